"""Tests of `interpolate_pos_embed`: bicubic resizing of a 2D position embedding, against a float64 reference."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import rel_err  # noqa: E402

from llava_uhd.modeling.pos_embed import interpolate_pos_embed  # noqa: E402


def _cubic(x, a=-0.75):
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _bicubic_matrix(n_in, n_out):
    """(n_out, n_in) float64 resampling matrix of PyTorch's bicubic, align_corners=False, borders clamped."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        base = int(np.floor(src))
        t = src - base
        for k in range(-1, 3):
            m[i, min(max(base + k, 0), n_in - 1)] += _cubic(k - t)
    return m


def reference_interpolation(pos2d, grid):
    """Separable bicubic in numpy float64: (gh, gw, D) to (h*w, D)."""
    gh, gw, d = pos2d.shape
    x = np.asarray(pos2d, dtype=np.float64)
    x = np.einsum("hi,ijd->hjd", _bicubic_matrix(gh, grid[0]), x)
    x = np.einsum("wj,hjd->hwd", _bicubic_matrix(gw, grid[1]), x)
    return x.reshape(-1, d)


@pytest.mark.parametrize("grid", [(6, 6), (2, 6), (1, 5), (7, 1), (3, 3), (1, 1), (9, 13)])
def test_interpolate_pos_embed_matches_float64_reference(grid):
    pos = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(0))
    out = interpolate_pos_embed(pos, grid)
    assert out.shape == (grid[0] * grid[1], 16) and out.dtype == torch.float32
    ref = torch.from_numpy(reference_interpolation(pos.numpy(), grid))
    assert rel_err(out, ref) < 1e-5
    # and float64 input stays float64, matching the same reference to round-off
    assert rel_err(interpolate_pos_embed(pos.double(), grid), ref) < 1e-12


def test_interpolate_pos_embed_native_grid_is_unchanged(monkeypatch):
    pos = torch.randn(4, 4, 8)
    calls = []
    monkeypatch.setattr(torch.nn.functional, "interpolate", lambda *a, **k: calls.append(1))
    out = interpolate_pos_embed(pos, (4, 4))
    assert not calls
    assert torch.equal(out, pos.reshape(16, 8))


def test_interpolate_pos_embed_rejects_bad_input():
    with pytest.raises(ValueError, match="gh, gw, D"):
        interpolate_pos_embed(torch.randn(16, 8), (2, 2))
    with pytest.raises(ValueError, match="positive"):
        interpolate_pos_embed(torch.randn(4, 4, 8), (0, 3))
