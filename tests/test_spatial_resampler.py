"""The spatially constrained resampler of the release (`llava_uhd.modeling.spatial_resampler`): its pooling rule, its
ROI-align against torchvision's definition written out in float64 (``aligned`` both ways, fixed and adaptive
``sampling_ratio``), and the whole resampler against a one-query-at-a-time float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err

from llava_uhd.modeling.spatial_resampler import SpatialResampler, pooling_size


def test_pooling_rule():
    assert pooling_size(24, 24) == (3, 3)
    assert pooling_size(20, 29) == (2, 3)  # 1.45:1 -> 3:2
    assert pooling_size(17, 33) == (2, 4)  # ~2:1
    assert pooling_size(33, 17) == (4, 2)
    assert pooling_size(21, 28) == (3, 4)  # 4:3
    assert pooling_size(1, 100) == (2, 4)  # extreme: the widest candidate
    # the candidates come in transposed pairs and the comparison is exact, so transposing a crop transposes its
    # pooled grid (a floating-point comparison could flip near-ties)
    for h in range(1, 41):
        for w in range(1, 41):
            ph, pw = pooling_size(h, w)
            assert pooling_size(w, h) == (pw, ph)


def _bilinear(feat, y, x):
    """torchvision ROI-align's bilinear sample of feat (H, W, C) at (y, x), float64, written out."""
    H, W = feat.shape[:2]
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return torch.zeros(feat.shape[-1], dtype=feat.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= H - 1:
        y0 = y1 = H - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= W - 1:
        x0 = x1 = W - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * feat[y0, x0] + hy * lx * feat[y0, x1] + ly * hx * feat[y1, x0] + ly * lx * feat[y1, x1]


def roi_align_reference(feat, box, ph, pw, aligned, sampling_ratio):
    """torchvision's ``roi_align`` of one box ``(x1, y1, x2, y2)`` (``spatial_scale = 1``: feature ``c`` sits at
    ``x = c``) over ``feat`` (H, W, C), written out sample by sample in float64: ``(ph * pw, C)``, bins row-major.

    ``aligned``: the box is shifted by -0.5 (pixel model) and its sides are not clamped to at least 1 (without it,
    they are). ``sampling_ratio > 0``: that many samples per bin and axis; else ``ceil(side / bins)`` (adaptive).
    Each sample is `_bilinear`; a bin is the mean of its samples."""
    x1, y1, x2, y2 = box
    offset = 0.5 if aligned else 0.0
    start_x, start_y = x1 - offset, y1 - offset
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / ph)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pw)
    count = max(grid_h * grid_w, 1)
    out = []
    for by in range(ph):
        for bx in range(pw):
            acc = torch.zeros(feat.shape[-1], dtype=torch.float64)
            for iy in range(grid_h):
                y = start_y + by * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = start_x + bx * bin_w + (ix + 0.5) * bin_w / grid_w
                    acc += _bilinear(feat, y, x)
            out.append(acc / count)
    return torch.stack(out)


def region_box(i, j, h, w, g):
    """Region (i, j) of the g x g grid over an h x w map, ``(x1, y1, x2, y2)`` in feature units."""
    return j * w / g, i * h / g, (j + 1) * w / g, (i + 1) * h / g


ROI_SETTINGS = [(False, -1), (False, 0), (False, 1), (False, 3), (True, -1), (True, 0), (True, 1), (True, 2),
                (True, 3)]


@pytest.mark.parametrize("aligned, sampling_ratio", ROI_SETTINGS)
@torch.no_grad()
def test_roi_pool_matches_roi_align_written_out(aligned, sampling_ratio):
    """`SpatialResampler.roi_pool` (the two-matrix form) against `roi_align_reference`, box by box. The grids take
    in regions wider than a feature, under one feature (3 rows / 4 regions, 8 rows / 12: there ``aligned=False``
    clamps the side to 1 and ``aligned=True`` does not), regions that straddle features (20 / 12) and 1-feature
    maps; a 4x4 query grid (cheap) and the release's 12x12 on its extreme slice."""
    torch.manual_seed(0)
    for g, grids in ((4, [(24, 24), (20, 29), (3, 10), (7, 5), (1, 9)]), (12, [(8, 67)])):
        resampler = SpatialResampler(8, 16, g * g, aligned=aligned, sampling_ratio=sampling_ratio)
        for h, w in grids:
            feat = torch.randn(h, w, 3, dtype=torch.float64)
            got = resampler.roi_pool(feat.reshape(1, h * w, 3), (h, w))[0]  # (Q, ph * pw, C)
            ph, pw = pooling_size(h, w)
            assert got.shape == (g * g, ph * pw, 3)
            for i in range(g):
                for j in range(g):
                    want = roi_align_reference(feat, region_box(i, j, h, w, g), ph, pw, aligned, sampling_ratio)
                    torch.testing.assert_close(got[i * g + j], want, rtol=0, atol=1e-12,
                                               msg=lambda m: f"grid {h}x{w}, region ({i}, {j}): {m}")


def test_roi_align_settings_change_the_pooling():
    """The cases above are not all the same numbers: on a 20x29 map, aligned and a fixed sampling ratio each move
    the pooled values (so a setting that is ignored cannot pass the comparison)."""
    torch.manual_seed(0)
    feat = torch.randn(1, 20 * 29, 3, dtype=torch.float64)
    pooled = {s: SpatialResampler(8, 16, 16, aligned=s[0], sampling_ratio=s[1]).roi_pool(feat, (20, 29))
              for s in [(False, -1), (True, -1), (False, 1), (True, 2)]}
    for a in pooled:
        for b in pooled:
            if a != b:
                assert (pooled[a] - pooled[b]).abs().max() > 1e-3, (a, b)


def _reference(resampler: SpatialResampler, feat: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The spatial resampler straight from its description, one query at a time, float64 (its ``aligned`` and
    ``sampling_ratio`` through `roi_align_reference`)."""
    p = {k: v.double() for k, v in resampler.state_dict().items()}
    H = resampler.hidden_size
    g = resampler.grid_size
    heads = resampler.num_heads

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-6) * p[name + ".weight"] + p[name + ".bias"]

    x = ln(feat.double() @ p["kv_proj.weight"].T, "ln_kv").reshape(h, w, H)
    table = p["pos_embed"].reshape(g, g, H).permute(2, 0, 1)[None]
    pos = torch.nn.functional.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)[0]
    keys_map = x + pos.permute(1, 2, 0)
    both = torch.cat([keys_map, x], dim=-1)  # keys and values pooled side by side
    ph, pw = pooling_size(h, w)
    queries = ln(p["query"], "ln_q") + p["pos_embed"]
    wq, wk, wv = p["attn.in_proj_weight"].chunk(3)
    bq, bk, bv = p["attn.in_proj_bias"].chunk(3)
    d = H // heads
    out = []
    for i in range(g):
        for j in range(g):
            pooled = roi_align_reference(both, region_box(i, j, h, w, g), ph, pw, resampler.aligned,
                                         resampler.sampling_ratio)
            k = pooled[:, :H] @ wk.T + bk
            v = pooled[:, H:] @ wv.T + bv
            q = queries[i * g + j] @ wq.T + bq
            heads_out = []
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                att = torch.softmax(k[:, sl] @ q[sl] / math.sqrt(d), dim=0)
                heads_out.append(att @ v[:, sl])
            o = torch.cat(heads_out) @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
            out.append(o)
    out = ln(torch.stack(out), "ln_post") @ p["proj"]
    return out


@pytest.mark.parametrize("aligned, sampling_ratio", [
    (False, -1), (True, 2),
    pytest.param(True, -1, marks=pytest.mark.slow), pytest.param(False, 3, marks=pytest.mark.slow)])
@torch.no_grad()
def test_spatial_resampler_matches_the_slow_reference(aligned, sampling_ratio):
    torch.manual_seed(0)
    resampler = SpatialResampler(24, 256, 144, aligned=aligned, sampling_ratio=sampling_ratio).eval()
    for t in resampler.parameters():  # non-trivial norms and biases
        t.add_(0.1 * torch.randn_like(t))
    # square, 3:2, an extreme slice (2 samples per bin across, regions < 1 feature down), tiny maps
    grids = [(24, 24), (20, 29), (8, 67), (5, 3), (2, 2)]
    feats = torch.randn(sum(h * w for h, w in grids), 24)
    out = resampler(feats, torch.tensor(grids))
    assert out.shape == (len(grids), 144, 256)
    start = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny float64 ops: threading only adds overhead
    try:
        refs = []
        for h, w in grids:
            refs.append(_reference(resampler, feats[start:start + h * w], h, w))
            start += h * w
    finally:
        torch.set_num_threads(threads)
    for k, ((h, w), ref) in enumerate(zip(grids, refs)):
        assert rel_err(out[k], ref) < 1e-5, (h, w, rel_err(out[k], ref))
    # packing: a crop alone gives the same result as in the batch
    alone = resampler(feats[: 24 * 24], torch.tensor([[24, 24]]))
    assert rel_err(alone[0], out[0]) < 1e-6


@torch.no_grad()
def test_each_query_sees_only_its_region():
    torch.manual_seed(1)
    resampler = SpatialResampler(16, 128, 144).eval()
    h, w = 24, 36
    feats = torch.randn(h * w, 16)
    base = resampler(feats, torch.tensor([[h, w]]))[0]
    changed = feats.clone().reshape(h, w, 16)
    changed[:2, :3] += 5.0  # region (0, 0) is rows [0, 2) x cols [0, 3)
    out = resampler(changed.reshape(-1, 16), torch.tensor([[h, w]]))[0]
    moved = ((out - base).abs().amax(-1) > 1e-6).reshape(12, 12)
    # 24x36 (3:2) pools each 2x3 region to 2x3 bins, one sample each at (r + 0.5, c + 0.5) (aligned=False): the
    # samples of region (0, 0) are the only ones reading rows 0-1 x cols 0-2
    assert moved[0, 0] and int(moved.sum()) == 1


def test_resampler_type_setting():
    from llava_uhd import LlavaUHDConfig

    assert LlavaUHDConfig().resampler_type == "perceiver"  # the paper's resampler stays the default
    with pytest.raises(ValueError, match="resampler_type"):
        LlavaUHDConfig(resampler_type="roi")
    with pytest.raises(ValueError, match="perfect square"):
        SpatialResampler(16, 128, 64 + 1)
