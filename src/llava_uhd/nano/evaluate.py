"""Evaluating a nano variant on the held-out synthetic questions: greedy answers to the bare question (as
``llava-uhd ask`` sends it), scored per kind with `is_correct`, plus the visual tokens it spent.

    info = evaluate_variant(model, processor, samples, settings, workers=0)
    info["fine_detail"]["accuracy"], info["predictions"][0]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..data.probes import FINE_KINDS
from ..eval.synthetic_eval import generate_answers, score_predictions
from .data import question_text
from .settings import NanoSettings

__all__ = ["answer_samples", "evaluate_variant", "visual_tokens"]


def answer_samples(model, processor, samples: Sequence[Any], settings: NanoSettings, workers: int = 0) -> list[str]:
    """Greedy answers to ``samples`` with the run's prompt (the question, plus ``settings.answer_prompt``),
    ``settings.eval_batch_size`` at a time, images processed in ``workers`` processes."""
    prompts = [processor.question_prompt(question_text(s.question, settings.answer_prompt)) for s in samples]
    return generate_answers(model, processor, [s.image for s in samples], prompts, settings.eval_batch_size,
                            settings.max_new_tokens, workers=workers)


def visual_tokens(processor, sizes: Sequence[tuple[int, int]]) -> float:
    """Mean LLM tokens per image (image tokens and separators) over images of ``sizes`` ``(W, H)``."""
    return sum(processor.num_image_tokens(w, h) for w, h in sizes) / max(1, len(sizes))


def evaluate_variant(model, processor, samples: Sequence[Any], settings: NanoSettings, workers: int = 0
                     ) -> dict[str, Any]:
    """`score_predictions`' accuracies (per kind, fine-detail, all) of ``model`` on ``samples``, with
    ``eval_time_s``, ``visual_tokens_per_image`` and every prediction."""
    t0 = time.perf_counter()
    predictions = answer_samples(model, processor, samples, settings, workers)
    scores = score_predictions(predictions, [s.answer for s in samples], [s.kind for s in samples], FINE_KINDS)
    scores.pop("correct")
    return {**scores, "eval_time_s": time.perf_counter() - t0,
            "visual_tokens_per_image": visual_tokens(processor, [s.image.size for s in samples]),
            "predictions": [{"kind": s.kind, "question": s.question, "answer": s.answer, "prediction": p,
                             "size": list(s.image.size)} for s, p in zip(samples, predictions)]}
