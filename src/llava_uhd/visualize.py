"""Pictures of slicing plans, and a generated example image to try them on."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .slicing import SlicePlan

__all__ = ["draw_plan", "make_example_image"]

_GRID_COLOUR = (255, 40, 40)
_OVERVIEW_COLOUR = (40, 120, 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def _wrap(text: str, font, width: float) -> str:
    """``text`` broken into lines (at spaces) no wider than ``width`` pixels in ``font``."""
    lines = [""]
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and font.getlength(candidate) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return "\n".join(lines)


def _label(draw: ImageDraw.ImageDraw, centre: tuple[float, float], text: str, font, colour) -> None:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, align="center")
    w, h = right - left, bottom - top
    x, y = centre[0] - w / 2, centre[1] - h / 2
    draw.rectangle((x - 4, y - 3, x + w + 4, y + h + 5), fill=(255, 255, 255), outline=colour)
    draw.multiline_text((x - left, y - top), text, fill=(0, 0, 0), font=font, align="center")


def draw_plan(image: Image.Image, plan: SlicePlan, max_side: int = 900, queries: int = 64) -> Image.Image:
    """The image with the slice grid drawn over it (each slice labelled with its resized size and patch grid) and
    the overview, at its resized size, beside it; the title gives the grid, the ViT patches and the LLM tokens
    at ``queries`` resampler queries per crop, wrapped to the picture's width."""
    image = image.convert("RGB")
    scale = min(1.0, max_side / max(image.size))
    shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    overview = None
    if plan.overview is not None:
        overview = image.resize(plan.overview.size, Image.Resampling.BICUBIC)
    pad = 20
    ov_w = overview.width + pad if overview is not None else 0
    ov_h = overview.height if overview is not None else 0
    width = max(shown.width + ov_w + 2 * pad, 320)
    title_font = _font(16)
    title = _wrap(f"{plan.width}x{plan.height}: {plan.cols} cols x {plan.rows} rows, {len(plan.slices)} slice(s)"
                  + (" + overview" if overview is not None else " (not sliced)")
                  + f", {plan.num_patches} ViT patches, {plan.num_tokens(queries)} LLM tokens ({queries} queries "
                  "per crop)", title_font, width - 2 * pad)
    header = title.count("\n") * 20 + 34
    canvas = Image.new("RGB", (width, max(shown.height, ov_h + 40) + header + 2 * pad), (245, 245, 245))
    canvas.paste(shown, (pad, pad + header))
    draw = ImageDraw.Draw(canvas)
    font = _font(max(11, min(18, shown.width // max(1, 6 * plan.cols))))
    draw.multiline_text((pad, pad), title, fill=(0, 0, 0), font=title_font, spacing=4)
    for s in plan.slices:
        l, t, r, b = (round(v * scale) for v in s.box)
        box = (pad + l, pad + header + t, pad + max(l, r - 1), pad + header + max(t, b - 1))
        draw.rectangle(box, outline=_GRID_COLOUR, width=2)
        h_p, w_p = s.grid
        _label(draw, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), f"{s.size[0]}x{s.size[1]}\n{w_p}x{h_p} patches",
               font, _GRID_COLOUR)
    if overview is not None:
        x0, y0 = pad + shown.width + pad, pad + header
        canvas.paste(overview, (x0, y0))
        draw.rectangle((x0, y0, x0 + overview.width - 1, y0 + overview.height - 1), outline=_OVERVIEW_COLOUR, width=2)
        h_p, w_p = plan.overview.grid
        draw.text((x0, y0 + overview.height + 6), f"overview {overview.width}x{overview.height}\n{w_p}x{h_p} patches",
                  fill=(0, 0, 0), font=_font(14))
    return canvas


def make_example_image(width: int = 1008, height: int = 672, seed: int = 0) -> Image.Image:
    """A deterministic test picture with fine detail: a gradient, small shapes of several colours and kinds, and
    small text, so the effect of slicing and resizing is easy to see."""
    rng = random.Random(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([150 + 80 * yy / height, 190 + 40 * xx / width, 235 - 30 * yy / height], axis=-1)
    image = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colours = [(220, 30, 30), (30, 160, 60), (30, 60, 220), (240, 200, 20), (140, 40, 160), (128, 128, 128)]
    unit = max(4, min(width, height) // 30)
    for _ in range(24):
        x, y = rng.randrange(0, max(1, width - 2 * unit)), rng.randrange(0, max(1, height - 2 * unit))
        s = rng.randrange(unit // 2, 2 * unit)
        colour = rng.choice(colours)
        kind = rng.choice(["circle", "square", "triangle"])
        if kind == "circle":
            draw.ellipse((x, y, x + s, y + s), fill=colour, outline=(0, 0, 0))
        elif kind == "square":
            draw.rectangle((x, y, x + s, y + s), fill=colour, outline=(0, 0, 0))
        else:
            draw.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=colour, outline=(0, 0, 0))
    font = _font(max(8, unit // 2))
    for k in range(4):
        code = "".join(rng.choice("0123456789ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(6))
        draw.text((rng.randrange(0, max(1, width - 8 * unit)), rng.randrange(0, max(1, height - unit))),
                  f"code {code}", fill=(0, 0, 0), font=font)
    return image
