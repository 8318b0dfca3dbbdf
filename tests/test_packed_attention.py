"""Tests of the packed (block-diagonal) attention: against per-segment SDPA, and the flash varlen kernel's plumbing
through a tiny CLIP encoder with a reference kernel standing in for torch's on the CPU."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import rel_err  # noqa: E402
from transformers import CLIPVisionConfig  # noqa: E402

from llava_uhd.modeling import packed_attention  # noqa: E402
from llava_uhd.modeling.packed_attention import packed_attention_forward  # noqa: E402
from llava_uhd.modeling.vision import AdaptiveVisionEncoder  # noqa: E402

# The CLIP tower and crops of test_vision.py: patch 7, native grid 4x4, crops of equal and of different lengths.
MIXED_GRIDS = [(4, 4), (2, 6), (1, 5), (6, 1), (3, 5), (4, 4), (1, 1), (2, 6),
               (2, 8), (8, 2), (16, 1), (5, 3), (1, 16), (1, 15), (3, 5)]


def tiny_clip_encoder(seed, **kw):
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=7)
    return AdaptiveVisionEncoder.from_config(config, **kw)


def random_crops(grids, seed):
    rows = sum(h * w for h, w in grids)
    pixels = torch.randn(rows, 3 * 7 * 7, generator=torch.Generator().manual_seed(seed))
    return pixels, torch.tensor(grids, dtype=torch.int64)


def _reference_segment_attention(q, k, v, lengths, scale=None):
    out, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        out.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, s], k[:, :, s], v[:, :, s], scale=scale))
        start += n
    return torch.cat(out, dim=2).transpose(1, 2)  # (1, T, H, d)


@torch.no_grad()
def test_packed_attention_forward_is_block_diagonal():
    lengths = [3, 5, 5, 2, 3, 3, 1]  # runs of equal lengths, not sorted
    total = sum(lengths)
    q, k, v = (torch.randn(1, 4, total, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    cu = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32)
    out, weights = packed_attention_forward(None, q, k, v, None, scaling=0.3, cu_seqlens=cu, max_seqlen=5)
    assert weights is None and out.shape == (1, total, 4, 8)
    assert rel_err(out, _reference_segment_attention(q, k, v, lengths, scale=0.3)) < 1e-6
    out2, _ = packed_attention_forward(None, q, k, v, None, cu_seqlens=cu, max_seqlen=5, seqlens=tuple(lengths))
    assert rel_err(out2, _reference_segment_attention(q, k, v, lengths)) < 1e-6
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        packed_attention_forward(torch.nn.Identity(), q, k, v, None)
    with pytest.raises(ValueError, match="attention_mask"):
        packed_attention_forward(None, q, k, v, torch.zeros(1, 1, total, total), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cover"):
        packed_attention_forward(None, q, k, v, None, cu_seqlens=cu[:-1])


@torch.no_grad()
def test_flash_varlen_path_plumbing(monkeypatch):
    """The CUDA path (torch's varlen_attn) with a reference kernel standing in for it on the CPU."""
    seen = []

    def fake_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs):
        assert query.dim() == 3 and query.shape == key.shape == value.shape  # (T, H, d)
        assert cu_seq_q.dtype == torch.int32 and cu_seq_q is cu_seq_k or torch.equal(cu_seq_q, cu_seq_k)
        assert isinstance(max_q, int) and max_q == max_k
        lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
        assert max(lengths) == max_q and cu_seq_q[-1] == query.shape[0]
        seen.append((tuple(lengths), kwargs))
        qkv = [t.transpose(0, 1).unsqueeze(0) for t in (query, key, value)]
        return _reference_segment_attention(*qkv, lengths, scale=kwargs.get("scale"))[0]

    enc = tiny_clip_encoder(18, packing="bucket")
    pixel_values, grids = random_crops(MIXED_GRIDS, seed=8)
    ref = enc(pixel_values, grids)
    monkeypatch.setattr(packed_attention, "torch_varlen_attn", fake_varlen_attn)
    monkeypatch.setattr(packed_attention, "varlen_kernel_available", lambda device, dtype: True)
    enc.packing = "auto"
    assert enc.resolve_packing() == "bucket"  # auto packs on CUDA only
    enc.packing = "varlen"
    assert enc.resolve_packing() == "varlen"
    assert seen == [((1, 1), {})]  # the probe: two one-token segments through the first layer
    seen.clear()
    out = enc(pixel_values, grids)
    assert len(seen) == len(enc.layers) - 1  # every layer run (penultimate: all but the last)
    lengths, kwargs = seen[0]
    assert sorted(lengths) == sorted(h * w + 1 for h, w in MIXED_GRIDS) and kwargs == {}  # default scale
    assert rel_err(out, ref) < 1e-5
