"""Tests of the compression layer (perceiver resampler), its 2D sin-cos embedding and the MLP projector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import rel_err

from llava_uhd.modeling.projector import MLPProjector
from llava_uhd.modeling.resampler import PerceiverResampler, get_2d_sincos_pos_embed

VD, HID, Q, HEADS = 24, 32, 64, 4


def packed(grids, vision_dim=VD, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(h * w for h, w in grids)
    return torch.randn(n, vision_dim, generator=g), torch.tensor(grids, dtype=torch.long)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("num_heads", HEADS)
    m = PerceiverResampler(VD, HID, **kw)
    # Non-trivial LayerNorm affine params and attention biases, so the reference test exercises them.
    with torch.no_grad():
        for ln in (m.ln_q, m.ln_kv, m.ln_post):
            ln.weight.add_(0.1 * torch.randn_like(ln.weight))
            ln.bias.add_(0.1 * torch.randn_like(ln.bias))
        m.attn.in_proj_bias.normal_(0, 0.1)
        m.attn.out_proj.bias.normal_(0, 0.1)
    return m.eval()


# ----------------------------------------------------------------------------------------------------------------
# 2D sin-cos embedding


def np_mae_2d(d: int, h: int, w: int) -> np.ndarray:
    """Independent float64 numpy version of MAE's formula (meshgrid with w first, first half <- grid[0])."""

    def one_d(dim, pos):
        om = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        o = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), om)
        return np.concatenate([np.sin(o), np.cos(o)], axis=1)

    grid = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))  # each (h, w)
    return np.concatenate([one_d(d // 2, grid[0]), one_d(d // 2, grid[1])], axis=1)


@pytest.mark.parametrize("d", [16, 32, 128])
def test_sincos_matches_mae_square(d):
    ours = get_2d_sincos_pos_embed(d, (24, 24))
    assert ours.dtype == torch.float32 and ours.shape == (576, d)
    ref = np_mae_2d(d, 24, 24)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-6)
    # an int means a square grid (not bit-compared: torch's vectorized sin can differ in the last ulp by chunk)
    torch.testing.assert_close(get_2d_sincos_pos_embed(d, 24), ours, rtol=0, atol=1e-6)


def test_sincos_scalar_spot_values():
    d = 16  # 4 frequencies per axis
    h, w = 3, 7
    e = get_2d_sincos_pos_embed(d, (h, w)).double()
    for r, c in [(0, 0), (2, 5), (1, 6)]:
        row = e[r * w + c]
        for i in range(4):
            om = 1.0 / 10000 ** (i / 4)
            assert math.isclose(row[i], math.sin(c * om), abs_tol=1e-6)
            assert math.isclose(row[4 + i], math.cos(c * om), abs_tol=1e-6)
            assert math.isclose(row[8 + i], math.sin(r * om), abs_tol=1e-6)
            assert math.isclose(row[12 + i], math.cos(r * om), abs_tol=1e-6)


def test_sincos_non_square_is_built_for_its_grid():
    d = 32
    a = get_2d_sincos_pos_embed(d, (3, 7))
    b = get_2d_sincos_pos_embed(d, (7, 3))
    np.testing.assert_allclose(a.numpy(), np_mae_2d(d, 3, 7), rtol=0, atol=1e-6)
    np.testing.assert_allclose(b.numpy(), np_mae_2d(d, 7, 3), rtol=0, atol=1e-6)
    assert not torch.allclose(a, b)
    # Transposing the grid swaps the column and row halves of the channels.
    a_grid = a.reshape(3, 7, d)
    b_grid = b.reshape(7, 3, d)
    swapped = torch.cat([b_grid[..., d // 2 :], b_grid[..., : d // 2]], dim=-1).transpose(0, 1)
    assert torch.equal(a_grid, swapped)
    # Raw indices: the (r, c) patch of a 3x7 grid has the same embedding as in a 24x24 grid.
    big = get_2d_sincos_pos_embed(d, 24).reshape(24, 24, d)
    assert torch.allclose(a_grid, big[:3, :7], atol=1e-7)


def test_sincos_errors():
    with pytest.raises(ValueError, match="multiple of 4"):
        get_2d_sincos_pos_embed(30, (2, 2))
    with pytest.raises(ValueError, match="positive"):
        get_2d_sincos_pos_embed(32, (0, 2))


# ----------------------------------------------------------------------------------------------------------------
# Resampler

MIXED = [(3, 4), (1, 5), (5, 1), (3, 4), (2, 2), (4, 3), (1, 1), (3, 4), (6, 2)]


def test_shapes_and_defaults():
    m = PerceiverResampler(VD, 256)
    assert m.num_heads == 2 and m.num_queries == 64
    assert PerceiverResampler(VD, 64).num_heads == 1
    x, g = packed([(2, 3), (4, 4)])
    out = PerceiverResampler(VD, HID, num_heads=HEADS)(x, g)
    assert out.shape == (2, Q, HID)
    assert m.tokens_per_crop((24, 24)) == 64 == m.tokens_per_crop((7, 3))
    empty = PerceiverResampler(VD, HID)(torch.zeros(0, VD), torch.zeros(0, 2, dtype=torch.long))
    assert empty.shape == (0, Q, HID)


@pytest.mark.parametrize("batching", ["group", "pad"])
def test_batched_equals_each_crop_alone(batching):
    m = make(batching=batching)
    x, g = packed(MIXED)
    with torch.no_grad():
        out = m(x, g)
        split = m.forward_split(x, g)
        assert len(split) == len(MIXED) and all(s.shape == (Q, HID) for s in split)
        start = 0
        for k, (h, w) in enumerate(MIXED):
            n = h * w
            alone = m(x[start : start + n], torch.tensor([[h, w]]))[0]
            assert rel_err(out[k], alone) < 1e-5, (k, (h, w))
            assert torch.equal(split[k], out[k])
            start += n


def test_group_and_pad_agree():
    x, g = packed(MIXED, seed=3)
    a = make(seed=1, batching="group")
    b = make(seed=1, batching="pad")
    with torch.no_grad():
        assert rel_err(b(x, g), a(x, g)) < 1e-5


@pytest.mark.parametrize("batching", ["group", "pad"])
def test_crop_output_depends_only_on_its_features(batching):
    m = make(batching=batching)
    x, g = packed(MIXED)
    with torch.no_grad():
        base = m(x, g)
        j = 3  # second (3, 4) crop: shares its group with crops 0 and 7
        start = sum(h * w for h, w in MIXED[:j])
        x2 = x.clone()
        x2[start : start + 12] += torch.randn(12, VD)
        out = m(x2, g)
    changed = [(out[k] - base[k]).abs().max().item() > 1e-4 for k in range(len(MIXED))]
    assert changed[j]
    for k in range(len(MIXED)):
        if k != j:
            assert rel_err(out[k], base[k]) < 1e-6


def test_grid_shape_changes_output():
    m = make()
    x = torch.randn(12, VD)
    with torch.no_grad():
        outs = [m(x, torch.tensor([hw])) for hw in [(3, 4), (4, 3), (2, 6), (1, 12)]]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert rel_err(outs[i], outs[j]) > 1e-3


def reference_resampler(m: PerceiverResampler, x: torch.Tensor, grids) -> torch.Tensor:
    """Slow float64 reimplementation with the module's weights: one crop, one head at a time."""
    p = {k: v.detach().double() for k, v in m.state_dict().items()}
    H, nh = m.hidden_size, m.num_heads
    dh = H // nh

    def ln(t, name):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * p[name + ".weight"] + p[name + ".bias"]

    Wq, Wk, Wv = p["attn.in_proj_weight"].split(H)
    bq, bk, bv = p["attn.in_proj_bias"].split(H)
    q_in = ln(p["query"], "ln_q")
    outs, start = [], 0
    for h, w in grids:
        n = h * w
        kv = ln(x[start : start + n].double() @ p["kv_proj.weight"].T, "ln_kv")
        start += n
        pos = torch.from_numpy(np_mae_2d(H, h, w))
        q = q_in @ Wq.T + bq
        k = (kv + pos) @ Wk.T + bk
        v = kv @ Wv.T + bv
        heads = []
        for i in range(nh):
            sl = slice(i * dh, (i + 1) * dh)
            s = q[:, sl] @ k[:, sl].T / math.sqrt(dh)
            a = torch.exp(s - s.max(-1, keepdim=True).values)
            a = a / a.sum(-1, keepdim=True)
            heads.append(a @ v[:, sl])
        o = torch.cat(heads, -1) @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
        outs.append(ln(o, "ln_post") @ p["proj"])
    return torch.stack(outs)


@pytest.mark.parametrize("batching", ["group", "pad"])
def test_against_slow_reference(batching):
    m = make(seed=2, batching=batching)
    x, g = packed(MIXED, seed=5)
    with torch.no_grad():
        out = m(x, g)
    ref = reference_resampler(m, x, MIXED)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("attention", ["plain", "folded"])
def test_cpu_chunks_of_whole_crops_match_the_reference(attention, monkeypatch):
    import llava_uhd.modeling.resampler as resampler

    m = make(seed=3, attention=attention)
    grids = [(2, 3)] * 5 + [(3, 3)] * 2 + [(1, 7)]
    x, g = packed(grids, seed=8)
    calls = []
    handle = m.kv_proj.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[:-1]))
    monkeypatch.setattr(resampler, "CPU_CHUNK_TOKENS", 13)  # two 2x3 crops, one 3x3 or 1x7 crop per pass
    with torch.no_grad():
        out = m(x, g)
    handle.remove()
    assert calls == [(2, 6), (2, 6), (1, 6), (1, 9), (1, 9), (1, 7)]  # every row projected once, whole crops
    assert rel_err(out, reference_resampler(m, x, grids)) < 1e-5


def test_float64_module_matches_reference_tightly():
    m = make(seed=4).double()
    x, g = packed([(2, 3), (3, 2), (2, 3)], seed=6)
    with torch.no_grad():
        out = m(x.double(), g)
    assert out.dtype == torch.float64
    assert rel_err(out, reference_resampler(m, x, [(2, 3), (3, 2), (2, 3)])) < 1e-6


def test_gradients_reach_parameters():
    m = make().train()
    x, g = packed(MIXED)
    x.requires_grad_(True)
    m(x, g).square().mean().backward()
    for name in ["query", "kv_proj.weight", "proj", "attn.in_proj_weight", "ln_kv.weight", "ln_q.weight"]:
        grad = dict(m.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_and_pos_cache():
    m = make().to(torch.bfloat16)
    x, g = packed([(2, 3), (2, 3), (1, 4)])
    with torch.no_grad():
        out = m(x, g)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    cached = m.pos_embed(2, 3)
    assert cached.dtype == torch.float32 and m.pos_embed(2, 3) is cached  # kept in float32 in a bf16 model
    assert torch.equal(cached, get_2d_sincos_pos_embed(HID, (2, 3)))
    assert m.pos_embed(2, 3, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert m.state_dict().keys() == make().state_dict().keys()  # a cache, not a parameter or buffer


@pytest.mark.parametrize("kind", ["perceiver", "spatial"])
def test_output_takes_the_attention_dtype_as_under_cuda_autocast(kind, monkeypatch):
    """CUDA autocast keeps layer norms in float32 but runs the attention in bfloat16 (CPU autocast runs both in
    bfloat16, so it cannot show this): the output buffer must follow the attention, not the normed input."""
    from llava_uhd.modeling.spatial_resampler import SpatialResampler

    torch.manual_seed(0)
    m = make() if kind == "perceiver" else SpatialResampler(VD, 128, 16).eval()
    x, g = packed([(4, 4), (3, 5), (4, 4)])  # two grids: two groups scattered into one buffer
    with torch.no_grad():
        ref = m(x, g)
        attend = type(m)._attend
        monkeypatch.setattr(m, "_attend", lambda *a, **k: attend(m, *a, **k).to(torch.bfloat16))
        out = m(x, g)
    assert ref.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.equal(out, ref.to(torch.bfloat16))


def test_resampler_errors():
    m = make()
    x, g = packed([(2, 3), (1, 4)])
    with pytest.raises(ValueError, match=r"10 rows .* sum\(h_p \* w_p\) = 11"):
        m(x, torch.tensor([[2, 3], [1, 5]]))
    with pytest.raises(ValueError, match="width 20 .* vision_dim = 24"):
        m(torch.randn(10, 20), g)
    with pytest.raises(ValueError, match=r"shape \(K, 2\)"):
        m(x, torch.tensor([2, 3, 1, 4]))
    with pytest.raises(ValueError, match="integer"):
        m(x, g.float())
    with pytest.raises(ValueError, match="positive"):
        m(torch.randn(4, VD), torch.tensor([[0, 3], [1, 4]]))
    with pytest.raises(ValueError, match="2D tensor"):
        m(torch.randn(1, 10, VD), g)
    with pytest.raises(ValueError, match="multiple of 4"):
        PerceiverResampler(VD, 30, num_heads=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        PerceiverResampler(VD, 32, num_heads=3)
    with pytest.raises(ValueError, match="batching"):
        PerceiverResampler(VD, 32, batching="loop")


# ----------------------------------------------------------------------------------------------------------------
# MLP projector


def test_mlp_projector_shapes_and_counts():
    torch.manual_seed(0)
    p = MLPProjector(VD, HID)
    assert [type(c) for c in p.children()] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    x, g = packed(MIXED)
    out = p(x, g)
    assert out.shape == (x.shape[0], HID)
    assert torch.equal(p(x), out)
    split = p.forward_split(x, g)
    assert [s.shape for s in split] == [(h * w, HID) for h, w in MIXED]
    assert torch.equal(torch.cat(split), out)
    assert p.tokens_per_crop((24, 24)) == 576 and p.tokens_per_crop((3, 7)) == 21
    # Per-token: a crop's tokens equal projecting that crop alone.
    assert torch.allclose(split[1], p(x[12:17]), atol=1e-6)


def test_uniform_interface():
    x, g = packed(MIXED)
    for mod in (make(), MLPProjector(VD, HID)):
        with torch.no_grad():
            split = mod.forward_split(x, g)
        assert [s.shape[0] for s in split] == [mod.tokens_per_crop(hw) for hw in MIXED]
        assert all(s.shape[1] == HID for s in split)


def test_mlp_projector_errors():
    p = MLPProjector(VD, HID)
    x, g = packed([(2, 3)])
    with pytest.raises(ValueError, match=r"6 rows .* = 8"):
        p(x, torch.tensor([[2, 4]]))
    with pytest.raises(ValueError, match="vision_dim"):
        p(torch.randn(6, 7))
    with pytest.raises(ValueError, match="width 7"):
        p.forward_split(torch.randn(6, 7), g)


@pytest.mark.parametrize("batching", ["group", "pad"])
def test_folded_attention_is_the_plain_attention(batching):
    """``attention="folded"`` (queries folded into the key projection, the value projection after the weighted sum)
    computes what ``nn.MultiheadAttention`` computes on projected keys and values (the default), biases included,
    and its gradients are the same."""
    folded, plain = make(seed=7, batching=batching, attention="folded"), make(seed=7, batching=batching)
    assert folded.attention == "folded" and plain.attention == "plain"
    assert folded.attn.in_proj_bias.abs().min() > 0  # make() gives every bias a value: the key bias must cancel
    x, g = packed(MIXED, seed=8)
    out_f, out_p = folded(x, g), plain(x, g)
    assert rel_err(out_f.detach(), out_p.detach()) < 1e-5
    out_f.square().sum().backward()
    out_p.square().sum().backward()
    for (name, a), (_, b) in zip(folded.named_parameters(), plain.named_parameters()):
        assert rel_err(a.grad, b.grad) < 1e-4, name
    with torch.no_grad():
        assert rel_err(folded.double()(x.double(), g), reference_resampler(folded, x, MIXED)) < 1e-8
    with pytest.raises(ValueError, match="attention must be 'folded' or 'plain'"):
        PerceiverResampler(VD, HID, attention="fast")


def test_the_model_config_chooses_the_attention_form():
    from conftest import build_tiny

    model, _ = build_tiny(resampler_attention="folded")
    assert model.projector.attention == "folded"
    assert build_tiny()[0].projector.attention == "plain"
    from llava_uhd.modeling import LlavaUHDConfig

    with pytest.raises(ValueError, match="resampler_attention must be 'plain' or 'folded'"):
        LlavaUHDConfig(resampler_attention="fast")
