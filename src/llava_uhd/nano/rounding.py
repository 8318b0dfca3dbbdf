"""The nano tower's 8-bit rounding: each row of every Linear weight of DINOv2 scaled by its largest magnitude / 127
and rounded (``int8-rowwise``), in training and at inference alike, so the shipped resampler sees exactly the
features it was trained on. The rounded tower also travels small (`llava_uhd.nano.bundle`).

    round_linear_int8_(model.vision_tower)          # in place; returns how many weights were rounded
    q, scale = int8_rowwise(weight)                 # q.float() * scale is the rounded weight, bit for bit

A folder whose tower is already rounded carries a marker (`VISION_MARKER`, read with `read_vision_marker`), so
loading it does not round it again. `rounded_tower` keeps such a folder in the backbone cache (rounded once, not at
every load of the nano model):

    folder = rounded_tower(prepare_backbone("dinov2-s14"))   # cache/nano-vision-int8-rowwise-DIGEST
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["VISION_MARKER", "ROUNDING", "int8_rowwise", "round_linear_int8_", "read_vision_marker", "rounded_tower"]

ROUNDING = "int8-rowwise"
"""The name of this rounding in markers and in ``nano_config.json`` (`nano.settings.VISION_ROUNDING`, which stays a
plain string there so that building the command line imports no torch)."""

VISION_MARKER = "llava_uhd_nano_vision.json"
"""In a DINOv2 folder: how its weights are rounded and where they came from (written by `llava_uhd.nano.bundle`)."""


def int8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: each row of ``weight`` ``(out, in)`` scaled by its largest magnitude / 127 and rounded to int8
    (a zero row gets scale 1); ``scale`` is ``(out, 1)`` float32. ``q.float() * scale`` is the rounded weight, bit
    for bit wherever it is computed."""
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def round_linear_int8_(module: nn.Module) -> int:
    """Round every ``nn.Linear`` weight inside ``module`` in place with `int8_rowwise` (biases, norms, embeddings
    and convolutions are left alone). Returns the number of weights rounded."""
    count = 0
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                q, scale = int8_rowwise(sub.weight)
                sub.weight.copy_((q.to(torch.float32) * scale).to(sub.weight.dtype))
                count += 1
    return count


def read_vision_marker(folder) -> dict | None:
    """The `VISION_MARKER` of a DINOv2 folder, or None when it has none (its weights are as converted)."""
    marker = Path(folder) / VISION_MARKER
    if marker.is_file():
        return json.loads(marker.read_text())
    return None


def rounded_tower(vision_dir, cache_dir=None, log=None) -> Path:
    """A copy of the DINOv2 folder ``vision_dir`` with every Linear weight rounded (`round_linear_int8_`) and a
    `VISION_MARKER`, kept in the backbone cache (`llava_uhd.backbone_cache`: keyed by the source folder's name,
    which carries its content digest, locked, published whole, checked on use) so it is rounded once."""
    import shutil

    from transformers import AutoModel

    from ..backbone_cache import MARKER, cached_conversion
    from ..backbones import default_cache_dir

    source = Path(vision_dir)
    key = {"source": source.name, "rounding": ROUNDING, "format": 1}

    def convert(out: Path) -> None:
        model = AutoModel.from_pretrained(source)
        round_linear_int8_(model)
        model.save_pretrained(out)
        for path in source.iterdir():  # config files the tower's loaders read, beside the weights
            if path.is_file() and not (out / path.name).exists() and path.name != MARKER and \
                    not path.name.endswith((".safetensors", ".bin")):
                shutil.copy2(path, out / path.name)
        (out / VISION_MARKER).write_text(json.dumps({"rounding": ROUNDING, "source": source.name}, indent=2) + "\n")

    cache = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    return cached_conversion(cache, f"nano-vision-{ROUNDING}", key, convert, log, describe=f"{source.name} rounded")
