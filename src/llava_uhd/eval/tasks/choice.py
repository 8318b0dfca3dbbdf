"""Multiple-choice benchmarks answered with an option letter: ScienceQA-IMG (LLaVA's layout) and AI2D (the official
release's layout). The prompt ends with LLaVA-1.5's "Answer with the option's letter from the given choices
directly."; the letter is read by `llava_uhd.eval.metrics.option_letter`.

    items = SCIENCEQA.read(Path("eval/scienceqa"), None); SCIENCEQA.score(items, answers)
"""

from __future__ import annotations

from pathlib import Path

from ..metrics import LETTERS, option_letter
from .base import OPTION_LETTER, Item, Task, TaskDataError, mean, need, percent, read_json

__all__ = ["SCIENCEQA", "AI2D", "TASKS", "options_text"]


def options_text(options) -> str:
    """``"A. first\\nB. second..."``: the options as LLaVA's MMBench script and lmms-eval's AI2D list them."""
    return "\n".join(f"{LETTERS[k]}. {option}" for k, option in enumerate(options))


def _letter_score(items: list[Item], answers: dict[str, str]) -> dict:
    """Accuracy of option letters: ``truth`` is ``(right index, options)``."""
    right = [option_letter(answers[i.key], i.truth[1]) == LETTERS[i.truth[0]] for i in items]
    return {"metric": "accuracy", "score": percent(mean(map(float, right))),
            "unreadable": sum(option_letter(answers[i.key], i.truth[1]) is None for i in items)}


# ------------------------------------------------------------------------------------------- ScienceQA
SQA_QUESTIONS = "llava_test_CQM-A.json"


def _sqa_read(data: Path, limit: int | None) -> list[Item]:
    """LLaVA's test questions that have an image and are in ``pid_splits.json``'s test split; the truth from
    ``problems.json`` (``answer``: the index of the right choice)."""
    path = need(data / SQA_QUESTIONS, "ScienceQA question file")
    questions = read_json(path)
    problems = read_json(need(data / "problems.json", "ScienceQA problems.json"))
    splits = read_json(need(data / "pid_splits.json", "ScienceQA pid_splits.json"))
    if not isinstance(questions, list) or not isinstance(problems, dict) or "test" not in splits:
        raise TaskDataError(f"{data}: expected {SQA_QUESTIONS} to be a list, problems.json an object and "
                            "pid_splits.json to have a 'test' split")
    test = set(map(str, splits["test"]))
    items = []
    for k, record in enumerate(questions):
        try:
            pid, text = str(record["id"]), record["conversations"][0]["value"]
        except (KeyError, IndexError, TypeError):
            raise TaskDataError(f"{path} entry {k}: expected 'id' and 'conversations'") from None
        if not record.get("image") or pid not in test:
            continue  # ScienceQA-IMG: the test questions with an image
        problem = problems.get(pid)
        if not isinstance(problem, dict) or "answer" not in problem or "choices" not in problem:
            raise TaskDataError(f"{path} entry {k}: problem {pid!r} has no answer and choices in problems.json")
        prompt = text.replace("<image>", "").strip() + "\n" + OPTION_LETTER
        items.append(Item(str(len(items)), pid, prompt, [str(data / "images" / "test" / record["image"])],
                          truth=(int(problem["answer"]), list(problem["choices"]))))
        if limit is not None and len(items) >= limit:
            break
    return items


SCIENCEQA = Task(
    "scienceqa", "ScienceQA-IMG (test questions with an image)",
    f"{SQA_QUESTIONS} (LLaVA's questions) + problems.json + pid_splits.json (ScienceQA's) + images/test/<id>/",
    "LLaVA's question text (context, question, options) + '\\n' + the option-letter instruction "
    "(LLaVA's --single-pred-prompt)",
    _sqa_read, _letter_score)


# ------------------------------------------------------------------------------------------- AI2D
AI2D_TEST_IDS = "ai2d_test_ids.csv"


def _ai2d_read(data: Path, limit: int | None) -> list[Item]:
    """Every question of ``questions/<image>.json`` (of the images listed in ``ai2d_test_ids.csv`` when that file
    is there), images in numeric order, questions in ``questionId`` order."""
    folder = need(data / "questions", "AI2D questions folder")
    ids = data / AI2D_TEST_IDS
    keep = ({line.strip().split(",")[0] for line in ids.read_text(encoding="utf-8").splitlines() if line.strip()}
            if ids.is_file() else None)
    files = sorted(folder.glob("*.json"), key=lambda p: (len(p.name), p.name))
    items = []
    for file in files:
        record = read_json(file)
        try:
            image, questions = record["imageName"], record["questions"]
        except (KeyError, TypeError):
            raise TaskDataError(f"{file}: expected 'imageName' and 'questions'") from None
        if keep is not None and image.split(".")[0] not in keep:
            continue
        entries = sorted(questions.items(), key=lambda kv: str(kv[1].get("questionId", "")))
        for text, q in entries:
            try:
                options, right = list(q["answerTexts"]), int(q["correctAnswer"])
            except (KeyError, TypeError, ValueError):
                raise TaskDataError(f"{file}: question {text!r} has no answerTexts / correctAnswer") from None
            prompt = f"{text}\n{options_text(options)}\n{OPTION_LETTER}"
            items.append(Item(str(len(items)), q.get("questionId", f"{image}-{len(items)}"), prompt,
                              [str(data / "images" / image)], truth=(right, options)))
            if limit is not None and len(items) >= limit:
                return items
    return items


AI2D = Task(
    "ai2d", "AI2D (test split when ai2d_test_ids.csv is present)",
    f"questions/<image>.json + images/ (the AI2D release); optional {AI2D_TEST_IDS} (image ids of the test split)",
    "question + '\\n' + 'A. ...' option lines + '\\n' + the option-letter instruction (lmms-eval's AI2D prompt)",
    _ai2d_read, _letter_score)

TASKS = (SCIENCEQA, AI2D)
