"""Document and chart questions in their official layouts: DocVQA (Task 1, ANLS) and ChartQA (relaxed accuracy).
Neither has a LLaVA-1.5 script; the prompt is the question and LLaVA-1.5's short-answer instruction (lmms-eval's
default for both).

    items = DOCVQA.read(Path("eval/docvqa"), None); DOCVQA.score(items, answers)
"""

from __future__ import annotations

from pathlib import Path

from ..metrics import anls, relaxed_correctness
from .base import SHORT_ANSWER, Item, Task, TaskDataError, mean, need, percent, read_json, write_json

__all__ = ["DOCVQA", "CHARTQA", "TASKS", "CHARTQA_SPLITS"]

# ------------------------------------------------------------------------------------------- DocVQA
DOCVQA_FILES = ("val_v1.0.json", "test_v1.0.json")


def _docvqa_read(data: Path, limit: int | None) -> list[Item]:
    """``val_v1.0.json`` (or, without it, ``test_v1.0.json``, whose answers are not public): ``{"data":
    [{"questionId", "question", "image", "answers"?}]}``, image paths relative to the folder."""
    path = next((data / f for f in DOCVQA_FILES if (data / f).is_file()), None)
    if path is None:
        raise TaskDataError(f"no DocVQA questions in '{data}' (expected {' or '.join(DOCVQA_FILES)})")
    found = read_json(path)
    records = found.get("data") if isinstance(found, dict) else None
    if not isinstance(records, list):
        raise TaskDataError(f"{path}: expected an object with a 'data' list")
    items = []
    for k, record in enumerate(records[:limit] if limit is not None else records):
        try:
            qid, question, image = record["questionId"], record["question"], record["image"]
        except (KeyError, TypeError):
            raise TaskDataError(f"{path} data[{k}]: expected questionId, question and image") from None
        items.append(Item(str(k), qid, f"{question}\n{SHORT_ANSWER}", [str(data / image)], truth=record.get("answers")))
    return items


def _docvqa_score(items: list[Item], answers: dict[str, str]) -> dict:
    scored = [anls(answers[i.key], i.truth) for i in items if i.truth]
    return {"metric": "ANLS", "score": percent(mean(scored)), "scored": len(scored),
            "note": None if scored else "test answers are not public: submit the submission file to the RRC server"}


def _docvqa_submission(items: list[Item], answers: dict[str, str], out: Path, data: Path) -> Path | None:
    """For the test split (questions without answers): the RRC server's JSON list of ``{"questionId", "answer"}``."""
    if all(i.truth for i in items):
        return None
    return write_json(out / "docvqa_submission.json", [{"questionId": i.question_id, "answer": answers[i.key]}
                                                       for i in items])


DOCVQA = Task(
    "docvqa", "DocVQA (Task 1) val",
    "val_v1.0.json (or test_v1.0.json; DocVQA's own: {data: [{questionId, question, image, answers}]}) + the "
    "documents/ images it names",
    "question + '\\n' + the short-answer instruction",
    _docvqa_read, _docvqa_score, _docvqa_submission)


# ------------------------------------------------------------------------------------------- ChartQA
CHARTQA_SPLITS = ("human", "augmented")


def _chartqa_read(data: Path, limit: int | None) -> list[Item]:
    """``test/test_human.json`` and ``test/test_augmented.json`` (ChartQA's release: lists of ``{"imgname",
    "query", "label"}``), images in ``test/png/``; with ``limit``, the first of each split."""
    items = []
    for split in CHARTQA_SPLITS:
        path = need(data / "test" / f"test_{split}.json", f"ChartQA {split} test file")
        records = read_json(path)
        if not isinstance(records, list):
            raise TaskDataError(f"{path}: expected a list")
        for k, record in enumerate(records[:limit] if limit is not None else records):
            try:
                image, query, label = record["imgname"], record["query"], record["label"]
            except (KeyError, TypeError):
                raise TaskDataError(f"{path} entry {k}: expected imgname, query and label") from None
            items.append(Item(f"{split}/{k}", f"{split}/{k}", f"{query}\n{SHORT_ANSWER}",
                              [str(data / "test" / "png" / image)], truth=str(label), extra={"split": split}))
    return items


def _chartqa_score(items: list[Item], answers: dict[str, str]) -> dict:
    right = {i.key: float(relaxed_correctness(answers[i.key], i.truth)) for i in items}
    splits = {s: percent(mean(right[i.key] for i in items if i.extra["split"] == s)) for s in CHARTQA_SPLITS}
    return {"metric": "relaxed accuracy", "score": percent(mean(right.values())), "splits": splits}


CHARTQA = Task(
    "chartqa", "ChartQA test (human + augmented)",
    "test/test_human.json + test/test_augmented.json (ChartQA's: [{imgname, query, label}]) + test/png/",
    "question + '\\n' + the short-answer instruction (lmms-eval's default prompt)",
    _chartqa_read, _chartqa_score)

TASKS = (DOCVQA, CHARTQA)
