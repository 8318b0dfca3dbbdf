"""A model folder's ``config.json`` and weight files, checked before anything loads them.

A truncated download, a half-copied shard or a hand-edited config otherwise fails deep inside safetensors, torch or
a config class (``incomplete metadata, file not fully covered``, ``'<=' not supported between 'str' and 'int'``),
or, worse, loads: a shard missing from an index leaves weights at their random initialization with only a warning.
Here each problem is a `ValueError` whose message names the file and says what is wrong, in one line::

    config = check_model_folder("out", LlavaUHDConfig)     # what LlavaUHDForConditionalGeneration.from_pretrained runs
    files = weight_files("release")                         # the files a folder's weights are read from
    state = load_weight_file(files[0])                      # checked, then read (safetensors or torch .bin)

What is checked, reading only headers (no tensor data), so it costs milliseconds whatever the model's size:

- ``config.json``: valid JSON holding an object; its ``model_type`` the one expected; every field the config class
  declares as a number (``hidden_size: int``, ``rms_norm_eps: float``) holds one, in sub-configs too
  (``text_config``, ``vision_config``: each checked against the class of its own ``model_type``); then the config
  class itself accepts the file.
- ``*.safetensors``: the 8-byte header length and the JSON header read; every tensor's dtype, shape and byte range
  agree; the tensor data ends exactly where the file does (a truncated or padded file is named, with both sizes).
- an index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``): valid JSON with a non-empty
  ``weight_map``; every shard it names is there and sound; for safetensors shards, the tensors it lists are the
  tensors the shards hold.
- ``*.bin`` (torch's zip format): the archive's directory reads and every member lies inside the file. A ``.bin``
  in torch's legacy format cannot be checked without reading it; `load_weight_file` names it when it fails.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import zipfile
from pathlib import Path

__all__ = ["CONFIG_NAME", "WEIGHT_NAMES", "INDEX_NAMES", "read_config_json", "check_config_fields",
           "check_weight_file", "weight_files", "load_weight_file", "check_model_folder"]

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
"""The single weight files transformers reads, in its order."""
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
"""The shard indexes transformers reads, in its order."""

# safetensors' dtypes and their sizes in bits (sub-byte types pack)
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
               "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64,
               "U64": 64, "F64": 64, "C64": 64}
_MAX_HEADER = 100_000_000  # safetensors' own limit
_NUMBER_TYPES = {"int": (int,), "float": (int, float)}


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------- config.json
def read_config_json(folder, model_types: tuple[str, ...] | None = None) -> dict:
    """``folder/config.json`` as a dict, refused (`ValueError` naming the file) when it is not valid JSON, not an
    object, or (with ``model_types``) of another ``model_type``. `FileNotFoundError` when it is missing."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: holds a JSON {type(config).__name__}, not an object")
    if model_types is not None and config.get("model_type") not in model_types:
        raise ValueError(f"{path}: model_type {config.get('model_type')!r} is not {' or '.join(map(repr, model_types))}"
                         " (a folder saved for another kind of model)")
    return config


def _numeric_fields(config_class) -> dict[str, tuple[type, ...]]:
    """``{field: accepted types}`` for the fields ``config_class`` declares as numbers (``int``, ``float``,
    optionally ``| None``); fields that also take lists, strings or objects are left out."""
    if not dataclasses.is_dataclass(config_class):
        return {}
    out = {}
    for f in dataclasses.fields(config_class):
        kinds = {part.strip() for part in (f.type.__name__ if isinstance(f.type, type) else str(f.type)).split("|")}
        numbers = kinds & set(_NUMBER_TYPES)
        if numbers and kinds <= {"int", "float", "None"}:
            out[f.name] = tuple({t for k in numbers for t in _NUMBER_TYPES[k]}) + ((type(None),) if "None" in kinds
                                                                                  else ())
    return out


def _field_problems(config: dict, config_class, prefix: str = "") -> list[str]:
    from transformers import CONFIG_MAPPING

    problems = []
    for name, types in _numeric_fields(config_class).items():
        if name not in config:
            continue
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, types) or (
                isinstance(value, float) and not math.isfinite(value)):
            want = "an integer" if float not in types else "a number"
            problems.append(f"{prefix}{name} is {_short(value)}, expected {want}")
    for name, value in config.items():
        sub_type = value.get("model_type") if isinstance(value, dict) else None
        if isinstance(sub_type, str) and sub_type in CONFIG_MAPPING:
            problems += _field_problems(value, CONFIG_MAPPING[sub_type], f"{prefix}{name}.")
    return problems


def check_config_fields(config: dict, config_class, where, numbers: dict[str, type] | None = None) -> None:
    """Every field ``config_class`` declares as a number holds one in ``config`` (sub-configs with a known
    ``model_type`` against their own class), and so does each ``numbers`` field (``{"mm_hidden_size": int}``).
    Raises a `ValueError` naming ``where`` (the file) and the fields."""
    problems = _field_problems(config, config_class) if config_class is not None else []
    for name, kind in (numbers or {}).items():
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, _NUMBER_TYPES[kind.__name__])):
            problems.append(f"{name} is {_short(value)}, expected {'an integer' if kind is int else 'a number'}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------- weight files
def _check_safetensors(path: Path) -> list[str]:
    """The tensor names of a sound safetensors file; `ValueError` naming it otherwise."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file, or truncated: its header would be {n} bytes long, "
                             f"the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: damaged safetensors file (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: damaged safetensors file (its header is not a JSON object)")
    end, names = 0, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            bits = _DTYPE_BITS[info["dtype"]]
            begin, stop = (int(v) for v in info["data_offsets"])
            count = math.prod(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: damaged safetensors file (tensor {name!r}: {_short(info, 80)})") from None
        if stop - begin != (count * bits + 7) // 8 or begin < 0:
            raise ValueError(f"{path}: damaged safetensors file (tensor {name!r} {info['dtype']} {info['shape']} "
                             f"does not fit its bytes {begin}-{stop})")
        end = max(end, stop)
        names.append(name)
    data = size - 8 - n
    if end != data:
        what = "truncated" if end > data else "longer than its tensors"
        raise ValueError(f"{path}: {what}: the tensors need {8 + n + end} bytes, the file has {size} (copy or "
                         "download it again)")
    return names


def _check_torch_zip(path: Path) -> None:
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path}: truncated or damaged torch checkpoint ({e})") from None
    for m in members:
        if m.header_offset + 30 + len(m.filename) + m.compress_size > size:
            raise ValueError(f"{path}: truncated or damaged torch checkpoint ({m.filename} lies past the end of the "
                             f"file, {size} bytes)")


def check_weight_file(path) -> list[str] | None:
    """Check one weight file without reading its tensors (see the module docstring); returns the tensor names of
    a safetensors file (None for a ``.bin``). `ValueError` naming the file when it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return _check_safetensors(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        _check_torch_zip(path)
    elif len(magic) < 4:
        raise ValueError(f"{path}: truncated or damaged torch checkpoint ({path.stat().st_size} bytes)")
    return None


def _check_index(index: Path) -> list[Path]:
    try:
        value = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{index}: not a valid shard index ({e})") from None
    weight_map = value.get("weight_map") if isinstance(value, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{index}: no weight_map (tensor name -> shard file) in it")
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise ValueError(f"{index} names shard(s) that are not in {index.parent}: {_list(absent)}")
    held = {}
    for f in files:
        names = check_weight_file(f)
        if names is not None:
            held.update(dict.fromkeys(names, f.name))
    if held:  # safetensors shards: their tensors are known from the headers
        shards = set(held.values())
        listed = {k: v for k, v in weight_map.items() if v in shards}
        absent = sorted(k for k, v in listed.items() if held.get(k) != v)
        unlisted = sorted(set(held) - set(listed))
        if absent or unlisted:
            raise ValueError(f"{index} does not match the shards: listed but absent: {_list(absent) or '-'}; "
                             f"present but unlisted: {_list(unlisted) or '-'}")
    return files


def _list(names, limit: int = 12) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def weight_files(folder, any_name: bool = False) -> list[Path]:
    """The weight files of ``folder``, each checked (`check_weight_file`), found as transformers finds them:
    ``model.safetensors``, else the shards of ``model.safetensors.index.json`` (checked: `INDEX_NAMES`), else
    ``pytorch_model.bin``, else its index. With ``any_name``, a folder with none of these gives every
    ``*.safetensors`` (else ``pytorch_model*.bin``) file in it. An empty list when there are none."""
    folder = Path(folder)
    for single, index in zip(WEIGHT_NAMES, INDEX_NAMES):
        if (folder / single).is_file():
            check_weight_file(folder / single)
            return [folder / single]
        if (folder / index).is_file():
            return _check_index(folder / index)
    if not any_name:
        return []
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    for f in files:
        check_weight_file(f)
    return files


def load_weight_file(path) -> dict:
    """All tensors of one weight file (safetensors, or a torch ``.bin`` read with ``weights_only=True``), after
    `check_weight_file`; a file that still fails to read is a `ValueError` naming it."""
    import pickle

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    check_weight_file(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # the legacy (pre-zip) format cannot be memory-mapped
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: cannot be read ({first})") from None


def check_model_folder(folder, config_class=None, need_config: bool = True) -> dict | None:
    """Check a saved model folder before ``from_pretrained`` reads it: its ``config.json`` (JSON, the
    ``model_type`` of ``config_class``, numeric fields, accepted by ``config_class``; skipped when absent and
    ``need_config`` is False) and its weight files (`weight_files`). Returns the config as a dict (None when
    skipped). Raises a `ValueError` naming the file, `FileNotFoundError` when ``config.json`` is missing."""
    folder = Path(folder)
    config = None
    if need_config or (folder / CONFIG_NAME).is_file():
        model_type = getattr(config_class, "model_type", None)
        config = read_config_json(folder, (model_type,) if model_type else None)
        if config_class is not None:
            path = folder / CONFIG_NAME
            check_config_fields(config, config_class, path)
            try:
                config_class.from_dict(dict(config))
            except Exception as e:  # noqa: BLE001 - anything the config class refuses comes from the file
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ValueError(f"{path}: {first}") from None
    weight_files(folder)
    return config
