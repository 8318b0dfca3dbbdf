"""Int8 inference of a LLaVA-UHD model on the CPU, and the dtype rule for quantized linear layers.

    from llava_uhd.modeling.quantization import quantize_model, quantization_config
    model = quantize_model(model, "int8")       # a loaded model, in place (returned); "none" leaves it as it is
    model = LlavaUHDForConditionalGeneration.from_pretrained(path, quantization_config=quantization_config("int8"))

``"int8"`` is torchao's dynamic int8 quantization (``Int8DynamicActivationInt8WeightConfig``: int8 weights per
output channel, activations quantized per token on the fly, int8 matrix products) of every ``nn.Linear`` of the LLM
and of the projector (the resampler's ``kv_proj``; both layers of the MLP projector). The vision tower, the
resampler's attention and layer norms, the LLM's embeddings and its output layer stay in float. The two entry
points quantize the same layers alike; `quantize_model` also lets go of the float checkpoint's memory map, which
``from_pretrained`` keeps. Needs ``torchao`` (``pip install torchao``).

`compute_dtype` says in which float dtype a linear layer, quantized or not, takes its input; the projectors cast
their input with it (a quantized weight's own dtype may be int8).
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import itertools

import torch
from torch import nn

__all__ = ["METHODS", "compute_dtype", "quantize_model", "quantization_config", "int8_layers"]

METHODS = ("none", "int8")
"""What `quantize_model` and `quantization_config` accept."""

# Kept in float by "int8" (module names as from_pretrained's quantizers match them, by prefix): the tower; the
# resampler's attention, whose forward reads out_proj's weight itself; the LLM's output layer.
_FLOAT_MODULES = ("vision_tower", "projector.attn", "language_model.lm_head")


def compute_dtype(layer: nn.Module, default: torch.dtype | None = None) -> torch.dtype:
    """The float dtype in which ``layer``, a linear layer quantized or not, takes its input (and returns its output).

    * ``nn.Linear``, and torchao's quantized weights (tensor subclasses whose ``dtype`` is the original float
      dtype): the weight's dtype.
    * torch dynamic quantization (``torch.ao.nn.quantized.dynamic.Linear``, whose ``weight`` is a method):
      float32, the only input it accepts.
    * bitsandbytes ``Linear4bit``: its ``compute_dtype`` once set.
    * bitsandbytes ``Linear8bitLt`` (an int8 weight): it takes any float input and returns the same dtype, so the
      dtype of the float layers around it is the one to use: ``default``, else the bias's, else float32.
    """
    weight = getattr(layer, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):
        return torch.float32
    explicit = getattr(layer, "compute_dtype", None)
    if isinstance(explicit, torch.dtype):
        return explicit
    if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point:
        return weight.dtype
    if default is not None:
        return default
    bias = getattr(layer, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.dtype.is_floating_point:
        return bias.dtype
    return torch.float32


def _torchao_config(method: str, device: torch.device):
    """The torchao config of ``method`` for a model computing on ``device``; ValueError for an unknown method or
    a missing torchao."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {', '.join(map(repr, METHODS))}")
    if method == "none":
        return None
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(f"quantization method {method!r} needs the torchao package: pip install torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from torchao.utils import should_reduce_range

    # a CPU without VNNI could overflow the int8 products' accumulation: torchao then narrows the ranges
    return Int8DynamicActivationInt8WeightConfig(reduce_range=should_reduce_range(device))


def int8_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """``{name: layer}``: the linear layers that ``"int8"`` quantizes in ``model`` (a LLaVA-UHD model in float)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: module for name, module in model.named_modules()
            if type(module) is nn.Linear and module is not output
            and not any(name == skip or name.startswith(skip + ".") for skip in _FLOAT_MODULES)}


def quantization_config(method: str):
    """What to pass as ``from_pretrained(..., quantization_config=...)`` for ``method``: None for ``"none"``, a
    transformers ``TorchAoConfig`` for ``"int8"`` (the layers of `int8_layers`, for an LLM whose output layer is
    ``lm_head`` as in transformers' causal LMs). ValueError for an unknown method or a missing package."""
    config = _torchao_config(method, torch.device("cpu"))
    if config is None:
        return None
    from transformers import TorchAoConfig

    return TorchAoConfig(config, modules_to_not_convert=list(_FLOAT_MODULES))


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Quantize a loaded LLaVA-UHD ``model`` in place for CPU inference and return it.

    ``"none"``: unchanged. ``"int8"``: the layers of `int8_layers` get int8 weights and int8 matrix products (see
    the module docstring). Inference only. ValueError for an unknown method or a missing package."""
    device = next(model.parameters(), torch.empty(0)).device
    config = _torchao_config(method, device)
    if config is None:
        return model
    from torchao.quantization import quantize_

    layers = int8_layers(model)
    if not layers:
        return model
    for name, layer in layers.items():  # one at a time, handing the float weight back to the system after each
        quantize_(model.get_submodule(name.rpartition(".")[0]), config,
                  filter_fn=lambda module, fqn, layer=layer: module is layer)
        _trim_heap()
    _own_float_tensors([module for name, module in model.named_children()
                        if any(layer_name.startswith(name + ".") for layer_name in layers)])
    gc.collect()
    _trim_heap()
    return model


def _own_float_tensors(modules: list[nn.Module]) -> None:
    """Copy the plain (unquantized) parameters and buffers of ``modules`` into memory of their own.

    ``from_pretrained`` memory-maps the checkpoint and its tensors stay views into the map; after quantization the
    few float tensors left (embeddings, norms) would keep the whole map, float weights included, mapped and
    resident."""
    with torch.no_grad():
        for root in modules:
            for tensor in itertools.chain(root.parameters(), root.buffers()):  # a tied weight comes once
                if type(tensor.data) is torch.Tensor:  # not a quantized tensor subclass
                    tensor.data = tensor.data.clone()


def _trim_heap() -> None:
    """Hand the heap memory freed so far back to the system (glibc keeps it otherwise; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass
