"""Drawing the synthetic scenes so that the pixels hold the ground truth exactly.

* shapes are drawn without anti-aliasing in exact palette colours (``COLOURS``), from binary masks (`shape_mask`)
  pasted at integer boxes that lie inside the image, at least 3 px apart from each other and from the text
  (`Canvas`), so every shape is one connected blob of its exact colour;
* backgrounds are light (every channel >= 195), solid or a gentle gradient, so never a palette colour, and the text
  is dark blue-black (``TEXT_COLOUR``), so its anti-aliased edges never take a palette colour either;
* sizes are relative to the image: shapes are 1.5-4 % of the short side (at least 8 px, stars 12), text 1.2-3 %
  (at least 9 px; 8 where a code would not fit), so a 2000-px image shrunk to 336 px loses them.

A scene is planned first (`plan_shape`, `plan_text` reserve free boxes on a `Canvas`), then drawn (`draw_shapes`,
`draw_text`) on a `draw_background`.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .vocabulary import CODE_DIGITS, CODE_LETTERS, COLOURS, SHAPES

__all__ = [
    "TEXT_COLOUR",
    "MIN_SHAPE_PX",
    "MIN_SHAPE_SIZES",
    "MIN_FONT_PX",
    "SHAPE_FRACTION",
    "FONT_FRACTION",
    "Canvas",
    "shape_mask",
    "load_font",
    "draw_background",
    "plan_shape",
    "draw_shapes",
    "plan_text",
    "draw_text",
    "text_metadata",
]

TEXT_COLOUR: tuple[int, int, int] = (20, 20, 70)
MIN_SHAPE_PX = 8
MIN_SHAPE_SIZES = {"star": 12}  # a star needs more pixels than the others to show its points
MIN_FONT_PX = 9
SHAPE_FRACTION = (0.015, 0.04)  # shape side, as a fraction of the image's short side
FONT_FRACTION = (0.012, 0.03)  # text size, as a fraction of the image's short side
_BACKGROUND_RANGE = (205, 250)  # light backgrounds: every channel in [195, 252] after the gradient


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


def load_font(size: int):
    """``(font, size)``: PIL's default font at ``size`` px, or ``(its one bitmap font, None)`` where it cannot be
    sized (Pillow < 10.1 or no FreeType)."""
    try:
        return ImageFont.load_default(size=size), size
    except (TypeError, OSError, ImportError, AttributeError):  # Pillow < 10.1 or no FreeType: one bitmap font
        return ImageFont.load_default(), None


def draw_background(rng: random.Random, w: int, h: int) -> tuple[Image.Image, dict[str, Any]]:
    """A light ``w x h`` RGB background, solid or a gentle gradient, and its metadata (``style``, ``colours``)."""
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


class Canvas:
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


def plan_shape(rng, canvas: Canvas, colour: str, shape: str) -> dict[str, Any] | None:
    """Reserve a free box on ``canvas`` for a shape of a random size: ``{"colour", "shape", "box", "center"}``, or
    None if there is no room."""
    s = _shape_size(rng, min(canvas.width, canvas.height), shape)
    box = canvas.place(rng, s, s, _gap(s))
    if box is None:
        return None
    return {"colour": colour, "shape": shape, "box": list(box), "center": [(box[0] + box[2]) / 2,
                                                                              (box[1] + box[3]) / 2]}


def draw_shapes(image: Image.Image, shapes: Sequence[dict[str, Any]]) -> None:
    """Paste planned shapes into ``image`` in their exact colours (no anti-aliasing)."""
    for sh in shapes:
        x0, y0, x1, y1 = sh["box"]
        image.paste(COLOURS[sh["colour"]], (x0, y0, x1, y1), _shape_mask_cached(sh["shape"], x1 - x0))


def _random_code(rng: random.Random, length: int) -> str:
    style = rng.choice(["digits", "letters", "mixed"])
    alphabet = {"digits": CODE_DIGITS, "letters": CODE_LETTERS, "mixed": CODE_DIGITS + CODE_LETTERS}[style]
    return "".join(rng.choice(alphabet) for _ in range(length))


def plan_text(rng: random.Random, canvas: Canvas, image: Image.Image) -> dict[str, Any] | None:
    """Choose a code, a font size and a free place for it; None if it does not fit."""
    w, h = canvas.width, canvas.height
    short = min(w, h)
    length = rng.randint(4, 6)
    code = _random_code(rng, length)
    size = max(MIN_FONT_PX, round(short * rng.uniform(*FONT_FRACTION)))
    draw = ImageDraw.Draw(image)
    while True:
        font, font_size = load_font(size)
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


def draw_text(image: Image.Image, text: dict[str, Any]) -> None:
    """Write a text planned by `plan_text` into ``image`` in ``TEXT_COLOUR``."""
    ImageDraw.Draw(image).text(tuple(text["origin"]), text["text"], fill=TEXT_COLOUR, font=text["_font"])


def text_metadata(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON-serializable fields of a text planned by `plan_text` (its font dropped); None for no text."""
    return None if text is None else {k: v for k, v in text.items() if not k.startswith("_")}
