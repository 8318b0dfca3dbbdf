"""The words of the synthetic questions and answers: palette colours, shapes, locations, code alphabets, and the
question kinds with the type of their answers.

    from llava_uhd.data.synthetic.vocabulary import COLOURS, KINDS
    KINDS["count"].answer_type  # "number"; COLOURS["red"] == (220, 30, 30)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "COLOURS",
    "PADDING_GREY",
    "SHAPES",
    "PLURALS",
    "CORNERS",
    "EDGES",
    "CODE_DIGITS",
    "CODE_LETTERS",
    "SHORT_ANSWER_PROMPT",
    "KindInfo",
    "KINDS",
    "FINE_DETAIL_KINDS",
]

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
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
"""Plural of each shape name, as the questions use it."""

CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
EDGES: tuple[str, ...] = ("top", "bottom", "left", "right")
CODE_DIGITS = "23456789"  # no 0/1 (O, I, L look alike)
CODE_LETTERS = "ACEFGHJKMNPRTUVWXY"  # no B D I L O Q S Z (8 0 1 1 0 0 5 2 look alike)

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
"""LLaVA-1.5's prompt for short answers, appended to the question in the human turn by default."""


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
