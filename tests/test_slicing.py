import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llava_uhd.slicing import DEFAULT_MAX_PIXELS, SliceConfig, choose_grid, fit_to_patches, partition, plan_slices

PAPER = SliceConfig.paper()


def brute_force_grid(width, height, config):
    """Eq. 1/2 straight from the paper, in float64, for images far from ties."""
    vw, vh = config.image_size
    n = min(math.ceil(width * height / (vw * vh)), config.max_slices)
    if n <= 1:
        return None
    best, best_score = None, -math.inf
    for k in (n - 1, n, n + 1):
        if k == 1 or k > config.max_slices:
            continue
        for m in range(1, k + 1):
            if k % m == 0:
                score = -abs(math.log(width * (k // m) / (height * m)) - math.log(vw / vh))
                if score > best_score:
                    best, best_score = (m, k // m), score
    return best, best_score


def check_plan_invariants(plan, config):
    w, h = plan.width, plan.height
    # boxes partition the image exactly
    covered = 0
    for k, s in enumerate(plan.slices):
        l, t, r, b = s.box
        assert 0 <= l < r <= w and 0 <= t < b <= h
        covered += (r - l) * (b - t)
        row, col = divmod(k, plan.cols)
        # row-major: neighbours share edges
        if col > 0:
            assert plan.slices[k - 1].box[2] == l and plan.slices[k - 1].box[1] == t
        if row > 0:
            assert plan.slices[k - plan.cols].box[3] == t
    assert covered == w * h
    assert plan.slices[0].box[:2] == (0, 0) and plan.slices[-1].box[2:] == (w, h)
    assert len(plan.slices) == plan.cols * plan.rows <= config.max_slices
    for c in plan.crops:
        sw, sh = c.size
        assert sw % config.patch_size == 0 and sh % config.patch_size == 0
        assert sw >= config.patch_size and sh >= config.patch_size
        assert c.num_patches <= config.native_patches


def test_paper_example():
    plan = plan_slices(672, 1008)
    assert (plan.cols, plan.rows) == (2, 3)
    assert [s.size for s in plan.slices] == [(336, 336)] * 6
    assert [s.box for s in plan.slices] == [
        (0, 0, 336, 336), (336, 0, 672, 336),
        (0, 336, 336, 672), (336, 336, 672, 672),
        (0, 672, 336, 1008), (336, 672, 672, 1008),
    ]
    assert plan.overview is not None
    assert plan.num_separators() == 6
    assert plan.num_tokens(64) == 454
    assert plan.num_tokens(64, spatial_schema=False) == 448
    assert plan.patch_grids[:6] == [(24, 24)] * 6


def test_presets_one_argument_away():
    assert SliceConfig.paper().max_slices == 6
    assert SliceConfig.release().max_slices == 7
    assert SliceConfig.preset("release") == SliceConfig.release()
    assert SliceConfig.paper(max_slices=9).max_slices == 9
    # 7 slices are only reachable with the release's cap
    assert len(plan_slices(336 * 7, 336, SliceConfig.release()).slices) == 7
    assert len(plan_slices(336 * 7, 336, SliceConfig.paper()).slices) == 6
    with pytest.raises(ValueError, match="unknown slicing preset"):
        SliceConfig.preset("nope")


def test_square_tie_is_exact_and_documented():
    # 2x3 and 3x2 tie exactly for a square image; the rule picks landscape slices: 2 cols x 3 rows.
    for side in (900, 1000, 5000, 30000):
        assert choose_grid(side, side, SliceConfig.paper(max_pixels=None)) == (2, 3)
    # a square image with 4 ideal slices: 2x2 wins outright
    assert choose_grid(672, 672, PAPER) == (2, 2)


def test_small_images_are_not_sliced():
    for w, h in [(336, 336), (100, 50), (1, 1), (200, 500), (336 * 336, 1)]:
        plan = plan_slices(w, h)
        assert (plan.cols, plan.rows) == (1, 1) and plan.overview is None
        assert plan.slices[0].box == (0, 0, w, h)
        assert plan.num_tokens(64) == 64
    assert plan_slices(100, 100).slices[0].size == (336, 336)  # upscaled to about the native area
    assert plan_slices(337, 336).is_sliced


def test_slice_resize_keeps_aspect_and_area():
    for w, h in [(500, 300), (300, 500), (1000, 999), (800, 100)]:
        sw, sh = fit_to_patches(w, h, PAPER)
        # about the native area, never above the cap
        assert sw * sh <= 336 * 336
        assert sw * sh >= 0.85 * 336 * 336
        # each side within about half a patch of the exact area-preserving size (aspect kept)
        exact_w = math.sqrt(576 * w / h) * 14
        exact_h = math.sqrt(576 * h / w) * 14
        assert abs(sw - exact_w) <= 14 and abs(sh - exact_h) <= 14


def test_extreme_inputs_give_plans():
    for w, h in [(1, 1), (1, 10000), (10000, 1), (100000, 3), (3, 100000), (30000, 30000), (4000, 100)]:
        plan = plan_slices(w, h, max_pixels=None)
        check_plan_invariants(plan, PAPER)
    assert plan_slices(1, 10000).slices[0].size == (14, 8064)
    assert plan_slices(10000, 1).slices[0].size == (8064, 14)
    # the release's 4000x100 case: 67x8-patch slices there; here (5 slices) 68x8 patches, under the cap
    assert plan_slices(4000, 100).slices[0].grid == (8, 68)


def test_pixel_limit_is_configurable():
    # the default is Pillow's bomb threshold, 2 * 89,478,485 pixels (a 1 GB RGBA decode / 3 bytes a pixel, twice)
    assert SliceConfig().max_pixels == DEFAULT_MAX_PIXELS == 2 * (1024**3 // 4 // 3)
    assert plan_slices(14000, 10000).is_sliced  # a 140-megapixel photo
    with pytest.raises(ValueError, match="exceeds max_pixels"):
        plan_slices(32000, 32000)
    assert plan_slices(40000, 40000, max_pixels=None).is_sliced
    with pytest.raises(ValueError, match="positive integer"):
        plan_slices(0, 10)
    with pytest.raises(ValueError, match="positive integer"):
        plan_slices(10.5, 10)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        SliceConfig(image_size=(330, 336))
    with pytest.raises(ValueError, match="max_slices"):
        SliceConfig(max_slices=0)


def test_max_slices_one_never_slices():
    assert not plan_slices(5000, 3000, max_slices=1).is_sliced


def test_partition():
    assert partition(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert partition(5, 5) == [(i, i + 1) for i in range(5)]


sizes = st.integers(min_value=1, max_value=20000)


@st.composite
def image_sizes(draw):
    """Sizes from 1 to 20000 px with aspect ratios from 1:100 to 100:1."""
    w = draw(sizes)
    ratio = draw(st.floats(min_value=0.01, max_value=100.0))
    h = max(1, min(20000, round(w / ratio)))
    return w, h


# geometry only, so no pixel limit: sizes up to 20000x20000 are plans, never decoded images
configs = st.sampled_from([SliceConfig.paper(max_pixels=None), SliceConfig.release(max_pixels=None),
                           SliceConfig(image_size=(224, 224), patch_size=14, max_slices=9, max_pixels=None)])


@settings(max_examples=400, deadline=None)
@given(image_sizes(), configs)
def test_property_partition_and_patch_multiples(wh, config):
    plan = plan_slices(*wh, config)
    check_plan_invariants(plan, config)


@settings(max_examples=400, deadline=None)
@given(image_sizes(), configs)
def test_property_transpose(wh, config):
    w, h = wh
    if w == h:
        return
    a, b = plan_slices(w, h, config), plan_slices(h, w, config)
    assert (a.cols, a.rows) == (b.rows, b.cols)
    for i in range(a.rows):
        for j in range(a.cols):
            sa, sb = a.slices[i * a.cols + j], b.slices[j * b.cols + i]
            l, t, r, bo = sa.box
            assert sb.box == (t, l, bo, r)
            assert sb.size == sa.size[::-1]
    if a.overview:
        assert b.overview.size == a.overview.size[::-1]


@settings(max_examples=300, deadline=None)
@given(image_sizes(), configs)
def test_property_deterministic_and_matches_eq1(wh, config):
    w, h = wh
    plan = plan_slices(w, h, config)
    assert plan == plan_slices(w, h, config)
    ref = brute_force_grid(w, h, config)
    if ref is None:
        assert not plan.is_sliced
        return
    (m, n), score = ref
    vw, vh = config.image_size
    ours = -abs(math.log(w * plan.rows / (h * plan.cols)) - math.log(vw / vh))
    # the chosen grid has the best score (up to float noise in the reference); the ideal count respected
    assert ours >= score - 1e-12
    ideal = min(math.ceil(w * h / (vw * vh)), config.max_slices)
    assert abs(plan.cols * plan.rows - ideal) <= 1


@settings(max_examples=200, deadline=None)
@given(image_sizes())
def test_property_paper_claim_on_slice_shapes(wh):
    """Paper: for aspect ratios in [1:6, 6:1] slices stay within [1:2, 2:1] (at N <= 20)."""
    w, h = wh
    if not (Fraction(1, 6) <= Fraction(w, h) <= 6) or w * h <= 336 * 336:
        return
    plan = plan_slices(w, h, SliceConfig(max_slices=20, max_pixels=None))
    for s in plan.slices:
        l, t, r, b = s.box
        assert Fraction(1, 2) - Fraction(1, 20) <= Fraction(r - l, b - t) <= 2 + Fraction(1, 10)
