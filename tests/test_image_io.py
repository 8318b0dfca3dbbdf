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


def _peak_rss_growth_mb(tmp_path, code: str) -> dict:
    """Run ``code`` (with ``path`` bound) in a fresh interpreter that has imported the image processor, and
    report the growth of its peak resident memory over that baseline, its time and its output."""
    import json
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(
        "import json, resource, time\n"
        "from llava_uhd.image_processing import LlavaUHDImageProcessor\n"
        "from llava_uhd.image_io import load_rgb\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t = time.perf_counter()\n"
        "try:\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "except ValueError as e:\n    out = 'ValueError: ' + str(e)\n"
        "seconds = time.perf_counter() - t\n"
        "grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024\n"
        "print(json.dumps({'out': out, 'seconds': seconds, 'grown_mb': grown}))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    from conftest import png_bomb

    (tmp_path / "bomb.png").write_bytes(png_bomb(32000, 32000))  # 120 KB on disk, 1 gigapixel decoded
    result = _peak_rss_growth_mb(tmp_path, "out = repr(LlavaUHDImageProcessor()('bomb.png')['pixel_values'].shape)")
    assert result["out"].startswith("ValueError: image 0 ('bomb.png'): 32000x32000 = 1024000000 pixels exceeds "
                                    "max_pixels=178956970"), result
    assert result["seconds"] < 1.0 and result["grown_mb"] < 30, result
    # the same through every input form, and a user can lift the limit (a small bomb, so the test stays cheap)
    small_bomb = png_bomb(3000, 2000)
    with pytest.raises(ValueError, match="exceeds max_pixels=1000000"):
        load_rgb(small_bomb, max_pixels=1_000_000)
    with pytest.raises(ValueError, match="exceeds max_pixels=1000000"):
        load_rgb("data:image/png;base64," + base64.b64encode(small_bomb).decode(), max_pixels=1_000_000)
    assert np.asarray(load_rgb(small_bomb, max_pixels=None)).shape == (2000, 3000, 3)


def test_pillows_global_guard_is_neither_used_nor_touched(monkeypatch):
    # Our limit is per call; Pillow's process-wide MAX_IMAGE_PIXELS is another thread's business, never flipped.
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    image = _png_bytes(random_image(40, 30, 0))  # 1200 pixels: Pillow's own guard would refuse it (> 2 * 100)
    assert np.asarray(load_rgb(image, max_pixels=1200)).shape == (30, 40, 3)
    with pytest.raises(ValueError, match="40x30 = 1200 pixels exceeds max_pixels=1199"):
        load_rgb(image, max_pixels=1199)
    assert Image.MAX_IMAGE_PIXELS == 100


@pytest.mark.slow
def test_a_48_megapixel_photo_decodes_at_a_reduced_scale_in_bounded_memory(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).resize((8000, 6000), Image.BICUBIC)
    photo.save(tmp_path / "photo.jpg", quality=90)
    del photo
    # A full decode holds 8000 * 6000 * 3 bytes = 144 MB; the 1/2-scale draft holds a quarter of that.
    result = _peak_rss_growth_mb(tmp_path, "p = LlavaUHDImageProcessor()\n"
                                           "out = [p('photo.jpg')['image_sizes'].tolist(), p.keep_pixels()]")
    assert result["out"] == [[[3000, 4000]], 4 * 7 * 336 * 336], result
    assert result["grown_mb"] < 100, result


def test_the_reduced_decode_keeps_the_pixels_the_model_sees(tmp_path):
    from PIL import Image

    from llava_uhd.image_processing import LlavaUHDImageProcessor

    rng = np.random.default_rng(1)
    photo = Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8)).resize((4800, 3200), Image.BICUBIC)
    photo.save(tmp_path / "photo.jpg", quality=95)
    processor = LlavaUHDImageProcessor()
    assert 4800 * 3200 > 4 * processor.keep_pixels()  # so the decoder halves it
    reduced = processor(str(tmp_path / "photo.jpg"))
    full_decode = processor(Image.open(tmp_path / "photo.jpg").convert("RGB"))  # a PIL image is never drafted
    assert reduced["image_sizes"].tolist() == [[1600, 2400]] and full_decode["image_sizes"].tolist() == [[3200, 4800]]
    assert reduced["image_layout"].tolist() == full_decode["image_layout"].tolist()
    assert reduced["patch_grid_hw"].tolist() == full_decode["patch_grid_hw"].tolist()
    # pixel differences in 0-255 units (CLIP's std is about 0.27): a fraction of one grey level on average
    diff = np.abs(reduced["pixel_values"] - full_decode["pixel_values"]) * 0.27 * 255
    assert diff.mean() < 1.0 and np.percentile(diff, 99) < 6, (diff.mean(), np.percentile(diff, 99))


def test_32_bit_images_are_scaled_by_their_real_range():
    from PIL import Image

    ramp = np.linspace(0, 1, 50 * 20).reshape(20, 50)
    sixteen_in_32 = Image.fromarray((ramp * 65535).round().astype(np.int32), mode="I")
    assert np.allclose(load_rgb(sixteen_in_32)[:, :, 0], ramp, atol=1e-5)  # 16-bit data in a 32-bit container
    wide = Image.fromarray((ramp * 4_000_000 - 1_000_000).round().astype(np.int32), mode="I")
    out = load_rgb(wide)
    assert out.dtype == np.float32 and out.shape == (20, 50, 3)
    assert np.allclose(out[:, :, 1], ramp, atol=1e-6)  # min to max, not clipped at 65535 into a white picture
    kelvin = Image.fromarray((ramp * 300 + 20).astype(np.float32), mode="F")
    assert np.allclose(load_rgb(kelvin)[:, :, 2], ramp, atol=1e-5)
    unit = Image.fromarray((ramp * 0.5).astype(np.float32), mode="F")
    assert np.allclose(load_rgb(unit)[:, :, 0], ramp * 0.5, atol=1e-6)  # float data in [0, 1] is kept as it is
    flat = Image.fromarray(np.full((4, 4), 7_000_000, np.int32), mode="I")
    assert (load_rgb(flat) == 0).all()
    nan = Image.fromarray(np.full((4, 4), np.nan, np.float32), mode="F")
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_rgb(nan)


def _palette(mode: str):
    from PIL import Image

    image = Image.new(mode, (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 9))
    return image


def _over_white(value: float, alpha: int) -> float:
    """A straight-alpha value composited on white: v * a/255 + 255 * (1 - a/255)."""
    return value * alpha / 255 + 255 * (1 - alpha / 255)


def _mode_cases():
    """(name, image, expected RGB of its pixels left to right, tolerance in 0-255 levels), every expectation from
    the mode's definition (not from Pillow or `load_rgb`). Tolerance 1 where Pillow's fixed-point arithmetic may
    round the other way."""
    from PIL import Image

    def frombytes(mode, width, values):
        return Image.frombytes(mode, (width, 1), bytes(values))

    grey = [0, 7, 128, 255]
    p = _palette("P")
    p.putdata([0, 1, 2])
    p_transparent = p.copy()
    p_transparent.info["transparency"] = 1  # palette index 1 is the transparent one
    pa = _palette("PA")
    pa.putdata([(0, 255), (1, 0), (2, 128)])
    cmyk = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (100, 50, 25, 60)]
    ycbcr = [(128, 128, 128), (0, 128, 128), (100, 50, 200), (200, 180, 60)]

    def cmyk_to_rgb(c, m, y, k):  # (255 - K) * (1 - C/255), per channel
        return [(255 - k) * (255 - v) / 255 for v in (c, m, y)]

    def ycbcr_to_rgb(y, cb, cr):  # JPEG's (ITU-R BT.601 full range), clipped to 0-255
        rgb = [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)]
        return [min(255, max(0, v)) for v in rgb]

    return [
        ("L", Image.fromarray(np.array([grey], np.uint8), "L"), [[g] * 3 for g in grey], 0),
        ("1", Image.fromarray(np.array([[0, 1, 1, 0]], bool)).convert("1"),
         [[0] * 3, [255] * 3, [255] * 3, [0] * 3], 0),
        ("LA", frombytes("LA", 4, [10, 0, 10, 255, 10, 128, 200, 51]),
         [[_over_white(10, 0)] * 3, [10] * 3, [_over_white(10, 128)] * 3, [_over_white(200, 51)] * 3], 1),
        # premultiplied alpha: v' + 255 - a
        ("La", frombytes("La", 2, [64, 128, 0, 0]), [[64 + 255 - 128] * 3, [255] * 3], 1),
        ("RGBA", frombytes("RGBA", 4, [255, 0, 0, 0, 255, 0, 0, 255, 0, 100, 200, 128, 40, 80, 120, 51]),
         [[255] * 3, [255, 0, 0], [_over_white(v, 128) for v in (0, 100, 200)],
          [_over_white(v, 51) for v in (40, 80, 120)]], 1),
        ("RGBa", frombytes("RGBa", 3, [100, 50, 0, 128, 0, 0, 0, 0, 200, 100, 50, 255]),
         [[v + 255 - 128 for v in (100, 50, 0)], [255] * 3, [200, 100, 50]], 1),
        ("P", p, [[255, 0, 0], [0, 255, 0], [10, 20, 30]], 0),
        ("P+transparency", p_transparent, [[255, 0, 0], [255, 255, 255], [10, 20, 30]], 0),
        ("PA", pa, [[255, 0, 0], [255, 255, 255], [_over_white(v, 128) for v in (10, 20, 30)]], 1),
        ("CMYK", frombytes("CMYK", 4, [v for px in cmyk for v in px]), [cmyk_to_rgb(*px) for px in cmyk], 1),
        ("YCbCr", frombytes("YCbCr", 4, [v for px in ycbcr for v in px]), [ycbcr_to_rgb(*px) for px in ycbcr], 1),
        ("HSV", frombytes("HSV", 4, [0, 255, 255, 85, 255, 255, 170, 255, 255, 30, 0, 128]),  # 0, 120, 240 degrees
         [[255, 0, 0], [0, 255, 0], [0, 0, 255], [128] * 3], 1),
        ("RGB", frombytes("RGB", 2, [1, 2, 3, 250, 251, 252]), [[1, 2, 3], [250, 251, 252]], 0),
    ]


@pytest.mark.parametrize("name", [case[0] for case in _mode_cases()])
def test_every_8_bit_mode_gives_the_rgb_its_definition_says(name):
    [(_, image, want, tolerance)] = [case for case in _mode_cases() if case[0] == name]
    out = load_rgb(image)
    assert out.mode == "RGB" and out.size == (len(want), 1)
    got = np.asarray(out, np.float64)[0]
    assert np.abs(got - np.asarray(want, np.float64)).max() <= tolerance + 0.5, (got.tolist(), want)


def test_wide_and_float_modes_give_the_values_their_definition_says():
    """16-bit integers divide by 65535 (also when a 32-bit container holds them); other 32-bit integers, and floats
    outside [0, 1], are scaled min to max; floats in [0, 1] are kept. Grey: the three channels are equal."""
    from PIL import Image

    cases = [
        (Image.fromarray(np.array([[0, 257, 32768, 65535]], np.uint16)), [0, 257 / 65535, 32768 / 65535, 1]),
        (Image.frombytes("I;16B", (4, 1), np.array([0, 257, 32768, 65535], ">u2").tobytes()),
         [0, 257 / 65535, 32768 / 65535, 1]),
        (Image.fromarray(np.array([[0, 1000, 65535, 30000]], np.int32), "I"), [0, 1000 / 65535, 1, 30000 / 65535]),
        (Image.fromarray(np.array([[-100, 0, 100, 300]], np.int32), "I"), [0, 100 / 400, 200 / 400, 1]),
        (Image.fromarray(np.array([[0, 0.25, 0.5, 1]], np.float32), "F"), [0, 0.25, 0.5, 1]),
        (Image.fromarray(np.array([[0.1, 0.2, 0.3, 0.4]], np.float32), "F"), [0.1, 0.2, 0.3, 0.4]),
        (Image.fromarray(np.array([[-1, 0, 1, 3]], np.float32), "F"), [0, 1 / 4, 2 / 4, 1]),
    ]
    for image, want in cases:
        out = load_rgb(image)
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (1, 4, 3), image.mode
        np.testing.assert_allclose(out[0], np.repeat(np.asarray(want)[:, None], 3, axis=1), atol=1e-6,
                                   err_msg=image.mode)


def test_arrays_give_the_values_their_dtype_says():
    """bool: False black, True white; uint8 as is (through PIL: RGBA composited on white); uint16 / 65535; floats
    in [0, 1] as they are, with RGBA composited on white (c * a + 1 - a); (C, H, W) read as (H, W, C)."""
    as_rgb = [[0, 0, 0], [255, 255, 255]]
    assert np.asarray(load_rgb(np.array([[False, True]]))).tolist() == [as_rgb]
    assert np.asarray(load_rgb(np.array([[3, 250]], np.uint8))).tolist() == [[[3] * 3, [250] * 3]]
    rgba8 = np.array([[[255, 0, 0, 0], [0, 100, 200, 128]]], np.uint8)
    got = np.asarray(load_rgb(rgba8), np.float64)[0]
    assert np.abs(got - [[255] * 3, [_over_white(v, 128) for v in (0, 100, 200)]]).max() <= 1.5
    np.testing.assert_allclose(load_rgb(np.array([[0, 655, 65535]], np.uint16))[0, :, 0], [0, 655 / 65535, 1],
                               atol=1e-7)
    rgba = np.array([[[1.0, 0.0, 0.5, 0.0], [1.0, 0.0, 0.5, 0.25], [0.2, 0.4, 0.6, 1.0]]], np.float32)
    np.testing.assert_allclose(load_rgb(rgba)[0], [[1, 1, 1], [1, 0.75, 0.875], [0.2, 0.4, 0.6]], atol=1e-6)
    chw = np.zeros((3, 2, 5), np.float32)
    chw[0], chw[1], chw[2] = 0.1, 0.2, 0.3
    out = load_rgb(chw)
    assert out.shape == (2, 5, 3)
    np.testing.assert_allclose(out[1, 4], [0.1, 0.2, 0.3], atol=1e-7)
