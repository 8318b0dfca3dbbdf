"""The question kinds: each lays out a scene, asks one question and knows its answer.

* ``count``: "How many red circles are there?" (0-6, answered as a digit) over small shapes of several colours
  and kinds, some of them sharing the target's colour or kind;
* ``corner_colour`` / ``edge_colour``: "What colour is the shape nearest the top-left corner / the left edge?";
* ``shape_at``: "What shape is nearest the bottom-right corner / the top edge / the centre of the image?";
* ``read_text``: "What code is written in the image?" over a short code of digits and letters written small with
  PIL's default font (answer: the code exactly);
* ``grey_probe``: "What colour is the leftmost region of the image?" over an image with a band on one side, grey
  (LLaVA-1.5's padding colour (122, 116, 104) or plain grey) half of the time, another colour otherwise: a model that
  pads images with grey cannot tell grey content from its padding (the paper's Fig. 3).

"Nearest" questions drop any shape with a different answer that is almost as near as the nearest one (within the
largest shape size plus 15 % of the distance), so the nearest shape is unambiguous. ``GENERATORS[kind](rng, image,
w, h)`` returns ``(question, answer, metadata, shapes, text)``; `samples.generate_sample` draws them.
"""

from __future__ import annotations

import math
from typing import Callable

from .drawing import Canvas, plan_shape, plan_text, text_metadata
from .vocabulary import COLOURS, CORNERS, EDGES, KINDS, PADDING_GREY, PLURALS, SHAPES

__all__ = ["GENERATORS", "distances"]


def distances(shapes, location: str, w: int, h: int) -> list[float]:
    """Distance of each shape's ``center`` to ``location`` in a ``w x h`` image: a corner (Euclidean), an edge
    (perpendicular) or ``"centre"`` (Euclidean)."""
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


def _random_shapes(rng, canvas, n: int, avoid: Callable[[str, str], bool] = lambda c, s: False,
                   draw: Callable[[], tuple[str, str]] | None = None):
    """Up to ``n`` shapes placed on ``canvas``: each a ``(colour, kind)`` from ``draw`` (default: any), drawn again
    (at most 20 times, else skipped) while ``avoid`` says no."""
    draw = draw or (lambda: (rng.choice(list(COLOURS)), rng.choice(SHAPES)))
    shapes = []
    for _ in range(n):
        for _ in range(20):
            colour, shape = draw()
            if not avoid(colour, shape):
                break
        else:
            continue
        planned = plan_shape(rng, canvas, colour, shape)
        if planned is not None:
            shapes.append(planned)
    return shapes


def _maybe_distractor_text(rng, canvas, image):
    return plan_text(rng, canvas, image) if rng.random() < 0.3 else None


def _kind_count(rng, image, w, h):
    canvas = Canvas(w, h)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    variant = rng.choice(["colour_shape", "colour_shape", "colour", "shape"])
    target_colour = colour if variant in ("colour_shape", "colour") else None
    target_shape = shape if variant in ("colour_shape", "shape") else None

    def matches(c, s):
        return (target_colour is None or c == target_colour) and (target_shape is None or s == target_shape)

    k = rng.randint(0, 6)
    shapes = []
    for _ in range(k):
        planned = plan_shape(rng, canvas, colour, shape)
        if planned is not None:
            shapes.append(planned)
    answer = len(shapes)
    # Distractors: about half share the target's colour or kind, so the question needs the detail.
    def distractor():
        c = colour if rng.random() < 0.3 else rng.choice(list(COLOURS))
        return c, shape if rng.random() < 0.3 else rng.choice(SHAPES)

    shapes += _random_shapes(rng, canvas, rng.randint(2, 8), matches, distractor)
    order = list(range(len(shapes)))
    rng.shuffle(order)  # no meaning in the order of the list
    shapes = [shapes[i] for i in order]
    text = _maybe_distractor_text(rng, canvas, image)
    if variant == "colour_shape":
        question = f"How many {colour} {PLURALS[shape]} are there?"
    elif variant == "colour":
        question = f"How many {colour} shapes are there?"
    else:
        question = f"How many {PLURALS[shape]} are there?"
    meta = {"target": {"colour": target_colour, "shape": target_shape}, "shapes": shapes, "text": text_metadata(text)}
    return question, str(answer), meta, shapes, text


def _nearest(rng, image, w, h, locations, attr):
    canvas = Canvas(w, h)
    shapes = _random_shapes(rng, canvas, rng.randint(3, 12))
    location = rng.choice(locations)
    dist = distances(shapes, location, w, h)
    order = sorted(range(len(shapes)), key=lambda i: (dist[i], i))
    best = order[0]
    biggest = max(sh["box"][2] - sh["box"][0] for sh in shapes)
    margin = biggest + 0.15 * dist[best]
    dropped = [i for i in order[1:] if dist[i] < dist[best] + margin and shapes[i][attr] != shapes[best][attr]]
    kept = [sh for i, sh in enumerate(shapes) if i not in set(dropped)]
    canvas.boxes = [tuple(sh["box"]) for sh in kept]
    text = _maybe_distractor_text(rng, canvas, image)
    meta = {"location": location, "nearest": dict(shapes[best]), "shapes": kept, "text": text_metadata(text),
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
    canvas = Canvas(w, h)
    text = plan_text(rng, canvas, image)
    if text is None:  # cannot happen for min_side >= 32; kept as a guard
        raise RuntimeError(f"no room for a code in a {w}x{h} image")
    shapes = _random_shapes(rng, canvas, rng.randint(0, 8))
    question = rng.choice(["What code is written in the image?", "What is the code written in the image?"])
    return question, text["text"], {"shapes": shapes, "text": text_metadata(text)}, shapes, text


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
    canvas = Canvas(w, h, region)
    shapes = _random_shapes(rng, canvas, rng.randint(0, 8))
    text = _maybe_distractor_text(rng, canvas, image)
    image.paste(tuple(rgb), band)
    # LLaVA-1.5 pads a landscape image at the top and bottom, a portrait one at the left and right.
    padded = ("top", "bottom") if w > h else ("left", "right") if h > w else ()
    word = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}[side]
    meta = {"band": {"side": side, "box": list(band), "rgb": list(rgb),
                     "padding_colour": list(rgb) == list(PADDING_GREY), "on_llava15_padded_side": side in padded},
            "shapes": shapes, "text": text_metadata(text)}
    return f"What colour is the {word} region of the image?", name, meta, shapes, text


GENERATORS: dict[str, Callable] = {
    "count": _kind_count,
    "corner_colour": _kind_corner_colour,
    "edge_colour": _kind_edge_colour,
    "shape_at": _kind_shape_at,
    "read_text": _kind_read_text,
    "grey_probe": _kind_grey_probe,
}
"""Each kind's scene-and-question generator: ``GENERATORS[kind](rng, image, w, h)`` lays out the scene on ``image``
(only its background drawn so far) and returns ``(question, answer, metadata, shapes, text)``; the caller draws the
shapes and the text."""
assert set(GENERATORS) == set(KINDS)
