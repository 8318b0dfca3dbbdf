"""Reading any image a user may hand over into RGB pixels, with a clear error for anything unreadable.

    image = load_rgb("photo.jpg")          # or bytes, a data: URL, an http(s) URL, PIL, numpy, torch
    describe_image(image)                  # a short description for error messages

Paths, encoded bytes, ``data:`` URLs (base64), ``http(s)://`` URLs (fetched with transformers' `load_image`: needs
the network), PIL images of any mode (EXIF orientation applied, transparency composited on white, 16-bit scaled),
numpy arrays (``HxW``, ``HxWxC``, ``CxHxW``) and torch tensors. Only PIL and numpy are imported here, so the
``llava-uhd slice`` command starts fast.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .slicing import DEFAULT_MAX_PIXELS

__all__ = ["load_rgb", "rgb_size", "describe_image", "decode_data_url"]

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_ORIENTATION = 0x0112  # the EXIF tag


def describe_image(image: Any) -> str:
    """A short description of an image input for error messages: its path, PIL mode and size, byte count or
    array shape (data: URLs shortened)."""
    if isinstance(image, str) and image.startswith("data:"):
        return f"'{image[:40]}...' ({len(image)} characters)"
    if isinstance(image, (str, os.PathLike)):
        return f"'{os.fspath(image)}'"
    if isinstance(image, Image.Image):
        name = getattr(image, "filename", "") or ""
        return f"PIL {image.mode} {image.size[0]}x{image.size[1]}" + (f" from '{name}'" if name else "")
    if isinstance(image, (bytes, bytearray)):
        return f"{len(image)} bytes"
    shape = getattr(image, "shape", None)
    return f"{type(image).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")


def _open(source: str | os.PathLike | bytes, max_pixels: int | None) -> Image.Image:
    """Open a file or encoded bytes and check its pixel count from the header, before anything is decoded.

    Pillow's `Image.open` applies its own process-wide decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`); we
    enforce ``max_pixels`` instead, so a user can raise or lower it per call. Rather than flipping Pillow's global
    (a race between threads), we identify the format through Pillow's plugin registry the way `Image.open` does,
    minus its guard.
    """
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    try:
        image = _identify(fp, "" if isinstance(source, (bytes, bytearray)) else os.fspath(source))
        _check_pixels(image.size, max_pixels)
    except BaseException:
        fp.close()
        raise
    image._exclusive_fp = True  # the image owns the file and closes it once decoded, as with Image.open(path)
    return image


def _identify(fp, filename: str) -> Image.Image:
    """The first Pillow plugin that accepts the file's first bytes opens it (header only)."""
    prefix = fp.read(16)
    tried: set[str] = set()
    for loader in (Image.preinit, Image.init):  # common plugins first, the rest only when needed
        loader()
        for name in [f for f in Image.ID if f not in tried]:
            tried.add(name)
            factory, accept = Image.OPEN[name]
            accepted = not accept or accept(prefix)
            if not accepted or isinstance(accepted, str):  # a str is Pillow's "not this format, because ..."
                continue
            try:
                fp.seek(0)
                return factory(fp, filename)
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    raise UnidentifiedImageError("cannot identify image file")


def _draft(image: Image.Image, keep_pixels: int) -> None:
    """Ask the decoder (JPEG only; a no-op elsewhere) for a reduced scale that keeps ``keep_pixels`` pixels."""
    w, h = image.size
    if w * h > keep_pixels:
        f = math.sqrt(keep_pixels / (w * h))
        image.draft(None, (math.ceil(w * f), math.ceil(h * f)))


def _check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ValueError(f"image is empty ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ValueError(f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")


def rgb_size(image: Image.Image | np.ndarray) -> tuple[int, int]:
    """``(width, height)`` of what `load_rgb` returns (a PIL image, or an ``(H, W, 3)`` float array)."""
    return image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])


def _pil_to_working(image: Image.Image) -> Image.Image | np.ndarray:
    """EXIF orientation applied, any mode to RGB: a PIL RGB image (8-bit sources) or a float32 (H, W, 3) array
    in [0, 1] (16/32-bit and float sources, kept at full precision)."""
    image.load()  # decode now so a truncated file fails here, with a clear message
    if image.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose copies the image even when nothing turns
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in _WIDE_INT_MODES or mode == "F":
        return np.repeat(_scale_wide(image)[:, :, None], 3, axis=2)
    if mode == "1":
        image = image.convert("L")
    if mode == "La":  # Pillow converts premultiplied grey + alpha to nothing but LA
        image = image.convert("LA")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        # Composite transparent pixels on white instead of keeping whatever colour hides under alpha = 0.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _scale_wide(image: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float single-channel image to float32 in [0, 1].

    16-bit modes divide by 65535. A 32-bit integer image whose values fit 16 bits is 16-bit data in a wider
    container (how Pillow opens some 16-bit files) and divides by 65535 too; any other 32-bit integer image, and
    a float image outside [0, 1], is scaled by its real range (min to max), never clipped into a white picture.
    """
    arr = np.asarray(image, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{image.mode} image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if image.mode == "F" and lo >= 0.0 and hi <= 1.0:
        return arr.astype(np.float32)
    if image.mode != "F" and lo >= 0 and hi <= 65535:
        return (arr / 65535.0).astype(np.float32)
    return ((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)).astype(np.float32)


def _array_to_working(arr: np.ndarray) -> Image.Image | np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) arrays with C in 1, 3, 4. uint8/bool/small ints go through PIL; uint16 is
    scaled by 1/65535; floats must already lie in [0, 1]."""
    if arr.ndim == 3:
        if arr.shape[-1] in (1, 3, 4):
            pass
        elif arr.shape[0] in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)
        else:
            raise ValueError(f"cannot tell the channel axis of an array of shape {arr.shape}: expected 1, 3 or 4 "
                             "channels first or last")
    elif arr.ndim != 2:
        raise ValueError(f"expected an array of 2 or 3 dimensions, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image is empty (shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[:, :, 0]
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"integer image values must lie in [0, 255] (uint16: [0, 65535]), got [{lo}, {hi}]")
        # Image.fromarray infers L, RGB or RGBA from the shape; PIL then handles alpha like any file.
        return _pil_to_working(Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8))))
    elif not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"unsupported image dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"float images must lie in [0, 1] (got values in [{lo:.4g}, {hi:.4g}]); "
                         "pass uint8 arrays for 0-255 data")
    arr = np.clip(arr, 0.0, 1.0)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[-1] == 4:  # composite on white
        alpha = arr[:, :, 3:]
        return arr[:, :, :3] * alpha + (1.0 - alpha)
    return arr


def load_rgb(image: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS,
             keep_pixels: int | None = None) -> Image.Image | np.ndarray:
    """Any supported image input to RGB, EXIF orientation applied.

    Accepts a path, encoded bytes, a ``data:`` or ``http(s)://`` URL, a PIL image of any mode (L, LA, P, RGBA,
    CMYK, I;16, 1, ...), a numpy array or a torch tensor. Returns a PIL RGB image for 8-bit sources, else a float32
    ``(H, W, 3)`` array in [0, 1]. Raises `ValueError` naming the problem for anything unreadable (a missing path,
    a directory, another URL scheme, ...); an animated image gives its first frame, with a warning that says so.

    Args:
        max_pixels: files and bytes claiming more pixels are refused from their header, before anything is
            decoded (None: no limit).
        keep_pixels: a JPEG file with more than this many pixels decodes at the smallest scale (1/2, 1/4 or 1/8,
            done by the decoder, so memory stays bounded) that keeps at least this many. None decodes in full;
            other formats always decode in full.
    """
    if isinstance(image, str) and image.startswith("data:"):
        image = decode_data_url(image)
    elif isinstance(image, str) and image.startswith(("http://", "https://")):
        image = _fetch(image)
    elif isinstance(image, str) and _URL_SCHEME.match(image):
        raise ValueError(f"unsupported URL scheme '{image.split(':', 1)[0]}:' (http, https and data URLs are "
                         "read; download other URLs first)")
    if isinstance(image, (str, os.PathLike)):
        _check_file(Path(image))
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        try:
            image = _open(image, max_pixels)
            if keep_pixels is not None:
                _draft(image, keep_pixels)
        except UnidentifiedImageError as e:
            raise ValueError("not an image (unknown or unsupported format)") from e
        except OSError as e:
            raise ValueError(f"cannot be read: {e}") from e
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels)
        frames = getattr(image, "n_frames", 1)
        if getattr(image, "is_animated", False) and frames > 1:
            warnings.warn(f"{describe_image(image)} is animated ({frames} frames): its first frame is used",
                          stacklevel=2)
        try:
            return _pil_to_working(image)
        except (OSError, SyntaxError) as e:  # PIL reports truncated / corrupt data as OSError (or SyntaxError)
            raise ValueError(f"cannot be decoded: {e}") from e
    if type(image).__module__.startswith("torch"):
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    if isinstance(image, np.ndarray):
        working = _array_to_working(image)
        _check_pixels(rgb_size(working), max_pixels)
        return working
    raise ValueError(f"unsupported image type {type(image).__name__}: expected a path, bytes, a PIL image, "
                     "a numpy array or a torch tensor")


_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def _check_file(path: Path) -> None:
    """A readable image file is there: a missing path, a directory and an unreadable file each say so."""
    if path.is_dir():
        raise ValueError(f"'{path}' is a directory, not an image file")
    if not path.exists():
        raise ValueError(f"no such image file: '{path}'")
    if not os.access(path, os.R_OK):
        raise ValueError(f"'{path}' cannot be read (permission denied)")


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:[<type>][;base64],<data>`` URL (base64 only: images are binary)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError(f"a data: URL must be base64 encoded (data:image/png;base64,...), got '{header[:60]}'")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"the data: URL's base64 payload is malformed: {e}") from e


def _fetch(url: str) -> Image.Image:
    """An http(s) image through transformers' loader (needs the network)."""
    from transformers.image_utils import load_image

    try:
        return load_image(url)
    except Exception as e:  # network, HTTP status, decoding: all say the same to the user
        raise ValueError(f"cannot fetch {url}: {type(e).__name__}: {e}") from e
