"""One synthetic sample: a random image size, a kind, its scene drawn, and the question with its answer.

    sample = generate_sample(7, kinds=["count"], max_side=800)  # SyntheticSample
    sample.image, sample.question, sample.answer, sample.conversations()

Deterministic from a seed: ``generate_sample(seed)`` uses only its own ``random.Random(seed)``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .drawing import draw_background, draw_shapes, draw_text
from .kinds import GENERATORS
from .vocabulary import KINDS, SHORT_ANSWER_PROMPT

__all__ = ["SyntheticSample", "check_kinds", "check_sizes", "generate_sample", "sample_size"]


@dataclass
class SyntheticSample:
    """One generated image with its question and its exactly checkable answer.

    ``metadata`` is JSON-serializable: ``width``, ``height``, ``seed`` (when generated from an int), ``background``,
    ``shapes`` (each ``{"colour", "shape", "box": [x0, y0, x1, y1] (exclusive), "center": [cx, cy]}``) and the
    kind's own fields (``target``, ``location``, ``text``, ``band``...).
    """

    image: Image.Image
    question: str
    answer: str
    kind: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def conversations(self, answer_prompt: str | None = SHORT_ANSWER_PROMPT) -> list[dict[str, str]]:
        """The LLaVA conversation: ``<image>`` and the question from the human, the answer from gpt."""
        human = f"<image>\n{self.question}" + (f"\n{answer_prompt}" if answer_prompt else "")
        return [{"from": "human", "value": human}, {"from": "gpt", "value": self.answer}]


def _as_rng(rng_or_seed: int | random.Random | np.random.Generator) -> tuple[random.Random, int | None]:
    if isinstance(rng_or_seed, random.Random):
        return rng_or_seed, None
    if isinstance(rng_or_seed, np.random.Generator):
        seed = int(rng_or_seed.integers(0, 2**63))
        return random.Random(seed), seed
    if isinstance(rng_or_seed, (int, np.integer)) and not isinstance(rng_or_seed, bool):
        return random.Random(int(rng_or_seed)), int(rng_or_seed)
    raise TypeError(f"rng_or_seed must be an int, random.Random or numpy Generator, got {type(rng_or_seed).__name__}")


def check_sizes(min_side: int, max_side: int, max_aspect: float) -> None:
    """Raise ValueError unless ``32 <= min_side <= max_side`` and ``max_aspect >= 1``."""
    if min_side < 32:
        raise ValueError(f"min_side must be >= 32, got {min_side}")
    if max_side < min_side:
        raise ValueError(f"max_side ({max_side}) must be >= min_side ({min_side})")
    if not max_aspect >= 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")


def sample_size(rng_or_seed: int | random.Random | np.random.Generator, min_side: int = 64, max_side: int = 2000,
                max_aspect: float = 6.0) -> tuple[int, int]:
    """A random ``(width, height)``: aspect ratio log-uniform in ``[1/A, A]`` with ``A = min(max_aspect,
    max_side/min_side)``, the long side uniform over what keeps both sides in ``[min_side, max_side]``.
    Guaranteed: ``min_side <= w, h <= max_side`` and ``max(w, h) / min(w, h) <= A``."""
    check_sizes(min_side, max_side, max_aspect)
    rng, _ = _as_rng(rng_or_seed)
    cap = min(float(max_aspect), max_side / min_side)
    ratio = math.exp(rng.uniform(-math.log(cap), math.log(cap)))  # width / height
    r = max(ratio, 1.0 / ratio)
    lo = min(max_side, max(min_side, math.ceil(min_side * r)))
    long = rng.randint(lo, max_side)
    short = min(long, max(min_side, math.ceil(long / r)))
    return (long, short) if ratio >= 1 else (short, long)


def check_kinds(kinds: Sequence[str] | str | None) -> list[str]:
    """``kinds`` as a non-empty list of known kind names (None: all of ``KINDS``); ValueError otherwise."""
    if kinds is None:
        return list(KINDS)
    if isinstance(kinds, str):
        kinds = [kinds]
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown kinds {unknown}; expected some of {list(KINDS)}")
    return kinds


def generate_sample(rng_or_seed: int | random.Random | np.random.Generator, kinds: Sequence[str] | str | None = None,
                    min_side: int = 64, max_side: int = 2000, max_aspect: float = 6.0,
                    size: tuple[int, int] | None = None) -> SyntheticSample:
    """One sample: a kind drawn uniformly from ``kinds`` (default: all), a size from `sample_size` (or ``size``,
    ``(W, H)``, when given), then the kind's scene, question and answer. Deterministic given an int seed (or the
    state of the ``random.Random`` passed, which it advances); a numpy Generator is used only to draw a seed."""
    kinds = check_kinds(kinds)
    check_sizes(min_side, max_side, max_aspect)
    rng, seed = _as_rng(rng_or_seed)
    kind = rng.choice(kinds)
    w, h = sample_size(rng, min_side, max_side, max_aspect)  # drawn even when ``size`` is given: same scene stream
    if size is not None:
        w, h = (int(v) for v in size)
        if w < 32 or h < 32:
            raise ValueError(f"size must be at least 32x32 (room for the scene), got {w}x{h}")
    image, background = draw_background(rng, w, h)
    question, answer, meta, shapes, text = GENERATORS[kind](rng, image, w, h)
    draw_shapes(image, shapes)
    if text is not None:
        draw_text(image, text)
    metadata = {"width": w, "height": h, "seed": seed, "background": background, **meta}
    return SyntheticSample(image=image, question=question, answer=answer, kind=kind, metadata=metadata)
