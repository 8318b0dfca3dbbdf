"""Yes/no benchmarks in LLaVA's layouts: POPE (object hallucination, three splits) and MME (14 subtasks, two
questions per image). The prompts are the LLaVA question files' text as it is.

    items = POPE.read(Path("eval/pope"), None); POPE.score(items, answers)   # per split: accuracy, precision, ...
    items = MME.read(Path("eval/MME"), None); MME.score(items, answers)      # per subtask acc, acc+; perception
"""

from __future__ import annotations

from pathlib import Path

from ..metrics import mme_scores, pope_metrics, pope_yes
from .base import SHORT_ANSWER, Item, Task, TaskDataError, llava_items, mean, need, read_jsonl

__all__ = ["POPE", "MME", "TASKS", "POPE_SPLITS"]

# ------------------------------------------------------------------------------------------- POPE
POPE_QUESTIONS = "llava_pope_test.jsonl"
POPE_SPLITS = ("adversarial", "popular", "random")


def _pope_read(data: Path, limit: int | None) -> list[Item]:
    """LLaVA's questions (``category`` names the split) matched, split by split and in order, to the labels of
    ``coco/coco_pope_<split>.json`` (as LLaVA's ``eval_pope.py`` pairs them); each pair must name the same image."""
    questions = need(data / POPE_QUESTIONS, "POPE question file")
    items = llava_items(questions, data / "val2014", limit)
    labels: dict[str, list[tuple[int, dict]]] = {}
    taken: dict[str, int] = {}
    for item in items:
        split = item.extra.get("category")
        if split not in POPE_SPLITS:
            raise TaskDataError(f"{questions} line {item.extra['line']}: category must be one of "
                                f"{', '.join(POPE_SPLITS)}, got {split!r}")
        if split not in labels:
            labels[split] = read_jsonl(need(data / "coco" / f"coco_pope_{split}.json", f"POPE {split} labels"),
                                       ("label",))
        k = taken.get(split, 0)
        taken[split] = k + 1
        if k >= len(labels[split]):
            raise TaskDataError(f"{questions} line {item.extra['line']}: more {split} questions than labels in "
                                f"coco/coco_pope_{split}.json")
        number, label = labels[split][k]
        if "image" in label and item.images and Path(item.images[0]).name != Path(str(label["image"])).name:
            raise TaskDataError(f"{questions} line {item.extra['line']}: its image is not the one of "
                                f"coco/coco_pope_{split}.json line {number} ({label['image']})")
        if str(label["label"]).strip().lower() not in ("yes", "no"):
            raise TaskDataError(f"coco/coco_pope_{split}.json line {number}: label must be yes or no")
        item.truth = str(label["label"]).strip().lower()
    return items


def _pope_score(items: list[Item], answers: dict[str, str]) -> dict:
    splits = {}
    for split in POPE_SPLITS:
        chosen = [i for i in items if i.extra["category"] == split]
        if chosen:
            splits[split] = pope_metrics([pope_yes(answers[i.key]) for i in chosen], [i.truth for i in chosen])
    f1 = mean(s["f1"] for s in splits.values())
    return {"metric": "F1 (mean over splits)", "score": None if f1 is None else 100 * f1,
            "accuracy": None if not splits else 100 * mean(s["accuracy"] for s in splits.values()), "splits": splits}


POPE = Task(
    "pope", "POPE (COCO; adversarial, popular, random)",
    f"{POPE_QUESTIONS} (LLaVA's questions, category = split) + coco/coco_pope_<split>.json (labels, JSON lines) + "
    "val2014/",
    "LLaVA's text as it is (question + '\\n' + the short-answer instruction); an answer is 'no' when its first "
    "sentence holds No / no / not (LLaVA's eval_pope.py)",
    _pope_read, _pope_score)


# ------------------------------------------------------------------------------------------- MME
MME_QUESTIONS = "llava_mme.jsonl"
MME_FOLDER = "MME_Benchmark_release_version"
_YES_NO = "Please answer yes or no."


def _mme_truths(root: Path) -> dict[tuple[str, str, str], str]:
    """``(subtask, answer file, question) -> "Yes"/"No"`` from MME's release folder: each subtask folder holds
    ``<image>.txt`` files beside its images, or ``images/`` and ``questions_answers_YN/``; each line of a txt file is
    ``question<TAB>answer``."""
    truths = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        qa = folder / "questions_answers_YN" if (folder / "images").is_dir() else folder
        for txt in sorted(qa.glob("*.txt")):
            for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise TaskDataError(f"{txt} line {number}: expected 'question<TAB>answer'")
                truths[(folder.name, txt.name, parts[0])] = parts[1]
    return truths


def _mme_key(question_id: str, prompt: str, truths: dict) -> tuple[str, str, str] | None:
    """The ground-truth key of an answer, found as LLaVA's ``convert_answer_to_mme.py`` finds it: the subtask and
    file from the question_id (``subtask/.../name.ext`` -> ``name.txt``), the question from the prompt without
    the short-answer instruction, with " Please answer yes or no." added when missing (or with two spaces)."""
    category = question_id.split("/")[0]
    file = question_id.split("/")[-1].split(".")[0] + ".txt"
    question = prompt.replace(SHORT_ANSWER, "").strip()
    if _YES_NO not in question:
        question += " " + _YES_NO
        if (category, file, question) not in truths:
            question = question.replace(" " + _YES_NO, "  " + _YES_NO)
    key = (category, file, question)
    return key if key in truths else None


def _mme_read(data: Path, limit: int | None) -> list[Item]:
    questions = need(data / MME_QUESTIONS, "MME question file")
    root = need(data / MME_FOLDER, "MME release folder")
    items = llava_items(questions, root, limit)
    truths = _mme_truths(root)
    for item in items:
        key = _mme_key(str(item.question_id), item.prompt, truths)
        if key is None:
            raise TaskDataError(f"{questions} line {item.extra['line']}: no ground truth for {item.question_id!r} "
                                f"in {MME_FOLDER}")
        item.truth = (key[0], key[1], truths[key])
    return items


def _mme_score(items: list[Item], answers: dict[str, str]) -> dict:
    scores = mme_scores((task, image, truth, answers[i.key]) for i in items for task, image, truth in [i.truth])
    return {"metric": "perception score", "score": scores["perception"], **scores}


MME = Task(
    "mme", "MME (perception and cognition)",
    f"{MME_QUESTIONS} (LLaVA's questions; question_id = image path) + {MME_FOLDER}/ (MME's release: images and "
    "'question<TAB>Yes|No' txt files per subtask)",
    "LLaVA's text as it is (MME's question, which ends 'Please answer yes or no.', + the short-answer "
    "instruction); answers read as MME's calculation.py reads them",
    _mme_read, _mme_score)

TASKS = (POPE, MME)
