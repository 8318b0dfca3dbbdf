"""The compression layer of LLaVA-UHD: a shared perceiver resampler (paper Sec. 3.2).

Every slice (and the overview image) is encoded by the ViT into ``h_p * w_p`` patch features; the resampler
compresses each of them, independently, to a fixed number of tokens (64 by default) of the LLM's width, so the
LLM's token count does not grow with the slice's size.

Structure (MiniCPM-V / Qwen-VL style, one cross-attention layer)::

    q   = ln_q(query)                                  # (Q, hidden), learnable, shared by all crops
    x   = ln_kv(kv_proj(features))                     # (n, hidden), n = h_p * w_p
    k   = x + pos_embed(h_p, w_p)                      # 2D sin-cos embedding of the crop's OWN grid
    v   = x
    out = ln_post(MultiheadAttention(q, k, v)) @ proj  # (Q, hidden)

Position embedding
------------------
``get_2d_sincos_pos_embed`` is the MAE 2D sin-cos embedding evaluated on the crop's own ``(h_p, w_p)`` patch
grid. The coordinates are the **raw patch indices** ``0 .. w_p-1`` (column) and ``0 .. h_p-1`` (row), not
normalized ones: this is what MAE (and MiniCPM-V) do, so a 24x24 grid reproduces MAE's
``get_2d_sincos_pos_embed(d, 24)`` exactly, and a patch at a given (row, column) gets the same embedding
whatever the size of its slice (slices are all about the ViT's native area, so the index ranges are comparable).
As in MAE, the first half of the channels encodes the column index and the second half the row index; each half
is ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 1 / 10000 ** (i / (d / 4))``,
``i = 0 .. d/4 - 1`` (i.e. ``1/10000^(2i/(d/2))`` in the usual notation). The authors' release always used a
24x24 table whatever the slice's grid; here the table is built for the slice's own grid. The table is
computed in float64, stored in float32 (cached per grid and device) and cast to the activations' dtype.

Batching
--------
Inputs are packed: ``features`` ``(P, D_v)`` holds all crops of a batch back to back and ``patch_grid_hw``
``(K, 2)`` gives each crop's ``(h_p, w_p)``; crop ``k`` owns the next ``h_p * w_p`` rows (row-major patches).
The per-token work (``kv_proj``, ``ln_kv``) runs once per row. For the attention, the default
``batching="group"`` groups the crops whose grids are equal into one dense ``(G, h_p * w_p, hidden)`` batch and
runs one attention call per distinct grid: no padding, no mask, results exact, and in LLaVA-UHD the slices of
an image share one grid (plus the overview), so the number of calls is small. ``batching="pad"`` instead pads
every crop to the longest one and runs a single attention call with a ``key_padding_mask`` (padded keys are
masked out, so results match the grouped path up to float rounding); it wins when a batch holds many distinct
grids. No crop ever attends to another crop's features. On a CPU the grouped path takes at most
`CPU_CHUNK_TOKENS` rows at a time through the projection and the attention (whole crops): on the CPU a bigger
batch is no faster, and the intermediates at the LLM's width would set the peak memory of an image's encoding.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from .offload import onloaded
from .quantization import compute_dtype

# Rows of features the grouped path projects and attends at a time on a CPU (whole crops, at least one): past it
# a batch only costs memory there (bench/RESULTS.md, "Time to first token")
CPU_CHUNK_TOKENS = 1024

__all__ = ["get_2d_sincos_pos_embed", "CrossAttentionResampler", "PerceiverResampler", "check_packed_inputs",
           "group_crops"]


def _sincos_1d(embed_dim: int, pos: Tensor) -> Tensor:
    """MAE 1D sin-cos embedding of positions ``pos`` (any shape, flattened): ``(len, embed_dim)`` float64."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000.0**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_hw) -> Tensor:
    """2D sin-cos position embedding of an ``h x w`` patch grid: ``(h * w, embed_dim)`` float32.

    Rows are in row-major patch order (row ``r``, column ``c`` at index ``r * w + c``). Coordinates are raw patch
    indices (MAE convention); channels ``[:embed_dim // 2]`` encode the column index and
    ``[embed_dim // 2:]`` the row index, each as ``[sin, cos]`` at frequencies ``1 / 10000 ** (2i / (d / 2))``.
    For a square grid this equals MAE's ``get_2d_sincos_pos_embed(embed_dim, n)``.

    Args:
        embed_dim: number of channels, a positive multiple of 4.
        grid_hw: ``(h, w)`` in patches, or an int ``n`` for an ``n x n`` grid.
    """
    if isinstance(grid_hw, int):
        h = w = grid_hw
    else:
        h, w = (int(v) for v in grid_hw)
    if embed_dim <= 0 or embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be a positive multiple of 4, got {embed_dim}")
    if h <= 0 or w <= 0:
        raise ValueError(f"grid must have positive sides, got (h, w) = ({h}, {w})")
    rows = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    return emb.to(torch.float32)


def check_packed_inputs(features: Tensor, patch_grid_hw: Tensor, vision_dim: int) -> list[tuple[int, int]]:
    """Validate packed inputs and return the crops' grids as a list of ``(h_p, w_p)`` ints.

    Raises `ValueError` when ``features`` is not ``(P, vision_dim)``, ``patch_grid_hw`` is not a ``(K, 2)`` integer
    tensor of positive sizes, or ``P != sum(h_p * w_p)``.
    """
    if not isinstance(features, Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a 2D tensor (P, vision_dim), got {shape}")
    if features.shape[1] != vision_dim:
        raise ValueError(
            f"features have width {features.shape[1]} but the module expects vision_dim = {vision_dim}"
        )
    grid = torch.as_tensor(patch_grid_hw)
    if grid.dim() != 2 or grid.shape[1] != 2:
        raise ValueError(f"patch_grid_hw must have shape (K, 2), got {tuple(grid.shape)}")
    if grid.is_floating_point() or grid.is_complex() or grid.dtype == torch.bool:
        raise ValueError(f"patch_grid_hw must be an integer tensor, got dtype {grid.dtype}")
    grids = [(int(h), int(w)) for h, w in grid.tolist()]
    bad = [g for g in grids if g[0] <= 0 or g[1] <= 0]
    if bad:
        raise ValueError(f"patch_grid_hw must hold positive (h_p, w_p), got {bad[0]}")
    total = sum(h * w for h, w in grids)
    if features.shape[0] != total:
        raise ValueError(
            f"features have {features.shape[0]} rows but patch_grid_hw accounts for sum(h_p * w_p) = {total} "
            f"over {len(grids)} crops"
        )
    return grids


def group_crops(grids: list[tuple[int, int]], device) -> tuple[list[int], dict[tuple[int, int], Tensor]]:
    """Where each packed crop starts, and for each distinct grid the ``(G, h*w)`` row indices of its crops.

    Returns ``(starts, groups)`` with ``groups[(h, w)] = (crop_indices (G,), rows (G, h*w))``, grids in order of
    first appearance, so each group can be gathered as one dense batch with ``features[rows]``.
    """
    starts, total = [], 0
    for h, w in grids:
        starts.append(total)
        total += h * w
    members: dict[tuple[int, int], list[int]] = {}
    for k, g in enumerate(grids):
        members.setdefault(g, []).append(k)
    groups = {}
    for (h, w), ks in members.items():
        st = torch.tensor([starts[k] for k in ks], device=device)
        groups[(h, w)] = (torch.tensor(ks, device=device), st[:, None] + torch.arange(h * w, device=device)[None, :])
    return starts, groups


def scatter_groups(num_crops: int, parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Put each group's output ``(G, Q, H)`` back at its crop indices: ``(num_crops, Q, H)``.

    The result takes the dtype the groups came out in, not the input's: under CUDA autocast the layer norms give
    float32 and the attention bfloat16, so a buffer allocated from the input would refuse the write.
    """
    first = parts[0][1]
    out = first.new_empty(num_crops, *first.shape[1:])
    for ks, y in parts:
        out[ks] = y
    return out


class CrossAttentionResampler(nn.Module):
    """What both resamplers share: learnable queries cross-attending to each crop's projected ViT features.

    Layers: ``query`` ``(Q, hidden)``, ``kv_proj`` (``vision_dim -> hidden``, no bias), ``ln_q``, ``ln_kv``,
    ``attn`` (``MultiheadAttention``, batch first), ``ln_post``, ``proj`` ``(hidden, hidden)``. ``forward`` checks
    the packed inputs, runs the per-token work (``ln_kv(kv_proj(features))``) once over all rows and hands the
    result to the subclass's ``_compress``, which decides what each query sees.
    """

    def __init__(self, vision_dim: int, hidden_size: int, num_queries: int, num_heads: int | None, eps: float):
        super().__init__()
        if num_heads is None:
            num_heads = max(1, hidden_size // 128)
        if vision_dim <= 0 or hidden_size <= 0 or num_queries <= 0 or num_heads <= 0:
            raise ValueError(
                "vision_dim, hidden_size, num_queries and num_heads must be positive, got "
                f"{vision_dim}, {hidden_size}, {num_queries}, {num_heads}"
            )
        if hidden_size % 4 != 0:
            raise ValueError(f"hidden_size must be a multiple of 4 (2D sin-cos embedding), got {hidden_size}")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.vision_dim = vision_dim
        self.hidden_size = hidden_size
        self.num_queries = num_queries
        self.num_heads = num_heads

        self.query = nn.Parameter(torch.empty(num_queries, hidden_size))
        self.kv_proj = nn.Linear(vision_dim, hidden_size, bias=False)
        self.ln_q = nn.LayerNorm(hidden_size, eps=eps)
        self.ln_kv = nn.LayerNorm(hidden_size, eps=eps)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.ln_post = nn.LayerNorm(hidden_size, eps=eps)
        self.proj = nn.Parameter(torch.empty(hidden_size, hidden_size))

    def tokens_per_crop(self, grid_hw=None) -> int:
        """Output tokens per crop: ``num_queries`` whatever the grid."""
        return self.num_queries

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype features are cast to: ``kv_proj``'s compute dtype (`quantization.compute_dtype`), which for an
        int8 ``kv_proj`` that takes any float input is the dtype of ``proj``, a bare parameter no quantizer
        touches."""
        return compute_dtype(self.kv_proj, default=self.proj.dtype)

    # Whether `_compress` gets the features before the per-token work and projects them itself (in pieces)
    compress_projects = False

    def project(self, features: Tensor) -> Tensor:
        """The per-token work: ``(N, vision_dim)`` -> ``(N, hidden)``, ``ln_kv(kv_proj(features))``."""
        return self.ln_kv(self.kv_proj(features))

    def _compress(self, x: Tensor, grids: list[tuple[int, int]]) -> Tensor:
        """``x`` ``(P, hidden)``: the projected, normed features of the crops ``grids`` (at least one), packed
        (``(P, vision_dim)``, not yet projected, where `compress_projects`) -> ``(K, num_queries, hidden)``."""
        raise NotImplementedError

    def forward(self, features: Tensor, patch_grid_hw: Tensor) -> Tensor:
        """Compress packed crops.

        Args:
            features: ``(P, vision_dim)`` ViT features of all crops, concatenated.
            patch_grid_hw: ``(K, 2)`` integer ``(h_p, w_p)`` per crop; ``P == sum(h_p * w_p)``.

        Returns:
            ``(K, num_queries, hidden_size)``.
        """
        grids = check_packed_inputs(features, patch_grid_hw, self.vision_dim)
        x = features.to(self.compute_dtype)
        if not self.compress_projects:
            x = self.project(x)  # (P, hidden), once over all rows
        if not grids:
            return x.new_zeros(0, self.num_queries, self.hidden_size)
        # MultiheadAttention reads out_proj's weight without calling out_proj, and the folded attention reads the
        # in-projection's: load them if accelerate offloaded them
        folded = getattr(self, "attention", "plain") == "folded"
        with onloaded(self.attn if folded else self.attn.out_proj):
            return self._compress(x, grids)

    def forward_split(self, features: Tensor, patch_grid_hw: Tensor) -> list[Tensor]:
        """Same as `forward`, as a list of K tensors ``(num_queries, hidden_size)`` (one per crop)."""
        return list(self.forward(features, patch_grid_hw).unbind(0))


class PerceiverResampler(CrossAttentionResampler):
    """Compress each crop's ``h_p * w_p`` ViT features to ``num_queries`` tokens of width ``hidden_size``.

    Args:
        vision_dim: width ``D_v`` of the ViT features.
        hidden_size: output width (the LLM's hidden size); must be a multiple of 4 and of ``num_heads``.
        num_queries: number of learnable queries = output tokens per crop (64 in the paper).
        num_heads: attention heads; default ``max(1, hidden_size // 128)``.
        batching: ``"group"`` (one dense attention call per distinct grid, default) or ``"pad"`` (one call,
            crops padded to the longest with a key padding mask). See the module docstring.
        attention: ``"plain"`` (default: ``nn.MultiheadAttention`` on projected keys and values) or ``"folded"``
            (the queries folded into the key projection and the value projection applied after the weighted sum,
            see `_attend_folded`: the same function with half the work per token; `bench/resampler.py` measured
            it 1.16-1.23x faster in float32 on a CPU but 0.93x in bfloat16, where the fused attention wins, so it
            is an option). Same weights either way.
    """

    compress_projects = True  # each group, or each chunk of one, is projected as it is attended

    def __init__(
        self,
        vision_dim: int,
        hidden_size: int,
        num_queries: int = 64,
        num_heads: int | None = None,
        batching: str = "group",
        attention: str = "plain",
    ):
        if batching not in ("group", "pad"):
            raise ValueError(f"batching must be 'group' or 'pad', got {batching!r}")
        if attention not in ("folded", "plain"):
            raise ValueError(f"attention must be 'folded' or 'plain', got {attention!r}")
        super().__init__(vision_dim, hidden_size, num_queries, num_heads, eps=1e-5)
        self.batching = batching
        self.attention = attention
        # Not a buffer: derived data, never saved in a checkpoint. Keyed by (h, w, device).
        self._pos_cache: dict[tuple[int, int, torch.device], Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialize: trunc-normal(0.02) query and Linear weights, zero biases, unit LayerNorms,
        ``proj ~ hidden**-0.5 * randn``; the attention's packed in-projection keeps PyTorch's xavier init."""
        nn.init.trunc_normal_(self.query, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.proj.copy_(self.hidden_size**-0.5 * torch.randn(self.hidden_size, self.hidden_size))

    def extra_repr(self) -> str:
        return (
            f"vision_dim={self.vision_dim}, hidden_size={self.hidden_size}, num_queries={self.num_queries}, "
            f"num_heads={self.num_heads}, batching={self.batching!r}, attention={self.attention!r}"
        )

    def pos_embed(self, h: int, w: int, device=None, dtype=None) -> Tensor:
        """Sin-cos embedding of an ``h x w`` grid, ``(h * w, hidden_size)``, cached in float32 per grid/device."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (int(h), int(w), device)
        emb = self._pos_cache.get(key)
        if emb is None:
            emb = get_2d_sincos_pos_embed(self.hidden_size, (h, w)).to(device)
            self._pos_cache[key] = emb
        return emb if dtype is None else emb.to(dtype)

    def _attend(self, x: Tensor, pos: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Cross-attention of the queries to a dense batch ``x`` (B, L, hidden) -> (B, Q, hidden)."""
        if self.attention == "folded" and self.attn.in_proj_weight is not None and \
                not (self.training and self.attn.dropout > 0):
            return self.ln_post(self._attend_folded(x, pos, key_padding_mask)) @ self.proj
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        out, _ = self.attn(q, x + pos, x, key_padding_mask=key_padding_mask, need_weights=False)
        return self.ln_post(out) @ self.proj

    def _attend_folded(self, x: Tensor, pos: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``self.attn(q, x + pos, x)`` computed without projecting the L tokens to keys and values.

        Per head h: ``q_h k_j^T = (q_h W_k[h]) (x_j + pos_j)^T + q_h b_k[h]``, and the last term is the same for
        every key, so softmax drops it: the queries fold into the key projection, ``A = q_h W_k[h] / sqrt(d)``
        ``(heads * Q, hidden)``, and scores are ``(x + pos) A^T``. The softmax weights sum to 1, so
        ``sum_j a_j (x_j W_v[h]^T + b_v[h]) = (sum_j a_j x_j) W_v[h]^T + b_v[h]``: the value projection runs on
        the ``heads * Q`` weighted sums instead of the L tokens. Per token this costs ``2 * heads * Q * hidden``
        multiply-adds instead of ``2 * hidden**2`` (plus the attention itself): half as much with 64 queries and
        128-wide heads, exactly the same function (tested against the plain form).
        """
        attn, H = self.attn, self.hidden_size
        heads, d, Q = attn.num_heads, H // attn.num_heads, self.num_queries
        w_q, w_k, w_v = attn.in_proj_weight.split(H)
        b_q, _, b_v = (attn.in_proj_bias.split(H) if attn.in_proj_bias is not None else (None, None, None))
        q = nn.functional.linear(self.ln_q(self.query), w_q, b_q).view(Q, heads, d).transpose(0, 1)  # (heads, Q, d)
        folded = (q @ w_k.view(heads, d, H)).reshape(heads * Q, H) * d**-0.5
        scores = (x + pos) @ folded.T  # (B, L, heads * Q)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, :, None], float("-inf"))
        weights = scores.softmax(dim=1).to(x.dtype)
        sums = (weights.transpose(1, 2) @ x).view(x.shape[0], heads, Q, H)  # (B, heads, Q, hidden)
        out = (sums @ w_v.view(heads, d, H).transpose(1, 2)).transpose(1, 2).reshape(x.shape[0], Q, H)
        if b_v is not None:
            out = out + b_v
        return attn.out_proj(out)

    def _compress(self, x: Tensor, grids: list[tuple[int, int]]) -> Tensor:
        device = x.device
        K, H = len(grids), self.hidden_size
        counts = [h * w for h, w in grids]
        starts, groups = group_crops(grids, device)

        if self.batching == "pad" and len(set(grids)) > 1:
            x = self.project(x)
            L = max(counts)
            ar = torch.arange(L, device=device)
            cnt = torch.tensor(counts, device=device)
            st = torch.tensor(starts, device=device)
            valid = ar[None, :] < cnt[:, None]  # (K, L)
            idx = torch.where(valid, st[:, None] + ar[None, :], torch.zeros((), dtype=torch.long, device=device))
            xb = x[idx]  # (K, L, hidden); padded rows are arbitrary and masked out below
            pos = x.new_zeros(K, L, H)
            for (h, w), (ks, _) in groups.items():
                pos[ks, : h * w] = self.pos_embed(h, w, device=device, dtype=x.dtype)
            return self._attend(xb, pos, key_padding_mask=~valid)

        parts = []
        for (h, w), (ks, idx) in groups.items():
            pos = None
            # on a CPU whole crops of the group a chunk at a time, at most CPU_CHUNK_TOKENS rows (at least one crop)
            per_chunk = max(1, CPU_CHUNK_TOKENS // (h * w)) if device.type == "cpu" else len(ks)
            for ks_chunk, idx_chunk in zip(ks.split(per_chunk), idx.split(per_chunk)):
                rows = self.project(x[idx_chunk])  # (G, h*w, hidden)
                if pos is None:
                    pos = self.pos_embed(h, w, device=device, dtype=rows.dtype).unsqueeze(0)
                parts.append((ks_chunk, self._attend(rows, pos)))
        return scatter_groups(K, parts)
