"""Single-shape probes and the reproducible question sets that the ablation and the nano model train on.

A probe is one small shape (14-24 px by default) on a light background; the question asks for its colour
(``probe_colour``), its kind (``probe_shape``) or the quarter of the image it lies in (``probe_where``; the shape
never straddles a midline). Sets mix probes with any kind of `llava_uhd.data.synthetic`::

    from llava_uhd.data.probes import SyntheticDataSettings, SyntheticSamples
    settings = SyntheticDataSettings(train_samples=100)
    train = SyntheticSamples(settings.train_samples, settings.seed, settings)       # sample i drawn on access
    held_out = SyntheticSamples(settings.eval_samples, settings.held_out_seed, settings)

With only generator kinds, sample ``i`` is exactly what ``generate_dataset(seed=seed, kinds=...)`` writes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .synthetic import (
    COLOURS,
    FINE_DETAIL_KINDS,
    KINDS,
    SHAPES,
    SyntheticSample,
    generate_sample,
    sample_seed,
    sample_size,
    shape_mask,
)

__all__ = [
    "PROBE_KINDS",
    "DEFAULT_KINDS",
    "FINE_KINDS",
    "ALL_KINDS",
    "SyntheticDataSettings",
    "SyntheticSamples",
    "probe_sample",
    "make_sample",
    "make_samples",
]

PROBE_KINDS: dict[str, tuple[str, str]] = {
    "probe_shape": ("What shape is the small shape?", "shape"),
    "probe_colour": ("What colour is the small shape?", "colour"),
    "probe_where": ("Which quarter of the image is the small shape in?", "quarter"),
}
"""name -> (question, answer type); answers are scored with `is_correct` (exact match after normalization)."""

DEFAULT_KINDS: tuple[str, ...] = ("probe_colour", "probe_shape", "probe_where", "grey_probe")
"""What the ablation and the nano model train and evaluate on by default: the three probes and the generator's
``grey_probe`` (a large band: a control that needs no fine detail). The generator's relational kinds
(``corner_colour``, ``edge_colour``, ``shape_at``: the shape nearest a corner or edge among 3-12; ``count``) did
not rise above the answer prior in the step budgets tried (records in ``results/``); they remain selectable."""

FINE_KINDS: tuple[str, ...] = tuple(FINE_DETAIL_KINDS) + tuple(PROBE_KINDS)
"""Kinds that need fine detail: the generator's and every probe."""

ALL_KINDS: tuple[str, ...] = tuple(KINDS) + tuple(PROBE_KINDS)
"""Every kind a set can hold."""


@dataclass
class SyntheticDataSettings:
    """The data of a run: which kinds, image sizes, how many samples, which seeds. The ablation's and the nano
    model's settings extend it (with their own defaults)."""

    kinds: tuple[str, ...] = DEFAULT_KINDS
    min_side: int = 64
    max_side: int = 448
    max_aspect: float = 6.0
    probe_size: tuple[int, int] = (14, 24)  # side of the probes' shape, in pixels
    train_samples: int = 6000
    eval_samples: int = 300
    seed: int = 0
    eval_seed: int | None = None  # None: seed + 1

    @property
    def held_out_seed(self) -> int:
        return self.seed + 1 if self.eval_seed is None else self.eval_seed

    def check(self) -> None:
        """``ValueError`` naming the first field out of range or the unknown kinds."""
        for name in ("train_samples", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = [k for k in self.kinds if k not in ALL_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"unknown kinds {unknown}; choose from {list(ALL_KINDS)}")


def probe_sample(seed: int, kind: str, settings: SyntheticDataSettings, size: tuple[int, int] | None = None
                 ) -> SyntheticSample:
    """One single-shape probe, drawn with `llava_uhd.data.synthetic`'s palette, masks and size sampler. ``size``
    (``(W, H)``) replaces the drawn size; the rest of the scene comes from the same random stream."""
    rng = random.Random(seed)
    w, h = sample_size(rng, settings.min_side, settings.max_side, settings.max_aspect)
    if size is not None:
        w, h = (int(v) for v in size)
        if min(w, h) < 2 * settings.probe_size[1] + 4:
            raise ValueError(f"size must be at least {2 * settings.probe_size[1] + 4} px per side for a "
                             f"{settings.probe_size[1]}-px probe shape, got {w}x{h}")
    background = tuple(rng.randint(205, 250) for _ in range(3))
    image = Image.new("RGB", (w, h), background)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    lo, hi = settings.probe_size
    side = min(rng.randint(max(lo, 12) if shape == "star" else lo, hi), min(w, h) // 2 - 2)
    # the shape never straddles a midline, so its quarter is never ambiguous
    xs = [x for x in range(1, w - side) if x + side <= w // 2 or x >= w - w // 2]
    ys = [y for y in range(1, h - side) if y + side <= h // 2 or y >= h - h // 2]
    x0, y0 = rng.choice(xs), rng.choice(ys)
    cx, cy = x0 + side / 2, y0 + side / 2
    image.paste(COLOURS[colour], (x0, y0, x0 + side, y0 + side), shape_mask(shape, side))
    quarter = ("top" if cy < h / 2 else "bottom") + "-" + ("left" if cx < w / 2 else "right")
    answer = {"probe_shape": shape, "probe_colour": colour, "probe_where": quarter}[kind]
    meta = {"width": w, "height": h, "seed": seed, "background": list(background),
            "shape": {"colour": colour, "shape": shape, "box": [x0, y0, x0 + side, y0 + side]}}
    return SyntheticSample(image=image, question=PROBE_KINDS[kind][0], answer=answer, kind=kind, metadata=meta)


def make_sample(index: int, seed: int, settings: SyntheticDataSettings) -> SyntheticSample:
    """Sample ``index`` of the set drawn with ``seed``. With only `llava_uhd.data.synthetic` kinds it is exactly
    the sample `generate_dataset(seed=seed, kinds=...)` writes; `PROBE_KINDS` are drawn with `probe_sample`."""
    kinds = list(settings.kinds)
    generator = [k for k in kinds if k not in PROBE_KINDS]
    sseed = sample_seed(seed, index)
    kind = random.Random(sseed).choice(kinds) if len(generator) < len(kinds) else None
    if kind is None or kind not in PROBE_KINDS:
        return generate_sample(sseed if kind is None else sseed + 1, generator if kind is None else [kind],
                               settings.min_side, settings.max_side, settings.max_aspect)
    return probe_sample(sseed + 1, kind, settings)


def make_samples(n: int, seed: int, settings: SyntheticDataSettings) -> list[SyntheticSample]:
    """Samples ``0..n-1`` with ``seed`` (`make_sample`)."""
    return [make_sample(i, seed, settings) for i in range(n)]


class SyntheticSamples:
    """The set of ``n`` samples drawn with ``seed``, as a map-style dataset: sample ``i`` (`make_sample`) is
    drawn when it is asked for, so a DataLoader's workers can draw them in parallel."""

    def __init__(self, n: int, seed: int, settings: SyntheticDataSettings):
        self.n, self.seed, self.settings = n, seed, settings

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} of a set of {self.n}")
        return make_sample(i, self.seed, self.settings)
