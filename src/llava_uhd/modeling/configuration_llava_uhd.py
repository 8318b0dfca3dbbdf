"""`LlavaUHDConfig`: a vision tower config, a causal-LM config, and the LLaVA-UHD settings between them."""

from __future__ import annotations

from typing import Literal

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from ..slicing import SliceConfig

__all__ = ["LlavaUHDConfig", "IMAGE_STRATEGIES", "PROJECTORS", "RESAMPLER_TYPES"]

IMAGE_STRATEGIES = ("uhd", "pad", "fixed_grid")
PROJECTORS = ("resampler", "mlp")
RESAMPLER_TYPES = ("perceiver", "spatial")


class LlavaUHDConfig(PreTrainedConfig):
    r"""Configuration of a `LlavaUHDForConditionalGeneration`.

    Args:
        vision_config: a CLIP, SigLIP or DINOv2 vision config (dict or config; default: CLIP-ViT-L/14-336).
        text_config: any causal LM config (dict or config; default: Llama).
        slice_size: the native slice side in pixels (``W_v = H_v``); None: the vision config's ``image_size``.
        max_slices: slice cap (paper 6, authors' release 7).
        num_queries: resampler queries per crop (64 in the paper).
        resampler_heads: resampler attention heads; None: ``hidden_size // 128`` (at least 1).
        resampler_attention: how the perceiver resampler computes its attention: ``"plain"`` (default) or
            ``"folded"`` (the same function with half the work per token; see `PerceiverResampler`).
        resampler_type: ``"perceiver"`` (the paper's perceiver resampler, default) or ``"spatial"`` (the
            release's spatially constrained resampler: ``num_queries`` on a square grid, each attending to its own
            ROI-align pooled region; ``num_queries`` must be a perfect square, 144 in the release).
        vision_feature_layer: the ViT layer feeding the projector (-2: the penultimate; patch tokens only).
        image_strategy: ``"uhd"`` (LLaVA-UHD slicing), ``"pad"`` (LLaVA-1.5: pad to a square with the mean colour,
            resize to the native size) or ``"fixed_grid"`` (cut into ``fixed_grid`` = (cols, rows) slices + overview).
        fixed_grid: ``(cols, rows)`` for ``image_strategy="fixed_grid"``.
        projector: ``"resampler"`` (shared perceiver resampler, ``num_queries`` tokens per crop) or ``"mlp"``
            (LLaVA-1.5's 2-layer MLP, every patch token kept).
        spatial_schema: insert "," between slices of a row and "\\n" after each row.
        overview_position: ``"after"`` the slices (the release) or ``"before"``.
        image_token_id: the id of the image placeholder token in the tokenizer.
        freeze_vision_tower: keep the ViT frozen (both stages of the paper).
    """

    model_type = "llava_uhd"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={"hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14, "image_size": 336,
                         "num_hidden_layers": 24, "num_attention_heads": 16, "projection_dim": 768},
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    slice_size: int | None = None
    max_slices: int = 6
    num_queries: int = 64
    resampler_heads: int | None = None
    resampler_attention: Literal["plain", "folded"] = "plain"
    resampler_type: Literal["perceiver", "spatial"] = "perceiver"
    vision_feature_layer: int = -2
    image_strategy: Literal["uhd", "pad", "fixed_grid"] = "uhd"
    fixed_grid: list[int] | tuple[int, int] = (2, 2)
    projector: Literal["resampler", "mlp"] = "resampler"
    spatial_schema: bool = True
    overview_position: Literal["after", "before"] = "after"
    image_token_id: int = 32000
    freeze_vision_tower: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.slice_size is None:
            self.slice_size = int(self.vision_config.image_size)
        if self.image_strategy not in IMAGE_STRATEGIES:
            raise ValueError(f"image_strategy must be one of {IMAGE_STRATEGIES}, got {self.image_strategy!r}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.resampler_type not in RESAMPLER_TYPES:
            raise ValueError(f"resampler_type must be one of {RESAMPLER_TYPES}, got {self.resampler_type!r}")
        if self.resampler_attention not in ("plain", "folded"):
            raise ValueError(f"resampler_attention must be 'plain' or 'folded', got {self.resampler_attention!r}")
        if self.overview_position not in ("after", "before"):
            raise ValueError(f"overview_position must be 'after' or 'before', got {self.overview_position!r}")
        self.fixed_grid = [int(v) for v in self.fixed_grid]
        if len(self.fixed_grid) != 2 or min(self.fixed_grid) < 1:
            raise ValueError(f"fixed_grid must be (cols, rows) >= 1, got {self.fixed_grid!r}")
        # the LLM's own tying decides (saved in text_config by most causal LMs)
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self.slice_config  # validates slice_size against the patch size

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)

    @property
    def slice_config(self) -> SliceConfig:
        return SliceConfig(image_size=(self.slice_size, self.slice_size), patch_size=self.patch_size,
                           max_slices=self.max_slices)

    def get_text_config(self, *args, **kwargs):
        return self.text_config
