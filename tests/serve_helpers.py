"""Helpers of the serving tests (`test_ask`, `test_chat`, `test_generation`, `test_infer`): pictures a tiny random
model answers differently, and a tiny model saved as ``llava-uhd ask --model DIR`` loads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """6 x 6 flat blocks around a main colour (all from ``seed``), scaled to ``width x height``. The tiny random
    models answer uniform noise images alike (and flat pictures have all their patches alike): these change their
    answers with the main colour, and their patches differ from each other."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=3) + rng.integers(-60, 60, size=(6, 6, 3))
    return Image.fromarray(np.clip(blocks, 0, 255).astype(np.uint8)).resize((width, height), Image.NEAREST)


def save_tiny(folder: Path, kind: str = "clip"):
    """``build_tiny(kind)`` saved into ``folder`` (model + processor); returns ``(model, processor)``."""
    from conftest import build_tiny

    model, processor = build_tiny(kind)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor
