"""LLaVA-1.5's 2-layer MLP projector: the baseline the resampler is compared with (paper Table 2).

It maps every ViT token to the LLM's width and keeps all of them (576 tokens for a 24x24 slice), so the LLM's
token count grows with the image's resolution.

Shared interface with `PerceiverResampler` (so a caller can treat both uniformly):

* ``forward(features (P, D_v), patch_grid_hw (K, 2))`` returns the natural tensor: ``(P, hidden)`` here,
  ``(K, Q, hidden)`` for the resampler;
* ``forward_split(features, patch_grid_hw)`` returns a list of K tensors ``(n_k, hidden)``, one per crop
  (``n_k = h_p * w_p`` here, ``num_queries`` for the resampler);
* ``tokens_per_crop(grid_hw)`` gives ``n_k`` for a grid without running the module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .quantization import compute_dtype
from .resampler import check_packed_inputs

__all__ = ["MLPProjector"]


class MLPProjector(nn.Module):
    """``Linear(vision_dim, hidden) -> GELU -> Linear(hidden, hidden)`` applied to every token."""

    def __init__(self, vision_dim: int, hidden_size: int):
        super().__init__()
        if vision_dim <= 0 or hidden_size <= 0:
            raise ValueError(f"vision_dim and hidden_size must be positive, got {vision_dim}, {hidden_size}")
        self.vision_dim = vision_dim
        self.hidden_size = hidden_size
        self.linear_1 = nn.Linear(vision_dim, hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def tokens_per_crop(self, grid_hw) -> int:
        """Output tokens per crop: every patch is kept, ``h_p * w_p``."""
        h, w = (int(v) for v in grid_hw)
        return h * w

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype features are cast to: ``linear_1``'s compute dtype (`quantization.compute_dtype`)."""
        return compute_dtype(self.linear_1)

    def forward(self, features: Tensor, patch_grid_hw: Tensor | None = None) -> Tensor:
        """Project packed features ``(P, vision_dim)`` to ``(P, hidden_size)``.

        ``patch_grid_hw`` ``(K, 2)`` is optional here (the MLP is per-token); when given, the inputs are checked
        against it exactly as the resampler does.
        """
        if patch_grid_hw is not None:
            check_packed_inputs(features, patch_grid_hw, self.vision_dim)
        elif not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != self.vision_dim:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"features must have shape (P, vision_dim={self.vision_dim}), got {shape}")
        x = features.to(self.compute_dtype)
        return self.linear_2(self.act(self.linear_1(x)))

    def forward_split(self, features: Tensor, patch_grid_hw: Tensor) -> list[Tensor]:
        """Same as `forward`, split per crop: a list of K tensors ``(h_p * w_p, hidden_size)``."""
        grids = check_packed_inputs(features, patch_grid_hw, self.vision_dim)
        out = self.forward(features)
        return list(torch.split(out, [h * w for h, w in grids], dim=0))
