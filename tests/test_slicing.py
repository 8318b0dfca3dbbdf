import math
import re
from dataclasses import asdict
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llava_uhd.slicing import (DEFAULT_MAX_PIXELS, SliceConfig, choose_grid, fit_to_patches, partition, plan_fixed_grid,
                               plan_slices)

PAPER = SliceConfig.paper()


def brute_force_scores(width, height, config):
    """Eq. 1 straight from the paper, in float64: ``{(m, n): S(m, n)}`` over C_{N-1} u C_N u C_{N+1} (m columns,
    n rows; counts of 1 and above the cap left out), or None when the image is not sliced (N <= 1). ``W_v`` is the
    ViT's width, ``H_v`` its height: ``config.image_size`` is ``(W_v, H_v)``."""
    W_v, H_v = config.image_size
    n = min(math.ceil(width * height / (W_v * H_v)), config.max_slices)
    if n <= 1:
        return None
    scores = {}
    for k in (n - 1, n, n + 1):
        if k == 1 or k > config.max_slices:
            continue
        for m in range(1, k + 1):
            if k % m == 0:
                rows = k // m
                scores[(m, rows)] = -abs(math.log(width * rows / (height * m)) - math.log(W_v / H_v))
    return scores


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
    p = config.patch_size
    native = (config.image_size[0] // p) * (config.image_size[1] // p)  # the ViT's own patch grid, W_v x H_v
    for c in plan.crops:
        sw, sh = c.size
        assert sw % p == 0 and sh % p == 0
        assert sw >= p and sh >= p
        assert (sw // p) * (sh // p) <= native


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


# geometry only, so no pixel limit: sizes up to 20000x20000 are plans, never decoded images. Two non-square ViTs
# (W_v != H_v: 336x224 = a 24x16 patch grid, landscape; 224x448 = 16x32, portrait) so that a W_v / H_v swap in
# Eq. 1 changes the plans.
SQUARE_CONFIGS = [SliceConfig.paper(max_pixels=None), SliceConfig.release(max_pixels=None),
                  SliceConfig(image_size=(224, 224), patch_size=14, max_slices=9, max_pixels=None)]
NON_SQUARE_CONFIGS = [SliceConfig(image_size=(336, 224), patch_size=14, max_slices=6, max_pixels=None),
                      SliceConfig(image_size=(224, 448), patch_size=14, max_slices=9, max_pixels=None)]
configs = st.sampled_from(SQUARE_CONFIGS + NON_SQUARE_CONFIGS)


def transposed(config):
    """The same ViT turned a quarter turn: ``(W_v, H_v)`` -> ``(H_v, W_v)``."""
    return SliceConfig(**{**asdict(config), "image_size": config.image_size[::-1]})


@settings(max_examples=400, deadline=None)
@given(image_sizes(), configs)
def test_property_partition_and_patch_multiples(wh, config):
    plan = plan_slices(*wh, config)
    check_plan_invariants(plan, config)


@settings(max_examples=400, deadline=None)
@given(image_sizes(), configs)
def test_property_transpose(wh, config):
    """Turning the image (and the ViT with it: a square one stays the same) turns the plan."""
    w, h = wh
    if w == h:
        return
    a, b = plan_slices(w, h, config), plan_slices(h, w, transposed(config))
    assert (a.cols, a.rows) == (b.rows, b.cols)
    for i in range(a.rows):
        for j in range(a.cols):
            sa, sb = a.slices[i * a.cols + j], b.slices[j * b.cols + i]
            l, t, r, bo = sa.box
            assert sb.box == (t, l, bo, r)
            assert sb.size == sa.size[::-1]
    if a.overview:
        assert b.overview.size == a.overview.size[::-1]


@settings(max_examples=400, deadline=None)
@given(image_sizes(), configs)
def test_property_deterministic_and_matches_eq1(wh, config):
    w, h = wh
    plan = plan_slices(w, h, config)
    assert plan == plan_slices(w, h, config)
    scores = brute_force_scores(w, h, config)
    if scores is None:
        assert not plan.is_sliced
        return
    best = max(scores.values())
    ours = scores.get((plan.cols, plan.rows))
    assert ours is not None, (plan.cols, plan.rows, sorted(scores))  # a candidate of C_{N-1} u C_N u C_{N+1}
    # the chosen grid has the best score (up to float noise in the reference) ...
    assert ours >= best - 1e-12
    # ... and where the reference's best is clear of every other grid, it is that grid
    runners_up = [v for g, v in scores.items() if g != (plan.cols, plan.rows)]
    if runners_up and best - max(runners_up) > 1e-9:
        assert scores[(plan.cols, plan.rows)] == best


def test_non_square_vit_worked_by_hand():
    """W_v x H_v = 336 x 224 (3:2, a 24x16 patch grid), cap 6. Image 1008x448: N = ceil(451584 / 75264) = 6,
    candidates C_5 u C_6 (7 is over the cap). The slice aspect (1008 / m) / (448 / n) = 2.25 n / m:

        (1, 5) 11.25   (5, 1) 0.45   (1, 6) 13.5   (2, 3) 3.375   (3, 2) 1.5   (6, 1) 0.375

    Against W_v / H_v = 1.5, (3, 2) is exact (score 0): 3 columns x 2 rows of 336x224 slices, each already at the
    ViT's size. With W_v and H_v swapped (target 2/3) the best would be (5, 1) (0.45 is 1.48x off 2/3, (3, 2) 2.25x).
    """
    config = SliceConfig(image_size=(336, 224), patch_size=14, max_slices=6)
    plan = plan_slices(1008, 448, config)
    assert (plan.cols, plan.rows) == (3, 2)
    assert [s.box for s in plan.slices] == [
        (0, 0, 336, 224), (336, 0, 672, 224), (672, 0, 1008, 224),
        (0, 224, 336, 448), (336, 224, 672, 448), (672, 224, 1008, 448)]
    assert [s.size for s in plan.slices] == [(336, 224)] * 6
    assert [s.grid for s in plan.slices] == [(16, 24)] * 6  # (h_p, w_p): the ViT's native 16 x 24 patches
    # the overview keeps the image's 9:4 aspect in at most 24 * 16 = 384 patches: sqrt(384 * 9/4) = 29.4 -> 29
    # patches across, sqrt(384 * 4/9) = 13.06 -> 13 down (29 * 13 = 377 <= 384)
    assert plan.overview.size == (29 * 14, 13 * 14)

    # a square image, 672x672: N = 6; slice aspect n / m. (2, 3) gives 3:2 slices, exact; (3, 2) would give 2:3
    assert choose_grid(672, 672, config) == (2, 3)
    # the portrait ViT (224 x 336) turns both answers: 2:3 slices of a square image are 3 columns x 2 rows
    portrait = SliceConfig(image_size=(224, 336), patch_size=14, max_slices=6)
    assert choose_grid(672, 672, portrait) == (3, 2)
    assert choose_grid(448, 1008, portrait) == (2, 3)
    assert [s.size for s in plan_slices(448, 1008, portrait).slices] == [(224, 336)] * 6
    # the landscape ViT on the portrait image: slice aspect (448 / m) / (1008 / n) = 4n / 9m; (1, 5) = 2.22 is the
    # closest to 1.5 (1.48x off; (1, 6) 2.67 is 1.78x, (2, 3) 0.67 is 2.25x)
    assert choose_grid(448, 1008, config) == (1, 5)


@st.composite
def thin_sizes(draw):
    """Strips a few pixels thick and up to 20000 long (aspect ratios past the patch cap, either way)."""
    long, short = draw(st.integers(min_value=1, max_value=20000)), draw(st.integers(min_value=1, max_value=30))
    return (long, short) if draw(st.booleans()) else (short, long)


def test_ties_with_a_non_square_vit_turn_with_the_image():
    """Exact ties of Eq. 1 that only a non-square ViT makes, each with its turned twin (image and ViT turned).

    1268x634 on a 224x448 ViT (target slice aspect 1/2), cap 9: N = ceil(803912 / 100352) = 9, counts 8 and 9;
    slice aspect 2n/m: (4, 2) gives 1 (square), (8, 1) 0.25 (portrait): both 2x off 1/2, both 8 slices, a tie.
    Rule 3: the landscape image takes the square slices over portrait ones: (4, 2). Turned (634x1268 on 448x224):
    (2, 4) square against (1, 8) landscape slices for a portrait image: (2, 4), the transpose.

    1290x860 on 336x224 (target 3/2), cap 12: N = 15 -> 12, counts 11 and 12; slice aspect 1.5n/m: (3, 4) gives 2,
    (4, 3) 1.125, both 4/3 off 3/2 and both landscape. Rule 4: the one closer to square, (4, 3); turned: (3, 4).
    """
    tall_vit = SliceConfig(image_size=(224, 448), patch_size=14, max_slices=9)
    assert choose_grid(1268, 634, tall_vit) == (4, 2)
    assert choose_grid(634, 1268, transposed(tall_vit)) == (2, 4)
    wide_vit = SliceConfig(image_size=(336, 224), patch_size=14, max_slices=12)
    assert choose_grid(1290, 860, wide_vit) == (4, 3)
    assert choose_grid(860, 1290, transposed(wide_vit)) == (3, 4)


@settings(max_examples=600, deadline=None)
@given(st.one_of(image_sizes(), thin_sizes()), configs)
def test_property_fit_to_patches_is_nearest(wh, config):
    """fit_to_patches against the exact area-preserving size, worked out here in float64: ``w_i * h_i = cap`` and
    ``w_i / h_i = W / H`` (in patches; cap = the ViT's patch grid). Each side lands on the nearest whole patch
    (within half a patch: nearest, not floor or ceil); where both nearest sides would exceed the cap, a side goes
    down, and then each side is within one patch. A side under one patch (extreme aspect) is one patch, the other
    keeps the aspect (nearest, capped)."""
    w, h = wh
    p = config.patch_size
    W_v, H_v = config.image_size
    cap = (W_v // p) * (H_v // p)
    exact_w, exact_h = math.sqrt(cap * w / h), math.sqrt(cap * h / w)
    sw, sh = fit_to_patches(w, h, config)
    assert sw % p == 0 and sh % p == 0
    wp, hp = sw // p, sh // p
    assert wp >= 1 and hp >= 1 and wp * hp <= cap
    eps = 1e-9
    if exact_h < 1:  # too wide for one full row: one row, as many patches across as the aspect says (capped)
        assert hp == 1
        assert wp == cap if w / h >= cap else abs(wp - w / h) <= 0.5 + eps
        return
    if exact_w < 1:
        assert wp == 1
        assert hp == cap if h / w >= cap else abs(hp - h / w) <= 0.5 + eps
        return
    # the largest rounding either side could get (a tie at .5 counted as rounding up)
    up_w, up_h = math.floor(exact_w + 0.5 + eps), math.floor(exact_h + 0.5 + eps)
    if up_w * up_h <= cap:
        assert abs(wp - exact_w) <= 0.5 + eps and abs(hp - exact_h) <= 0.5 + eps, (wp, hp, exact_w, exact_h)
    else:  # the cap forces a side down
        assert abs(wp - exact_w) < 1 + eps and abs(hp - exact_h) < 1 + eps, (wp, hp, exact_w, exact_h)


def test_fit_to_patches_worked_by_hand():
    # 336/14: cap 24 * 24 = 576 patches. 180x100: sqrt(576 * 9/5) = 32.20 -> 32, sqrt(576 * 5/9) = 17.89 -> 18
    # (floor: 17); 32 * 18 = 576 fits
    assert fit_to_patches(180, 100, PAPER) == (32 * 14, 18 * 14)
    # 160x100: sqrt(921.6) = 30.36 -> 30, sqrt(360) = 18.97 -> 19 (floor: 18); 570 fits
    assert fit_to_patches(160, 100, PAPER) == (30 * 14, 19 * 14)
    # 900x400: sqrt(576 * 9/4) = 36 and sqrt(256) = 16 exactly
    assert fit_to_patches(900, 400, PAPER) == (504, 224)
    # 500x300: 30.98 -> 31 and 18.59 -> 19, 31 * 19 = 589 > 576: a side goes down. 30 x 19 (1.579), 31 x 18 (1.722),
    # 30 x 18 (1.667) against 5/3: 30 x 18 keeps the aspect exactly
    assert fit_to_patches(500, 300, PAPER) == (30 * 14, 18 * 14)
    # the 336x224 ViT (24 x 16 = 384 patches); 300x100: sqrt(1152) = 33.94 -> 34, sqrt(128) = 11.31 -> 11; 374 fits
    assert fit_to_patches(300, 100, NON_SQUARE_CONFIGS[0]) == (34 * 14, 11 * 14)


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


# ------------------------------------------------------------------------------------------ found by the mutation check
# (scripts/mutation_check.py: each test below fails for a small change of slicing.py that the tests above let pass)
def refused(message, call, *args, **kwargs):
    """``call(*args, **kwargs)`` raises a ValueError whose message is exactly ``message``."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call(*args, **kwargs)


def test_size_errors_name_the_side_and_the_pixel_count():
    refused("image width must be a positive integer, got 0", plan_slices, 0, 10)
    refused("image height must be a positive integer, got 0", plan_slices, 10, 0)
    refused("image width must be a positive integer, got True", plan_slices, True, 10)
    refused("image height must be a positive integer, got 2.0", plan_fixed_grid, 10, 2.0, 1, 1)
    # the limit is inclusive: exactly max_pixels pixels pass, one more is refused
    assert plan_slices(1000, 1000, max_pixels=1_000_000).is_sliced
    refused("image of 1000x1000 = 1000000 pixels exceeds max_pixels=999999; downscale it first or raise "
            "SliceConfig.max_pixels", plan_slices, 1000, 1000, max_pixels=999_999)


def test_config_errors_and_the_smallest_valid_settings():
    refused("image_size must be two positive integers, got (0, 336)", SliceConfig, image_size=(0, 336))
    refused("image_size must be two positive integers, got (336, 0)", SliceConfig, image_size=(336, 0))
    refused("image_size must be two positive integers, got (336.0, 336)", SliceConfig, image_size=(336.0, 336))
    refused("image_size must be two positive integers, got (336, 336.0)", SliceConfig, image_size=(336, 336.0))
    refused("patch_size must be a positive integer, got 0", SliceConfig, patch_size=0)
    refused("patch_size must be a positive integer, got 14.0", SliceConfig, patch_size=14.0)
    refused("image_size (330, 336) must be a multiple of patch_size 14", SliceConfig, image_size=(330, 336))
    refused("max_slices must be an integer >= 1, got 0", SliceConfig, max_slices=0)
    refused("max_pixels must be positive or None, got 0", SliceConfig, max_pixels=0)
    refused("unknown slicing preset 'nope'; choose one of ['paper', 'release']", SliceConfig.preset, "nope")
    # one-pixel ViT, one-pixel patches, a one-pixel limit: all valid
    tiny = SliceConfig(image_size=(1, 1), patch_size=1, max_slices=1, max_pixels=1)
    assert tiny.native_patches == 1 and not plan_slices(1, 1, tiny).is_sliced
    assert SliceConfig(patch_size=1).native_patches == 336 * 336
    assert SliceConfig.preset("paper") == SliceConfig.paper() and SliceConfig.preset("release", max_slices=3) == \
        SliceConfig(max_slices=3)


def test_a_plan_keeps_its_settings_and_describes_itself():
    """`SlicePlan.to_dict` of the paper's example written out: 6 slices of 336x336 (24x24 patches) and the overview,
    672x1008 fitted to 576 patches: sqrt(576 * 2/3) = 19.6 -> 20 across, sqrt(864) = 29.4 -> 29 down, 580 > 576,
    so the width goes down: 19 x 29 (the height already is its floor). Patches 6 * 576 + 551, tokens 7 * 64 + 6
    separators by default."""
    plan = plan_slices(672, 1008)
    assert plan.num_tokens() == 454 and plan.config == SliceConfig()
    box = [[0, 0, 336, 336], [336, 0, 672, 336], [0, 336, 336, 672], [336, 336, 672, 672], [0, 672, 336, 1008],
           [336, 672, 672, 1008]]
    config = {"image_size": [336, 336], "patch_size": 14, "max_slices": 6, "max_pixels": 178_956_970}
    assert plan.to_dict() == {
        "width": 672, "height": 1008, "cols": 2, "rows": 3,
        "slices": [{"box": b, "size": [336, 336], "grid": [24, 24]} for b in box],
        "overview": {"box": [0, 0, 672, 1008], "size": [19 * 14, 29 * 14], "grid": [29, 19]},
        "patches": 6 * 576 + 19 * 29, "tokens": 7 * 64 + 6, "config": config}
    assert plan.to_dict(queries=2, spatial_schema=False)["tokens"] == 14
    assert plan.to_dict(queries=2)["tokens"] == 20
    small = plan_slices(100, 50, max_slices=3)
    assert small.config == SliceConfig(max_slices=3)
    assert small.to_dict() == {
        "width": 100, "height": 50, "cols": 1, "rows": 1,
        # 2:1 in 576 patches: sqrt(1152) = 33.9 -> 34 across, sqrt(288) = 16.97 -> 17 down (578 > 576): 34 x 16
        # (2.125: 1.0625 off 2), 33 x 16 (2.0625: 1.0313 off) or 33 x 17 (1.941: 1.0303 off): 33 x 17
        "slices": [{"box": [0, 0, 100, 50], "size": [33 * 14, 17 * 14], "grid": [17, 33]}],
        "overview": None, "patches": 33 * 17, "tokens": 64, "config": {**config, "max_slices": 3}}


def test_fixed_grid_worked_by_hand():
    # 1000x600 in 2 x 2: 500x300 slices, each (like the whole image, 5:3) 30 x 18 patches (see above)
    plan = plan_fixed_grid(1000, 600, 2, 2)
    assert (plan.cols, plan.rows) == (2, 2) and plan.config == SliceConfig()
    assert [s.box for s in plan.slices] == [(0, 0, 500, 300), (500, 0, 1000, 300), (0, 300, 500, 600),
                                            (500, 300, 1000, 600)]
    assert [s.size for s in plan.crops] == [(420, 252)] * 5
    assert plan.overview.box == (0, 0, 1000, 600)
    # the grid is taken as given, even where Eq. 1 would not slice: 3 columns of a 10x10 image (3, 3 and 4 pixels)
    config = SliceConfig(max_slices=2)
    plan = plan_fixed_grid(10, 10, 3, 1, config)
    assert [s.box for s in plan.slices] == [(0, 0, 3, 10), (3, 0, 6, 10), (6, 0, 10, 10)]
    assert plan.is_sliced and plan.config is config
    # 1 x 1: the whole image, no overview
    one = plan_fixed_grid(500, 300, 1, 1)
    assert not one.is_sliced and one.slices[0].box == (0, 0, 500, 300) and one.slices[0].size == (420, 252)
    # a grid as wide / tall as the image in pixels fits; one more column or row does not
    assert len(plan_fixed_grid(3, 2, 3, 2).slices) == 6
    for cols, rows in [(4, 2), (3, 3), (0, 1), (1, 0)]:
        refused(f"a {cols}x{rows} grid does not fit a 3x2 image", plan_fixed_grid, 3, 2, cols, rows)
    refused("image of 100x100 = 10000 pixels exceeds max_pixels=9999; downscale it first or raise "
            "SliceConfig.max_pixels", plan_fixed_grid, 100, 100, 2, 2, SliceConfig(max_pixels=9999))


def test_grids_must_fit_in_the_pixels():
    """A 1x1-pixel ViT makes images of a few pixels sliceable. 2x3 pixels, cap 6: N = 6, counts 5 and 6; 5 slices
    fit neither as 1 x 5 nor 5 x 1 (3 rows, 2 columns of pixels), 6 only as 2 columns x 3 rows: one pixel each
    (every other grid would need a column or row more than the image has). 3x3 pixels, cap 8: N = 9 -> 8, counts
    7 and 8: 7 needs 7 pixels in a line, 8 a side of 4 or more: nothing fits, so the image is not sliced."""
    pixel_vit = SliceConfig(image_size=(1, 1), patch_size=1, max_slices=6)
    assert choose_grid(2, 3, pixel_vit) == (2, 3)
    assert choose_grid(3, 2, pixel_vit) == (3, 2)
    assert choose_grid(3, 3, SliceConfig(image_size=(1, 1), patch_size=1, max_slices=8)) == (1, 1)
    assert not plan_slices(3, 3, image_size=(1, 1), patch_size=1, max_slices=8).is_sliced


def test_rule_3_prefers_slices_shaped_like_the_image_over_square_ones():
    """1680x1120 (3:2) on a 336x224 ViT (target 3:2), cap 6: N = ceil(1881600 / 75264) = 25 -> 6, counts 5, 6.
    Slice aspect 1.5 n / m: (2, 3) 2.25 and (3, 2) 1 are both 1.5x off 1.5 (the rest: (1, 5) 7.5, (5, 1) 0.3,
    (1, 6) 9, (6, 1) 0.25). Same score, same count: rule 3 takes the landscape slices of the landscape image,
    (2, 3) (rule 4 alone would take the square ones). Turned (1120x1680 on 224x336): portrait slices, (3, 2)."""
    assert choose_grid(1680, 1120, SliceConfig(image_size=(336, 224), max_slices=6)) == (2, 3)
    assert choose_grid(1120, 1680, SliceConfig(image_size=(224, 336), max_slices=6)) == (3, 2)


def test_fit_to_patches_cap_edge_and_best_option_by_hand():
    # 590x1370 (aspect 0.4307), cap 576: sqrt(576 * 0.4307) = 15.75 -> 16, sqrt(576 / 0.4307) = 36.57 -> 37, 592 > 576.
    # Options 15 x 37 (0.405: 1.062 off), 16 x 36 (0.444: 1.032 off), 15 x 36 (0.417: 1.034 off): 16 x 36, which
    # uses exactly the 576 patches (a fit at the cap is allowed)
    assert fit_to_patches(590, 1370, PAPER) == (16 * 14, 36 * 14)
    # 840x160 (5.25) on 448x224, cap 32 * 16 = 512: sqrt(2688) = 51.85 -> 52, sqrt(97.5) = 9.87 -> 10, 520 > 512.
    # Options 51 x 10 (5.1: 1.029 off), 52 x 9 (5.78: 1.101 off), 51 x 9 (5.67: 1.079 off): 51 x 10
    assert fit_to_patches(840, 160, SliceConfig(image_size=(448, 224))) == (51 * 14, 10 * 14)
