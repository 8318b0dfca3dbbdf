"""Position embeddings at any patch grid: resize a ViT's learned 2D position embedding to a crop's grid.

    pos = interpolate_pos_embed(weight[1:].reshape(gh, gw, dim), (h_p, w_p))  # (h_p * w_p, dim)

Bicubic, ``align_corners=False`` (as the released LLaVA-UHD code and transformers' ``interpolate_pos_encoding``),
computed in at least float32 whatever the model dtype (the released code interpolated in bf16, which shifts the
embeddings); at the native grid the embedding is returned untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["interpolate_pos_embed"]


def interpolate_pos_embed(pos_embed_2d: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Resize a 2D position embedding to another patch grid.

    Args:
        pos_embed_2d: ``(gh, gw, D)``, the position embedding on its native grid.
        grid_hw: the target grid ``(h_p, w_p)``.

    Returns:
        ``(h_p * w_p, D)``, row-major, in the dtype of ``pos_embed_2d``. At the native grid this is
        ``pos_embed_2d`` reshaped, untouched. Otherwise bicubic (``align_corners=False``, as the released code),
        computed in at least float32: half-precision bicubic resampling visibly shifts the embeddings.
    """
    if pos_embed_2d.dim() != 3:
        raise ValueError(f"pos_embed_2d must be (gh, gw, D), got shape {tuple(pos_embed_2d.shape)}")
    h_p, w_p = int(grid_hw[0]), int(grid_hw[1])
    if h_p < 1 or w_p < 1:
        raise ValueError(f"grid must be positive, got {(h_p, w_p)}")
    gh, gw, dim = pos_embed_2d.shape
    if (gh, gw) == (h_p, w_p):
        return pos_embed_2d.reshape(gh * gw, dim)
    compute_dtype = torch.promote_types(pos_embed_2d.dtype, torch.float32)
    x = pos_embed_2d.to(compute_dtype).permute(2, 0, 1).unsqueeze(0)  # (1, D, gh, gw)
    x = F.interpolate(x, size=(h_p, w_p), mode="bicubic", align_corners=False)
    return x[0].permute(1, 2, 0).reshape(h_p * w_p, dim).to(pos_embed_2d.dtype)
