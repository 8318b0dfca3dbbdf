"""Convert the authors' released LLaVA-UHD checkpoint into this project's format (``llava-uhd convert``).

The release (e.g. ``guozonghao96/llava-uhd-144-13b``) is a LLaVA-codebase folder:

* ``config.json``: ``model_type "llava_llama"``, the Llama settings (``hidden_size``, ``num_hidden_layers``, ...)
  and LLaVA's ``mm_*`` keys (``mm_projector_type "adapt_spatial_resampler"``, ``mm_vision_tower``,
  ``mm_hidden_size``, ``mm_vision_select_layer``, ``mm_vision_select_feature``);
* weights, one file or shards (``*.safetensors`` with ``model.safetensors.index.json``, or ``pytorch_model*.bin``
  with ``pytorch_model.bin.index.json``), named::

      model.embed_tokens.* / model.layers.* / model.norm.* / lm_head.*      -> language_model.model.* / .lm_head.*
      model.vision_tower.vision_tower.vision_model.*                        -> vision_tower.vision_model.*
      model.mm_projector.{query, pos_embed, kv_proj, attn.*, ln_q, ln_kv, ln_post, proj}  -> projector.*

* the Llama tokenizer files (``tokenizer.model`` / ``tokenizer.json``, ``tokenizer_config.json``, ...).

The converter

1. rebuilds the ``CLIPVisionConfig`` from the tower's tensors: width and patch size from the patch-embedding conv
   ``(D, 3, p, p)``, image size from the position-embedding count ``(image / p)**2 + 1``, layers from the highest
   ``encoder.layers.N``, MLP width from ``fc1``, heads ``= D / 64`` (CLIP's 64-dim heads), OpenAI CLIP's
   ``quick_gelu`` and ``1e-5`` layer-norm eps;
2. rebuilds the ``LlamaConfig`` from ``config.json``'s Llama keys (the ``mm_*`` and other LLaVA keys are dropped);
3. builds a `LlavaUHDConfig` with the release preset (`RELEASE_PRESET`: the spatially constrained resampler with
   the release's query count (144, from ``mm_projector.query``) and ``hidden / 128`` heads, at most 7 slices, the
   overview after the slices, "," / "\\n" separators from the tokenizer) and ``vision_feature_layer =
   mm_vision_select_layer``;
4. renames every tensor, checks that each one lands on a tensor of the same shape of the new model and that every
   tensor of the new model is covered (a missing or unexpected key is a `ConversionError` naming them; the only
   keys dropped on purpose are derived buffers old transformers versions saved: CLIP's
   ``embeddings.position_ids`` and Llama's ``rotary_emb.inv_freq``);
5. writes the model with ``LlavaUHDForConditionalGeneration.save_pretrained`` and a `LlavaUHDProcessor` (the
   release's tokenizer, ``padding_side="left"``, with ``<image>`` added as a special token; a CLIP image
   processor at the tower's native size, max 7 slices; 144 tokens per crop; the vicuna_v1 chat template), into a
   temporary folder beside the output that is renamed into place once complete (a failed or interrupted
   conversion leaves no half-written output folder).

The release's files are read through `llava_uhd.modeling.checkpoint_files`: a truncated or damaged safetensors
shard or ``.bin``, a broken shard index or a ``config.json`` value that is not a number is a `ConversionError`
naming the file.

The release's ``mm_projector.pos_embed`` (a fixed ``144 x hidden`` 2D sin-cos table over the 12x12 query grid) maps
to `SpatialResampler`'s ``pos_embed`` buffer unchanged; see ``modeling/spatial_resampler.py`` for how it is used.

The model is assembled on the meta device and the release's tensors are assigned to it, so the peak memory is
about one copy of the checkpoint (26 GB for the 13B release in float16), never a random model beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch loads when a conversion runs
    import torch

__all__ = [
    "ConversionError",
    "ConversionReport",
    "RELEASE_PRESET",
    "RELEASE_PROJECTOR_TYPES",
    "convert_release",
    "load_release_state_dict",
    "map_release_key",
    "vision_config_from_release",
    "text_config_from_release",
    "add_convert_arguments",
    "run_convert",
]

RELEASE_PROJECTOR_TYPES = ("adapt_spatial_resampler", "adapt_spatial_resampler_v1")
RELEASE_MODEL_TYPES = ("llava_llama", "llava")

# the authors' release settings (LlavaUHDConfig fields); num_queries and resampler_heads come from the weights
RELEASE_PRESET = {
    "projector": "resampler",
    "resampler_type": "spatial",
    "max_slices": 7,
    "image_strategy": "uhd",
    "spatial_schema": True,
    "overview_position": "after",
}

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
_LLM_PARTS = ("model.embed_tokens.", "model.layers.", "model.norm.")
# derived buffers that old transformers versions saved; recomputed by the model, dropped on purpose
_IGNORED = (
    re.compile(re.escape(VISION_PREFIX) + r"embeddings\.position_ids$"),
    re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
)
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
# LlamaConfig settings written by older transformers under other names, accepted as is by LlamaConfig
_LLAMA_LEGACY_KEYS = ("rope_theta", "rope_scaling", "torch_dtype")
_DTYPES = ("float32", "float16", "bfloat16")  # names of torch dtypes (torch loads when a conversion runs)


class ConversionError(ValueError):
    """The source folder is not a checkpoint this converter understands (the message says why)."""


@dataclass
class ConversionReport:
    out_dir: Path
    num_tensors: int
    ignored: list[str] = field(default_factory=list)
    vision: str = ""
    llm: str = ""
    settings: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"wrote {self.out_dir}: {self.num_tensors} tensors",
                 f"  vision tower: {self.vision}", f"  LLM: {self.llm}",
                 "  " + ", ".join(f"{k}={v}" for k, v in self.settings.items())]
        if self.ignored:
            lines.append(f"  dropped {len(self.ignored)} derived buffer(s): {_names(self.ignored)}")
        return "\n".join(lines)


def _names(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --------------------------------------------------------------------------------------------- reading
def read_release_config(src: str | os.PathLike) -> dict:
    """``config.json`` of a release folder, checked to be a LLaVA checkpoint with the spatial resampler."""
    from transformers import LlamaConfig

    from .modeling.checkpoint_files import check_config_fields, read_config_json

    path = Path(src) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src}: no config.json (expected the authors' LLaVA-UHD release folder)")
    try:
        config = read_config_json(src)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    model_type = config.get("model_type")
    if model_type not in RELEASE_MODEL_TYPES:
        raise ConversionError(f"{path}: model_type {model_type!r} is not a LLaVA checkpoint; expected one of "
                              f"{RELEASE_MODEL_TYPES}")
    projector = config.get("mm_projector_type")
    if projector not in RELEASE_PROJECTOR_TYPES:
        raise ConversionError(
            f"{path}: mm_projector_type {projector!r} is not supported; only the LLaVA-UHD release's spatially "
            f"constrained resampler ({' / '.join(RELEASE_PROJECTOR_TYPES)}) can be converted")
    select = config.get("mm_vision_select_feature", "patch")
    if select != "patch":
        raise ConversionError(f"{path}: mm_vision_select_feature {select!r} is not supported (only 'patch': the "
                              "CLS token dropped)")
    tower = str(config.get("mm_vision_tower", "clip"))
    if "clip" not in tower.lower():
        raise ConversionError(f"{path}: mm_vision_tower {tower!r} is not a CLIP tower (only CLIP is supported)")
    try:
        check_config_fields(config, LlamaConfig, path, {"mm_hidden_size": int, "mm_vision_select_layer": int})
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return config


def _weight_files(src: Path) -> list[Path]:
    from .modeling.checkpoint_files import weight_files

    try:
        files = weight_files(src, any_name=True)
    except ValueError as e:  # a damaged file or index, named
        raise ConversionError(str(e)) from None
    if not files:
        raise ConversionError(f"{src}: no weights (*.safetensors or pytorch_model*.bin)")
    return files


def load_release_state_dict(src: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a release folder by their release names: one safetensors / bin file, or shards with an
    index json (``.bin`` files are read with ``torch.load(weights_only=True)``). Floating tensors are cast to
    ``dtype`` when given. A tensor found in two shards is an error."""
    import torch

    from .modeling.checkpoint_files import load_weight_file

    src = Path(src)
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(src):
        try:
            part = load_weight_file(f)
        except ValueError as e:
            raise ConversionError(str(e)) from None
        dup = set(part) & set(state)
        if dup:
            raise ConversionError(f"{f.name}: tensor(s) already read from another shard: {_names(dup)}")
        for k, v in part.items():
            state[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    index = src / "model.safetensors.index.json"
    if not index.is_file():
        index = src / "pytorch_model.bin.index.json"
    if index.is_file():
        listed = set(json.loads(index.read_text())["weight_map"])
        if listed != set(state):
            raise ConversionError(f"{index.name} does not match the shards: listed but absent: "
                                  f"{_names(listed - set(state)) or '-'}; present but unlisted: "
                                  f"{_names(set(state) - listed) or '-'}")
    return state


def map_release_key(key: str) -> str | None:
    """This project's name of a release tensor; None for a derived buffer dropped on purpose. Raises `KeyError`
    for a name outside the release layout."""
    if any(p.match(key) for p in _IGNORED):
        return None
    if key.startswith(VISION_PREFIX):
        return "vision_tower.vision_model." + key[len(VISION_PREFIX):]
    if key.startswith(PROJECTOR_PREFIX):
        return "projector." + key[len(PROJECTOR_PREFIX):]
    if key.startswith(_LLM_PARTS):
        return "language_model." + key
    if key.startswith("lm_head."):
        return "language_model." + key
    raise KeyError(key)


# --------------------------------------------------------------------------------------------- configs
def _need(state: dict, key: str, what: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"missing key {key!r} (needed to infer {what})")
    return state[key]


def vision_config_from_release(state: dict[str, torch.Tensor], release_config: dict | None = None,
                               head_dim: int = 64):
    """The tower's ``CLIPVisionConfig``, from the tensor shapes (see the module docstring)."""
    from transformers import CLIPVisionConfig

    release_config = release_config or {}
    conv = _need(state, VISION_PREFIX + "embeddings.patch_embedding.weight", "the vision patch size and width")
    pos = _need(state, VISION_PREFIX + "embeddings.position_embedding.weight", "the vision image size")
    if conv.dim() != 4 or conv.shape[2] != conv.shape[3]:
        raise ConversionError(f"patch embedding has shape {tuple(conv.shape)}, expected (D, C, p, p)")
    hidden, channels, patch = int(conv.shape[0]), int(conv.shape[1]), int(conv.shape[2])
    side = int(round((pos.shape[0] - 1) ** 0.5))
    if side * side + 1 != pos.shape[0]:
        raise ConversionError(f"the vision position embedding has {pos.shape[0]} rows, not a square grid + CLS")
    pattern = re.compile(re.escape(VISION_PREFIX) + r"encoder\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if not layers:
        raise ConversionError(f"no vision encoder layers ({VISION_PREFIX}encoder.layers.N.*) in the checkpoint")
    absent = sorted(set(range(max(layers) + 1)) - layers)
    if absent:
        raise ConversionError(f"vision encoder layers {absent} are missing (found up to {max(layers)})")
    fc1 = _need(state, VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight", "the vision MLP width")
    if hidden % head_dim:
        raise ConversionError(f"vision width {hidden} is not a multiple of the {head_dim}-dim CLIP heads")
    mm_hidden = release_config.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != hidden:
        raise ConversionError(f"config.json says mm_hidden_size={mm_hidden} but the vision tower is {hidden} wide")
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=int(fc1.shape[0]), num_hidden_layers=max(layers) + 1,
                            num_attention_heads=hidden // head_dim, num_channels=channels, patch_size=patch,
                            image_size=side * patch, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def text_config_from_release(release_config: dict):
    """The ``LlamaConfig`` from ``config.json``'s Llama keys (``mm_*`` and other LLaVA keys dropped)."""
    from transformers import LlamaConfig

    known = set(LlamaConfig().to_dict()) | set(_LLAMA_LEGACY_KEYS)
    skip = {"architectures", "model_type", "transformers_version", "_name_or_path", "use_cache"}
    kwargs = {k: v for k, v in release_config.items() if k in known and k not in skip}
    if "torch_dtype" in kwargs:
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if k not in kwargs:
            raise ConversionError(f"config.json has no {k!r} (needed for the Llama config)")
    try:
        return LlamaConfig(**kwargs)
    except Exception as e:  # noqa: BLE001 - whatever LlamaConfig refuses comes from config.json
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(f"config.json: not a valid Llama config ({first})") from None


# --------------------------------------------------------------------------------------------- processor
def _load_tokenizer(src: Path):
    from transformers import AutoTokenizer

    from .processing import LlavaUHDProcessor

    present = [name for name in _TOKENIZER_FILES if (src / name).is_file()]
    if not any(name in present for name in ("tokenizer.model", "tokenizer.json")):
        raise ConversionError(f"{src}: no tokenizer (tokenizer.model or tokenizer.json)")
    # a folder with only the tokenizer files, so AutoTokenizer never reads the llava_llama config.json
    with tempfile.TemporaryDirectory() as tmp:
        for name in present:
            shutil.copy2(src / name, Path(tmp) / name)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    tokenizer.padding_side = "left"
    return LlavaUHDProcessor.add_image_token(tokenizer)


def _build_processor(tokenizer, vision_config, num_queries: int, max_slices: int):
    from .image_processing import LlavaUHDImageProcessor
    from .processing import LlavaUHDProcessor

    size = int(vision_config.image_size)
    image_processor = LlavaUHDImageProcessor(size={"height": size, "width": size},
                                             patch_size=int(vision_config.patch_size), max_slices=max_slices,
                                             image_strategy=RELEASE_PRESET["image_strategy"])
    return LlavaUHDProcessor(image_processor, tokenizer, num_queries=num_queries,
                             projector=RELEASE_PRESET["projector"], spatial_schema=RELEASE_PRESET["spatial_schema"],
                             overview_position=RELEASE_PRESET["overview_position"])


# --------------------------------------------------------------------------------------------- convert
def convert_release(
    src: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    max_slices: int = RELEASE_PRESET["max_slices"],
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> ConversionReport:
    """Convert the release folder ``src`` into a `LlavaUHDForConditionalGeneration` + `LlavaUHDProcessor` folder
    ``out`` (loadable with ``from_pretrained`` / the Auto classes).

    Args:
        dtype: cast floating tensors (``"float32"``, ``"float16"``, ``"bfloat16"`` or a torch dtype); None keeps
            the checkpoint's dtypes.
        max_slices: slice cap of the image processor and config (the release: 7).
        max_shard_size: passed to ``save_pretrained``.
        overwrite: allow a non-empty ``out``.

    Raises:
        ConversionError: not the release layout: unsupported ``mm_projector_type``, missing / unexpected tensors
            (named), shape mismatches, no tokenizer, ...
    """
    import torch
    from transformers import GenerationConfig

    from .modeling import LlavaUHDConfig, LlavaUHDForConditionalGeneration

    src, out = Path(src), Path(out)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = getattr(torch, dtype)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    if out.resolve() == src.resolve():
        raise ConversionError("the output folder must differ from the release folder")
    release_config = read_release_config(src)
    tokenizer = _load_tokenizer(src)
    state = load_release_state_dict(src, dtype)

    # 1. rename (names outside the layout are reported with the missing ones, below)
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    ignored, unknown = [], []
    for key, tensor in state.items():
        try:
            new = map_release_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if new is None:
            ignored.append(key)
        else:
            mapped[new] = tensor
            origin[new] = key

    # 2. configs
    vision_config = vision_config_from_release(state, release_config)
    text_config = text_config_from_release(release_config)
    query = _need(state, PROJECTOR_PREFIX + "query", "the resampler's query count")
    if query.dim() != 2:
        raise ConversionError(f"{PROJECTOR_PREFIX}query has shape {tuple(query.shape)}, expected (Q, hidden)")
    num_queries, width = int(query.shape[0]), int(query.shape[1])
    if width != text_config.hidden_size:
        raise ConversionError(f"{PROJECTOR_PREFIX}query is {width} wide but the LLM's hidden_size is "
                              f"{text_config.hidden_size}")
    select_layer = int(release_config.get("mm_vision_select_layer", -2))
    settings = dict(RELEASE_PRESET, max_slices=int(max_slices), num_queries=num_queries,
                    resampler_heads=max(1, text_config.hidden_size // 128), vision_feature_layer=select_layer)
    try:
        config = LlavaUHDConfig(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
                                image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **settings)
    except ValueError as e:
        raise ConversionError(f"the release's settings do not make a valid LlavaUHDConfig: {e}") from None

    # 3. the model's own names and shapes (on the meta device: nothing allocated)
    with torch.device("meta"):
        model = LlavaUHDForConditionalGeneration(config)
    expected = model.state_dict()
    tied = "language_model.lm_head.weight" if config.tie_word_embeddings else None
    missing = [k for k in expected if k not in mapped and k != tied]
    extra = unknown + [origin[k] for k in mapped if k not in expected]
    if missing or extra:
        inverse = {v: k for k, v in _forward_names(expected).items()}
        msg = []
        if missing:
            msg.append(f"missing key(s): {_names(inverse.get(k, k) for k in missing)}")
        if extra:
            msg.append(f"unexpected key(s): {_names(extra)}")
        raise ConversionError("the checkpoint does not match the model built from its config; " + "; ".join(msg))
    bad = [f"{origin[k]}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in mapped.items()
           if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ConversionError("shape mismatch (checkpoint vs model): " + "; ".join(bad[:12])
                              + (f" ... and {len(bad) - 12} more" if len(bad) > 12 else ""))
    model.load_state_dict(mapped, strict=tied is None or tied in mapped, assign=True)
    if tied is not None:
        model.tie_weights()
    if (src / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(src)
    else:
        model.generation_config = GenerationConfig(
            bos_token_id=text_config.bos_token_id, eos_token_id=text_config.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)

    # 4. write (into a temporary folder beside ``out``, moved into place once complete)
    processor = _build_processor(tokenizer, vision_config, num_queries, int(max_slices))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        processor.save_pretrained(tmp)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ConversionReport(
        out_dir=out, num_tensors=len(mapped), ignored=sorted(ignored),
        vision=(f"CLIP {vision_config.num_hidden_layers} layers x {vision_config.hidden_size}, patch "
                f"{vision_config.patch_size}, {vision_config.image_size}px, feature layer {select_layer}"),
        llm=(f"Llama {text_config.num_hidden_layers} layers x {text_config.hidden_size}, vocab "
             f"{text_config.vocab_size}"),
        settings={k: settings[k] for k in ("resampler_type", "num_queries", "resampler_heads", "max_slices",
                                           "overview_position")},
    )


def _move_into_place(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out`` in one rename when ``out`` is absent or empty; into a non-empty ``out``
    (``overwrite``) its files move one by one, each replacing its namesake in one step."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
        return
    for path in sorted(tmp.rglob("*")):
        target = out / path.relative_to(tmp)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            os.replace(path, target)


def _forward_names(expected) -> dict[str, str]:
    """release name -> project name for every key of the model (to name missing keys in the release's terms)."""
    out = {}
    for k in expected:
        if k.startswith("vision_tower.vision_model."):
            out[VISION_PREFIX + k[len("vision_tower.vision_model."):]] = k
        elif k.startswith("projector."):
            out[PROJECTOR_PREFIX + k[len("projector."):]] = k
        elif k.startswith("language_model."):
            out[k[len("language_model."):]] = k
    return out


# --------------------------------------------------------------------------------------------- CLI
def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``llava-uhd convert``."""
    parser.add_argument("--from", dest="src", required=True, metavar="DIR",
                        help="the authors' release folder (config.json, weights, tokenizer), e.g. a download of "
                             "guozonghao96/llava-uhd-144-13b")
    parser.add_argument("--to", dest="out", required=True, metavar="OUT", help="output folder")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="cast the weights (default: keep the checkpoint's dtype)")
    parser.add_argument("--max-slices", type=int, default=RELEASE_PRESET["max_slices"],
                        help="slice cap (release: 7)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run ``llava-uhd convert``; returns the exit code (0 ok, 2 when the folder cannot be converted)."""
    try:
        report = convert_release(args.src, args.out, dtype=args.dtype, max_slices=args.max_slices,
                                 max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # ConversionError is a ValueError: a folder that cannot be converted
        print(f"llava-uhd convert: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
