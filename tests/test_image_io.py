"""Reading user images (`llava_uhd.image_io`): URLs, data: URLs, and clear errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from conftest import random_image

from llava_uhd.image_io import describe_image, load_rgb


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_data_urls_decode_to_the_same_pixels():
    image = random_image(37, 21, 4)
    url = "data:image/png;base64," + base64.b64encode(_png_bytes(image)).decode()
    assert np.array_equal(np.asarray(load_rgb(url)), np.asarray(image))
    with pytest.raises(ValueError, match="must be base64 encoded"):
        load_rgb("data:image/png,rawbytes")
    with pytest.raises(ValueError, match="base64 payload is malformed"):
        load_rgb("data:image/png;base64,@@@not base64@@@")
    with pytest.raises(ValueError, match="not an image"):
        load_rgb("data:text/plain;base64," + base64.b64encode(b"hello").decode())
    assert describe_image(url).endswith(f"({len(url)} characters)") and len(describe_image(url)) < 80


def test_http_urls_go_through_transformers_loader(monkeypatch):
    image = random_image(20, 10, 1)
    seen = []

    def fake_load_image(url):
        seen.append(url)
        if "missing" in url:
            raise OSError("404 Not Found")
        return image

    monkeypatch.setattr("transformers.image_utils.load_image", fake_load_image)
    assert np.array_equal(np.asarray(load_rgb("https://example.org/cat.png")), np.asarray(image))
    with pytest.raises(ValueError, match=r"cannot fetch https://example.org/missing.png: OSError: 404"):
        load_rgb("https://example.org/missing.png")
    assert seen == ["https://example.org/cat.png", "https://example.org/missing.png"]


def test_a_path_that_is_not_a_file_is_named():
    with pytest.raises(ValueError, match="no such image file: 'nowhere/x.png'"):
        load_rgb("nowhere/x.png")


def test_each_kind_of_bad_string_gets_its_own_message(tmp_path):
    with pytest.raises(ValueError, match="is a directory, not an image file"):
        load_rgb(str(tmp_path))
    with pytest.raises(ValueError, match="no such image file"):
        load_rgb(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match=r"unsupported URL scheme 'ftp:'"):
        load_rgb("ftp://example.org/a.png")


def test_an_animated_image_gives_its_first_frame_and_says_so(tmp_path):
    frames = [random_image(20, 10, k) for k in range(3)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.warns(UserWarning, match=r"is animated \(3 frames\): its first frame is used"):
        first = load_rgb(str(path))
    from PIL import Image

    with Image.open(path) as im:
        assert np.array_equal(np.asarray(first), np.asarray(im.convert("RGB")))
