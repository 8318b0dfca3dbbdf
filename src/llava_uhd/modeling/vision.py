"""Adaptive vision encoding: every crop goes through the ViT at its own patch grid (LLaVA-UHD Sec. 3.1).

A LLaVA-UHD slice keeps its aspect ratio, so its patch grid ``(h_p, w_p)`` is rarely the ViT's native grid
(24x24 for CLIP-ViT-L/14-336). `AdaptiveVisionEncoder` wraps a transformers vision tower (`CLIPVisionModel`,
`SiglipVisionModel`, `Dinov2Model`, `Dinov2WithRegistersModel`) and encodes packed crops at their own grids::

    encoder = AdaptiveVisionEncoder(CLIPVisionModel.from_pretrained(...))
    features = encoder(pixel_values, patch_grid_hw)  # (P, 3*p*p), (K, 2) -> (P, D)

1. **Patch embedding**: the crops of each distinct patch grid are reassembled from their packed patches into
   ``(B, 3, h_p*p, w_p*p)`` images and run through the tower's own patch conv, the very kernel call of the tower's
   forward, so a native-size crop matches the tower bit for bit.
2. **Position embedding**: the tower's learned 1D embedding, reshaped to its native 2D grid and interpolated to
   ``(h_p, w_p)`` by `interpolate_pos_embed` (see `pos_embed`); at the native grid it is used as is. The CLS
   position embedding (CLIP, DINOv2) is kept unchanged; DINOv2 register tokens get none, as in the tower.
3. **Encoder**: the tower's own modules (CLIP's ``pre_layrnorm``, its encoder layers with their attention
   backend, DINOv2 layer scale, ...) up to ``hidden_states[feature_layer]``, the penultimate layer by default as
   in LLaVA. Layers past the requested one are not run; no final/post layernorm is applied.

Batching (``packing=``): after steps 1-2 the layers only see token sequences, so crops are grouped by **sequence
length**, not by grid (a 24x24 and a 16x36 crop share one batch):

- ``"bucket"``: each group of equal lengths is one dense ``(B, L, D)`` batch, no padding and no attention mask, so
  every attention backend of the tower (sdpa / eager / flash) works unchanged. One pass per distinct length.
- ``"varlen"``: all crops' tokens in one ``(1, T, D)`` sequence through the tower's own layers with block-diagonal
  attention (`packed_attention.packed_attention_forward`, switched in for the call only: not thread safe). A tower
  whose layers do not forward the segments to the attention function (probed once) falls back to ``"bucket"`` with
  a warning, as does a tower in training with drop-path or with gradient checkpointing.
- ``"auto"`` (default): ``"varlen"`` on CUDA for a tower that forwards the segments, else ``"bucket"``.
  `resolve_packing` says which one a device / dtype gets.

``max_batch_tokens=N`` caps the tokens of one pass in either mode (crops are never split): it bounds activation
memory. The default, ``"auto"``, caps dense batches on the CPU at `CPU_BATCH_TOKENS` (one CLIP-L/14-336 crop, a
few B/16 crops a pass: on a CPU a bigger batch is no faster, its intermediates just fall out of cache) and leaves
everything else uncapped. Both modes give the same features up to float round-off, each crop's depending on that crop alone, scattered
back into the packed order of the input.

Interpolated position embeddings are cached per grid, keyed on the identity, storage, dtype, device and version
counter of the weight (``load_state_dict``, an optimizer step, ``.to()`` invalidate it); nothing is cached while
the weight requires grad under autograd, nor for weights made under ``torch.inference_mode``.

The tower is frozen by default (``trainable=False``; LLaVA-UHD keeps the ViT frozen in both stages): no parameter
requires grad and it stays in eval mode even when the parent calls ``.train()``. `unfreeze` / `freeze` switch it.

Under accelerate's big-model loading (``device_map=...``) the tower's embeddings may be offloaded: the weights read
here rather than through a module call (position embedding, CLS and register tokens) are loaded with
`offload.onloaded`, and inputs go to the tower's execution device (`device`).
"""
from __future__ import annotations

import inspect
import math
import warnings

import torch
from torch import nn

from .offload import execution_device, onloaded
from .packed_attention import (
    PACKED_ATTENTION_NAME,
    MissingSegmentsError,
    packed_attention_forward,
    torch_has_varlen_attn,
    use_packed_attention,
    varlen_kernel_available,
)
from .pos_embed import interpolate_pos_embed

__all__ = [
    "AdaptiveVisionEncoder",
    "interpolate_pos_embed",
    "packed_attention_forward",
    "torch_has_varlen_attn",
    "varlen_kernel_available",
    "PACKED_ATTENTION_NAME",
    "PACKING_MODES",
    "SUPPORTED_MODEL_TYPES",
]

# config.model_type -> the tower family this module knows how to take apart.
SUPPORTED_MODEL_TYPES = {
    "clip_vision_model": "clip",
    "siglip_vision_model": "siglip",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
}

PACKING_MODES = ("bucket", "varlen", "auto")

# max_batch_tokens="auto" on the CPU, bucket packing: per-pass tokens past which a dense batch stops getting faster
# there and only costs memory (bench/RESULTS.md: CLIP-L/14 bf16 1.14x faster than uncapped, B/16 the same)
CPU_BATCH_TOKENS = 1024

_MAX_CACHED_GRIDS = 256


_TAKES_MASK: dict[type, bool] = {}


def _layer_takes_mask(layer: nn.Module) -> bool:
    """Whether the layer's forward has an ``attention_mask`` parameter (CLIP / SigLIP require it positionally;
    DINOv2 in transformers <= 5.17 has none)."""
    cls = type(layer)
    if cls not in _TAKES_MASK:
        try:
            _TAKES_MASK[cls] = "attention_mask" in inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            _TAKES_MASK[cls] = True
    return _TAKES_MASK[cls]


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
        packing: how crops are batched through the layers: ``"bucket"`` (one dense batch per distinct sequence
            length), ``"varlen"`` (one packed sequence with block-diagonal attention) or ``"auto"`` (default:
            varlen on CUDA, bucket on the CPU). See the module
            docstring; `resolve_packing` tells which one a forward runs. Can be changed later (``enc.packing =``).
        max_batch_tokens: if set, no pass through the layers gets more than this many tokens (prefix included):
            a bucket is split into dense sub-batches, a varlen pack into several packs (a crop is never split, so
            a crop longer than the cap still runs, alone). None: no cap. ``"auto"`` (default): `CPU_BATCH_TOKENS`
            for bucket packing on a CPU, no cap otherwise (`resolve_max_batch_tokens`). Bounds activation memory;
            on a CPU it also keeps the MLP intermediates in cache (see ``bench/RESULTS.md``).

    Attributes:
        family: ``"clip"``, ``"siglip"`` or ``"dinov2"``.
        patch_size: ``p``; the input rows have ``3 * p * p`` values.
        native_grid: ``(gh, gw)``, the grid the position embedding was trained on.
        hidden_size: ``D``, the width of the returned features.
        num_prefix_tokens: CLS and register tokens the tower prepends (dropped from the output).
        packing: the requested packing mode.
        max_batch_tokens: the requested cap on tokens per pass (None: no cap; ``"auto"``).
    """

    def __init__(self, vision_model: nn.Module, feature_layer: int = -2, trainable: bool = False,
                 packing: str = "auto", max_batch_tokens: int | str | None = "auto"):
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

        kh, kw = self.patch_conv.kernel_size
        if kh != kw:
            raise ValueError(f"only square patches are supported, got {kh}x{kw}")
        self.patch_size = int(kh)
        self.in_channels = int(self.patch_conv.in_channels)
        self.hidden_size = int(self.patch_conv.out_channels)

        pos = self._pos_param()  # ds_shape: DeepSpeed ZeRO-3 builds the model with empty placeholders
        num_positions = getattr(pos, "ds_shape", pos.shape)[-2] - (1 if self.has_cls else 0)
        image_size = config.image_size
        ih, iw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.native_grid = (ih // self.patch_size, iw // self.patch_size)
        if self.native_grid[0] * self.native_grid[1] != num_positions:
            side = math.isqrt(num_positions)
            if side * side != num_positions:
                raise ValueError(f"cannot lay {num_positions} position embeddings out on a 2D grid")
            self.native_grid = (side, side)

        num_layers = len(self.layers)
        if not -(num_layers + 1) <= feature_layer <= num_layers:
            raise ValueError(f"feature_layer={feature_layer} out of range for a tower with {num_layers} layers "
                             f"({num_layers + 1} hidden states)")
        self.feature_layer = feature_layer
        # hidden_states[i] is the output of the first i layers: run only those.
        self._num_layers_to_run = feature_layer % (num_layers + 1)

        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self._pos_cache_key: tuple | None = None
        self.packing = packing
        self.max_batch_tokens = max_batch_tokens
        self._varlen_support: bool | None = None  # does the tower forward the segments? (probed once)
        self._warned_fallback = False
        self.trainable = True
        if not trainable:
            self.freeze()

    @classmethod
    def from_config(cls, vision_config, feature_layer: int = -2, trainable: bool = False,
                    packing: str = "auto", max_batch_tokens: int | str | None = "auto") -> "AdaptiveVisionEncoder":
        """A randomly initialised tower from a vision config (a full CLIP / SigLIP config's ``vision_config`` is
        used)."""
        is_tower_config = getattr(vision_config, "model_type", None) in SUPPORTED_MODEL_TYPES
        if not is_tower_config and hasattr(vision_config, "vision_config"):
            vision_config = vision_config.vision_config
        return cls(_build_tower(vision_config), feature_layer=feature_layer, trainable=trainable, packing=packing,
                   max_batch_tokens=max_batch_tokens)

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
    def patch_conv(self) -> nn.Conv2d:
        """The tower's patch-embedding conv (read only)."""
        emb = self.vision_model.embeddings
        return emb.patch_embeddings.projection if self.family == "dinov2" else emb.patch_embedding

    @property
    def layers(self) -> nn.ModuleList:
        """All of the tower's encoder layers (read only); the first `num_layers_to_run` of them are run."""
        encoder = self.vision_model.encoder
        return encoder.layer if self.family == "dinov2" else encoder.layers

    @property
    def num_layers_to_run(self) -> int:
        """How many of `layers` a forward runs: ``hidden_states[feature_layer]`` is the output of that many."""
        return self._num_layers_to_run

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the tower computes (its patch conv's execution device: not ``meta`` when accelerate offloaded
        it, see `offload`)."""
        return execution_device(self.patch_conv)

    # ----------------------------------------------------------------------------------------- position embedding

    def _pos_param(self) -> nn.Parameter:
        """The position-embedding parameter itself: ``(1, N, D)`` for DINOv2, ``(N, D)`` else."""
        emb = self.vision_model.embeddings
        return emb.position_embeddings if self.family == "dinov2" else emb.position_embedding.weight

    def _pos_weight(self) -> torch.Tensor:
        """The learned position embedding, ``(num_prefix_pos + gh*gw, D)``."""
        pos = self._pos_param()
        return pos[0] if self.family == "dinov2" else pos

    def get_pos_embed(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Patch position embedding for one grid: ``(h_p * w_p, D)`` in the tower's dtype (CLS excluded)."""
        weight = self._pos_weight()
        grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        patch_pos = weight[1:] if self.has_cls else weight
        if grid_hw == self.native_grid:
            return patch_pos  # exactly the tower's own embedding, no resampling
        if torch.is_grad_enabled() and weight.requires_grad:
            return self._interpolate(patch_pos, grid_hw)  # keep the graph: never cache
        if weight.is_inference():
            # made under torch.inference_mode: no version counter, so in-place updates could not be detected
            return self._interpolate(patch_pos, grid_hw)
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

    # ---------------------------------------------------------------------------------------------------- packing
    @property
    def packing(self) -> str:
        return self._packing

    @packing.setter
    def packing(self, value: str) -> None:
        if value not in PACKING_MODES:
            raise ValueError(f"packing must be one of {PACKING_MODES}, got {value!r}")
        self._packing = value

    @property
    def max_batch_tokens(self) -> int | str | None:
        return self._max_batch_tokens

    @max_batch_tokens.setter
    def max_batch_tokens(self, value: int | str | None) -> None:
        if value == "auto" or value is None:
            self._max_batch_tokens = value
            return
        if isinstance(value, (bool, str)) or int(value) != value or value < 1:
            raise ValueError(f"max_batch_tokens must be a positive integer, 'auto' or None, got {value!r}")
        self._max_batch_tokens = int(value)

    def resolve_max_batch_tokens(self, mode: str, device: torch.device | str | None = None) -> int | None:
        """The cap a forward in packing ``mode`` (``"bucket"`` / ``"varlen"``) on ``device`` (default: the
        tower's) runs with: the number set, or for ``"auto"`` `CPU_BATCH_TOKENS` for bucket packing on a CPU
        and None (no cap) otherwise."""
        if self._max_batch_tokens != "auto":
            return self._max_batch_tokens
        device = self.device if device is None else torch.device(device)
        return CPU_BATCH_TOKENS if mode == "bucket" and device.type == "cpu" else None

    def resolve_packing(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str:
        """The mode a forward runs, ``"bucket"`` or ``"varlen"``, for inputs on ``device`` in ``dtype`` (default:
        the tower's). ``"varlen"`` needs a tower whose layers forward keyword arguments to the attention function
        (probed once; else a warning and ``"bucket"``), no drop-path in training and no gradient checkpointing
        (its recomputation in the backward pass would run after the attention switch is undone); ``"auto"`` also
        needs a CUDA device."""
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        if self.packing == "bucket" or self._num_layers_to_run == 0:
            return "bucket"
        if self.packing == "auto" and device.type != "cuda":
            # on the CPU one dense batch per length is as fast as it gets (bench/RESULTS.md); on a GPU packing wins
            # in every dtype: the flash varlen kernel in half precision, SDPA per length in float32 (bench/gpu/)
            return "bucket"
        if self.vision_model.training and float(getattr(self.vision_model.config, "drop_path_rate", 0) or 0) > 0:
            return "bucket"  # drop path is drawn per sample: a packed batch is one sample
        if torch.is_grad_enabled() and any(getattr(layer, "gradient_checkpointing", False) and layer.training
                                           for layer in self.layers[: self._num_layers_to_run]):
            # the backward pass recomputes the layers after the attention switch is undone: full attention
            return "bucket"
        if self._varlen_support is None:
            self._varlen_support = self.probe_varlen()
        if not self._varlen_support:
            if not self._warned_fallback:
                self._warned_fallback = True
                warnings.warn(f"{type(self.layers[0]).__name__} does not forward keyword arguments to its attention "
                              f"function (transformers {_transformers_version()}), so the packed attention cannot "
                              f"get the segments: packing={self.packing!r} falls back to 'bucket'",
                              RuntimeWarning, stacklevel=3)
            return "bucket"
        return "varlen"

    def _packed_attention(self):
        """Switch the attention of the layers to run to `packed_attention_forward` for a ``with`` block."""
        return use_packed_attention(self.layers[: self._num_layers_to_run])

    def probe_varlen(self) -> bool:
        """Whether the segments reach the attention function: runs each kind of layer to run once on two one-token
        segments under the packed attention (no grad, RNG state restored). `resolve_packing` probes once."""
        device = self.device
        hidden = torch.zeros(1, 2, self.hidden_size, device=device, dtype=self.dtype)
        cu_seqlens = torch.tensor([0, 1, 2], device=device, dtype=torch.int32)
        kinds = {type(layer): layer for layer in self.layers[: self._num_layers_to_run]}
        cuda = [device.index or 0] if device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=cuda), self._packed_attention():
                for layer in kinds.values():
                    self._run_layer(layer, hidden, cu_seqlens=cu_seqlens, max_seqlen=1, seqlens=(1, 1))
        except (MissingSegmentsError, TypeError):
            return False
        return True

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
        device, dtype = self.device, self.dtype
        if not grids:
            return pixel_values.new_zeros((0, self.hidden_size), dtype=dtype, device=device)

        groups = self.embed_crops(pixel_values, grids)
        mode = self.resolve_packing(device, dtype)
        cap = self.resolve_max_batch_tokens(mode, device)
        hiddens = self._split_batches([hidden for hidden, _ in groups], cap)
        if mode == "varlen":
            feats = []
            for pack in self._packs(hiddens, cap):
                feats += self._encode_packed(pack)
        else:
            feats = [self._encode_dense(hidden) for hidden in hiddens]
        if len(feats) == 1 and len(grids) == 1:
            return feats[0]  # one crop: already in input order
        # Back to the packed input order: row rows[i] of the input is row i of the concatenated outputs.
        order = torch.cat([rows for _, rows in groups]).argsort()
        return torch.cat(feats)[order]

    def embed_crops(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The encoder's input, grouped by sequence length (used by `forward`; public for benchmarks).

        Args:
            pixel_values: ``(P, 3*p*p)`` packed patches.
            grids: each crop's ``(h_p, w_p)``, as Python ints.

        Returns:
            ``[(hidden, rows), ...]``, one entry per distinct ``h_p * w_p`` in order of first appearance:
            ``hidden`` ``(B, prefix + n, D)`` is what the first encoder layer sees (prefix tokens, patch embeddings
            plus position embeddings, the tower's embedding dropout / pre-layernorm) for the ``B`` crops of that
            length, whatever their grids; ``rows`` ``(B * n,)`` are the input rows of its patch tokens, in order.
        """
        # the position embedding and the CLS / register tokens are read, not called: load them if offloaded
        with onloaded(self.vision_model.embeddings):
            return self._embed_crops(pixel_values, grids)

    def _embed_crops(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        device, dtype = self.device, self.dtype
        x = pixel_values.to(device=device, dtype=dtype)
        p, c = self.patch_size, self.in_channels
        by_grid: dict[tuple[int, int], list[int]] = {}
        for k, grid in enumerate(grids):
            by_grid.setdefault(grid, []).append(k)
        starts = torch.tensor([0] + [h * w for h, w in grids[:-1]], device=device).cumsum(0)

        by_length: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for (h, w), crops in by_grid.items():
            n = h * w
            idx = (starts[crops].unsqueeze(1) + torch.arange(n, device=device)).reshape(-1)  # (B*n,)
            # Reassemble the grid's crops as images (B, C, h*p, w*p) and run the tower's own patch conv on them:
            # the same kernel call as the tower's forward, so a native-size crop matches it bit for bit.
            images = x[idx].view(len(crops), h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, h * p, w * p)
            tokens = self.patch_conv(images).flatten(2).transpose(1, 2) + self.get_pos_embed((h, w))  # (B, n, D)
            by_length.setdefault(n, []).append((tokens, idx))

        groups = []
        for parts in by_length.values():  # crops of different grids but equal length share one batch
            tokens = parts[0][0] if len(parts) == 1 else torch.cat([t for t, _ in parts])
            rows = parts[0][1] if len(parts) == 1 else torch.cat([r for _, r in parts])
            groups.append((self._stem(tokens), rows))
        return groups

    @staticmethod
    def _split_batches(hiddens: list[torch.Tensor], cap: int | None) -> list[torch.Tensor]:
        """Split ``(B, L, D)`` batches into pieces of at most ``cap`` tokens (at least one sequence)."""
        if cap is None:
            return hiddens
        return [piece for h in hiddens for piece in h.split(max(1, cap // h.shape[1]))]

    @staticmethod
    def _packs(hiddens: list[torch.Tensor], cap: int | None) -> list[list[torch.Tensor]]:
        """Consecutive batches grouped into packs of at most ``cap`` tokens (all in one if no cap)."""
        if cap is None:
            return [hiddens]
        packs, tokens = [], 0
        for h in hiddens:
            n = h.shape[0] * h.shape[1]
            if not packs or tokens + n > cap:
                packs.append([])
                tokens = 0
            packs[-1].append(h)
            tokens += n
        return packs

    def _stem(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, n, D)`` position-embedded patch tokens to the first layer's input ``(B, prefix + n, D)``."""
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
        return hidden

    @staticmethod
    def _run_layer(layer: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   **kwargs) -> torch.Tensor:
        if _layer_takes_mask(layer):
            out = layer(hidden, attention_mask, **kwargs)
        elif attention_mask is not None:
            raise ValueError(f"{type(layer).__name__} takes no attention mask")
        else:
            out = layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The tower's own layers up to ``feature_layer`` on ``(B, L, D)`` (its attention backend, layer scale,
        drop path and gradient checkpointing apply); ``attention_mask`` and ``kwargs`` go to every layer."""
        for layer in self.layers[: self._num_layers_to_run]:
            hidden = self._run_layer(layer, hidden, attention_mask, **kwargs)
        return hidden

    def _encode_dense(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, L, D)`` complete sequences (no padding, no mask needed) to ``(B * n, D)`` patch features."""
        out = self.run_layers(hidden)[:, self.num_prefix_tokens:]
        return out.reshape(-1, out.shape[-1])

    def _encode_packed(self, hiddens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every group's sequences as one packed ``(1, T, D)`` sequence with block-diagonal attention."""
        dim = hiddens[0].shape[-1]
        seqlens = [h.shape[1] for h in hiddens for _ in range(h.shape[0])]
        packed = torch.cat([h.reshape(-1, dim) for h in hiddens]).unsqueeze(0)
        bounds = [0]
        for n in seqlens:
            bounds.append(bounds[-1] + n)
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=packed.device)
        with self._packed_attention():
            out = self.run_layers(packed, cu_seqlens=cu_seqlens, max_seqlen=max(seqlens), seqlens=tuple(seqlens))[0]
        feats, start = [], 0
        for h in hiddens:
            b, length = h.shape[:2]
            seqs = out[start:start + b * length].view(b, length, dim)
            feats.append(seqs[:, self.num_prefix_tokens:].reshape(-1, dim))
            start += b * length
        return feats

    def extra_repr(self) -> str:
        return (f"family={self.family}, feature_layer={self.feature_layer}, patch_size={self.patch_size}, "
                f"native_grid={self.native_grid}, trainable={self.trainable}, packing={self.packing!r}"
                + (f", max_batch_tokens={self.max_batch_tokens}" if self.max_batch_tokens != "auto" else ""))


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except Exception:  # pragma: no cover
        return "?"