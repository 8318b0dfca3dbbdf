"""Open-ended VQA in LLaVA's layouts: VQAv2 (test-dev, scored on EvalAI), TextVQA (with or without OCR tokens in
the prompt) and GQA (testdev-balanced). The question files are LLaVA's (``{"question_id", "image", "text"}`` lines
whose text already ends with LLaVA-1.5's short-answer instruction); the prompt is that text, as LLaVA asks it.

    items = VQAV2.read(Path("eval/vqav2"), None); VQAV2.score(items, answers); VQAV2.write_submission(...)
"""

from __future__ import annotations

from pathlib import Path

from ..metrics import gqa_answer, gqa_match, normalize_vqa_answer, vqa_accuracy
from .base import Item, Task, TaskDataError, llava_items, mean, need, percent, read_json, read_jsonl, write_json

__all__ = ["VQAV2", "TEXTVQA", "TEXTVQA_NO_OCR", "GQA", "TASKS", "textvqa_question"]

OCR_PREFIX = "Reference OCR token:"


# ------------------------------------------------------------------------------------------- VQAv2
VQAV2_QUESTIONS = "llava_vqav2_mscoco_test-dev2015.jsonl"
VQAV2_ALL = "llava_vqav2_mscoco_test2015.jsonl"
VQAV2_ANNOTATIONS = "v2_mscoco_val2014_annotations.json"


def _vqav2_read(data: Path, limit: int | None) -> list[Item]:
    items = llava_items(need(data / VQAV2_QUESTIONS, "VQAv2 question file"), data / "test2015", limit)
    annotations = data / VQAV2_ANNOTATIONS
    if annotations.is_file():  # optional: official annotations for the questions asked (a local check)
        found = read_json(annotations)
        try:
            by_id = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in found["annotations"]}
        except (KeyError, TypeError) as e:
            raise TaskDataError(f"{annotations}: not VQA annotations (missing {e})") from None
        for item in items:
            item.truth = by_id.get(item.question_id)
    return items


def _vqav2_score(items: list[Item], answers: dict[str, str]) -> dict:
    scored = [vqa_accuracy(answers[i.key], i.truth) for i in items if i.truth is not None]
    return {"metric": "VQA accuracy", "score": percent(mean(scored)), "scored": len(scored),
            "note": None if scored else "test-dev answers are not public: submit the submission file to EvalAI"}


def _vqav2_submission(items: list[Item], answers: dict[str, str], out: Path, data: Path) -> Path:
    """EvalAI's file: a JSON list of ``{"question_id", "answer"}``, answers through EvalAI's processing, as LLaVA's
    ``convert_vqav2_for_submission.py`` writes it. With the full test file (``llava_vqav2_mscoco_test2015.jsonl``)
    in the folder every test question is listed, unanswered ones with "" (the server wants them all), in its order."""
    done = {i.question_id: normalize_vqa_answer(answers[i.key]) for i in items}
    ids = list(done)
    if (data / VQAV2_ALL).is_file():
        ids = [record["question_id"] for _, record in read_jsonl(data / VQAV2_ALL, ("question_id",))]
    return write_json(out / "vqav2_test-dev_submission.json",
                       [{"question_id": q, "answer": done.get(q, "")} for q in ids])


VQAV2 = Task(
    "vqav2", "VQAv2 test-dev",
    f"{VQAV2_QUESTIONS} (LLaVA's questions) + test2015/ (COCO test images); optional {VQAV2_ANNOTATIONS} (official "
    "annotations: questions found there are scored locally)",
    "LLaVA's text as it is (question + '\\n' + the short-answer instruction)",
    _vqav2_read, _vqav2_score, _vqav2_submission)


# ------------------------------------------------------------------------------------------- TextVQA
TEXTVQA_QUESTIONS = "llava_textvqa_val_v051_ocr.jsonl"
TEXTVQA_ANNOTATIONS = "TextVQA_0.5.1_val.json"


def textvqa_question(prompt: str) -> str:
    """The question of a LLaVA TextVQA prompt (its first line that is neither the OCR tokens nor the instruction),
    lower-cased: the key, with the image id, into the annotations (LLaVA's ``eval_textvqa.py``)."""
    lines = [line for line in prompt.split("\n") if line.strip() and not line.startswith(OCR_PREFIX)]
    return (lines[0] if lines else "").strip().lower()


def _textvqa_reader(ocr: bool):
    def read(data: Path, limit: int | None) -> list[Item]:
        items = llava_items(need(data / TEXTVQA_QUESTIONS, "TextVQA question file"), data / "train_images", limit)
        path = need(data / TEXTVQA_ANNOTATIONS, "TextVQA annotation file")
        try:
            keyed = {(a["image_id"], a["question"].strip().lower()): a["answers"] for a in read_json(path)["data"]}
        except (KeyError, TypeError, AttributeError) as e:
            raise TaskDataError(f"{path}: not TextVQA annotations (missing {e})") from None
        for item in items:
            truth = keyed.get((item.question_id, textvqa_question(item.prompt)))
            if truth is None:
                raise TaskDataError(f"{data / TEXTVQA_QUESTIONS} line {item.extra['line']}: no annotation for "
                                    f"image {item.question_id!r} and question {textvqa_question(item.prompt)!r}")
            item.truth = truth
            if not ocr:
                item.prompt = "\n".join(line for line in item.prompt.split("\n") if not line.startswith(OCR_PREFIX))
        return items

    return read


def _textvqa_score(items: list[Item], answers: dict[str, str]) -> dict:
    return {"metric": "VQA accuracy", "score": percent(mean([vqa_accuracy(answers[i.key], i.truth) for i in items]))}


TEXTVQA = Task(
    "textvqa", "TextVQA val (OCR tokens in the prompt)",
    f"{TEXTVQA_QUESTIONS} (LLaVA's questions) + {TEXTVQA_ANNOTATIONS} (official) + train_images/",
    "LLaVA's text as it is: question, 'Reference OCR token: ...' line, short-answer instruction",
    _textvqa_reader(True), _textvqa_score)
TEXTVQA_NO_OCR = Task(
    "textvqa-noocr", "TextVQA val (no OCR tokens)", TEXTVQA.layout,
    "LLaVA's text with its 'Reference OCR token: ...' line removed", _textvqa_reader(False), _textvqa_score)


# ------------------------------------------------------------------------------------------- GQA
GQA_QUESTIONS = "llava_gqa_testdev_balanced.jsonl"
GQA_ANNOTATIONS = "testdev_balanced_questions.json"


def _gqa_read(data: Path, limit: int | None) -> list[Item]:
    items = llava_items(need(data / GQA_QUESTIONS, "GQA question file"), data / "images", limit)
    path = need(data / GQA_ANNOTATIONS, "GQA questions file")
    found = read_json(path)
    if not isinstance(found, dict):
        raise TaskDataError(f"{path}: expected an object of questions by id")
    for item in items:
        record = found.get(str(item.question_id))
        if not isinstance(record, dict) or "answer" not in record:
            raise TaskDataError(f"{data / GQA_QUESTIONS} line {item.extra['line']}: question {item.question_id!r} "
                                f"has no answer in {path.name}")
        item.truth = record["answer"]
    return items


def _gqa_score(items: list[Item], answers: dict[str, str]) -> dict:
    return {"metric": "accuracy", "score": percent(mean([float(gqa_match(answers[i.key], i.truth)) for i in items]))}


def _gqa_predictions(items: list[Item], answers: dict[str, str], out: Path, data: Path) -> Path:
    """``testdev_balanced_predictions.json`` for GQA's own ``eval.py``, as LLaVA's ``convert_gqa_for_eval.py``."""
    return write_json(out / "testdev_balanced_predictions.json",
                       [{"questionId": i.question_id, "prediction": gqa_answer(answers[i.key])} for i in items])


GQA = Task(
    "gqa", "GQA testdev-balanced",
    f"{GQA_QUESTIONS} (LLaVA's questions) + {GQA_ANNOTATIONS} (official) + images/",
    "LLaVA's text as it is (question + '\\n' + the short-answer instruction)",
    _gqa_read, _gqa_score, _gqa_predictions)

TASKS = (VQAV2, TEXTVQA, TEXTVQA_NO_OCR, GQA)
