"""The benchmarks ``llava-uhd eval`` runs: one `Task` per benchmark, read from a local folder in a fixed layout.

    from llava_uhd.eval.tasks import TASKS, TaskDataError
    task = TASKS["gqa"]
    items = task.read(Path("data/gqa"), limit=100)       # [Item]: the questions, prompts and what scoring needs
    metrics = task.score(items, {item.key: "yes" for item in items})   # {"metric", "score", ...}
    task.write_submission(items, answers, Path("out"), Path("data/gqa"))   # the server's (or official script's) file

Each module reads one family of layouts (the files LLaVA's evaluation scripts use where LLaVA has a script), builds
the prompts (LLaVA-1.5's short-answer and option-letter instructions) and scores with `llava_uhd.eval.metrics`:
`vqa` (VQAv2, TextVQA, GQA), `yesno` (POPE, MME), `choice` (ScienceQA-IMG, AI2D), `mmbench`, `documents` (DocVQA,
ChartQA); `base` holds what they share. Nothing is downloaded; a missing or malformed file is a `TaskDataError`
naming it. Pure Python (json, csv): light to import.
"""

from __future__ import annotations

from . import choice, documents, mmbench, vqa, yesno
from .base import OPTION_LETTER, SHORT_ANSWER, Item, Task, TaskDataError

__all__ = ["TASKS", "Item", "Task", "TaskDataError", "SHORT_ANSWER", "OPTION_LETTER"]

TASKS: dict[str, Task] = {t.name: t for t in (*vqa.TASKS, *yesno.TASKS, *choice.TASKS, *mmbench.TASKS,
                                               *documents.TASKS)}
"""Every task by name."""
