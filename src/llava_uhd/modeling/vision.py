"""Adaptive vision encoding: every crop goes through the ViT at its own patch grid (LLaVA-UHD Sec. 3.1).

A LLaVA-UHD slice keeps its aspect ratio, so its patch grid ``(h_p, w_p)`` is rarely the ViT's native grid
(24x24 for CLIP-ViT-L/14-336). `AdaptiveVisionEncoder` wraps a transformers vision tower (`CLIPVisionModel`,
`SiglipVisionModel`, `Dinov2Model`, `Dinov2WithRegistersModel`) and encodes each crop at its own grid:

1. **Patch embedding**: each bucket of same-grid crops (see Batching) is reassembled from its packed patches into
   ``(B, 3, h_p*p, w_p*p)`` images and run through the tower's own patch conv, the very kernel call of the tower's
   forward, so a native-size crop matches the tower bit for bit.
2. **Position embedding**: the tower's learned 1D embedding, reshaped to its native 2D grid and interpolated to
   ``(h_p, w_p)`` by `interpolate_pos_embed` (bicubic, ``align_corners=False``, in float32 whatever the model
   dtype: the released code interpolated in bf16, which shifts the embeddings). At the native grid the embedding
   is used as is, so a native-size crop gives exactly what the tower's own forward gives. The CLS position
   embedding (CLIP, DINOv2) is kept unchanged; DINOv2 register tokens get none, as in the tower.
3. **Encoder**: the tower's own modules (CLIP's ``pre_layrnorm``, its encoder layers with their attention
   backend, DINOv2 layer scale, ...) up to ``hidden_states[feature_layer]``, the penultimate layer by default as
   in LLaVA. Layers past the requested one are not run; no final/post layernorm is applied.

Batching: crops are **bucketed by patch grid**. Each bucket of equal grids is one dense batch through the layers,
so there is no padding and no attention mask at all (every attention backend, sdpa / eager / flash, works
unchanged), and each crop's features depend on that crop alone. A batch of LLaVA-UHD crops has few distinct grids
(an image's slices mostly share one; its overview has another), so the number of buckets stays small. The outputs
are scattered back into the packed order of the input.

Position-embedding cache: interpolated embeddings are cached per grid, keyed on the identity, storage, dtype,
device and in-place version counter of the position-embedding weight, so ``load_state_dict``, an optimizer step,
``.to(dtype)`` or ``.to(device)`` all invalidate it. Nothing is cached while the weight requires grad under
autograd (a cached tensor would tie every step to the graph of the step that computed it): then it is recomputed
per forward, one small interpolation per distinct grid.

Freezing: the tower is frozen by default (``trainable=False``, LLaVA-UHD keeps the ViT frozen in both stages):
its parameters do not require grad and it stays in eval mode even when the parent model calls ``.train()``, so
dropout / drop-path never fire in a frozen tower. `unfreeze` makes it trainable; `freeze` undoes that.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdaptiveVisionEncoder", "interpolate_pos_embed", "SUPPORTED_MODEL_TYPES"]

# config.model_type -> the tower family this module knows how to take apart.
SUPPORTED_MODEL_TYPES = {
    "clip_vision_model": "clip",
    "siglip_vision_model": "siglip",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
}

_MAX_CACHED_GRIDS = 256


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


def _build_tower(vision_config) -> nn.Module:
    model_type = getattr(vision_config, "model_type", None)
    if model_type == "clip_vision_model":
        from transformers import CLIPVisionModel as cls
    elif model_type == "siglip_vision_model":
        from transformers import SiglipVisionModel as cls
    elif model_type == "dinov2":
        from transformers import Dinov2Model as cls
    elif model_type == "dinov2_with_registers":
        from transformers import Dinov2WithRegistersModel as cls
    else:
        raise ValueError(f"unsupported vision config model_type {model_type!r}; expected one of "
                         f"{sorted(SUPPORTED_MODEL_TYPES)}")
    return cls(vision_config)


class AdaptiveVisionEncoder(nn.Module):
    r"""Encodes packed crops of any patch grid with a CLIP, SigLIP or DINOv2 tower.

    Args:
        vision_model: a transformers ``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model`` or
            ``Dinov2WithRegistersModel`` (a wrapper holding one as ``.vision_model`` is unwrapped).
        feature_layer: which entry of the tower's ``hidden_states`` to return (``0`` is the embedding output,
            ``-1`` the last layer before any post layernorm). Defaults to ``-2``, the penultimate layer (LLaVA).
        trainable: if False (default) the tower is frozen, see `freeze`.

    Attributes:
        family: ``"clip"``, ``"siglip"`` or ``"dinov2"``.
        patch_size: ``p``; the input rows have ``3 * p * p`` values.
        native_grid: ``(gh, gw)``, the grid the position embedding was trained on.
        hidden_size: ``D``, the width of the returned features.
        num_prefix_tokens: CLS and register tokens the tower prepends (dropped from the output).
    """

    def __init__(self, vision_model: nn.Module, feature_layer: int = -2, trainable: bool = False):
        super().__init__()
        if not hasattr(vision_model, "embeddings") and hasattr(vision_model, "vision_model"):
            vision_model = vision_model.vision_model
        config = getattr(vision_model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported vision tower {type(vision_model).__name__} (model_type {model_type!r}); "
                             f"expected one of {sorted(SUPPORTED_MODEL_TYPES)}")
        self.vision_model = vision_model
        self.family = SUPPORTED_MODEL_TYPES[model_type]

        if self.family == "dinov2":
            self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        else:
            self.num_prefix_tokens = 1 if self.family == "clip" else 0
        self.has_cls = self.family in ("clip", "dinov2")

        kh, kw = self._patch_conv.kernel_size
        if kh != kw:
            raise ValueError(f"only square patches are supported, got {kh}x{kw}")
        self.patch_size = int(kh)
        self.in_channels = int(self._patch_conv.in_channels)
        self.hidden_size = int(self._patch_conv.out_channels)

        num_positions = self._pos_weight().shape[0] - (1 if self.has_cls else 0)
        image_size = config.image_size
        ih, iw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.native_grid = (ih // self.patch_size, iw // self.patch_size)
        if self.native_grid[0] * self.native_grid[1] != num_positions:
            side = math.isqrt(num_positions)
            if side * side != num_positions:
                raise ValueError(f"cannot lay {num_positions} position embeddings out on a 2D grid")
            self.native_grid = (side, side)

        num_layers = len(self._layers)
        if not -(num_layers + 1) <= feature_layer <= num_layers:
            raise ValueError(f"feature_layer={feature_layer} out of range for a tower with {num_layers} layers "
                             f"({num_layers + 1} hidden states)")
        self.feature_layer = feature_layer
        # hidden_states[i] is the output of the first i layers: run only those.
        self._num_layers_to_run = feature_layer % (num_layers + 1)

        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self._pos_cache_key: tuple | None = None
        self.trainable = True
        if not trainable:
            self.freeze()

    @classmethod
    def from_config(cls, vision_config, feature_layer: int = -2, trainable: bool = False) -> "AdaptiveVisionEncoder":
        """A randomly initialised tower from a vision config (a full CLIP / SigLIP config's ``vision_config`` is
        used)."""
        is_tower_config = getattr(vision_config, "model_type", None) in SUPPORTED_MODEL_TYPES
        if not is_tower_config and hasattr(vision_config, "vision_config"):
            vision_config = vision_config.vision_config
        return cls(_build_tower(vision_config), feature_layer=feature_layer, trainable=trainable)

    # ------------------------------------------------------------------------------------------------ freezing
    def freeze(self) -> "AdaptiveVisionEncoder":
        """Freeze the tower: no parameter requires grad and it stays in eval mode (see `train`)."""
        self.trainable = False
        self.vision_model.requires_grad_(False)
        self.vision_model.eval()
        return self

    def unfreeze(self) -> "AdaptiveVisionEncoder":
        """Make the tower trainable; its train/eval mode follows this module's again."""
        self.trainable = True
        self.vision_model.requires_grad_(True)
        self.vision_model.train(self.training)
        return self

    def train(self, mode: bool = True) -> "AdaptiveVisionEncoder":
        super().train(mode)
        if not self.trainable:
            self.vision_model.eval()  # a frozen tower never runs dropout / drop-path
        return self

    # ------------------------------------------------------------------------------------- the tower's parts
    # Looked up on each use rather than stored: a second reference would register the modules twice (duplicate
    # state-dict keys) and go stale if the tower's modules were swapped.
    @property
    def _patch_conv(self) -> nn.Conv2d:
        emb = self.vision_model.embeddings
        return emb.patch_embeddings.projection if self.family == "dinov2" else emb.patch_embedding

    @property
    def _layers(self) -> nn.ModuleList:
        encoder = self.vision_model.encoder
        return encoder.layer if self.family == "dinov2" else encoder.layers

    @property
    def dtype(self) -> torch.dtype:
        return self._patch_conv.weight.dtype

    # ----------------------------------------------------------------------------------------- position embedding

    def _pos_weight(self) -> torch.Tensor:
        """The learned position embedding, ``(num_prefix_pos + gh*gw, D)``."""
        emb = self.vision_model.embeddings
        if self.family == "dinov2":
            return emb.position_embeddings[0]
        return emb.position_embedding.weight

    def get_pos_embed(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Patch position embedding for one grid: ``(h_p * w_p, D)`` in the tower's dtype (CLS excluded)."""
        weight = self._pos_weight()
        grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        patch_pos = weight[1:] if self.has_cls else weight
        if grid_hw == self.native_grid:
            return patch_pos  # exactly the tower's own embedding, no resampling
        if torch.is_grad_enabled() and weight.requires_grad:
            return self._interpolate(patch_pos, grid_hw)  # keep the graph: never cache
        key = (id(weight), weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if key != self._pos_cache_key:
            self._pos_cache.clear()
            self._pos_cache_key = key
        entry = (grid_hw, torch.is_inference_mode_enabled())
        cached = self._pos_cache.get(entry)
        if cached is None:
            if len(self._pos_cache) >= _MAX_CACHED_GRIDS:
                self._pos_cache.pop(next(iter(self._pos_cache)))
            cached = self._pos_cache[entry] = self._interpolate(patch_pos.detach(), grid_hw)
        return cached

    def _interpolate(self, patch_pos: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        gh, gw = self.native_grid
        return interpolate_pos_embed(patch_pos.reshape(gh, gw, -1), grid_hw)

    # -------------------------------------------------------------------------------------------------- forward
    def _check_inputs(self, pixel_values: torch.Tensor, patch_grid_hw: torch.Tensor) -> list[tuple[int, int]]:
        p, c = self.patch_size, self.in_channels
        if pixel_values.dim() != 2:
            raise ValueError(f"pixel_values must be packed patches (P, {c}*p*p), got shape "
                             f"{tuple(pixel_values.shape)}")
        if pixel_values.shape[1] != c * p * p:
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} values per patch but the tower expects "
                             f"{c}*p*p = {c}*{p}*{p} = {c * p * p} (patch size {p})")
        if patch_grid_hw.dim() != 2 or patch_grid_hw.shape[1] != 2:
            raise ValueError(f"patch_grid_hw must be (K, 2), got shape {tuple(patch_grid_hw.shape)}")
        if patch_grid_hw.is_floating_point() or patch_grid_hw.is_complex():
            raise ValueError(f"patch_grid_hw must hold integers, got {patch_grid_hw.dtype}")
        grids = [(int(h), int(w)) for h, w in patch_grid_hw.tolist()]  # one host sync: bucketing needs the values
        bad = [g for g in grids if g[0] < 1 or g[1] < 1]
        if bad:
            raise ValueError(f"patch grids must be positive, got {bad[0]}")
        total = sum(h * w for h, w in grids)
        if total != pixel_values.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patch rows but patch_grid_hw describes "
                             f"{len(grids)} crops with sum(h_p*w_p) = {total} patches")
        return grids

    def forward(self, pixel_values: torch.Tensor, patch_grid_hw: torch.Tensor) -> torch.Tensor:
        """Encode packed crops.

        Args:
            pixel_values: ``(P, 3*p*p)``, every crop's patches, row-major within a crop (see
                `image_processing.patchify`).
            patch_grid_hw: ``(K, 2)`` integers, each crop's grid ``(h_p, w_p)``; crop ``k`` owns the next
                ``h_p * w_p`` rows of ``pixel_values``.

        Returns:
            ``(P, D)`` in the tower's dtype: ``hidden_states[feature_layer]`` of every patch token (no CLS, no
            registers), in the packed order of the input.
        """
        patch_grid_hw = torch.as_tensor(patch_grid_hw)
        grids = self._check_inputs(pixel_values, patch_grid_hw)
        weight = self._patch_conv.weight
        device, dtype = weight.device, weight.dtype
        if not grids:
            return pixel_values.new_zeros((0, self.hidden_size), dtype=dtype, device=device)

        # Bucket crops by grid, in order of first appearance.
        buckets: dict[tuple[int, int], list[int]] = {}
        for k, grid in enumerate(grids):
            buckets.setdefault(grid, []).append(k)
        starts = torch.tensor([0] + [h * w for h, w in grids[:-1]], device=device).cumsum(0)
        x = pixel_values.to(device=device, dtype=dtype)
        p, c = self.patch_size, self.in_channels

        outputs, rows = [], []
        for (h, w), crops in buckets.items():
            n = h * w
            idx = (starts[crops].unsqueeze(1) + torch.arange(n, device=device)).reshape(-1)  # (B*n,)
            # Reassemble the bucket's crops as images (B, C, h*p, w*p) and run the tower's own patch conv on them:
            # the same kernel call as the tower's forward, so a native-size crop matches it bit for bit.
            images = x[idx].view(len(crops), h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, h * p, w * p)
            embeds = self._patch_conv(images).flatten(2).transpose(1, 2)  # (B, n, D)
            tokens = embeds + self.get_pos_embed((h, w))
            feats = self._encode(tokens)  # (B, n, D)
            outputs.append(feats.reshape(len(crops) * n, -1))
            rows.append(idx)
        # Back to the packed input order: row rows[i] of the input is row i of the concatenated outputs.
        order = torch.cat(rows).argsort()
        return torch.cat(outputs)[order]

    def _encode(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, n, D)`` position-embedded patch tokens of same-grid crops to ``(B, n, D)`` features."""
        tower, emb = self.vision_model, self.vision_model.embeddings
        b = patch_tokens.shape[0]
        prefix = []
        if self.family == "clip":
            cls = emb.class_embedding + emb.position_embedding.weight[0]
            prefix.append(cls.expand(b, 1, -1))
        elif self.family == "dinov2":
            cls = emb.cls_token[:, 0] + emb.position_embeddings[:, 0]  # (1, D)
            prefix.append(cls.expand(b, 1, -1))
            if getattr(emb, "register_tokens", None) is not None:
                prefix.append(emb.register_tokens.expand(b, -1, -1))  # registers carry no position embedding
        hidden = torch.cat([*prefix, patch_tokens], dim=1) if prefix else patch_tokens
        if self.family == "dinov2":
            hidden = emb.dropout(hidden)
        if self.family == "clip":
            hidden = tower.pre_layrnorm(hidden)
        # The tower's own layers, so its attention backend, layer scale, drop path and gradient checkpointing
        # apply; no mask is needed since every sequence in the bucket is complete.
        for layer in self._layers[: self._num_layers_to_run]:
            hidden = layer(hidden, None)
        return hidden[:, self.num_prefix_tokens:]

    def extra_repr(self) -> str:
        return (f"family={self.family}, feature_layer={self.feature_layer}, patch_size={self.patch_size}, "
                f"native_grid={self.native_grid}, trainable={self.trainable}")
