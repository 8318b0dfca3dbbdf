"""Shared tiny fixtures."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def jpeg_bytes(rng) -> bytes:
    """A small valid JPEG (noise, so it does not compress to almost nothing)."""
    arr = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()
