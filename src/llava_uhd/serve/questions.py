"""LLaVA's evaluation files: question JSONL in, answer JSONL out (the format of LLaVA's ``model_vqa``).

    questions = read_questions("questions.jsonl", image_folder="images/")  # [Question]; bad lines: .error set
    questions = chunk(questions, num_chunks=4, chunk_idx=1)                # LLaVA's --num-chunks split
    done, dropped = read_answers("answers.jsonl")     # question_ids answered; a half-written last line is cut off
    answer_record(question, "red", "llava-uhd-nano")  # {"question_id", "prompt", "text", "answer_id", ...}
    sort_answers("answers.jsonl", questions)          # rewrite in question order

A question line is ``{"question_id": int | str, "text": str, "image": path | [paths] | absent}``; other fields are
ignored. Image paths are taken relative to the image folder unless absolute. An answer line is ``{"question_id",
"prompt" (the question's text), "text" (the answer), "answer_id" (a short uuid), "model_id", "metadata": {}}``.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Question", "read_questions", "chunk", "read_answers", "answer_record", "sort_answers", "short_uuid",
           "AnswersFileError"]

_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"  # shortuuid's, as LLaVA's answer ids


class AnswersFileError(ValueError):
    """The answers file holds a line that is not an answer (not written by a run that could be resumed)."""


@dataclass
class Question:
    """One question line: where it was (``line``, 1-based; ``index`` among the file's questions), its id, text
    and image paths (resolved), or the ``error`` that makes it unusable (then only ``line`` and ``index`` hold)."""

    line: int
    index: int
    question_id: Any = None
    text: str = ""
    images: list[str] = field(default_factory=list)
    error: str | None = None


def _parse(line: str, image_folder: Path) -> tuple[Any, str, list[str]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "question_id" not in record:
        raise ValueError("no question_id")
    qid = record["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise ValueError(f"question_id must be an integer or a string, got {json.dumps(qid)}")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("no question: 'text' must be a non-empty string")
    images = record.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise ValueError("'image' must be a path or a list of paths")
    return qid, text, [str(image_folder / p) for p in images]  # an absolute p replaces the folder


def read_questions(path, image_folder=None) -> list[Question]:
    """The question lines of a JSONL file, in order; a bad one (malformed JSON, a missing field, a repeated
    question_id) has its ``error`` set. Blank lines are skipped. Images are resolved against ``image_folder``
    (default: the file's folder); whether they exist is not checked here. Raises `UnicodeDecodeError` for a
    file that is not UTF-8 text."""
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    questions: list[Question] = []
    seen: dict[Any, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            index = len(questions)
            try:
                qid, text, images = _parse(line, folder)
                if qid in seen:
                    raise ValueError(f"question_id {json.dumps(qid)} repeats line {seen[qid]}")
            except ValueError as e:
                questions.append(Question(number, index, error=str(e)))
            else:
                seen[qid] = number
                questions.append(Question(number, index, qid, text, images))
    return questions


def chunk(questions: list[Question], num_chunks: int, chunk_idx: int) -> list[Question]:
    """The ``chunk_idx``-th of ``num_chunks`` consecutive parts of the file's questions (bad lines included, so
    every process splits alike), as LLaVA's ``get_chunk`` splits them: parts of ``ceil(n / num_chunks)``."""
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"the chunk index must lie in 0..{num_chunks - 1}, got {chunk_idx}")
    size = math.ceil(len(questions) / num_chunks)
    return questions[chunk_idx * size:(chunk_idx + 1) * size]


def read_answers(path) -> tuple[set, bool]:
    """The question_ids already answered in ``path`` (none if it does not exist) and whether a half-written last
    line (a run killed while writing) was cut off the file. Raises `AnswersFileError` naming any other line that
    is not an answer."""
    path = Path(path)
    if not path.exists():
        return set(), False
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: after the last newline (empty if the file ends with one)
    done: set = set()
    dropped = False
    for number, raw in enumerate(complete, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            done.add(record["question_id"])
        except (ValueError, KeyError, TypeError):
            raise AnswersFileError(f"{path} line {number} is not an answer line ({raw[:60]!r}); it is not the "
                                   "output of a run this could resume: pass another --output") from None
    if tail.strip():  # a line without its newline: the run was killed while writing it
        try:
            done.add(json.loads(tail)["question_id"])  # complete after all: keep it
            with open(path, "ab") as f:
                f.write(b"\n")
        except (ValueError, KeyError, TypeError):
            _truncate(path, len(data) - len(tail))
            dropped = True
    return done, dropped


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def short_uuid() -> str:
    """A random 22-character id in shortuuid's alphabet, as LLaVA's ``answer_id``."""
    number, out = uuid.uuid4().int, []
    while number:
        number, digit = divmod(number, len(_ALPHABET))
        out.append(_ALPHABET[digit])
    return "".join(reversed(out)).rjust(22, _ALPHABET[0])


def answer_record(question: Question, answer: str, model_id: str) -> dict:
    """The answer line LLaVA's ``model_vqa`` writes: the question's text as ``prompt``, the answer as ``text``."""
    return {"question_id": question.question_id, "prompt": question.text, "text": answer,
            "answer_id": short_uuid(), "model_id": model_id, "metadata": {}}


def sort_answers(path, questions: list[Question]) -> bool:
    """Rewrite ``path`` (atomically) with its answers in the order of ``questions``; answers to other questions
    follow in their order. Returns whether anything moved."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    order = {q.question_id: q.index for q in questions}
    keyed = [(order.get(json.loads(line)["question_id"], math.inf), k) for k, line in enumerate(lines)]
    ranked = [k for _, k in sorted(keyed)]
    if ranked == list(range(len(lines))):
        return False
    tmp = path.with_name(path.name + ".sorting")
    tmp.write_text("".join(lines[k] + "\n" for k in ranked), encoding="utf-8")
    os.replace(tmp, path)
    return True
