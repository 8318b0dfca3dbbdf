"""What every benchmark task is made of: `Item` (one question), `Task` (reading, scoring, submission), `TaskDataError`,
and the readers and writers the task modules share (`llava_items` for LLaVA's question files, JSON / JSONL).

    items = llava_items(Path("q.jsonl"), Path("images"), limit=None)   # LLaVA's {"question_id", "image", "text"}
    Task("gqa", title, layout, prompt, read, score, submission)       # see the task modules

Pure Python (json): light to import.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Item", "Task", "TaskDataError", "SHORT_ANSWER", "OPTION_LETTER", "read_json", "read_jsonl",
           "need", "llava_items", "percent", "mean", "write_json"]

SHORT_ANSWER = "Answer the question using a single word or phrase."
"""LLaVA-1.5's instruction for short-answer questions (VQAv2, GQA, TextVQA, POPE, MME, DocVQA, ChartQA)."""
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
"""LLaVA-1.5's instruction for multiple-choice questions (ScienceQA, MMBench, AI2D)."""


class TaskDataError(ValueError):
    """A benchmark folder that does not hold the task's layout: a missing file or a malformed one (named)."""


@dataclass
class Item:
    """One question to ask: ``key`` (unique in the run), the benchmark's ``question_id``, the ``prompt`` text (no
    image placeholder: the processor puts one per image before it), ``images`` (paths, or encoded bytes), what
    scoring needs (``truth``) and fields copied into the answer line's ``metadata`` (``extra``)."""

    key: str
    question_id: Any
    prompt: str
    images: list = field(default_factory=list)
    truth: Any = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """A benchmark: ``read(folder, limit)`` -> items; ``score(items, answers)`` (answers by item key) -> metrics
    with ``metric`` (its name), ``score`` (the headline number, None when only a server can score) and details;
    ``submission(items, answers, out_dir, data_dir)`` -> the path of the server's file, or None. ``layout`` and
    ``prompt`` describe the files read and the prompt built (for the README)."""

    name: str
    title: str
    layout: str
    prompt: str
    read: Callable[[Path, int | None], list[Item]]
    score: Callable[[list[Item], dict[str, str]], dict]
    submission: Callable[[list[Item], dict[str, str], Path, Path], Path | None] | None = None

    def write_submission(self, items: list[Item], answers: dict[str, str], out: Path, data: Path) -> Path | None:
        """The server's file (or the benchmark's own evaluation input) written into ``out``; None if the task has
        none. ``data`` is the benchmark folder (some submissions list every question of the split)."""
        return self.submission(items, answers, out, data) if self.submission is not None else None


def need(path: Path, what: str) -> Path:
    """``path`` if it exists, else a `TaskDataError` saying what it should be."""
    if not path.exists():
        raise TaskDataError(f"no {what} at '{path}'")
    return path


def read_json(path: Path) -> Any:
    """A JSON file; a `TaskDataError` naming it when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskDataError(f"{path}: not a JSON file ({e})") from None


def read_jsonl(path: Path, fields: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file, each an object holding ``fields``; a
    `TaskDataError` naming the first bad line."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path} line {number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise TaskDataError(f"{path} line {number}: expected a JSON object")
        missing = [f for f in fields if f not in record]
        if missing:
            raise TaskDataError(f"{path} line {number}: no {', '.join(missing)}")
        out.append((number, record))
    return out


def write_json(path: Path, value) -> Path:
    """``value`` written to ``path`` as JSON; returns ``path``."""
    path.write_text(json.dumps(value, indent=None), encoding="utf-8")
    return path


def mean(values) -> float | None:
    """The mean of ``values`` (None when there are none)."""
    values = list(values)
    return sum(values) / len(values) if values else None


def llava_items(path: Path, image_folder: Path, limit: int | None) -> list[Item]:
    """The items of a LLaVA question file (``{"question_id", "text", "image"?, "category"?}`` lines; the image
    relative to ``image_folder``), keyed by position, the line number and category in ``extra``; the first
    ``limit`` only."""
    items = []
    for number, record in read_jsonl(path, ("question_id", "text")):
        image = record.get("image")
        if image is not None and not isinstance(image, str):
            raise TaskDataError(f"{path} line {number}: 'image' must be a path")
        items.append(Item(str(len(items)), record["question_id"], str(record["text"]),
                          [str(image_folder / image)] if image else [],
                          extra={"line": number, **({"category": record["category"]} if "category" in record
                                                    else {})}))
        if limit is not None and len(items) >= limit:
            break
    return items


def percent(fraction: float | None) -> float | None:
    """A fraction as a percentage (None stays None)."""
    return None if fraction is None else 100.0 * fraction
