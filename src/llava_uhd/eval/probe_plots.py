"""The probes' pictures, drawn with PIL only (no matplotlib: the ``nano`` extra suffices).

    heat_map(summary, width=896, height=672, title="nano", slices=[[0, 0, 299, 336], ...]).save("position.png")
    distribution_plot(summary, title="nano").save("resolution.png")
    padding_plot(summary, title="nano").save("padding.png")
    side_by_side([a, b], gap=16).save("both.png")

Each takes `llava_uhd.eval.probes.aggregate`'s summary. The heat map keeps the canvas's aspect ratio: one cell per
grid cell, coloured by its value (share right, or the mean number answered with the truth marked) with the number
written in it, and the model's slice boundaries drawn over it when known. The resolution plot stacks each size's
answers (right / wrong / unreadable, or the numbers answered); the padding plot sets grey bands' accuracy beside
coloured bands' per aspect ratio.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw

from ..data.synthetic.drawing import load_font

__all__ = ["colour_map", "heat_map", "distribution_plot", "padding_plot", "side_by_side"]

_WHITE, _INK, _GRID = (255, 255, 255), (30, 30, 30), (200, 200, 200)
_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
_CATEGORY = {"right": (60, 160, 80), "wrong": (210, 70, 60), "unreadable": (170, 170, 170)}
_NUMBERS = [(49, 54, 149), (69, 117, 180), (116, 173, 209), (171, 217, 233), (253, 174, 97), (244, 109, 67),
            (215, 48, 39), (165, 0, 38)]


def _font(size: int):
    return load_font(size)[0]


def colour_map(t: float) -> tuple[int, int, int]:
    """A viridis-like colour for ``t`` in [0, 1] (clipped)."""
    t = min(1.0, max(0.0, float(t))) * (len(_VIRIDIS) - 1)
    k = min(int(t), len(_VIRIDIS) - 2)
    a, b, f = _VIRIDIS[k], _VIRIDIS[k + 1], t - k
    return tuple(round(x + (y - x) * f) for x, y in zip(a, b))


def _text_on(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    return _INK if sum(fill) > 380 else _WHITE


def _centered(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - (right - left) / 2 - left, xy[1] - (bottom - top) / 2 - top), text, font=font, fill=fill)


def heat_map(summary: dict[str, Any], width: int, height: int, title: str = "",
             slices: list[list[int]] | None = None, plot_width: int = 560) -> Image.Image:
    """The position probe's heat map: ``summary["grid"][row][col]`` over a ``width x height`` canvas scaled to
    ``plot_width``, the ``slices`` boxes (canvas pixels) drawn as dashed-free white lines, a colour bar below."""
    grid = summary["grid"]
    rows, cols = len(grid), len(grid[0])
    count = summary["answer_type"] == "count"
    truth = float(summary["truth"]) if count and summary.get("truth") is not None else None
    top_value = max([2 * truth if truth else 1.0] + [v for row in grid for v in row if v is not None]) if count \
        else 1.0
    scale = plot_width / width
    ph = round(height * scale)
    pad, head, foot = 16, 44, 62
    image = Image.new("RGB", (plot_width + 2 * pad, ph + head + foot), _WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((pad, 8), title, font=_font(16), fill=_INK)
    what = f"mean count answered (truth {summary['truth']})" if count else "share of right answers"
    draw.text((pad, 27), what, font=_font(12), fill=_INK)
    x0, y0 = pad, head
    cell_font = _font(max(10, min(18, round(plot_width / cols / 4))))
    for r in range(rows):
        for c in range(cols):
            box = (x0 + round(c * plot_width / cols), y0 + round(r * ph / rows),
                   x0 + round((c + 1) * plot_width / cols), y0 + round((r + 1) * ph / rows))
            value = grid[r][c]
            fill = _GRID if value is None else colour_map(value / top_value)
            draw.rectangle(box, fill=fill, outline=_WHITE)
            text = "-" if value is None else (f"{value:.1f}" if count else f"{100 * value:.0f}")
            _centered(draw, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), text, cell_font, _text_on(fill))
    for left, top, right, bottom in slices or []:
        draw.rectangle((x0 + left * scale, y0 + top * scale, x0 + right * scale - 1, y0 + bottom * scale - 1),
                       outline=(255, 60, 200), width=2)
    # the colour bar
    by = y0 + ph + 14
    for k in range(plot_width):
        draw.line((x0 + k, by, x0 + k, by + 10), fill=colour_map(k / (plot_width - 1)))
    small = _font(11)
    draw.text((x0, by + 14), "0", font=small, fill=_INK)
    right_label = f"{top_value:g}" if count else "100 %"
    draw.text((x0 + plot_width - draw.textlength(right_label, font=small), by + 14), right_label, font=small,
              fill=_INK)
    if slices:
        note = "magenta: the model's slices"
        draw.text((x0 + plot_width / 2 - draw.textlength(note, font=small) / 2, by + 14), note, font=small,
                  fill=(200, 40, 160))
    return image


def _bars_frame(draw, box, top_value: float, label: str) -> None:
    """Axes of a bar plot inside ``box``: the y axis from 0 to ``top_value`` with ticks at quarters."""
    left, top, right, bottom = box
    small = _font(11)
    for k in range(5):
        y = bottom - (bottom - top) * k / 4
        draw.line((left, y, right, y), fill=(235, 235, 235))
        tick = f"{top_value * k / 4:g}"
        draw.text((left - 6 - draw.textlength(tick, font=small), y - 6), tick, font=small, fill=_INK)
    draw.line((left, top, left, bottom), fill=_INK)
    draw.line((left, bottom, right, bottom), fill=_INK)
    draw.text((left - 36, top - 18), label, font=small, fill=_INK)


def _legend(draw, x: float, y: float, entries: list[tuple[str, tuple[int, int, int]]]) -> None:
    small = _font(11)
    for name, colour in entries:
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=colour)
        draw.text((x + 14, y), name, font=small, fill=_INK)
        x += 24 + draw.textlength(name, font=small)


def distribution_plot(summary: dict[str, Any], title: str = "", plot_width: int = 560,
                      plot_height: int = 240) -> Image.Image:
    """The resolution probe: one stacked bar per size, the share of each answer category, the size (and a local
    model's slice grid, ``"slices"``) under it."""
    sizes = summary["sizes"]
    count = summary["answer_type"] == "count"
    names = []
    for s in sizes:
        names += [n for n in s["distribution"] if n not in names]
    if count:
        numbers = sorted(n for n in names if n.isdigit())
        palette = {n: _NUMBERS[k % len(_NUMBERS)] for k, n in enumerate(numbers)}
        palette["unreadable"] = _CATEGORY["unreadable"]
        names = numbers + [n for n in names if not n.isdigit()]
    else:
        palette = _CATEGORY
        names = [n for n in ("right", "wrong", "unreadable") if n in names]
    pad, head, left_m, foot = 16, 64, 48, 64
    image = Image.new("RGB", (plot_width + left_m + pad, plot_height + head + foot), _WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((pad, 8), title, font=_font(16), fill=_INK)
    what = f"numbers answered (truth {summary['truth']})" if count else "answers per picture size"
    draw.text((pad, 27), what, font=_font(12), fill=_INK)
    box = (left_m, head, left_m + plot_width, head + plot_height)
    _bars_frame(draw, box, 100, "%")
    slot = plot_width / max(1, len(sizes))
    small = _font(11)
    for k, s in enumerate(sizes):
        total = sum(s["distribution"].values()) or 1
        x_left, x_right = box[0] + k * slot + slot * 0.18, box[0] + (k + 1) * slot - slot * 0.18
        y = box[3]
        for name in names:
            share = s["distribution"].get(name, 0) / total
            if share:
                y_top = y - share * plot_height
                draw.rectangle((x_left, y_top, x_right, y), fill=palette[name])
                y = y_top
        _centered(draw, ((x_left + x_right) / 2, box[3] + 10), f"{s['width']}x{s['height']}", small, _INK)
        if s.get("slices"):  # a local model's grid for this size
            _centered(draw, ((x_left + x_right) / 2, box[3] + 24), f"{s['slices']} sl.", small, (110, 110, 110))
        label = (f"{s['mean']:.1f}" if s.get("mean") is not None else "-") if count else \
            (f"{100 * s['accuracy']:.0f}%" if s["accuracy"] is not None else "-")
        _centered(draw, ((x_left + x_right) / 2, box[1] - 8), label, small, _INK)
    _legend(draw, left_m, box[3] + 38, [(n, palette[n]) for n in names])
    return image


def padding_plot(summary: dict[str, Any], title: str = "", plot_width: int = 560,
                 plot_height: int = 240) -> Image.Image:
    """The padding probe: per aspect ratio, the accuracy on grey bands beside that on coloured bands."""
    aspects = summary["aspects"]
    pad, head, left_m, foot = 16, 64, 48, 52
    image = Image.new("RGB", (plot_width + left_m + pad, plot_height + head + foot), _WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((pad, 8), title, font=_font(16), fill=_INK)
    draw.text((pad, 27), "colour of the extreme region: share right per aspect ratio (W:H)", font=_font(12),
              fill=_INK)
    box = (left_m, head, left_m + plot_width, head + plot_height)
    _bars_frame(draw, box, 100, "%")
    slot = plot_width / max(1, len(aspects))
    colours = {"grey": (128, 128, 128), "coloured": (60, 110, 220)}
    small = _font(11)
    for k, a in enumerate(aspects):
        for j, part in enumerate(("grey", "coloured")):
            value = a[part]["accuracy"]
            x_left = box[0] + k * slot + slot * (0.14 + 0.36 * j)
            x_right = x_left + slot * 0.34
            if value is not None:
                draw.rectangle((x_left, box[3] - value * plot_height, x_right, box[3]), fill=colours[part])
                _centered(draw, ((x_left + x_right) / 2, box[3] - value * plot_height - 8), f"{100 * value:.0f}",
                          small, _INK)
        _centered(draw, (box[0] + (k + 0.5) * slot, box[3] + 10), a["aspect"], small, _INK)
    _legend(draw, left_m, box[3] + 26, [("grey region", colours["grey"]), ("coloured region", colours["coloured"])])
    return image


def side_by_side(images: list[Image.Image], gap: int = 12) -> Image.Image:
    """``images`` in one row, top-aligned, on white."""
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, max(im.height for im in images)), _WHITE)
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out
