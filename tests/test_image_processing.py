import io

import numpy as np
import pytest
import torch
from PIL import Image

from llava_uhd.image_processing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    LlavaUHDImageProcessor,
    load_rgb,
    patchify,
    unpatchify,
)
from llava_uhd.slicing import plan_slices


@pytest.fixture
def processor():
    return LlavaUHDImageProcessor()


def gradient(width, height):
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1),
                     (xx + yy) % 256], -1).astype(np.uint8)


def test_output_layout_672x1008(processor):
    out = processor(Image.fromarray(gradient(672, 1008)), return_tensors="pt")
    plan = plan_slices(672, 1008)
    assert out["pixel_values"].shape == (plan.num_patches, 3 * 14 * 14)
    assert out["pixel_values"].dtype == torch.float32
    assert out["patch_grid_hw"].tolist() == [list(g) for g in plan.patch_grids]
    assert out["crop_image_ids"].tolist() == [0] * 7
    assert out["crop_is_overview"].tolist() == [False] * 6 + [True]
    assert out["image_layout"].tolist() == [[3, 2]]
    assert out["image_sizes"].tolist() == [[1008, 672]]


def _crop_then_resize(image, plan, box: bool) -> list[np.ndarray]:
    """Each crop of ``plan``, bicubic-resized from its box of ``image`` (``box``: PIL's ``resize(box=...)``, whose
    filter reads the pixels around the box; else crop first, as the release did), /255, CLIP-normalized,
    ``(3, h, w)`` float64."""
    out = []
    for crop in plan.crops:
        region = image.resize(crop.size, Image.Resampling.BICUBIC, box=crop.box) if box else \
            image.crop(crop.box).resize(crop.size, Image.Resampling.BICUBIC)
        ref = np.asarray(region, np.float64) / 255.0
        out.append(((ref - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD).transpose(2, 0, 1))
    return out


def _crops(out) -> list[np.ndarray]:
    crops, offset = [], 0
    for grid in out["patch_grid_hw"]:
        n = int(grid[0] * grid[1])
        crops.append(unpatchify(out["pixel_values"][offset:offset + n], tuple(grid), 14))
        offset += n
    assert offset == out["pixel_values"].shape[0]
    return crops


def test_slice_pixels_match_an_independent_pipeline():
    """Without the reducing gap, each slice = bicubic-resize its box, /255, CLIP-normalize: recomputed by hand."""
    image = Image.fromarray(gradient(1000, 700))
    got = _crops(LlavaUHDImageProcessor(reducing_gap=None)(image))
    want = _crop_then_resize(image, plan_slices(1000, 700), box=True)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_the_fast_resize_stays_within_a_grey_level_of_crop_then_resize():
    """The default processor (``resize(box=...)`` and ``reducing_gap=3``) against the release's crop-then-resize
    at full resolution, on a 12-megapixel photo-like picture, in 0-255 grey levels: a mean under 0.1, 99 % within
    1.5 (the reduced steps and the filter reading across slice borders), none over 4."""
    rng = np.random.default_rng(3)
    image = Image.fromarray((rng.random((75, 100, 3)) * 255).astype(np.uint8)).resize((4000, 3000),
                                                                                      Image.Resampling.BICUBIC)
    got = np.concatenate([c.ravel() for c in _crops(LlavaUHDImageProcessor()(image))])
    want = np.concatenate([c.ravel() for c in _crop_then_resize(image, plan_slices(4000, 3000), box=False)])
    levels = np.abs(got - want) * min(OPENAI_CLIP_STD) * 255  # back to grey levels (at least)
    assert levels.mean() < 0.1 and np.percentile(levels, 99) < 1.5 and levels.max() < 4, \
        (levels.mean(), np.percentile(levels, 99), levels.max())
    with pytest.raises(ValueError, match="reducing_gap must be >= 1 or None"):
        LlavaUHDImageProcessor(reducing_gap=0.5)


def test_patchify_round_trip(rng):
    x = rng.standard_normal((3, 28, 42)).astype(np.float32)
    p = patchify(x, 14)
    assert p.shape == (6, 588)
    np.testing.assert_array_equal(unpatchify(p, (2, 3), 14), x)
    # patch (row 1, col 2) is the block [14:28, 28:42], channel-major
    np.testing.assert_array_equal(p[5], x[:, 14:28, 28:42].reshape(-1))


def test_batch_of_mixed_sizes(processor, rng):
    images = [Image.fromarray(gradient(672, 1008)), rng.random((50, 80, 3)), torch.randint(0, 256, (3, 400, 900)),
              Image.fromarray(gradient(3000, 200))]
    out = processor(images, return_tensors="pt")
    grids = out["patch_grid_hw"]
    assert out["pixel_values"].shape[0] == int((grids[:, 0] * grids[:, 1]).sum())
    ids = out["crop_image_ids"].tolist()
    assert ids == sorted(ids) and set(ids) == {0, 1, 2, 3}
    assert out["image_layout"].tolist()[1] == [1, 1]  # the 80x50 array is not sliced
    assert out["crop_is_overview"].sum() == 3
    # a nested list (one list per sample) gives the same as the flat list
    nested = processor([images[:2], images[2:]], return_tensors="pt")
    assert torch.equal(nested["pixel_values"], out["pixel_values"])


def test_per_call_max_slices(processor):
    image = Image.fromarray(gradient(2000, 1500))
    assert processor(image)["image_layout"].tolist() != [[1, 1]]
    assert processor(image, max_slices=1)["image_layout"].tolist() == [[1, 1]]


def test_same_result_for_pil_numpy_and_torch(processor):
    arr = gradient(500, 400)
    a = processor(Image.fromarray(arr))["pixel_values"]
    b = processor(arr)["pixel_values"]
    c = processor(torch.from_numpy(arr).permute(2, 0, 1))["pixel_values"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    # float input in [0, 1] goes through the full-precision path and lands close to the 8-bit one (on a smooth
    # image: at sharp edges only the 8-bit path clips the bicubic overshoot)
    smooth = arr.copy()
    smooth[..., 2] = 128
    d = processor(smooth.astype(np.float32) / 255.0)["pixel_values"]
    np.testing.assert_allclose(d, processor(smooth)["pixel_values"], atol=0.03)


MODES = ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "RGB", "I", "F", "YCbCr"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_becomes_rgb(processor, mode):
    base = Image.fromarray(gradient(400, 300))
    if mode == "I;16":
        image = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257))
        assert image.mode == "I;16"
    elif mode == "F":
        image = Image.fromarray(np.asarray(base.convert("L"), np.float32) / 255.0)
    else:
        image = base.convert(mode)
    rgb = load_rgb(image)
    size = rgb.size if isinstance(rgb, Image.Image) else rgb.shape[1::-1]
    assert tuple(size) == (400, 300)
    if isinstance(rgb, Image.Image):
        assert rgb.mode == "RGB"
    else:
        assert rgb.shape == (300, 400, 3) and rgb.dtype == np.float32 and 0 <= rgb.min() and rgb.max() <= 1
    out = processor(image)
    assert out["pixel_values"].shape[1] == 588 and np.isfinite(out["pixel_values"]).all()
    if mode == "I;16":  # 16-bit is scaled to [0, 1], not clipped at 255
        np.testing.assert_allclose(rgb[..., 0], np.asarray(base.convert("L"), np.float32) / 255.0, atol=1e-6)


def test_transparent_pixels_become_white():
    rgba = np.zeros((10, 10, 4), np.uint8)  # fully transparent black
    assert np.asarray(load_rgb(Image.fromarray(rgba))).min() == 255
    assert np.allclose(load_rgb(np.zeros((10, 10, 4), np.float32)), 1.0)


def test_exif_orientation_is_applied(processor):
    image = Image.fromarray(gradient(400, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes())
    loaded = load_rgb(buf.getvalue())
    assert loaded.size == (200, 400)
    assert processor(buf.getvalue())["image_sizes"].tolist() == [[400, 200]]


def test_truncated_jpeg_is_a_clear_error(processor, jpeg_bytes, tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])
    with pytest.raises(ValueError, match=r"image 1 \('.*cut.jpg'\).*(truncated|decoded|read)"):
        processor([jpeg_bytes, str(path)])
    # a lazily opened PIL image of the same file fails clearly too
    with pytest.raises(ValueError, match=r"image 0 .*cut.jpg"):
        processor(Image.open(path))


def test_non_image_file_is_a_clear_error(processor, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image at all")
    with pytest.raises(ValueError, match=r"image 0 \('.*notes.txt'\): not an image"):
        processor(str(path))
    with pytest.raises(ValueError, match="no such image file"):
        processor(str(tmp_path / "missing.png"))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((0, 10, 3), np.uint8), "empty"),
    (np.zeros((10, 10, 7), np.uint8), "channel axis"),
    (np.zeros((2, 2, 2, 3), np.uint8), "2 or 3 dimensions"),
    (np.full((10, 10), 2.0, np.float32), r"\[0, 1\]"),
    (np.full((10, 10), np.nan, np.float32), "NaN"),
    (np.full((10, 10), 300, np.int64), "0, 255"),
    ({"not": "an image"}, "unsupported image type dict"),
])
def test_bad_arrays_are_clear_errors(processor, bad, message):
    with pytest.raises(ValueError, match=message):
        processor(bad)


def test_pixel_limit(tmp_path):
    processor = LlavaUHDImageProcessor(max_pixels=1000)
    Image.fromarray(gradient(100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="exceeds max_pixels=1000"):
        processor(str(tmp_path / "big.png"))


def test_save_and_load_round_trip(tmp_path):
    processor = LlavaUHDImageProcessor(max_slices=7, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25],
                                       size={"height": 224, "width": 224})
    processor.save_pretrained(tmp_path)
    loaded = LlavaUHDImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.slice_config == processor.slice_config
    image = Image.fromarray(gradient(900, 500))
    np.testing.assert_array_equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])


def test_normalization_settings(processor):
    image = Image.new("RGB", (336, 336), (255, 0, 128))
    raw = LlavaUHDImageProcessor(do_normalize=False, do_rescale=False)(image)["pixel_values"]
    assert np.allclose(raw.reshape(-1, 3, 196)[:, 0], 255) and np.allclose(raw.reshape(-1, 3, 196)[:, 1], 0)
    out = processor(image)["pixel_values"].reshape(-1, 3, 196)
    assert np.allclose(out[:, 0], (1.0 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0], atol=1e-5)


def test_a_zero_std_is_refused():
    with pytest.raises(ValueError, match="image_std must not hold a 0"):
        LlavaUHDImageProcessor(image_std=(0.2, 0.0, 0.2))


# ------------------------------------------------------------------------------------------ the ablation strategies
# LLaVA-1.5's expand2square fills with tuple(int(x * 255) for x in image_mean): CLIP's mean is 0.4815, 0.4578, 0.4082,
# i.e. 122.77, 116.75, 104.09 grey levels, truncated
CLIP_FILL = (122, 116, 104)
RED = (255, 0, 0)


def normalized(rgb255) -> np.ndarray:
    """An 8-bit colour as the processor's output values (/255, CLIP mean and std), float64, shape (3,)."""
    return (np.asarray(rgb255, np.float64) / 255.0 - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD


def _pad_layout(side: int, image_rows: range, image_cols: range, image_value, fill_value) -> np.ndarray:
    """(3, side, side): ``fill_value`` everywhere but the block of ``image_rows`` x ``image_cols``."""
    want = np.empty((3, side, side))
    want[:] = np.asarray(fill_value, np.float64)[:, None, None]
    want[:, image_rows.start:image_rows.stop, image_cols.start:image_cols.stop] = \
        np.asarray(image_value, np.float64)[:, None, None]
    return want


@pytest.mark.parametrize("width, height, rows, cols", [
    (112, 56, range(28, 84), range(0, 112)),  # landscape: 28 rows of fill above, 28 below
    (56, 112, range(0, 112), range(28, 84)),  # portrait: 28 columns left and right
    (112, 55, range(28, 83), range(0, 112)),  # odd margin (57 rows): 28 above, 29 below, as expand2square does
])
def test_pad_centres_the_image_on_the_mean_colour(width, height, rows, cols):
    """``image_strategy="pad"`` at a native size equal to the padded square (112), so no resize blurs the edges: the
    output is exactly the fill colour outside the centred image, the image's colour inside."""
    processor = LlavaUHDImageProcessor(size={"height": 112, "width": 112}, image_strategy="pad")
    out = processor(Image.new("RGB", (width, height), RED))
    assert out["patch_grid_hw"].tolist() == [[8, 8]] and out["image_layout"].tolist() == [[1, 1]]
    assert out["crop_is_overview"].tolist() == [False]
    assert out["image_sizes"].tolist() == [[height, width]]  # the image's own size, not the square's
    got = unpatchify(out["pixel_values"], (8, 8), 14)
    np.testing.assert_allclose(got, _pad_layout(112, rows, cols, normalized(RED), normalized(CLIP_FILL)), atol=1e-5)


@pytest.mark.parametrize("height", [56, 32])
def test_pad_of_a_float_image_fills_with_the_exact_mean(height):
    """A float image in [0, 1] pads with the mean itself (not truncated to 8 bits): the fill normalizes to 0."""
    processor = LlavaUHDImageProcessor(size={"height": 112, "width": 112}, image_strategy="pad")
    image = np.zeros((height, 112, 3), np.float32)
    image[..., 0] = 1.0  # red
    got = unpatchify(processor(image)["pixel_values"], (8, 8), 14)
    red = (np.array([1.0, 0.0, 0.0]) - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD
    top = (112 - height) // 2
    np.testing.assert_allclose(got, _pad_layout(112, range(top, top + height), range(112), red, np.zeros(3)),
                               atol=1e-5)


def test_pad_100x50_matches_expand2square_then_resize():
    """The 100x50 red image: padded by hand to 100x100 (rows 25-74 red, the rest the mean colour), bicubic-resized
    to 336x336 with PIL, /255, CLIP-normalized, against the processor's one crop."""
    canvas = np.empty((100, 100, 3), np.uint8)
    canvas[:] = CLIP_FILL
    canvas[25:75] = RED
    ref = np.asarray(Image.fromarray(canvas).resize((336, 336), Image.Resampling.BICUBIC), np.float64) / 255.0
    want = ((ref - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD).transpose(2, 0, 1)
    out = LlavaUHDImageProcessor(image_strategy="pad")(Image.new("RGB", (100, 50), RED))
    assert out["patch_grid_hw"].tolist() == [[24, 24]]
    got = unpatchify(out["pixel_values"], (24, 24), 14)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # away from the edges (rows 84 and 252; bicubic reads 2 source pixels, 6.7 output rows, either side): the fill
    # at the top and bottom, red between
    fill, red = (np.broadcast_to(normalized(c)[:, None, None], (3, 76, 336)) for c in (CLIP_FILL, RED))
    np.testing.assert_allclose(got[:, :76], fill, atol=1e-5)
    np.testing.assert_allclose(got[:, 92:168], red, atol=1e-5)
    np.testing.assert_allclose(got[:, 168:244], red, atol=1e-5)
    np.testing.assert_allclose(got[:, 260:], fill, atol=1e-5)


def test_fixed_grid_3_columns_2_rows():
    """``fixed_grid=(3, 2)``: 3 columns x 2 rows. A 1512x448 image of six flat blocks of 504x224 (one colour per
    block) cuts into exactly those blocks, row-major (top row left to right, then the bottom row), each kept at
    504x224 (sqrt(576 * 9/4) = 36 by sqrt(576 * 4/9) = 16 patches: the block's own size, so no resampling), then the
    overview: sqrt(576 * 27/8) = 44.09 -> 44 by sqrt(576 * 8/27) = 13.06 -> 13 patches (572 <= 576)."""
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200), (200, 0, 200)]
    pixels = np.zeros((448, 1512, 3), np.uint8)
    for k, colour in enumerate(colours):
        row, col = divmod(k, 3)
        pixels[row * 224:(row + 1) * 224, col * 504:(col + 1) * 504] = colour
    processor = LlavaUHDImageProcessor(image_strategy="fixed_grid", fixed_grid=(3, 2))
    out = processor(Image.fromarray(pixels))
    assert out["image_layout"].tolist() == [[2, 3]]  # (rows, cols)
    assert out["patch_grid_hw"].tolist() == [[16, 36]] * 6 + [[13, 44]]
    assert out["crop_is_overview"].tolist() == [False] * 6 + [True]
    crops = _crops(out)
    for k, colour in enumerate(colours):
        want = np.broadcast_to(normalized(colour)[:, None, None], (3, 224, 504))
        np.testing.assert_allclose(crops[k], want, atol=1e-5, err_msg=f"slice {k}")
    # the plan says the same, box by box
    plan = processor.plan(1512, 448)
    assert (plan.cols, plan.rows) == (3, 2)
    assert [s.box for s in plan.slices] == [(0, 0, 504, 224), (504, 0, 1008, 224), (1008, 0, 1512, 224),
                                            (0, 224, 504, 448), (504, 224, 1008, 448), (1008, 224, 1512, 448)]


def test_large_images_resize_their_crops_in_threads_with_identical_output(monkeypatch):
    import llava_uhd.image_processing as ip
    from concurrent.futures import ThreadPoolExecutor

    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (1500, 2000, 3), dtype=np.uint8))
    processor = LlavaUHDImageProcessor()
    monkeypatch.setattr(ip, "free_cores", lambda: 1)
    serial = processor(image, return_tensors="np")
    pools = []
    monkeypatch.setattr(ip, "free_cores", lambda: 3)
    monkeypatch.setattr(ip, "ThreadPoolExecutor", lambda n: pools.append(n) or ThreadPoolExecutor(n))
    threaded = processor(image, return_tensors="np")
    assert pools == [3]  # 3 MP of source pixels, 7 crops, 3 idle cores
    np.testing.assert_array_equal(threaded["pixel_values"], serial["pixel_values"])
    np.testing.assert_array_equal(threaded["patch_grid_hw"], serial["patch_grid_hw"])
    processor(Image.fromarray(np.zeros((600, 800, 3), np.uint8)))  # 0.5 MP: not worth a thread
    assert pools == [3]


# ------------------------------------------------------------------ found by the mutation check (image_processing)
def test_defaults_and_settings_as_documented():
    p = LlavaUHDImageProcessor()
    assert (p.max_slices, p.reducing_gap, p.resample, p.patch_size) == (6, 3.0, Image.Resampling.BICUBIC, 14)
    assert p.size == {"height": 336, "width": 336}
    assert LlavaUHDImageProcessor(reducing_gap=1).reducing_gap == 1.0  # the smallest gap PIL accepts
    assert LlavaUHDImageProcessor(reducing_gap=1.5).reducing_gap == 1.5
    assert LlavaUHDImageProcessor(reducing_gap=None).reducing_gap is None
    with pytest.raises(ValueError, match=r"reducing_gap must be >= 1 or None, got 0.5"):
        LlavaUHDImageProcessor(reducing_gap=0.5)
    with pytest.raises(ValueError, match=r"image_strategy must be 'uhd', 'pad' or 'fixed_grid', got 'tiles'"):
        LlavaUHDImageProcessor(image_strategy="tiles")
    with pytest.raises(TypeError, match=r"unexpected arguments: \['colour'\]"):
        p.preprocess(Image.new("RGB", (40, 30)), colour="red")
    saved = LlavaUHDImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).to_dict()
    assert (saved["image_mean"], saved["image_std"]) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])


def test_from_slice_config_takes_every_setting():
    from llava_uhd.slicing import SliceConfig

    p = LlavaUHDImageProcessor.from_slice_config(
        SliceConfig(image_size=(448, 224), patch_size=16, max_slices=4, max_pixels=5_000_000), image_strategy="pad")
    assert p.size == {"height": 224, "width": 448} and p.patch_size == 16 and p.max_slices == 4
    assert p.max_pixels == 5_000_000 and p.image_strategy == "pad"
    assert p.slice_config == SliceConfig(image_size=(448, 224), patch_size=16, max_slices=4, max_pixels=5_000_000)


def test_keep_pixels_is_four_times_the_crops_pixels():
    side = 336 * 336
    assert LlavaUHDImageProcessor().keep_pixels() == 4 * 7 * side  # 6 slices + overview
    assert LlavaUHDImageProcessor().keep_pixels(max_slices=2) == 4 * 3 * side
    assert LlavaUHDImageProcessor(image_strategy="pad").keep_pixels() == 4 * 1 * side
    assert LlavaUHDImageProcessor(image_strategy="fixed_grid", fixed_grid=(3, 1)).keep_pixels() == 4 * 4 * side
    assert LlavaUHDImageProcessor(image_strategy="fixed_grid", fixed_grid=(4, 2)).keep_pixels() == 4 * 9 * side
    assert LlavaUHDImageProcessor(size={"height": 224, "width": 448}, max_slices=3).keep_pixels() == 4 * 4 * 448 * 224


def test_a_float_image_resizes_with_the_resample_filter():
    rng = np.random.default_rng(2)
    image = rng.random((300, 500, 3)).astype(np.float32)
    raw = {"do_normalize": False, "do_rescale": False, "reducing_gap": None}
    p = LlavaUHDImageProcessor(resample=Image.Resampling.NEAREST, **raw)
    crop = p.plan(500, 300).crops[0]
    left, top, right, bottom = crop.box
    expected = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[top:bottom, left:right, c]))
                                    .resize(crop.size, Image.Resampling.NEAREST)) for c in range(3)])
    np.testing.assert_array_equal(_crops(p(image))[0], expected)
    assert not np.array_equal(_crops(LlavaUHDImageProcessor(**raw)(image))[0], expected)


@pytest.mark.parametrize("resample", [Image.Resampling.NEAREST, Image.Resampling.BILINEAR])
def test_the_resample_filter_is_used(resample):
    image = Image.fromarray(gradient(1000, 700))
    rng = np.random.default_rng(0)  # detail that every filter renders differently
    image = Image.fromarray(np.clip(np.asarray(image) + rng.integers(0, 60, (700, 1000, 3)), 0, 255).astype(np.uint8))
    p = LlavaUHDImageProcessor(resample=resample, reducing_gap=None, do_normalize=False, do_rescale=False)
    out = p(image)
    crop = p.plan(1000, 700).crops[0]
    expected = np.asarray(image.resize(crop.size, resample, box=crop.box), np.float32).transpose(2, 0, 1)
    np.testing.assert_array_equal(_crops(out)[0], expected)
    bicubic = LlavaUHDImageProcessor(reducing_gap=None, do_normalize=False, do_rescale=False)(image)
    assert not np.array_equal(_crops(bicubic)[0], expected)


def test_reducing_gap_is_used():
    image = Image.fromarray(gradient(3000, 2000))
    rng = np.random.default_rng(1)
    image = Image.fromarray(np.clip(np.asarray(image) + rng.integers(0, 60, (2000, 3000, 3)), 0, 255).astype(np.uint8))
    raw = {"do_normalize": False, "do_rescale": False}
    # the first slice, 1000x1000 px to 336x336: reduced by 2 first only when the gap is under 1.5
    exact, gapped = (_crops(LlavaUHDImageProcessor(reducing_gap=g, **raw)(image))[0] for g in (None, 1.0))
    crop = LlavaUHDImageProcessor().plan(3000, 2000).crops[0]
    expected = np.asarray(image.resize(crop.size, Image.Resampling.BICUBIC, box=crop.box, reducing_gap=1.0),
                          np.float32).transpose(2, 0, 1)
    np.testing.assert_array_equal(gapped, expected)
    assert not np.array_equal(exact, gapped)


@pytest.mark.parametrize("strategy", ["uhd", "pad", "fixed_grid"])
def test_outputs_are_float32_and_int64(strategy):
    out = LlavaUHDImageProcessor(image_strategy=strategy, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 0.5])(
        [Image.fromarray(gradient(500, 300)), np.zeros((40, 90, 3), np.uint8)])
    assert out["pixel_values"].dtype == np.float32
    for key in ("patch_grid_hw", "crop_image_ids", "image_layout", "image_sizes"):
        assert out[key].dtype == np.int64, key
    assert out["crop_is_overview"].dtype == bool


def test_no_images_give_empty_rows_of_the_patch_width():
    out = LlavaUHDImageProcessor(patch_size=16)([])
    assert out["pixel_values"].shape == (0, 3 * 16 * 16) and out["pixel_values"].dtype == np.float32
    assert out["patch_grid_hw"].shape == (0, 2) and out["image_sizes"].shape == (0, 2)


def test_pad_is_one_view_whatever_the_size():
    p = LlavaUHDImageProcessor(image_strategy="pad")
    for w, h in ((2000, 1000), (336, 1500), (100, 50)):
        plan = p.plan(w, h)
        assert len(plan.crops) == 1 and plan.crops[0].size == (336, 336), (w, h)


def test_fixed_grid_crops_follow_the_processors_size():
    p = LlavaUHDImageProcessor(image_strategy="fixed_grid", fixed_grid=(2, 1), size={"height": 224, "width": 224})
    plan = p.plan(896, 448)
    assert (plan.cols, plan.rows) == (2, 1)
    assert [c.size for c in plan.crops[:2]] == [(224, 224), (224, 224)]  # two 448x448 halves at 224, not 336
    w, h = plan.crops[2].size  # the overview: about 224x224 pixels in all, 2:1 like the image (322x154)
    assert abs(w / h - 2) < 0.1 and 0.9 * 224 * 224 < w * h < 1.1 * 224 * 224


def test_patchify_keeps_leading_dimensions_for_numpy_and_torch():
    rng = np.random.default_rng(3)
    pixels = rng.normal(size=(2, 3, 3, 8, 12)).astype(np.float32)  # two batch dimensions, 4x4 patches
    out = patchify(pixels, 4)
    assert out.shape == (2, 3, 2 * 3, 3 * 16)
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(out[i, j], patchify(pixels[i, j], 4))
            np.testing.assert_array_equal(unpatchify(out[i, j], (2, 3), 4), pixels[i, j])
    as_torch = patchify(torch.from_numpy(pixels), 4)
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_array_equal(as_torch.numpy(), out)
    # patch (row 1, column 2) of image [1, 0] by hand: its 3 channels x 4 x 4 pixels, channel-major
    np.testing.assert_array_equal(out[1, 0, 1 * 3 + 2], pixels[1, 0, :, 4:8, 8:12].reshape(-1))


def test_vision_image_stats_from_the_checkpoint_or_its_family(tmp_path):
    import json

    from transformers import CLIPVisionConfig, Dinov2Config, SiglipVisionConfig

    from llava_uhd.image_processing import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, vision_image_stats

    for name, config, stats in (("dino", Dinov2Config(), (IMAGENET_MEAN, IMAGENET_STD)),
                                ("siglip", SiglipVisionConfig(), (SIGLIP_MEAN, SIGLIP_STD)),
                                ("clip", CLIPVisionConfig(), (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))):
        config.save_pretrained(tmp_path / name)  # no preprocessor config: the family's standard values
        assert vision_image_stats(str(tmp_path / name)) == stats, name
    # a preprocessor config with both values wins; with only one of them it is not used
    (tmp_path / "dino" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3]}))
    assert vision_image_stats(str(tmp_path / "dino")) == (IMAGENET_MEAN, IMAGENET_STD)
    (tmp_path / "dino" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    assert vision_image_stats(str(tmp_path / "dino")) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
