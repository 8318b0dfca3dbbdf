"""The paper's pilot experiments (Fig. 1-3) as probes: the pictures, their questions, reading the answers and the
aggregates the plots draw. No model and no torch here: `probe_systems` answers, `probe_plots` draws.

    items = position_items(PositionSettings(width=896, height=672, cols=6, rows=4, question="colour"))
    answers = [["red"], ["blue"], ...]                     # one list per item (its repeats), from any system
    records = score(items, answers)                        # one dict per answer: truth, parsed value, correct
    summary = aggregate("position", items, records)        # the heat map's values, per cell

* **position** (Fig. 1: GPT-4V counts objects in overlapping slices twice): one picture per grid cell of a fixed
  canvas with the object(s) centred in that cell. ``question="count"`` draws ``count`` circles and asks how many
  (the paper's question, for real models; the heat map holds the mean number answered); ``"colour"`` and
  ``"quarter"`` draw one small shape and ask its colour or its quarter of the image (what the nano model was
  trained on; the heat map holds the share of right answers). Position sensitivity shows either way: a cell
  whose object is cut by a slice boundary, or shrunk away, reads worse than its neighbours.
* **resolution** (Fig. 2: the answer to one picture changes with its resolution): one master picture per
  variant, drawn at the largest size with its objects sized relative to the image, resized (Lanczos) to every
  size of the sweep; the answers' distribution per size.
* **padding** (Fig. 3: LLaVA-1.5 pads with grey and then confuses grey content with its padding): pictures of
  several aspect ratios whose extreme region (a band on one side) is grey (LLaVA-1.5's padding colour or plain
  grey) or a palette colour; the question asks that region's colour; accuracy per aspect ratio, grey and
  coloured apart.

Answers are read with `llava_uhd.data.synthetic`'s `normalize_answer` (case, punctuation, number words, "gray")
and scored with its `is_correct` where the answer is a colour or a count.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from ..data.synthetic import COLOURS, PADDING_GREY, SHAPES, is_correct, normalize_answer, shape_mask

__all__ = ["PROBES", "QUESTIONS", "SIDES", "ProbeItem", "PositionSettings", "ResolutionSettings", "PadSettings",
           "position_items", "resolution_items", "padding_items", "items_for", "parse_answer", "score",
           "aggregate", "parse_ratio", "settings_dict"]

PROBES = ("position", "resolution", "padding")
QUESTIONS = ("colour", "quarter", "count")
"""What the position and resolution probes can ask: the small shape's colour or quarter (the nano model's skills)
or how many circles there are (the paper's question)."""
SIDES = ("left", "right", "top", "bottom")
_EXTREME = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}
_OTHER_COLOURS = ("white", "black", "brown", "cyan", "magenta", "beige", "tan", "silver", "gold", "teal", "navy",
                  "olive", "maroon", "turquoise", "lime", "indigo")  # read as wrong answers, not as no answer
_BACKGROUND = (236, 233, 226)  # light, never a palette colour


@dataclass
class ProbeItem:
    """One picture and its question: ``truth`` is the right answer (a colour name, a quarter such as
    ``"top-left"``, or a count), ``answer_type`` how answers are read (``"colour"``, ``"quarter"``, ``"count"``),
    ``cell`` where the item lies in the sweep (JSON-serializable)."""

    id: str
    image: Image.Image = field(repr=False)
    question: str
    truth: str
    answer_type: str
    cell: dict[str, Any]


@dataclass
class PositionSettings:
    """The position sweep: a ``width x height`` canvas cut into ``cols x rows`` cells, ``variants`` pictures per
    cell (the first centred, the others placed at random inside it; colours and kinds rotate), shapes of
    ``shape_size`` px, ``count`` circles for the count question."""

    width: int = 896
    height: int = 672
    cols: int = 6
    rows: int = 4
    question: str = "colour"
    variants: int = 2
    shape_size: int = 18
    count: int = 3
    seed: int = 0

    def check(self) -> None:
        if self.question not in QUESTIONS:
            raise ValueError(f"--question must be one of {', '.join(QUESTIONS)}, got {self.question!r}")
        cell_w, cell_h = self.width / self.cols, self.height / self.rows
        need_w = self.shape_size * (self.count * 3 - 1) / 2 if self.question == "count" else self.shape_size
        if cell_w < need_w + 4 or cell_h < self.shape_size + 4:
            raise ValueError(f"a {self.width}x{self.height} canvas cut into {self.cols}x{self.rows} cells leaves "
                             f"{cell_w:.0f}x{cell_h:.0f} px per cell, too small for its object(s) "
                             f"({need_w:.0f}x{self.shape_size} px); use a coarser --grid or a larger --size")
        if self.question == "quarter" and (self.cols % 2 or self.rows % 2):
            raise ValueError(f"--question quarter needs an even number of columns and rows (a cell on a midline "
                             f"has no quarter), got --grid {self.cols}x{self.rows}")


@dataclass
class ResolutionSettings:
    """The resolution sweep: long sides ``sizes`` at aspect ratio ``aspect`` (width / height), ``variants``
    master pictures; objects are ``shape_fraction`` of the short side."""

    sizes: tuple[int, ...] = (224, 320, 448, 640, 896, 1120, 1344, 1792)
    aspect: float = 1.5
    question: str = "colour"
    variants: int = 6
    shape_fraction: float = 0.025
    count: int = 3
    seed: int = 0

    def check(self) -> None:
        if self.question not in QUESTIONS:
            raise ValueError(f"--question must be one of {', '.join(QUESTIONS)}, got {self.question!r}")
        if min(self.sizes) < 32:
            raise ValueError(f"--sizes must be at least 32 px, got {min(self.sizes)}")
        if not 0 < self.shape_fraction <= 0.1:
            raise ValueError(f"the shape fraction must lie in (0, 0.1], got {self.shape_fraction}")


@dataclass
class PadSettings:
    """The padding sweep: aspect ratios ``aspects`` (width / height) at long side ``long_side``; per ratio, every
    side of ``sides`` with a grey band and with a coloured one, ``variants`` times; bands ``band_fraction`` of
    the image across."""

    aspects: tuple[float, ...] = (1 / 4, 1 / 3, 1 / 2, 1.0, 2.0, 3.0, 4.0)
    long_side: int = 896
    sides: tuple[str, ...] = SIDES
    variants: int = 1
    band_fraction: float = 0.2
    seed: int = 0

    def check(self) -> None:
        unknown = [s for s in self.sides if s not in SIDES]
        if unknown or not self.sides:
            raise ValueError(f"--sides must be some of {', '.join(SIDES)}, got {' '.join(self.sides)}")
        if not 0 < self.band_fraction < 0.5:
            raise ValueError(f"the band fraction must lie in (0, 0.5), got {self.band_fraction}")
        if min(int(round(self.long_side * min(a, 1 / a))) for a in self.aspects) < 32:
            raise ValueError(f"a long side of {self.long_side} px leaves less than 32 px across at aspect "
                             f"{_ratio_name(min(min(a, 1 / a) for a in self.aspects))}")


def parse_ratio(text: str) -> float:
    """``"3:2"``, ``"1:4"`` or ``"1.5"`` as width / height; ValueError otherwise."""
    try:
        if ":" in text:
            w, h = text.split(":")
            value = float(w) / float(h)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected an aspect ratio such as 3:2 or 1.5, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"an aspect ratio must be positive, got {text!r}")
    return value


def _ratio_name(value: float) -> str:
    """1.5 -> "3:2", 0.25 -> "1:4" (small integer ratios; otherwise the number)."""
    for den in range(1, 9):
        num = value * den
        if abs(num - round(num)) < 1e-6 and round(num) >= 1:
            return f"{round(num)}:{den}"
    return f"{value:.3g}"


def _paste_shape(image: Image.Image, kind: str, colour: str, cx: float, cy: float, side: int) -> list[int]:
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    image.paste(COLOURS[colour], (x0, y0, x0 + side, y0 + side), shape_mask(kind, side))
    return [x0, y0, x0 + side, y0 + side]


def _circles(image: Image.Image, colour: str, cx: float, cy: float, side: int, count: int) -> list[list[int]]:
    """``count`` circles in a row centred on (cx, cy), half a circle apart."""
    step = side * 1.5
    first = cx - step * (count - 1) / 2
    return [_paste_shape(image, "circle", colour, first + k * step, cy, side) for k in range(count)]


def _quarter(cx: float, cy: float, w: int, h: int) -> str:
    return ("top" if cy < h / 2 else "bottom") + "-" + ("left" if cx < w / 2 else "right")


def _question(question: str) -> str:
    return {"colour": "What colour is the small shape?",
            "quarter": "Which quarter of the image is the small shape in?",
            "count": "How many circles are there?"}[question]


def position_items(s: PositionSettings) -> list[ProbeItem]:
    """One picture per cell and variant: the object(s) in cell (col, row) of the canvas, centred in it for variant
    0, anywhere inside it (seeded) for the others, so a dense enough sweep also puts objects across slice
    boundaries."""
    s.check()
    palette = [c for c in COLOURS if c != "grey"] if s.question == "count" else list(COLOURS)
    items = []
    for row in range(s.rows):
        for col in range(s.cols):
            cell_w, cell_h = s.width / s.cols, s.height / s.rows
            for v in range(s.variants):
                p = row * s.cols + col
                # variant 0 at the cell's centre, the others anywhere the object(s) stay inside the cell
                half_w = s.shape_size * (1.5 * (s.count - 1) + 1) / 2 if s.question == "count" else s.shape_size / 2
                jitter = random.Random(s.seed * 1_000_003 + p * 101 + v)
                dx = 0.0 if v == 0 else jitter.uniform(-1, 1) * max(0.0, cell_w / 2 - half_w - 1)
                dy = 0.0 if v == 0 else jitter.uniform(-1, 1) * max(0.0, cell_h / 2 - s.shape_size / 2 - 1)
                cx, cy = (col + 0.5) * cell_w + dx, (row + 0.5) * cell_h + dy
                colour = palette[(s.seed + p + 3 * v) % len(palette)]
                kind = SHAPES[(s.seed + 2 * p + v) % len(SHAPES)]
                image = Image.new("RGB", (s.width, s.height), _BACKGROUND)
                if s.question == "count":
                    boxes = _circles(image, colour, cx, cy, s.shape_size, s.count)
                    truth, kind = str(s.count), "circle"
                else:
                    boxes = [_paste_shape(image, kind, colour, cx, cy, s.shape_size)]
                    truth = colour if s.question == "colour" else _quarter(cx, cy, s.width, s.height)
                cell = {"col": col, "row": row, "x": round(cx, 1), "y": round(cy, 1), "variant": v,
                        "colour": colour, "shape": kind, "boxes": boxes}
                items.append(ProbeItem(f"c{col}r{row}v{v}", image, _question(s.question), truth, s.question, cell))
    return items


def _master(s: ResolutionSettings, v: int) -> tuple[Image.Image, str, dict[str, Any]]:
    """Variant ``v``'s picture at the largest size, its truth and what was drawn."""
    rng = random.Random(s.seed * 1_000_003 + v)
    long = max(s.sizes)
    w, h = (long, max(1, round(long / s.aspect))) if s.aspect >= 1 else (max(1, round(long * s.aspect)), long)
    image = Image.new("RGB", (w, h), _BACKGROUND)
    side = max(2, round(s.shape_fraction * min(w, h)))
    if s.question == "count":
        colour = rng.choice([c for c in COLOURS if c != "grey"])
        boxes: list[list[int]] = []
        while len(boxes) < s.count:  # apart from each other by a shape's side at least
            cx, cy = rng.uniform(side, w - side), rng.uniform(side, h - side)
            if all(abs(cx - (b[0] + b[2]) / 2) > 2 * side or abs(cy - (b[1] + b[3]) / 2) > 2 * side for b in boxes):
                boxes.append(_paste_shape(image, "circle", colour, cx, cy, side))
        return image, str(s.count), {"colour": colour, "shape": "circle", "boxes": boxes}
    colour, kind = list(COLOURS)[(s.seed + v) % len(COLOURS)], SHAPES[(s.seed + 2 * v) % len(SHAPES)]
    # away from the midlines by a shape's side, so its quarter stays clear at every size
    xs = [rng.uniform(side, w / 2 - 1.5 * side), rng.uniform(w / 2 + 1.5 * side, w - side)]
    ys = [rng.uniform(side, h / 2 - 1.5 * side), rng.uniform(h / 2 + 1.5 * side, h - side)]
    cx, cy = xs[(v // 2) % 2], ys[v % 2]
    box = _paste_shape(image, kind, colour, cx, cy, side)
    truth = colour if s.question == "colour" else _quarter(cx, cy, w, h)
    return image, truth, {"colour": colour, "shape": kind, "boxes": [box]}


def resolution_items(s: ResolutionSettings) -> list[ProbeItem]:
    """Each variant's master picture resized to every long side of the sweep (smallest first)."""
    s.check()
    items = []
    for v in range(s.variants):
        master, truth, drawn = _master(s, v)
        mw, mh = master.size
        for long in sorted(set(s.sizes)):
            scale = long / max(mw, mh)
            size = (max(1, round(mw * scale)), max(1, round(mh * scale)))
            image = master if size == master.size else master.resize(size, Image.Resampling.LANCZOS)
            cell = {"long_side": long, "width": size[0], "height": size[1], "variant": v, **drawn,
                    "shape_px": round((drawn["boxes"][0][2] - drawn["boxes"][0][0]) * scale, 1)}
            items.append(ProbeItem(f"s{long}v{v}", image, _question(s.question), truth, s.question, cell))
    return items


def padding_items(s: PadSettings) -> list[ProbeItem]:
    """Per aspect ratio, side and variant: one picture with a grey band and one with a coloured band there.
    Grey bands alternate between LLaVA-1.5's padding colour and the palette's grey; coloured ones rotate."""
    s.check()
    coloured = [c for c in COLOURS if c != "grey"]
    items = []
    k = 0
    for aspect in s.aspects:
        w, h = ((s.long_side, round(s.long_side / aspect)) if aspect >= 1
                else (round(s.long_side * aspect), s.long_side))
        padded = ("top", "bottom") if w > h else ("left", "right") if h > w else ()
        for side in s.sides:
            for v in range(s.variants):
                for grey in (True, False):
                    turn = s.seed + k // 2  # the grey and the coloured band of a pair share it
                    name = "grey" if grey else coloured[turn % len(coloured)]
                    rgb = (PADDING_GREY if turn % 2 == 0 else COLOURS["grey"]) if grey else COLOURS[name]
                    k += 1
                    image = Image.new("RGB", (w, h), _BACKGROUND)
                    t = max(2, round((w if side in ("left", "right") else h) * s.band_fraction))
                    band = {"left": (0, 0, t, h), "right": (w - t, 0, w, h), "top": (0, 0, w, t),
                            "bottom": (0, h - t, w, h)}[side]
                    image.paste(tuple(rgb), band)
                    cell = {"aspect": _ratio_name(aspect), "aspect_value": aspect, "width": w, "height": h,
                            "side": side, "grey": grey, "rgb": list(rgb), "band": list(band), "variant": v,
                            "on_padded_side": side in padded}
                    question = f"What colour is the {_EXTREME[side]} region of the image?"
                    items.append(ProbeItem(f"a{_ratio_name(aspect)}{side[0]}{'g' if grey else 'c'}v{v}", image,
                                           question, name, "colour", cell))
    return items


def items_for(probe: str, settings) -> list[ProbeItem]:
    """The pictures of ``probe`` (one of `PROBES`) with its settings."""
    return {"position": position_items, "resolution": resolution_items, "padding": padding_items}[probe](settings)


def parse_answer(text: str, answer_type: str) -> str | None:
    """The value an answer gives, or None when it gives none or several: ``"count"``: the one number named
    ("There are three." -> "3", "none" -> "0"); ``"colour"``: the one colour word ("Gray." -> "grey"; colours
    outside the palette are read too, so they count as wrong rather than as no answer); ``"quarter"``:
    ``"top-left"``... from one of top/upper/bottom/lower and one of left/right."""
    tokens = normalize_answer(text).split()
    if answer_type == "count":
        numbers = {str(int(t)) for t in tokens if t.isdigit()} | ({"0"} if {"none", "no"} & set(tokens) else set())
        return numbers.pop() if len(numbers) == 1 else None
    if answer_type == "colour":
        found = {t for t in tokens if t in COLOURS or t in _OTHER_COLOURS}
        return found.pop() if len(found) == 1 else None
    if answer_type == "quarter":
        vertical = {{"upper": "top", "lower": "bottom"}.get(t, t) for t in tokens} & {"top", "bottom"}
        horizontal = set(tokens) & {"left", "right"}
        return f"{vertical.pop()}-{horizontal.pop()}" if len(vertical) == len(horizontal) == 1 else None
    raise ValueError(f"unknown answer type {answer_type!r}")


def _correct(answer: str, item: ProbeItem, parsed: str | None) -> bool:
    if item.answer_type == "count":
        return is_correct(answer, item.truth, "count")
    if item.answer_type == "colour":
        return is_correct(answer, item.truth, "grey_probe")  # a colour kind: exactly one colour word, the truth
    return parsed == item.truth


def score(items: list[ProbeItem], answers: list[list[str]]) -> list[dict[str, Any]]:
    """One record per answer (``answers[i]`` holds item ``i``'s repeats): the item's id, cell, question and truth,
    the ``answer``, its ``parsed`` value (None: no readable answer) and whether it is ``correct``."""
    if len(items) != len(answers):
        raise ValueError(f"got answers for {len(answers)} items, expected {len(items)}")
    records = []
    for item, repeats in zip(items, answers):
        for r, answer in enumerate(repeats):
            parsed = parse_answer(answer, item.answer_type)
            records.append({"id": item.id, "repeat": r, "cell": item.cell, "question": item.question,
                            "truth": item.truth, "answer": answer, "parsed": parsed,
                            "correct": _correct(answer, item, parsed)})
    return records


def _stats(records: list[dict[str, Any]], answer_type: str) -> dict[str, Any]:
    """Answers, share right, unreadable answers and, for counts, the mean number answered (over readable ones)."""
    n = len(records)
    out: dict[str, Any] = {"answers": n, "accuracy": sum(r["correct"] for r in records) / n if n else None,
                           "unreadable": sum(r["parsed"] is None for r in records)}
    if answer_type == "count":
        numbers = [int(r["parsed"]) for r in records if r["parsed"] is not None]
        out["mean"] = sum(numbers) / len(numbers) if numbers else None
    out["value"] = out["mean"] if answer_type == "count" else out["accuracy"]
    return out


def _categories(records: list[dict[str, Any]], answer_type: str) -> dict[str, int]:
    """The answers' distribution: the number answered (counts) or right / wrong / unreadable."""
    if answer_type == "count":
        found = Counter(r["parsed"] if r["parsed"] is not None else "unreadable" for r in records)
    else:
        found = Counter("unreadable" if r["parsed"] is None else "right" if r["correct"] else "wrong"
                        for r in records)
    return dict(sorted(found.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0,
                                                      kv[0])))


def aggregate(probe: str, items: list[ProbeItem], records: list[dict[str, Any]]) -> dict[str, Any]:
    """What the plots draw and the summary keeps, from `score`'s records.

    * position: ``grid[row][col]`` = the cell's value: the mean number answered (count) or the share of right
      answers (colour, quarter); ``cells`` the full `_stats` per cell;
    * resolution: per long side, `_stats` and ``distribution`` (the number answered, or right/wrong/unreadable);
    * padding: per aspect ratio, ``grey`` and ``coloured`` `_stats` and ``all``.
    Every probe also gives ``overall`` (`_stats` over every answer) and ``answer_type``."""
    answer_type = items[0].answer_type if items else "colour"
    out: dict[str, Any] = {"answer_type": answer_type, "overall": _stats(records, answer_type)}
    if probe == "position":
        cols = max(i.cell["col"] for i in items) + 1
        rows = max(i.cell["row"] for i in items) + 1
        cells = [[_stats([r for r in records if r["cell"]["col"] == c and r["cell"]["row"] == w], answer_type)
                  for c in range(cols)] for w in range(rows)]
        out.update(grid=[[cell["value"] for cell in row] for row in cells], cells=cells,
                   truth=items[0].truth if answer_type == "count" else None)
    elif probe == "resolution":
        out["sizes"] = []
        for long in sorted({i.cell["long_side"] for i in items}):
            chosen = [r for r in records if r["cell"]["long_side"] == long]
            first = next(i for i in items if i.cell["long_side"] == long)
            out["sizes"].append({"long_side": long, "width": first.cell["width"], "height": first.cell["height"],
                                 **_stats(chosen, answer_type), "distribution": _categories(chosen, answer_type)})
        out["truth"] = items[0].truth if answer_type == "count" else None
    elif probe == "padding":
        out["aspects"] = []
        for aspect in sorted({i.cell["aspect_value"] for i in items}):
            chosen = [r for r in records if r["cell"]["aspect_value"] == aspect]
            out["aspects"].append({"aspect": _ratio_name(aspect), "aspect_value": aspect,
                                   "grey": _stats([r for r in chosen if r["cell"]["grey"]], answer_type),
                                   "coloured": _stats([r for r in chosen if not r["cell"]["grey"]], answer_type),
                                   "all": _stats(chosen, answer_type)})
        out["padded_side"] = _stats([r for r in records if r["cell"]["on_padded_side"]], answer_type)
        out["other_sides"] = _stats([r for r in records if not r["cell"]["on_padded_side"]], answer_type)
    else:
        raise ValueError(f"unknown probe {probe!r}; expected one of {', '.join(PROBES)}")
    return out


def settings_dict(settings) -> dict[str, Any]:
    """A probe's settings as JSON (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}
