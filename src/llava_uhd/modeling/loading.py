"""Loading pretrained backbones from local paths or hub ids (CLIP, SigLIP, DINOv2 towers; any causal LM)."""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

__all__ = ["load_vision_tower", "load_causal_lm", "peft_quietly"]

# model_type of a checkpoint's config -> the transformers class holding just the vision tower
_TOWER_CLASSES = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
}

def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    return getattr(torch, str(dtype))


def load_vision_tower(name_or_path: str | os.PathLike, dtype=None) -> nn.Module:
    """The vision tower of a CLIP / SigLIP (full dual-encoder or vision-only) or DINOv2 checkpoint."""
    import transformers

    config = AutoConfig.from_pretrained(name_or_path)
    class_name = _TOWER_CLASSES.get(config.model_type)
    if class_name is None:
        raise ValueError(f"{name_or_path}: unsupported vision checkpoint (model_type {config.model_type!r}); "
                         f"expected one of {sorted(_TOWER_CLASSES)}")
    cls = getattr(transformers, class_name)
    kwargs = {"dtype": _resolve_dtype(dtype)} if dtype is not None else {}
    return cls.from_pretrained(name_or_path, **kwargs)


def load_causal_lm(name_or_path: str | os.PathLike, gguf_file: str | None = None, dtype=None) -> nn.Module:
    """A causal LM from a path / hub id, or from a GGUF file inside it (dequantized by transformers; needs the
    ``gguf`` package)."""
    kwargs = {}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if dtype is not None:
        kwargs["dtype"] = _resolve_dtype(dtype)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


@contextlib.contextmanager
def peft_quietly():
    """Wrapping a model with peft reads ``is_gradient_checkpointing``, which transformers 5 deprecated: a
    FutureWarning that is peft's to fix, not the user's to read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
