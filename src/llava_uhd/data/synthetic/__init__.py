"""Synthetic images whose answers need fine detail, with questions and answers in the LLaVA instruction format.

Every sample is one image of random size (``min_side``..``max_side`` pixels per side) and aspect ratio (up to
``max_aspect``:1 either way) and one question whose short answer (a word, a number or a code) can be checked
exactly. Samples are reproducible from a seed: ``generate_sample(seed)`` uses only its own ``random.Random(seed)``.

    sample = generate_sample(7)                       # .image, .question, .answer, .kind, .metadata
    generate_dataset("out/", 1000, seed=0)            # out/images/ + out/synthetic.json (LLaVA format)
    is_correct("There are three.", "3", "count")      # True

Modules: `vocabulary` (colours, shapes, ``KINDS``), `drawing` (exact, non-anti-aliased scenes), `kinds` (one scene
and question per kind; ``FINE_DETAIL_KINDS`` need small details), `samples` (`generate_sample`), `dataset`
(`generate_dataset`, byte-identical for the same arguments), `scoring` (`is_correct`) and `cli` (``llava-uhd synth``).
"""

from .cli import add_synth_arguments, run_synth
from .dataset import generate_dataset, load_records, sample_seed
from .drawing import (
    FONT_FRACTION,
    MIN_FONT_PX,
    MIN_SHAPE_PX,
    MIN_SHAPE_SIZES,
    SHAPE_FRACTION,
    TEXT_COLOUR,
    shape_mask,
)
from .samples import SyntheticSample, generate_sample, sample_size
from .scoring import is_correct, normalize_answer
from .vocabulary import (
    CODE_DIGITS,
    CODE_LETTERS,
    COLOURS,
    CORNERS,
    EDGES,
    FINE_DETAIL_KINDS,
    KINDS,
    PADDING_GREY,
    SHAPES,
    SHORT_ANSWER_PROMPT,
    KindInfo,
)

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
    "load_records",
    "CORNERS",
    "EDGES",
    "CODE_DIGITS",
    "CODE_LETTERS",
    "MIN_SHAPE_PX",
    "MIN_SHAPE_SIZES",
    "MIN_FONT_PX",
    "SHAPE_FRACTION",
    "FONT_FRACTION",
]
