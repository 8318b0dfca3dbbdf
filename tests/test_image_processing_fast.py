"""`LlavaUHDImageProcessorFast` against the PIL processor: the same keys, shapes, dtypes, grids, layouts and sizes
exactly, and pixel values within a stated tolerance, for every image strategy; its crops really resize in batches.

Tolerance, in normalized units (CLIP's std: one 0-255 grey level is about 0.015): mean absolute difference under
0.01, 99th percentile under 0.03 (two grey levels), none over 0.5 (a wrong box or order is off by far more).
Measured (8-bit images, both the CPU's uint8 resize and the float32 one a GPU uses): means 0.00001-0.0031, 99th
percentiles 0-0.015, largest 0.25 (a 2x2 grid upscaled from 200x150, where PIL's box resize reads the pixels
around each box); float and 16-bit images agree within 1e-4 (both resize in floating point).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import llava_uhd.image_processing_fast as fast_module
from llava_uhd.image_processing import LlavaUHDImageProcessor
from llava_uhd.image_processing_fast import LlavaUHDImageProcessorFast
from llava_uhd.slicing import plan_slices

MEAN_TOL, P99_TOL, MAX_TOL = 0.01, 0.03, 0.5
FLOAT_TOL = 1e-4
STRATEGIES = ["uhd", "pad", "fixed_grid"]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB picture: gradients, a smooth random texture and pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width * 255, yy / height * 255, 128 + 100 * np.sin(xx / 37 + yy / 53)], -1)
    texture = Image.fromarray((rng.random((max(2, height // 40), max(2, width // 40), 3)) * 255).astype(np.uint8))
    texture = np.asarray(texture.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    noisy = 0.5 * base + 0.4 * texture + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    buf = io.BytesIO()
    photo(4000, 3000, 4).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def pair(uint8_resize: bool = True, **kwargs):
    fast = LlavaUHDImageProcessorFast(**kwargs)
    fast.uint8_resize_on_cpu = uint8_resize  # False: the float32 resize a GPU does
    return LlavaUHDImageProcessor(**kwargs), fast


def assert_matches(slow_out, fast_out, tol=(MEAN_TOL, P99_TOL, MAX_TOL)):
    """Everything but the pixel values identical (values and dtypes); pixel values within ``tol``."""
    assert list(fast_out.keys()) == list(slow_out.keys())
    for key in slow_out:
        s, f = np.asarray(slow_out[key]), np.asarray(fast_out[key])
        assert f.dtype == s.dtype and f.shape == s.shape, (key, f.dtype, s.dtype, f.shape, s.shape)
        if key != "pixel_values":
            np.testing.assert_array_equal(f, s, err_msg=key)
    diff = np.abs(np.asarray(fast_out["pixel_values"]) - np.asarray(slow_out["pixel_values"]))
    if diff.size:
        stats = (diff.mean(), np.percentile(diff, 99), diff.max())
        assert all(v < t for v, t in zip(stats, tol)), stats


@pytest.mark.parametrize("uint8_resize", [True, False], ids=["uint8", "float32"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("size", [(1000, 700), (300, 1200), (200, 150)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_the_pil_processor(size, strategy, uint8_resize):
    slow, fast = pair(uint8_resize, image_strategy=strategy)
    image = photo(*size, seed=size[0])
    assert_matches(slow(image), fast(image))


@pytest.mark.slow  # decodes and resizes a 12-megapixel JPEG six times
@pytest.mark.parametrize("uint8_resize", [True, False], ids=["uint8", "float32"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_12_megapixel_jpeg_full_and_drafted(big_jpeg, strategy, uint8_resize):
    """4000x3000: decoded in full (the PIL processor then pre-reduces by ``reducing_gap``) or, where the crops use
    fewer pixels, at 1/2 or 1/4 scale by the JPEG draft, the same for both."""
    slow, fast = pair(uint8_resize, image_strategy=strategy)
    decoded = {"uhd": {None: [3000, 4000], 2: [1500, 2000]}, "pad": {None: [750, 1000], 2: [750, 1000]},
               "fixed_grid": {None: [1500, 2000], 2: [1500, 2000]}}[strategy]
    for max_slices, size in decoded.items():
        got = fast(big_jpeg, max_slices=max_slices)
        assert got["image_sizes"].tolist() == [size]
        assert_matches(slow(big_jpeg, max_slices=max_slices), got)


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.NEAREST], ids=lambda r: r.name)
def test_other_filters(resample):
    slow, fast = pair(resample=resample)
    image = photo(1000, 700, 1)
    assert_matches(slow(image), fast(image))
    with pytest.raises(ValueError, match="LANCZOS.*use LlavaUHDImageProcessor"):
        LlavaUHDImageProcessorFast(resample=Image.Resampling.LANCZOS)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float_and_16_bit_images(strategy):
    slow, fast = pair(image_strategy=strategy)
    rgb = np.asarray(photo(300, 200, 2), np.float32) / 255
    grey16 = (rgb[:, :, 0] * 65535).astype(np.uint16)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    for image in (rgb, (rgb * 65535).astype(np.uint16), Image.fromarray(grey16), tensor):
        assert_matches(slow(image), fast(image), tol=(FLOAT_TOL, FLOAT_TOL, FLOAT_TOL))


def test_a_batch_of_mixed_sizes_and_kinds(tmp_path):
    png = tmp_path / "tall.png"
    photo(300, 1200, 3).save(png)
    images = [[photo(1000, 700, 1), np.asarray(photo(500, 500, 2), np.float32) / 255], [str(png)],
              photo(200, 150, 4), photo(1000, 700, 5)]
    for strategy in STRATEGIES:
        slow, fast = pair(image_strategy=strategy)
        assert_matches(slow(images), fast(images))
    out = fast(images, return_tensors="pt")
    assert out["crop_image_ids"].unique().tolist() == [0, 1, 2, 3, 4]


def test_output_types():
    fast = LlavaUHDImageProcessorFast()
    image = photo(672, 1008)
    pt = fast(image, return_tensors="pt", device="cpu")
    assert {k: v.dtype for k, v in pt.items()} == {
        "pixel_values": torch.float32, "patch_grid_hw": torch.int64, "crop_image_ids": torch.int64,
        "crop_is_overview": torch.bool, "image_layout": torch.int64, "image_sizes": torch.int64}
    assert pt["pixel_values"].shape == (plan_slices(672, 1008).num_patches, 3 * 14 * 14)
    for return_tensors in (None, "np"):
        out = fast(image, return_tensors=return_tensors, device=torch.device("cpu"))
        assert all(isinstance(v, np.ndarray) for v in out.values())
        np.testing.assert_array_equal(out["pixel_values"], pt["pixel_values"].numpy())
    empty_slow, empty_fast = LlavaUHDImageProcessor()([]), fast([])
    assert_matches(empty_slow, empty_fast)
    assert empty_fast["pixel_values"].shape == (0, 588)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu(big_jpeg):
    slow, fast = pair()
    images = [big_jpeg, photo(1000, 700, 1), np.asarray(photo(300, 1200, 2), np.float32) / 255]
    out = fast(images, return_tensors="pt", device="cuda")
    assert out["pixel_values"].device.type == "cuda" and out["patch_grid_hw"].device.type == "cpu"
    assert_matches(slow(images), {k: v.cpu() for k, v in out.items()})


def test_crops_of_one_size_resize_in_one_call(monkeypatch):
    """672x1008 is six 336x336 slices (one call) and an overview (another); three such images still two calls;
    a 1000x700 image's slices differ in box size by a pixel, so they split into groups of equal boxes."""
    calls = []
    interpolate = torch.nn.functional.interpolate

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return interpolate(x, *args, **kwargs)

    monkeypatch.setattr(fast_module.F, "interpolate", counting)
    fast = LlavaUHDImageProcessorFast()
    out = fast(photo(672, 1008))
    assert len(out["patch_grid_hw"]) == 7 and sorted(calls) == [(1, 3, 1008, 672), (6, 3, 336, 336)]
    calls.clear()
    out = fast([photo(672, 1008, k) for k in range(3)])
    assert len(out["patch_grid_hw"]) == 21 and sorted(calls) == [(3, 3, 1008, 672), (18, 3, 336, 336)]
    calls.clear()
    out = fast(photo(1000, 700))
    boxes = {(c.box[3] - c.box[1], c.box[2] - c.box[0], c.size) for c in plan_slices(1000, 700).crops}
    crops = len(out["patch_grid_hw"])
    assert len(calls) == len(boxes) < crops and sum(n for n, *_ in calls) == crops


def test_save_and_load(tmp_path):
    from transformers import AutoImageProcessor

    from llava_uhd.auto import register_config_and_processors

    register_config_and_processors()
    fast = LlavaUHDImageProcessorFast(max_slices=4, image_strategy="fixed_grid", fixed_grid=(3, 1),
                                      image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), patch_size=16,
                                      size={"height": 224, "width": 224})
    fast.save_pretrained(tmp_path / "fast")
    LlavaUHDImageProcessor.from_pretrained(tmp_path / "fast").save_pretrained(tmp_path / "slow")

    def settings(p):
        return {k: v for k, v in p.to_dict().items() if k != "image_processor_type"}

    for folder in ("fast", "slow"):
        loaded = LlavaUHDImageProcessorFast.from_pretrained(tmp_path / folder)
        assert type(loaded) is LlavaUHDImageProcessorFast and settings(loaded) == settings(fast)
        for kwargs in ({"use_fast": True}, {"backend": "torchvision"}):
            assert type(AutoImageProcessor.from_pretrained(tmp_path / folder, **kwargs)) is LlavaUHDImageProcessorFast
        for kwargs in ({"use_fast": False}, {"backend": "pil"}):
            assert type(AutoImageProcessor.from_pretrained(tmp_path / folder, **kwargs)) is LlavaUHDImageProcessor
    image = photo(900, 300, 6)
    assert_matches(LlavaUHDImageProcessor.from_pretrained(tmp_path / "fast")(image), loaded(image))


def test_bad_inputs_fail_as_in_the_pil_processor(tmp_path):
    slow, fast = pair()
    (tmp_path / "notes.txt").write_text("not an image")
    cases = [
        ([photo(50, 50), str(tmp_path / "missing.png")], {}),
        (str(tmp_path), {}),
        (str(tmp_path / "notes.txt"), {}),
        (b"not an image", {}),
        (np.full((10, 10, 3), 2.0, np.float32), {}),
        (np.zeros((10, 10, 5), np.uint8), {}),
        (photo(20, 20), {"bogus": 1}),
        (object(), {}),
    ]
    for image, kwargs in cases:
        with pytest.raises(Exception) as want:
            slow(image, **kwargs)
        with pytest.raises(type(want.value)) as got:
            fast(image, **kwargs)
        assert str(got.value) == str(want.value)
    small = [LlavaUHDImageProcessor(max_pixels=100), LlavaUHDImageProcessorFast(max_pixels=100)]
    messages = []
    for processor in small:
        with pytest.raises(ValueError) as e:
            processor(photo(20, 20))
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "exceeds max_pixels=100" in messages[0]
    for bad in ({"image_strategy": "tiles"}, {"reducing_gap": 0.5}, {"image_std": (0.5, 0, 0.5)}, {"max_slices": 0}):
        with pytest.raises(ValueError) as want:
            LlavaUHDImageProcessor(**bad)
        with pytest.raises(ValueError) as got:
            LlavaUHDImageProcessorFast(**bad)
        assert str(got.value) == str(want.value)
