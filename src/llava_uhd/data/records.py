"""LLaVA-format records: reading them (`load_records`) and checking one (`parse_record`), with `DataError`.

Inputs (``records_or_path``), the formats LLaVA users already have:

- a ``.json`` file holding a list of records (LCS-558K pretraining captions, the 665K instruction mixture), a
  ``.jsonl`` file with one record per line, a list of record dicts, a `datasets.Dataset` with the same columns, or
  a directory written by ``Dataset.save_to_disk`` (loaded with ``datasets.load_from_disk``; a ``DatasetDict`` must
  hold a single split).
- a record is ``{"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"] (optional), "conversations": [{"from": "human" |
  "gpt" | "system", "value": str}, ...]}`` (``"user"`` / ``"assistant"`` and ``"role"`` / ``"content"`` keys are
  accepted too). Each image has one ``<image>`` placeholder (the processor's ``image_token``) in a human turn, in
  reading order; text-only records have no ``"image"`` (or ``None`` / ``[]``). Relative image paths are resolved
  against ``image_folder`` (the current directory when None); PIL images in the column are used as they are.

A record is malformed (`parse_record` raises a `DataError`) when: it is not a dict, has no or an empty
``conversations`` list, a turn has an unknown role or no text, a system turn is not first, the turns do not
alternate human/gpt starting with human, it has no gpt turn, a gpt answer is empty (only whitespace: training on
it would teach the model to answer nothing), the conversation ends on a human turn (a question without an answer),
``<image>`` appears in an answer, or the ``<image>`` count differs from the number of images.

`DataError` (a `ValueError`) is every problem with the data, as one line naming where it is: the data file (when
there is one), the record's index and id (``data.json, record 3 (id '42')``), the image and what is wrong, each said
once. `MissingFileError` (also a `FileNotFoundError`) is a data file or image that is not there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["DataError", "MissingFileError", "Record", "load_records", "parse_record", "record_name"]

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A problem with the training data, said in one line naming the file, the record and the image concerned.

    ``problem`` is the same message without the record's name (what a skip report lists under the record)."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem if problem is not None else message


class MissingFileError(DataError, FileNotFoundError):
    """A data file or an image that is not there."""


def record_name(index: int, rid: Any = None, source: str | os.PathLike | None = None) -> str:
    """``"data.json, record 3 (id '42')"``: how every message names a record (``source`` is the data file)."""
    where = f"{os.fspath(source)}, " if source is not None else ""
    return f"{where}record {index}" + (f" (id {rid!r})" if rid is not None else "")


@dataclass
class Record:
    """One parsed, checked record."""

    index: int
    id: Any
    images: list = field(default_factory=list)  # resolved paths (str) or PIL images
    turns: list[dict] = field(default_factory=list)  # {"role": "system" | "user" | "assistant", "content": str}
    source: str | None = None  # the data file it came from, if any

    @property
    def name(self) -> str:
        return record_name(self.index, self.id, self.source)

    def error(self, problem: str, cls: type[DataError] = DataError) -> DataError:
        """A `DataError` naming this record."""
        return cls(f"{self.name}: {problem}", problem)


def parse_record(raw: Any, index: int, image_token: str = "<image>", image_folder: str | os.PathLike | None = None,
                 source: str | os.PathLike | None = None) -> Record:
    """Check one LLaVA record and normalize it; a `DataError` naming the record (and ``source``, the data file it
    came from) says what is wrong."""
    rid = raw.get("id") if isinstance(raw, dict) else None
    where = record_name(index, rid, source)

    def bad(what: str) -> DataError:
        return DataError(f"{where}: {what}", what)

    if not isinstance(raw, dict):
        raise bad(f"expected a dict, got {type(raw).__name__}")
    conversations = raw.get("conversations")
    if conversations is None:
        raise bad("no 'conversations'")
    if not isinstance(conversations, (list, tuple)):
        raise bad(f"'conversations' must be a list, got {type(conversations).__name__}")
    if len(conversations) == 0:
        raise bad("empty conversations")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise bad(f"turn {k} is not a dict")
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if role not in _ROLES:
            raise bad(f"turn {k} has unknown role {role!r} (expected 'human', 'gpt' or 'system')")
        if not isinstance(value, str):
            raise bad(f"turn {k} has no text value (got {type(value).__name__})")
        role = _ROLES[role]
        if role == "system" and k != 0:
            raise bad(f"turn {k}: a system turn may only come first")
        if role == "assistant" and image_token in value:
            raise bad(f"turn {k}: {image_token} in a gpt answer")
        if role == "assistant" and not value.strip():
            raise bad(f"turn {k}: empty gpt answer")
        turns.append({"role": role, "content": value})
    roles = [t["role"] for t in turns]
    start = 1 if roles[0] == "system" else 0
    if len(roles) == start:
        raise bad("no human or gpt turn")
    for k in range(start, len(roles)):
        expected = "user" if (k - start) % 2 == 0 else "assistant"
        if roles[k] != expected:
            raise bad(f"turn {k} is from {'human' if roles[k] == 'user' else 'gpt'} but "
                      f"{'human' if expected == 'user' else 'gpt'} was expected (turns alternate, human first)")
    if "assistant" not in roles:
        raise bad("no gpt turn: nothing to train on")
    if roles[-1] == "user":
        raise bad(f"turn {len(roles) - 1}: the conversation ends on a human turn (a question without an answer)")

    image = raw.get("image")
    if image is None:
        images = []
    elif isinstance(image, (str, os.PathLike, Image.Image)):
        images = [image]
    elif isinstance(image, (list, tuple)):
        images = list(image)
    else:
        raise bad(f"'image' must be a path or a list of paths, got {type(image).__name__}")
    resolved = []
    for j, im in enumerate(images):
        if isinstance(im, Image.Image):
            resolved.append(im)
            continue
        if not isinstance(im, (str, os.PathLike)) or not os.fspath(im):
            raise bad(f"image {j} is not a path: {im!r}")
        path = os.fspath(im)
        if image_folder is not None and not os.path.isabs(path):
            path = os.path.join(os.fspath(image_folder), path)
        resolved.append(path)
    n_placeholders = sum(t["content"].count(image_token) for t in turns)
    if n_placeholders != len(resolved):
        raise bad(f"{n_placeholders} {image_token} placeholder(s) in the text but {len(resolved)} image(s)")
    return Record(index=index, id=rid, images=resolved, turns=turns,
                  source=os.fspath(source) if source is not None else None)


def load_records(records_or_path) -> Sequence:
    """A sequence of raw records from a list, a `datasets.Dataset`, a ``.json`` / ``.jsonl`` file or a
    ``save_to_disk`` directory. A file that is not there or cannot be read is a `DataError` naming it."""
    if isinstance(records_or_path, (str, os.PathLike)):
        path = Path(records_or_path)
        if path.is_dir():
            import datasets

            try:
                loaded = datasets.load_from_disk(str(path))
            except FileNotFoundError as e:  # a directory that save_to_disk did not write
                raise DataError(f"{path}: not a saved datasets folder ({e})") from e
            if isinstance(loaded, datasets.DatasetDict):
                if len(loaded) != 1:
                    raise DataError(f"{path} holds a DatasetDict with splits {sorted(loaded)}: pass one split "
                                    "(e.g. load_from_disk(path)['train'])")
                loaded = next(iter(loaded.values()))
            return loaded
        if not path.is_file():
            raise MissingFileError(f"{path}: no such data file or directory")
        if path.suffix not in (".json", ".jsonl"):
            raise DataError(f"{path}: expected a .json or .jsonl file or a directory saved with "
                            "datasets.save_to_disk")
        try:
            with open(path, encoding="utf-8") as f:
                if path.suffix == ".jsonl":
                    return _json_lines(path, f)
                records = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from e
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot be read ({e})") from e
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        return records
    if isinstance(records_or_path, (list, tuple)):
        return list(records_or_path)
    if hasattr(records_or_path, "__getitem__") and hasattr(records_or_path, "__len__"):  # datasets.Dataset & co.
        return records_or_path
    raise TypeError(f"expected records, a path or a datasets.Dataset, got {type(records_or_path).__name__}")


def _json_lines(path: Path, f) -> list:
    records = []
    for line_no, line in enumerate(f, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: not valid JSON ({e})") from e
    return records
