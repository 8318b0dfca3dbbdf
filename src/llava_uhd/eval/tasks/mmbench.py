"""MMBench in its released TSV layout (``mmbench_dev_20230712.tsv``: one row per question, options in columns
A-D, the image as base64), with circular evaluation.

    items = MMBENCH.read(Path("eval/mmbench"), None); MMBENCH.score(items, answers); MMBENCH.write_submission(...)

The prompt is LLaVA's ``model_vqa_mmbench.py`` one: the hint (when there is one) and the question, one
``"A. option"`` line per option, then the option-letter instruction. Circular evaluation: a question counts only if
every rotation of its options is answered right. Rows whose ``index`` differ by multiples of 1,000,000 are
rotations of one question (the circular copies some releases carry); a question with a single row is rotated here
(its n options shifted 0..n-1 times, as LLaVA's ``--all-rounds``).
"""

from __future__ import annotations

import base64
import binascii
import csv
import sys
from pathlib import Path

from ..metrics import LETTERS, circular_accuracy, option_letter
from .base import OPTION_LETTER, Item, Task, TaskDataError, need, percent

__all__ = ["MMBENCH", "TASKS", "MMBENCH_FILE", "CIRCULAR_OFFSET"]

MMBENCH_FILE = "mmbench_dev_20230712.tsv"
CIRCULAR_OFFSET = 1_000_000
_OPTIONS = "ABCD"
_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")  # what LLaVA's submission leaves out


def _empty(value) -> bool:
    return value is None or str(value).strip() == "" or str(value).strip().lower() in ("nan", "none")


def _rows(path: Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (csv.Error, UnicodeDecodeError) as e:
        raise TaskDataError(f"{path}: not a TSV file ({e})") from None
    missing = [c for c in ("index", "question", "A", "B", "image") if rows and c not in rows[0]]
    if not rows or missing:
        raise TaskDataError(f"{path}: " + (f"no column {', '.join(missing)}" if rows else "no rows"))
    return rows


def _mmbench_read(data: Path, limit: int | None) -> list[Item]:
    path = need(data / MMBENCH_FILE, "MMBench TSV")
    rows = _rows(path)
    groups: dict[int, list[int]] = {}
    for k, row in enumerate(rows):
        try:
            groups.setdefault(int(float(row["index"])) % CIRCULAR_OFFSET, []).append(k)
        except ValueError:
            raise TaskDataError(f"{path} row {k + 2}: index {row['index']!r} is not a number") from None
    items: list[Item] = []
    for n, (group, members) in enumerate(groups.items()):
        if limit is not None and n >= limit:
            break
        for k in members:
            row = rows[k]
            options = [row[c] for c in _OPTIONS if c in row and not _empty(row[c])]
            try:
                image = base64.b64decode(row["image"], validate=False)
            except (binascii.Error, ValueError):
                raise TaskDataError(f"{path} row {k + 2}: the image is not base64") from None
            answer = row.get("answer")
            right = None if _empty(answer) else _OPTIONS.index(answer.strip()) if answer.strip() in _OPTIONS else None
            if not _empty(answer) and right is None:
                raise TaskDataError(f"{path} row {k + 2}: answer {answer!r} is not an option letter")
            question = row["question"] if _empty(row.get("hint")) else f"{row['hint']}\n{row['question']}"
            shifts = range(len(options)) if len(members) == 1 else [0]
            for shift in shifts:
                shown = options[shift:] + options[:shift]
                prompt = f"{question}\n" + "\n".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(shown))
                truth = None if right is None else ((right - shift) % len(options), shown)
                items.append(Item(f"{row['index']}/{shift}", int(float(row["index"])), f"{prompt}\n{OPTION_LETTER}",
                                  [image], truth=truth, extra={"round_id": shift, "group": group,
                                                               "category": row.get("category")}))
    return items


def _mmbench_score(items: list[Item], answers: dict[str, str]) -> dict:
    scored = [i for i in items if i.truth is not None]
    if not scored:
        return {"metric": "circular accuracy", "score": None,
                "note": "no answers in the file (the test split): submit the submission file to MMBench's server"}
    groups: dict[int, list[bool]] = {}
    categories: dict[str, dict[int, list[bool]]] = {}
    for i in scored:
        ok = option_letter(answers[i.key], i.truth[1]) == LETTERS[i.truth[0]]
        groups.setdefault(i.extra["group"], []).append(ok)
        categories.setdefault(str(i.extra.get("category")), {}).setdefault(i.extra["group"], []).append(ok)
    single = [ok for i, ok in zip(scored, (option_letter(answers[i.key], i.truth[1]) == LETTERS[i.truth[0]]
                                           for i in scored)) if i.extra["round_id"] == 0]
    return {"metric": "circular accuracy", "score": percent(circular_accuracy(groups)), "questions": len(groups),
            "variants": len(scored), "first_round_accuracy": percent(sum(single) / len(single)) if single else None,
            "categories": {c: percent(circular_accuracy(g)) for c, g in sorted(categories.items())}}


def _mmbench_submission(items: list[Item], answers: dict[str, str], out: Path, data: Path) -> Path:
    """The TSV rows with a ``prediction`` column (the answer given in the options' own order, round 0), less the
    columns LLaVA's ``convert_mmbench_for_submission.py`` drops (hint, category, source, image, comment,
    l2-category): what MMBench's server takes, as TSV (save it as xlsx to upload it where xlsx is required)."""
    predictions = {i.question_id: answers[i.key] for i in items if i.extra["round_id"] == 0}
    rows = [r for r in _rows(data / MMBENCH_FILE) if int(float(r["index"])) in predictions]
    columns = [c for c in rows[0] if c not in _DROPPED] + ["prediction"] if rows else ["index", "prediction"]
    path = out / "mmbench_submission.tsv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "prediction": predictions[int(float(row["index"]))]})
    return path


MMBENCH = Task(
    "mmbench", "MMBench dev (circular evaluation)",
    f"{MMBENCH_FILE} (the released TSV: index, question, hint, A-D, answer, category, image as base64)",
    "hint + '\\n' + question + one 'A. option' line per option + '\\n' + the option-letter instruction "
    "(LLaVA's model_vqa_mmbench.py --single-pred-prompt)",
    _mmbench_read, _mmbench_score, _mmbench_submission)

TASKS = (MMBENCH,)
