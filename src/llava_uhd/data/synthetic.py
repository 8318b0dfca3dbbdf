"""Synthetic images whose answers need fine detail, with questions and answers in the LLaVA instruction format.

Every sample is one image of random size (``min_side``..``max_side`` pixels per side) and aspect ratio (up to
``max_aspect``:1 either way) and one question whose short answer (a word, a number or a code) can be checked
exactly. Samples are reproducible from a seed: ``generate_sample(seed)`` uses only its own ``random.Random(seed)``.

Question kinds (``KINDS``; ``FINE_DETAIL_KINDS`` are those that need small details to answer):

* ``count``: "How many red circles are there?" (0-6, answered as a digit) over small shapes of several colours
  and kinds, some of them sharing the target's colour or kind;
* ``corner_colour`` / ``edge_colour``: "What colour is the shape nearest the top-left corner / the left edge?";
* ``shape_at``: "What shape is nearest the bottom-right corner / the top edge / the centre of the image?";
* ``read_text``: "What code is written in the image?" over a short code of digits and letters written small with
  PIL's default font (answer: the code exactly);
* ``grey_probe``: "What colour is the leftmost region of the image?" over an image with a band on one side, grey
  (LLaVA-1.5's padding colour (122, 116, 104) or plain grey) half of the time, another colour otherwise: a model that
  pads images with grey cannot tell grey content from its padding (the paper's Fig. 3).

How the ground truth is kept right:

* shapes are drawn without anti-aliasing in exact palette colours (``COLOURS``), from binary masks
  (``shape_mask``) pasted at integer boxes that lie inside the image, at least 3 px apart from each other and from
  the text, so every shape is one connected blob of its exact colour;
* backgrounds are light (every channel >= 195), solid or a gentle gradient, so never a palette colour, and the text
  is dark blue-black (``TEXT_COLOUR``), so its anti-aliased edges never take a palette colour either;
* "nearest" questions drop any shape with a different answer that is almost as near as the nearest one
  (within the largest shape size plus 15 % of the distance), so the nearest shape is unambiguous;
* sizes are relative to the image: shapes are 1.5-4 % of the short side (at least 8 px, stars 12), text 1.2-3 %
  (at least 9 px; 8 where a code would not fit), so a 2000-px image shrunk to 336 px loses them.

``generate_dataset`` writes the images under ``OUT/images/`` and the annotations as LLaVA instruction data (one
JSON list, or JSON lines), byte-identical for the same arguments. ``is_correct`` checks a model's answer
(case, punctuation, articles, "gray"/"grey" and number words do not matter).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COLOURS",
    "PADDING_GREY",
    "SHAPES",
    "TEXT_COLOUR",
    "KINDS",
    "FINE_DETAIL_KINDS",
    "SHORT_ANSWER_PROMPT",
    "KindInfo",
    "SyntheticSample",
    "sample_size",
    "shape_mask",
    "generate_sample",
    "generate_dataset",
    "sample_seed",
    "normalize_answer",
    "is_correct",
    "add_synth_arguments",
    "run_synth",
]

# ------------------------------------------------------------------------------------------------ vocabulary
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
    "pink": (240, 110, 180),
    "grey": (128, 128, 128),
}
"""Shape colours, by the name used in questions and answers. Every one has a channel <= 130."""

PADDING_GREY: tuple[int, int, int] = (122, 116, 104)
"""LLaVA-1.5's padding colour: the CLIP mean times 255, truncated (``tuple(int(x * 255) for x in mean)``)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}

TEXT_COLOUR: tuple[int, int, int] = (20, 20, 70)
CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
EDGES: tuple[str, ...] = ("top", "bottom", "left", "right")
CODE_DIGITS = "23456789"  # no 0/1 (O, I, L look alike)
CODE_LETTERS = "ACEFGHJKMNPRTUVWXY"  # no B D I L O Q S Z (8 0 1 1 0 0 5 2 look alike)

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
"""LLaVA-1.5's prompt for short answers, appended to the question in the human turn by default."""

MIN_SHAPE_PX = 8
MIN_SHAPE_SIZES = {"star": 12}  # a star needs more pixels than the others to show its points
MIN_FONT_PX = 9
SHAPE_FRACTION = (0.015, 0.04)  # shape side, as a fraction of the image's short side
FONT_FRACTION = (0.012, 0.03)  # text size, as a fraction of the image's short side
_BACKGROUND_RANGE = (205, 250)  # light backgrounds: every channel in [195, 252] after the gradient


@dataclass(frozen=True)
class KindInfo:
    """One question kind: its name, what it asks, the type of its answer and whether it needs fine detail."""

    name: str
    description: str
    answer_type: str  # "number", "colour", "shape" or "code"
    fine_detail: bool


KINDS: dict[str, KindInfo] = {
    "count": KindInfo("count", "how many small shapes of a colour and/or kind (0-6, a digit)", "number", True),
    "corner_colour": KindInfo("corner_colour", "colour of the small shape nearest a corner", "colour", True),
    "edge_colour": KindInfo("edge_colour", "colour of the small shape nearest an edge", "colour", True),
    "shape_at": KindInfo("shape_at", "kind of the small shape nearest a corner, an edge or the centre", "shape", True),
    "read_text": KindInfo("read_text", "a short code of digits and letters written small", "code", True),
    "grey_probe": KindInfo("grey_probe", "colour of a band on one side, often LLaVA-1.5's grey padding colour "
                                         "(the paper's Fig. 3)", "colour", False),
}
"""Every question kind, by name."""

FINE_DETAIL_KINDS: tuple[str, ...] = tuple(k for k, info in KINDS.items() if info.fine_detail)


# ------------------------------------------------------------------------------------------------ samples
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


def _check_sizes(min_side: int, max_side: int, max_aspect: float) -> None:
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
    _check_sizes(min_side, max_side, max_aspect)
    rng, _ = _as_rng(rng_or_seed)
    cap = min(float(max_aspect), max_side / min_side)
    ratio = math.exp(rng.uniform(-math.log(cap), math.log(cap)))  # width / height
    r = max(ratio, 1.0 / ratio)
    lo = min(max_side, max(min_side, math.ceil(min_side * r)))
    long = rng.randint(lo, max_side)
    short = min(long, max(min_side, math.ceil(long / r)))
    return (long, short) if ratio >= 1 else (short, long)


# ------------------------------------------------------------------------------------------------ drawing
def _inside_polygon(xs: np.ndarray, ys: np.ndarray, points: Sequence[tuple[float, float]]) -> np.ndarray:
    """Even-odd rule for the points (xs, ys) against a closed polygon."""
    inside = np.zeros(np.broadcast(xs, ys).shape, dtype=bool)
    n = len(points)
    for k in range(n):
        (x0, y0), (x1, y1) = points[k], points[(k + 1) % n]
        if y0 == y1:
            continue
        crosses = (ys >= min(y0, y1)) & (ys < max(y0, y1))
        x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_at)
    return inside


@lru_cache(maxsize=1024)
def _shape_mask_cached(shape: str, size: int) -> Image.Image:
    # Pixel (x, y) is in the shape when its centre (x + 0.5, y + 0.5) is, the shape spanning [0, s] x [0, s]: masks
    # are mirror-symmetric left-right like the shapes, and never anti-aliased.
    s = size
    ys, xs = np.mgrid[0:s, 0:s] + 0.5
    c = s / 2
    if shape == "circle":
        mask = (xs - c) ** 2 + (ys - c) ** 2 <= c * c
    elif shape == "square":
        mask = np.ones((s, s), dtype=bool)
    elif shape == "triangle":  # apex up: row y is (y + 1) pixels wide about the centre, the last row full
        mask = np.abs(xs - c) <= (ys + 0.5) / 2
    elif shape == "star":  # five points, the top one up, as large as fits, centred
        outer = s / (2 * math.sin(2 * math.pi / 5))
        inner = outer * 0.5
        cy = outer + (s - outer * (1 + math.cos(math.pi / 5))) / 2
        points = [(c + (outer if k % 2 == 0 else inner) * math.sin(k * math.pi / 5),
                   cy - (outer if k % 2 == 0 else inner) * math.cos(k * math.pi / 5)) for k in range(10)]
        mask = _inside_polygon(xs, ys, points)
    elif shape == "cross":  # a plus sign, arms a third of the side thick
        # arms about a third of the side, with the parity of the side so both margins are equal (symmetric)
        t = min((t for t in range(2 - s % 2, s + 1, 2)), key=lambda t: (abs(t - s / 3), t))
        a = (s - t) // 2
        mask = np.zeros((s, s), dtype=bool)
        mask[a:a + t, :] = True
        mask[:, a:a + t] = True
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


def shape_mask(shape: str, size: int) -> Image.Image:
    """The binary ('L', 0/255) ``size x size`` mask of a shape, as pasted into the images (not anti-aliased)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return _shape_mask_cached(shape, int(size)).copy()


def _font(size: int):
    try:
        return ImageFont.load_default(size=size), size
    except (TypeError, OSError, ImportError, AttributeError):  # Pillow < 10.1 or no FreeType: one bitmap font
        return ImageFont.load_default(), None


def _background(rng: random.Random, w: int, h: int) -> tuple[Image.Image, dict[str, Any]]:
    lo, hi = _BACKGROUND_RANGE
    c0 = [rng.randint(lo, hi) for _ in range(3)]
    style = rng.choice(["solid", "horizontal", "vertical", "diagonal"])
    if style == "solid":
        return Image.new("RGB", (w, h), tuple(c0)), {"style": style, "colours": [c0]}
    c1 = [min(252, max(195, c + rng.randint(-35, 35))) for c in c0]
    if style == "horizontal":
        num, den = np.arange(w, dtype=np.int32)[None, :], max(1, w - 1)
    elif style == "vertical":
        num, den = np.arange(h, dtype=np.int32)[:, None], max(1, h - 1)
    else:  # diagonal, top-left to bottom-right; integer arithmetic so the pixels are the same everywhere
        num = np.arange(w, dtype=np.int32)[None, :] * h + np.arange(h, dtype=np.int32)[:, None] * w
        den = max(1, (w - 1) * h + (h - 1) * w)
    channels = [np.broadcast_to((a + (b - a) * num // den).astype(np.uint8), (h, w)) for a, b in zip(c0, c1)]
    image = Image.fromarray(np.ascontiguousarray(np.stack(channels, axis=-1)))
    return image, {"style": style, "colours": [c0, c1]}


class _Canvas:
    """Integer boxes (x0, y0, x1, y1), exclusive, that must not come within ``gap`` of each other."""

    def __init__(self, width: int, height: int, region: tuple[int, int, int, int] | None = None):
        self.width, self.height = width, height
        self.region = region or (0, 0, width, height)
        self.boxes: list[tuple[int, int, int, int]] = []

    def fits(self, box, gap: int) -> bool:
        x0, y0, x1, y1 = box
        return all(x1 + gap <= a0 or a1 + gap <= x0 or y1 + gap <= b0 or b1 + gap <= y0
                   for a0, b0, a1, b1 in self.boxes)

    def place(self, rng: random.Random, bw: int, bh: int, gap: int, tries: int = 60):
        """A free box of ``bw x bh`` at least 1 px inside the region, or None."""
        rx0, ry0, rx1, ry1 = self.region
        if rx1 - rx0 - 2 < bw or ry1 - ry0 - 2 < bh:
            return None
        for _ in range(tries):
            x = rng.randint(rx0 + 1, rx1 - 1 - bw)
            y = rng.randint(ry0 + 1, ry1 - 1 - bh)
            box = (x, y, x + bw, y + bh)
            if self.fits(box, gap):
                self.boxes.append(box)
                return box
        return None


def _shape_size(rng: random.Random, short: int, shape: str) -> int:
    return max(MIN_SHAPE_SIZES.get(shape, MIN_SHAPE_PX), round(short * rng.uniform(*SHAPE_FRACTION)))


def _gap(size: int) -> int:
    return max(3, size // 3)


def _plan_shape(rng, canvas: _Canvas, colour: str, shape: str) -> dict[str, Any] | None:
    s = _shape_size(rng, min(canvas.width, canvas.height), shape)
    box = canvas.place(rng, s, s, _gap(s))
    if box is None:
        return None
    return {"colour": colour, "shape": shape, "box": list(box), "center": [(box[0] + box[2]) / 2,
                                                                              (box[1] + box[3]) / 2]}


def _draw_shapes(image: Image.Image, shapes: Sequence[dict[str, Any]]) -> None:
    for sh in shapes:
        x0, y0, x1, y1 = sh["box"]
        image.paste(COLOURS[sh["colour"]], (x0, y0, x1, y1), _shape_mask_cached(sh["shape"], x1 - x0))


def _random_code(rng: random.Random, length: int) -> str:
    style = rng.choice(["digits", "letters", "mixed"])
    alphabet = {"digits": CODE_DIGITS, "letters": CODE_LETTERS, "mixed": CODE_DIGITS + CODE_LETTERS}[style]
    return "".join(rng.choice(alphabet) for _ in range(length))


def _plan_text(rng: random.Random, canvas: _Canvas, image: Image.Image) -> dict[str, Any] | None:
    """Choose a code, a font size and a free place for it; None if it does not fit."""
    w, h = canvas.width, canvas.height
    short = min(w, h)
    length = rng.randint(4, 6)
    code = _random_code(rng, length)
    size = max(MIN_FONT_PX, round(short * rng.uniform(*FONT_FRACTION)))
    draw = ImageDraw.Draw(image)
    while True:
        font, font_size = _font(size)
        left, top, right, bottom = draw.textbbox((0, 0), code, font=font)
        tw, th = right - left, bottom - top
        rx0, ry0, rx1, ry1 = canvas.region
        if tw + 4 <= rx1 - rx0 and th + 4 <= ry1 - ry0:
            break
        if font_size is not None and size > 8:
            size -= 1
        elif len(code) > 3:
            code = code[:-1]
        else:
            return None
    box = canvas.place(rng, tw, th, max(3, th // 3))
    if box is None:
        return None
    origin = (box[0] - left, box[1] - top)
    return {"text": code, "font_size": font_size, "box": list(box), "origin": list(origin), "_font": font}


def _draw_text(image: Image.Image, text: dict[str, Any]) -> None:
    ImageDraw.Draw(image).text(tuple(text["origin"]), text["text"], fill=TEXT_COLOUR, font=text["_font"])


def _public(text: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if text is None else {k: v for k, v in text.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------------ the kinds
def _distances(shapes, location: str, w: int, h: int) -> list[float]:
    out = []
    for sh in shapes:
        cx, cy = sh["center"]
        if location in CORNERS:
            vy, hx = location.split("-")
            dx = cx if hx == "left" else w - cx
            dy = cy if vy == "top" else h - cy
            out.append(math.hypot(dx, dy))
        elif location == "top":
            out.append(cy)
        elif location == "bottom":
            out.append(h - cy)
        elif location == "left":
            out.append(cx)
        elif location == "right":
            out.append(w - cx)
        else:  # centre
            out.append(math.hypot(cx - w / 2, cy - h / 2))
    return out


def _random_shapes(rng, canvas, n: int, avoid: Callable[[str, str], bool] = lambda c, s: False):
    shapes = []
    for _ in range(n):
        for _ in range(20):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            if not avoid(colour, shape):
                break
        else:
            continue
        planned = _plan_shape(rng, canvas, colour, shape)
        if planned is not None:
            shapes.append(planned)
    return shapes


def _maybe_distractor_text(rng, canvas, image):
    return _plan_text(rng, canvas, image) if rng.random() < 0.3 else None


def _kind_count(rng, image, w, h):
    canvas = _Canvas(w, h)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    variant = rng.choice(["colour_shape", "colour_shape", "colour", "shape"])
    target_colour = colour if variant in ("colour_shape", "colour") else None
    target_shape = shape if variant in ("colour_shape", "shape") else None

    def matches(c, s):
        return (target_colour is None or c == target_colour) and (target_shape is None or s == target_shape)

    k = rng.randint(0, 6)
    shapes = []
    for _ in range(k):
        planned = _plan_shape(rng, canvas, colour, shape)
        if planned is not None:
            shapes.append(planned)
    answer = len(shapes)
    # Distractors: about half share the target's colour or kind, so the question needs the detail.
    for _ in range(rng.randint(2, 8)):
        for _ in range(20):
            c = colour if rng.random() < 0.3 else rng.choice(list(COLOURS))
            s = shape if rng.random() < 0.3 else rng.choice(SHAPES)
            if not matches(c, s):
                break
        else:
            continue
        planned = _plan_shape(rng, canvas, c, s)
        if planned is not None:
            shapes.append(planned)
    order = list(range(len(shapes)))
    rng.shuffle(order)  # no meaning in the order of the list
    shapes = [shapes[i] for i in order]
    text = _maybe_distractor_text(rng, canvas, image)
    if variant == "colour_shape":
        question = f"How many {colour} {_PLURAL[shape]} are there?"
    elif variant == "colour":
        question = f"How many {colour} shapes are there?"
    else:
        question = f"How many {_PLURAL[shape]} are there?"
    meta = {"target": {"colour": target_colour, "shape": target_shape}, "shapes": shapes, "text": _public(text)}
    return question, str(answer), meta, shapes, text


def _nearest(rng, image, w, h, locations, attr):
    canvas = _Canvas(w, h)
    shapes = _random_shapes(rng, canvas, rng.randint(3, 12))
    location = rng.choice(locations)
    dist = _distances(shapes, location, w, h)
    order = sorted(range(len(shapes)), key=lambda i: (dist[i], i))
    best = order[0]
    biggest = max(sh["box"][2] - sh["box"][0] for sh in shapes)
    margin = biggest + 0.15 * dist[best]
    dropped = [i for i in order[1:] if dist[i] < dist[best] + margin and shapes[i][attr] != shapes[best][attr]]
    kept = [sh for i, sh in enumerate(shapes) if i not in set(dropped)]
    canvas.boxes = [tuple(sh["box"]) for sh in kept]
    text = _maybe_distractor_text(rng, canvas, image)
    meta = {"location": location, "nearest": dict(shapes[best]), "shapes": kept, "text": _public(text),
            "dropped": len(dropped)}
    return location, shapes[best][attr], meta, kept, text


def _kind_corner_colour(rng, image, w, h):
    location, answer, meta, shapes, text = _nearest(rng, image, w, h, CORNERS, "colour")
    return f"What colour is the shape nearest the {location} corner?", answer, meta, shapes, text


def _kind_edge_colour(rng, image, w, h):
    location, answer, meta, shapes, text = _nearest(rng, image, w, h, EDGES, "colour")
    return f"What colour is the shape nearest the {location} edge?", answer, meta, shapes, text


def _kind_shape_at(rng, image, w, h):
    location, answer, meta, shapes, text = _nearest(rng, image, w, h, CORNERS + EDGES + ("centre",), "shape")
    where = ("the centre of the image" if location == "centre"
             else f"the {location} corner" if location in CORNERS else f"the {location} edge")
    return f"What shape is nearest {where}?", answer, meta, shapes, text


def _kind_read_text(rng, image, w, h):
    canvas = _Canvas(w, h)
    text = _plan_text(rng, canvas, image)
    if text is None:  # cannot happen for min_side >= 32; kept as a guard
        raise RuntimeError(f"no room for a code in a {w}x{h} image")
    shapes = _random_shapes(rng, canvas, rng.randint(0, 8))
    question = rng.choice(["What code is written in the image?", "What is the code written in the image?"])
    return question, text["text"], {"shapes": shapes, "text": _public(text)}, shapes, text


def _kind_grey_probe(rng, image, w, h):
    side = rng.choice(EDGES)
    frac = rng.uniform(0.15, 0.35)
    if side in ("left", "right"):
        t = max(4, round(w * frac))
        band = (0, 0, t, h) if side == "left" else (w - t, 0, w, h)
    else:
        t = max(4, round(h * frac))
        band = (0, 0, w, t) if side == "top" else (0, h - t, w, h)
    if rng.random() < 0.5:
        name, rgb = "grey", rng.choice([PADDING_GREY, COLOURS["grey"]])
    else:
        name = rng.choice([c for c in COLOURS if c != "grey"])
        rgb = COLOURS[name]
    gap = 3
    x0, y0, x1, y1 = band
    region = {"left": (x1 + gap, 0, w, h), "right": (0, 0, x0 - gap, h),
              "top": (0, y1 + gap, w, h), "bottom": (0, 0, w, y0 - gap)}[side]
    canvas = _Canvas(w, h, region)
    shapes = _random_shapes(rng, canvas, rng.randint(0, 8))
    text = _maybe_distractor_text(rng, canvas, image)
    image.paste(tuple(rgb), band)
    # LLaVA-1.5 pads a landscape image at the top and bottom, a portrait one at the left and right.
    padded = ("top", "bottom") if w > h else ("left", "right") if h > w else ()
    word = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}[side]
    meta = {"band": {"side": side, "box": list(band), "rgb": list(rgb),
                     "padding_colour": list(rgb) == list(PADDING_GREY), "on_llava15_padded_side": side in padded},
            "shapes": shapes, "text": _public(text)}
    return f"What colour is the {word} region of the image?", name, meta, shapes, text


_GENERATORS: dict[str, Callable] = {
    "count": _kind_count,
    "corner_colour": _kind_corner_colour,
    "edge_colour": _kind_edge_colour,
    "shape_at": _kind_shape_at,
    "read_text": _kind_read_text,
    "grey_probe": _kind_grey_probe,
}
assert set(_GENERATORS) == set(KINDS)


def _check_kinds(kinds: Sequence[str] | str | None) -> list[str]:
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
    kinds = _check_kinds(kinds)
    _check_sizes(min_side, max_side, max_aspect)
    rng, seed = _as_rng(rng_or_seed)
    kind = rng.choice(kinds)
    w, h = sample_size(rng, min_side, max_side, max_aspect)  # drawn even when ``size`` is given: same scene stream
    if size is not None:
        w, h = (int(v) for v in size)
        if w < 32 or h < 32:
            raise ValueError(f"size must be at least 32x32 (room for the scene), got {w}x{h}")
    image, background = _background(rng, w, h)
    question, answer, meta, shapes, text = _GENERATORS[kind](rng, image, w, h)
    _draw_shapes(image, shapes)
    if text is not None:
        _draw_text(image, text)
    metadata = {"width": w, "height": h, "seed": seed, "background": background, **meta}
    return SyntheticSample(image=image, question=question, answer=answer, kind=kind, metadata=metadata)


# ------------------------------------------------------------------------------------------------ datasets
def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a dataset generated with ``seed`` (63 bits of SHA-256 of both)."""
    digest = hashlib.sha256(f"llava-uhd-synthetic:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


_IMAGE_FORMATS = {"png": ("PNG", "png"), "jpg": ("JPEG", "jpg"), "jpeg": ("JPEG", "jpg")}


def _save_image(image: Image.Image, path: Path, fmt: str, compress_level: int) -> None:
    if fmt == "PNG":
        image.save(path, format="PNG", compress_level=compress_level)
    else:  # lossy: the colours of small shapes are no longer exact
        image.save(path, format="JPEG", quality=95, subsampling=0)


def generate_dataset(out_dir: str | Path, n: int, seed: int = 0, kinds: Sequence[str] | str | None = None,
                     format: str = "json", image_format: str = "png", min_side: int = 64, max_side: int = 2000,
                     max_aspect: float = 6.0, progress: bool = True, answer_prompt: str | None = SHORT_ANSWER_PROMPT,
                     compress_level: int = 6, workers: int = 1) -> Path:
    """Write ``n`` samples: images to ``out_dir/images/NNNNNN.png`` and the annotations to ``out_dir/synthetic.json``
    (a JSON list, ``format="json"``) or ``out_dir/synthetic.jsonl`` (one record a line); returns that file's path.

    Each record is LLaVA instruction data plus fields for evaluation::

        {"id": "synth-0-000000", "image": "images/000000.png",
         "conversations": [{"from": "human", "value": "<image>\\nQUESTION\\nAnswer the question using a single ..."},
                           {"from": "gpt", "value": "ANSWER"}],
         "kind": "count", "answer": "ANSWER", "question": "QUESTION", "metadata": {...}}

    ``image`` is relative to ``out_dir`` (use ``out_dir`` as LLaVA's image folder). Sample ``i`` is
    ``generate_sample(sample_seed(seed, i), ...)``, so the same arguments give byte-identical annotations and images
    whatever ``workers`` is (threads; PNG encoding releases the GIL). PNGs are written with zlib level
    ``compress_level`` (6, PIL's default; 1 is faster, the pixels are the same at every level);
    ``image_format="jpg"`` is lossy.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if format not in ("json", "jsonl"):
        raise ValueError(f"format must be 'json' or 'jsonl', got {format!r}")
    if image_format.lower() not in _IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_IMAGE_FORMATS)}, got {image_format!r}")
    kinds = _check_kinds(kinds)
    _check_sizes(min_side, max_side, max_aspect)
    pil_format, ext = _IMAGE_FORMATS[image_format.lower()]
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(max(0, n - 1))))

    def one(i: int) -> dict[str, Any]:
        sample = generate_sample(sample_seed(seed, i), kinds, min_side, max_side, max_aspect)
        rel = f"images/{i:0{digits}d}.{ext}"
        _save_image(sample.image, out_dir / rel, pil_format, compress_level)
        return {"id": f"synth-{seed}-{i:0{digits}d}", "image": rel,
                "conversations": sample.conversations(answer_prompt), "kind": sample.kind,
                "question": sample.question, "answer": sample.answer, "metadata": sample.metadata}

    bar = _progress(n, progress)
    records: list[dict[str, Any]] = []
    try:
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                for record in pool.map(one, range(n)):
                    records.append(record)
                    bar.update(1)
        else:
            for i in range(n):
                records.append(one(i))
                bar.update(1)
    finally:
        bar.close()
    path = out_dir / f"synthetic.{format}"
    if format == "json":
        # one JSON list, one record a line: what LLaVA reads, compact, and easy to diff
        text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n" if records else "[]\n"
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")
    return path


class _NoBar:
    def update(self, k: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; be quiet without it
        return _NoBar()
    return tqdm(total=total, desc="synthetic samples", unit="img")


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read back the annotations written by `generate_dataset` (JSON list or JSON lines)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


# ------------------------------------------------------------------------------------------------ evaluation
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_SYNONYMS = {"gray": "grey", "violet": "purple", "plus": "cross"}
_ARTICLES = {"a", "an", "the"}
_COLOUR_WORDS = set(COLOURS) | {"white", "black", "brown", "cyan", "magenta", "beige", "tan", "silver", "gold",
                                "teal", "navy", "olive", "maroon", "turquoise", "lime", "indigo"}
_SHAPE_WORDS = set(SHAPES) | {"rectangle", "oval", "ellipse", "diamond", "pentagon", "hexagon", "octagon", "dot",
                              "heart", "arrow", "line"}
_SINGULAR = {plural: s for s, plural in _PLURAL.items()} | {
    "rectangles": "rectangle", "ovals": "oval", "ellipses": "ellipse", "diamonds": "diamond", "dots": "dot"}


def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, articles dropped, number words to digits (zero-twenty), "gray" ->
    "grey", "violet" -> "purple", "plus" -> "cross", whitespace collapsed: ``"The answer is Three."`` ->
    ``"answer is 3"``."""
    tokens = re.sub(r"[^0-9a-z]+", " ", str(text).lower()).split()
    tokens = [_SYNONYMS.get(_NUMBER_WORDS.get(t, t), _NUMBER_WORDS.get(t, t)) for t in tokens]
    return " ".join(t for t in tokens if t not in _ARTICLES)


def _code_key(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", str(text).lower())


def is_correct(prediction: str, answer: str, kind: str | None = None) -> bool:
    """Whether a model's ``prediction`` gives ``answer``, ignoring case, punctuation and articles.

    * number kinds (``count``): the prediction names exactly one number, the answer (digits or words: "3",
      "three", "There are 3."; "none" counts as 0);
    * colour kinds: exactly one colour word, the answer ("Red.", "It is red"; not "red or blue"; "gray" = "grey");
    * ``shape_at``: exactly one shape word, the answer (plurals and "plus" for "cross" accepted);
    * ``read_text``: the code, case-insensitive, with or without spaces between characters ("a7k9", "A 7 K 9",
      "The code is A7K9");
    * unknown kinds: equal after `normalize_answer`.
    """
    info = KINDS.get(kind) if kind is not None else None
    answer_type = info.answer_type if info is not None else None
    if answer_type == "code":
        target = _code_key(answer)
        if not target:
            return False
        tokens = re.findall(r"[0-9a-z]+", str(prediction).lower())
        for i in range(len(tokens)):  # a run of tokens that spells the code ("A7K9", "A 7 K 9", "A7 K9")
            joined = ""
            for tok in tokens[i:]:
                joined += tok
                if joined == target:
                    return True
                if not target.startswith(joined):
                    break
        return False
    pred, ans = normalize_answer(prediction), normalize_answer(answer)
    if pred == ans:
        return bool(ans)
    tokens = pred.split()
    if answer_type == "number":
        if not ans.isdigit():
            return False
        numbers = {str(int(t)) for t in tokens if t.isdigit()} | ({"0"} if "none" in tokens else set())
        return numbers == {str(int(ans))}
    if answer_type == "colour":
        return {t for t in tokens if t in _COLOUR_WORDS} == {ans}
    if answer_type == "shape":
        found = {_SINGULAR.get(t, t) for t in tokens}
        return found & _SHAPE_WORDS == {_SINGULAR.get(ans, ans)}
    return False


# ------------------------------------------------------------------------------------------------ CLI
def add_synth_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``llava-uhd synth`` options to ``parser`` (for the CLI)."""
    parser.add_argument("--out", required=True, help="output folder (images/ and synthetic.json[l] are written there)")
    parser.add_argument("--n", type=int, default=100, help="number of samples (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=None, metavar="KIND",
                        help=f"question kinds to draw from (default all: {', '.join(KINDS)})")
    parser.add_argument("--min-side", type=int, default=64, help="shortest image side in pixels (default 64, >= 32)")
    parser.add_argument("--max-side", type=int, default=2000, help="longest image side in pixels (default 2000)")
    parser.add_argument("--max-aspect", type=float, default=6.0, help="largest aspect ratio, either way (default 6)")
    parser.add_argument("--format", choices=["json", "jsonl"], default="json",
                        help="annotations as one JSON list (LLaVA) or JSON lines (default json)")
    parser.add_argument("--image-format", choices=["png", "jpg"], default="png",
                        help="png (exact colours; default) or jpg (lossy)")
    parser.add_argument("--workers", type=int, default=1, help="threads encoding images (default 1)")
    parser.add_argument("--no-answer-prompt", action="store_true",
                        help=f"do not append {SHORT_ANSWER_PROMPT!r} to the questions")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_synth(args) -> int:
    """Generate the dataset described by parsed `add_synth_arguments` options and print a summary."""
    start = time.perf_counter()
    try:
        path = generate_dataset(
            args.out, args.n, args.seed, kinds=args.kinds, format=args.format, image_format=args.image_format,
            min_side=args.min_side, max_side=args.max_side, max_aspect=args.max_aspect,
            progress=not args.no_progress, workers=max(1, args.workers),
            answer_prompt=None if args.no_answer_prompt else SHORT_ANSWER_PROMPT)
    except ValueError as e:
        print(f"llava-uhd synth: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    records = load_records(path)
    print(f"wrote {len(records)} samples to {path} (images in {Path(args.out) / 'images'}) in {elapsed:.1f} s")
    if records:
        counts = Counter(r["kind"] for r in records)
        widths = [r["metadata"]["width"] for r in records]
        heights = [r["metadata"]["height"] for r in records]
        aspects = [max(w, h) / min(w, h) for w, h in zip(widths, heights)]
        print("kind            samples  fine-detail")
        for kind in KINDS:
            if counts[kind]:
                print(f"  {kind:<14}{counts[kind]:>8}  {'yes' if KINDS[kind].fine_detail else 'no'}")
        print(f"width {min(widths)}-{max(widths)} px, height {min(heights)}-{max(heights)} px, "
              f"aspect ratio up to {max(aspects):.2f}:1, "
              f"{sum(w * h for w, h in zip(widths, heights)) / 1e6:.1f} Mpixels in all")
    return 0
