"""The "spatially constrained" resampler of the ECCV version and the authors' released checkpoint
(``mm_projector_type = "adapt_spatial_resampler"``, e.g. ``guozonghao96/llava-uhd-144-13b``).

Instead of 64 queries that each look at the whole crop, ``Q = g * g`` queries (144, ``g = 12``) sit on a ``g x g``
grid over the crop's ``h_p x w_p`` feature map, and query ``(i, j)`` attends **only to its own region**::

    rows [i * h_p / g, (i + 1) * h_p / g)  x  cols [j * w_p / g, (j + 1) * w_p / g)      (feature-map units)

whose features are ROI-align pooled to a small ``ph x pw`` grid (the region's keys and values).

Structure (one cross-attention layer, per crop)::

    x      = ln_kv(kv_proj(features))                        # (h_p * w_p, hidden)
    pos_k  = bicubic(pos_embed as a g x g map -> h_p x w_p)   # (h_p * w_p, hidden)
    keys   = roi_align(x + pos_k)   values = roi_align(x)     # (Q, ph * pw, hidden): each query's own region
    q      = ln_q(query) + pos_embed                          # (Q, hidden)
    out    = ln_post(MHA(q_k, keys_k, values_k) for every query k) @ proj    # (Q, hidden)

Every query is a separate tiny attention (one query, ``ph * pw`` keys): the ``Q`` queries of a crop (and all crops
of the same grid) are run as one batch of ``Q * G`` attentions. Heads default to ``hidden // 128``.

Pooling rule (the release's)
----------------------------
The pooled grid ``(ph, pw)`` keeps the region's aspect ratio, which is the crop's (``w_p / h_p``, every region
being ``1/g`` of each side). Candidates, as ``(pw, ph)`` in this order::

    (4, 2), (3, 2), (4, 3), (3, 3), (2, 4), (2, 3), (3, 4)

the one minimizing ``|log(w_p / h_p) - log(pw / ph)|`` wins; on a tie the earlier one in the list. The comparison
is exact (rational arithmetic, never floating point), so equal errors always resolve the same way. A square crop
gets 3x3 = 9 keys per query; a 2:1 landscape crop 2x4 = 8; a 4:3 one 3x4 = 12. See `pooling_size`.

ROI-align (torchvision ``roi_align`` semantics, pure torch)
----------------------------------------------------------
The box of region ``(i, j)`` is ``x1 = j * w_p / g``, ``x2 = (j + 1) * w_p / g`` (likewise ``y``), with
``spatial_scale = 1`` in the coordinates where feature ``c`` sits at ``x = c``. Then, per axis:

* ``aligned=False`` (default, what the release was trained with): ``start = x1``, ``len = max(x2 - x1, 1)``;
  ``aligned=True``: ``start = x1 - 0.5``, ``len = x2 - x1`` (pixel-model coordinates, no clamp).
* Each of the ``pw`` bins is ``len / pw`` wide and holds ``s`` sample points at its ``(k + 0.5) / s`` fractions,
  ``s = sampling_ratio`` if positive, else ``ceil(len / pw)`` (torchvision's adaptive rule; computed exactly
  here: every region of a crop has the same length, so ``s`` is one number per crop and axis).
* A sample at ``x`` is bilinear between its two neighbouring features: zero if ``x < -1`` or ``x > w_p``; else
  ``x`` is clamped to ``>= 0`` and, past the last feature (``x >= w_p - 1``), takes the last feature.
* A bin's value is the mean of its ``s_h * s_w`` samples.

Bilinear interpolation, the out-of-range rule and the bin mean all factor into a row part and a column part, so
ROI-align of the whole ``g x g`` box grid is two small matrix products: ``pooled = A_h @ X @ A_w^T`` with
``A_h`` of shape ``(g * ph, h_p)`` and ``A_w`` of shape ``(g * pw, w_p)`` (`roi_align_matrix`). This is exact (not
an approximation) and gives the same numbers as torchvision's kernel up to float rounding (the tests compare it
with an explicit per-sample loop in float64). Pooling is linear, so the keys are ``pool(x) + pool(pos_k)``: the
features are pooled once and the pooled position embedding is computed once per grid. Pooling runs in at least
float32 (bf16/fp16 activations are up-cast for it, as the release did).

Position embedding (``pos_embed``)
----------------------------------
``pos_embed`` is a ``(Q, hidden)`` table over the ``g x g`` query grid (row-major), stored as a persistent buffer
(saved and loaded with the weights, never trained). It is initialized to the 2D sin-cos embedding of the
``g x g`` grid (`get_2d_sincos_pos_embed`, MAE convention, the same the release computed) and the converter
overwrites it with the release's ``mm_projector.pos_embed`` tensor as is. It is used twice: added to the
queries (after ``ln_q``), and, resized bicubically (``align_corners=False``, in float32) from ``g x g`` to the
crop's ``h_p x w_p`` grid, added to the keys before pooling.

Layer norms use ``eps = 1e-6`` as in the release.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor, nn

from .pos_embed import interpolate_pos_embed
from .resampler import CrossAttentionResampler, get_2d_sincos_pos_embed, group_crops, scatter_groups

__all__ = ["SpatialResampler", "pooling_size", "roi_align_matrix", "POOLING_CANDIDATES"]

# (pw, ph) candidates of the pooled grid, in the release's order (earlier wins a tie)
POOLING_CANDIDATES: tuple[tuple[int, int], ...] = ((4, 2), (3, 2), (4, 3), (3, 3), (2, 4), (2, 3), (3, 4))


def pooling_size(h_p: int, w_p: int) -> tuple[int, int]:
    """The pooled grid ``(ph, pw)`` of every region of an ``h_p x w_p`` crop (see the module docstring).

    Minimizes ``|log(w_p / h_p) - log(pw / ph)|`` over `POOLING_CANDIDATES`, exactly: that error is
    ``log(max(t, 1 / t))`` with ``t = w_p * ph / (h_p * pw)``, so ``max(t, 1 / t)`` is compared as a fraction.
    """
    h_p, w_p = int(h_p), int(w_p)
    if h_p < 1 or w_p < 1:
        raise ValueError(f"grid must have positive sides, got (h_p, w_p) = ({h_p}, {w_p})")
    best, best_err = None, None
    for pw, ph in POOLING_CANDIDATES:
        t = Fraction(w_p * ph, h_p * pw)
        err = max(t, 1 / t)
        if best_err is None or err < best_err:
            best, best_err = (ph, pw), err
    return best


def roi_align_matrix(n: int, grid: int, bins: int, aligned: bool = False, sampling_ratio: int = -1) -> Tensor:
    """ROI-align along one axis as a matrix: ``(grid * bins, n)`` float64.

    Row ``r * bins + b`` holds the weights with which bin ``b`` of region ``r`` (of ``grid`` equal regions
    ``[r * n / grid, (r + 1) * n / grid]`` of an axis of ``n`` features) averages the features; the 2D ROI-align of
    the ``grid x grid`` boxes of a map ``X (h, w, C)`` is ``A_h @ X @ A_w^T`` (module docstring).
    """
    n, grid, bins = int(n), int(grid), int(bins)
    if n < 1 or grid < 1 or bins < 1:
        raise ValueError(f"n, grid and bins must be positive, got {n}, {grid}, {bins}")
    length = Fraction(n, grid)
    if not aligned:
        length = max(length, Fraction(1))
    samples = int(sampling_ratio) if sampling_ratio > 0 else max(1, math.ceil(length / bins))
    offset = 0.5 if aligned else 0.0
    r = torch.arange(grid, dtype=torch.float64)[:, None, None]
    b = torch.arange(bins, dtype=torch.float64)[None, :, None]
    s = torch.arange(samples, dtype=torch.float64)[None, None, :]
    bin_len = float(length) / bins
    x = r * (n / grid) - offset + b * bin_len + (s + 0.5) * (bin_len / samples)  # (grid, bins, samples)
    x = x.reshape(grid * bins, samples)
    valid = (x >= -1.0) & (x <= n)
    x = x.clamp(min=0.0)
    low = x.floor().long()
    past = low >= n - 1
    low = torch.where(past, torch.full_like(low, n - 1), low)
    high = torch.where(past, low, low + 1)
    frac = torch.where(past, torch.zeros_like(x), x - low.to(x.dtype))
    scale = valid.to(x.dtype) / samples
    out = torch.zeros(grid * bins, n, dtype=torch.float64)
    out.scatter_add_(1, low, (1.0 - frac) * scale)
    out.scatter_add_(1, high, frac * scale)
    return out


class SpatialResampler(CrossAttentionResampler):
    """Compress each crop's ``h_p * w_p`` ViT features to ``num_queries`` tokens, query ``(i, j)`` of the
    ``g x g`` query grid attending only to the ROI-align pooled features of its own region of the crop.

    Same interface as `PerceiverResampler`: ``forward(features (P, D_v), patch_grid_hw (K, 2)) -> (K, Q, hidden)``,
    ``forward_split``, ``tokens_per_crop``.

    Args:
        vision_dim: width ``D_v`` of the ViT features.
        hidden_size: output width (the LLM's hidden size); a multiple of 4 and of ``num_heads``.
        num_queries: ``g * g`` (a perfect square; 144 in the release).
        num_heads: attention heads; default ``max(1, hidden_size // 128)`` (the release).
        aligned: ROI-align's ``aligned`` flag (False: the release).
        sampling_ratio: samples per bin and axis; ``<= 0``: adaptive ``ceil(region / bins)`` (the release).
        eps: the layer norms' epsilon (1e-6: the release).
    """

    def __init__(
        self,
        vision_dim: int,
        hidden_size: int,
        num_queries: int = 144,
        num_heads: int | None = None,
        aligned: bool = False,
        sampling_ratio: int = -1,
        eps: float = 1e-6,
    ):
        super().__init__(vision_dim, hidden_size, num_queries, num_heads, eps=eps)  # checks the sizes positive
        grid = math.isqrt(num_queries)
        if grid * grid != num_queries:
            raise ValueError(f"num_queries must be a perfect square (a g x g query grid), got {num_queries}")
        self.grid_size = grid
        self.aligned = bool(aligned)
        self.sampling_ratio = int(sampling_ratio)
        # fixed (never trained) but saved: the release ships it in its checkpoint
        self.register_buffer("pos_embed", torch.empty(num_queries, hidden_size), persistent=True)
        # derived, never saved: ROI-align matrices keyed by (n, bins, device, dtype)
        self._roi_cache: dict[tuple, Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """trunc-normal(0.02) query and ``kv_proj``, zero biases, unit LayerNorms, ``proj ~ hidden**-0.5 * randn``,
        PyTorch's xavier in-projection, and the ``g x g`` 2D sin-cos ``pos_embed``."""
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.trunc_normal_(self.kv_proj.weight, std=0.02)
        self.attn._reset_parameters()
        for ln in (self.ln_q, self.ln_kv, self.ln_post):
            nn.init.ones_(ln.weight)
            nn.init.zeros_(ln.bias)
        with torch.no_grad():
            self.proj.copy_(self.hidden_size**-0.5 * torch.randn(self.hidden_size, self.hidden_size))
            self.pos_embed.copy_(get_2d_sincos_pos_embed(self.hidden_size, self.grid_size))

    def extra_repr(self) -> str:
        return (
            f"vision_dim={self.vision_dim}, hidden_size={self.hidden_size}, num_queries={self.num_queries} "
            f"({self.grid_size}x{self.grid_size}), num_heads={self.num_heads}, aligned={self.aligned}, "
            f"sampling_ratio={self.sampling_ratio}"
        )

    # ------------------------------------------------------------------------------------------ pooling
    def _roi_matrix(self, n: int, bins: int, device, dtype) -> Tensor:
        key = (n, bins, torch.device(device), dtype)
        m = self._roi_cache.get(key)
        if m is None:
            m = roi_align_matrix(n, self.grid_size, bins, self.aligned, self.sampling_ratio).to(device, dtype)
            self._roi_cache[key] = m
        return m

    def roi_pool(self, x: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """ROI-align the ``g x g`` regions of crops ``x`` ``(G, h_p * w_p, C)`` (row-major patches) to their
        pooled grids: ``(G, Q, ph * pw, C)``, query ``i * g + j`` for region ``(i, j)``, keys row-major in the
        ``ph x pw`` bins. Computed in at least float32, returned in ``x``'s dtype."""
        h, w = grid_hw
        ph, pw = pooling_size(h, w)
        g = self.grid_size
        G, C = x.shape[0], x.shape[-1]
        cdtype = torch.promote_types(x.dtype, torch.float32)
        a_h = self._roi_matrix(h, ph, x.device, cdtype)  # (g*ph, h)
        a_w = self._roi_matrix(w, pw, x.device, cdtype)  # (g*pw, w)
        xm = x.to(cdtype).reshape(G, h, w * C)
        t = torch.matmul(a_h, xm).reshape(G, g * ph, w, C)  # rows pooled
        t = torch.einsum("bc,gacd->gabd", a_w, t)  # (G, g*ph, g*pw, C)
        t = t.reshape(G, g, ph, g, pw, C).permute(0, 1, 3, 2, 4, 5).reshape(G, g * g, ph * pw, C)
        return t.to(x.dtype)

    def key_pos_embed(self, grid_hw: tuple[int, int], dtype=None) -> Tensor:
        """``pos_embed`` as a ``g x g`` map resized (bicubic, ``align_corners=False``, float32) to the crop's grid:
        ``(h_p * w_p, hidden)``; unchanged at ``h_p = w_p = g``."""
        g = self.grid_size
        pos = interpolate_pos_embed(self.pos_embed.float().reshape(g, g, -1), grid_hw)
        return pos if dtype is None else pos.to(dtype)

    # ------------------------------------------------------------------------------------------ forward
    def _attend(self, keys: Tensor, values: Tensor) -> Tensor:
        """``keys`` / ``values`` ``(G, Q, L, hidden)`` -> ``(G, Q, hidden)``: query ``k`` sees only its ``L`` keys."""
        G, Q, L, H = keys.shape
        q = (self.ln_q(self.query) + self.pos_embed.to(keys.dtype)).unsqueeze(0).expand(G, -1, -1)
        out, _ = self.attn(q.reshape(G * Q, 1, H), keys.reshape(G * Q, L, H), values.reshape(G * Q, L, H),
                           need_weights=False)
        return self.ln_post(out.reshape(G, Q, H)) @ self.proj

    def _compress(self, x: Tensor, grids: list[tuple[int, int]]) -> Tensor:
        device = x.device
        parts = []
        for (h, w), (ks, idx) in group_crops(grids, device)[1].items():
            values = self.roi_pool(x[idx], (h, w))  # (G, Q, L, hidden)
            pos = self.roi_pool(self.key_pos_embed((h, w)).to(device).unsqueeze(0), (h, w))  # (1, Q, L, hidden)
            keys = values + pos.to(values.dtype)
            parts.append((ks, self._attend(keys, values)))
        return scatter_groups(len(grids), parts)
