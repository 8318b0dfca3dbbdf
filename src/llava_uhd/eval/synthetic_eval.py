"""Score a LLaVA-UHD model on the synthetic fine-detail questions (`llava_uhd.data.synthetic`).

Two halves, usable separately:

* `generate_answers`: greedy answers of a model to (image, prompt) pairs, batched with left padding through
  `LlavaUHDProcessor` and ``model.generate`` (KV cache); only the newly generated tokens are decoded.
* `score_predictions`: exact scoring with `llava_uhd.data.synthetic.is_correct` (case, punctuation, articles,
  number words and "gray"/"grey" do not matter; naming two colours is wrong), reported per question kind, over the
  fine-detail kinds together (``FINE_DETAIL_KINDS`` present in the data) and over everything.

`evaluate_samples` runs both on a list of `SyntheticSample` (or any objects with ``image``, ``question``,
``answer`` and ``kind``); `prior_answers` and `score_prior` give the "prior" row (a model that ignores the image).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..data.batches import ordered_batches
from ..data.synthetic import FINE_DETAIL_KINDS, KINDS, is_correct

__all__ = ["generate_answers", "score_predictions", "evaluate_samples", "prior_answers", "score_prior"]


class _PromptBatches:
    """Batch ``b`` of the (image, prompt) pairs, processed (map-style, so data workers can prepare batches)."""

    def __init__(self, processor, images: Sequence[Any], prompts: Sequence[str], batch_size: int):
        self.processor, self.images, self.prompts, self.batch_size = processor, images, prompts, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.prompts) / self.batch_size)

    def __getitem__(self, b: int) -> dict:
        start, stop = b * self.batch_size, min(len(self.prompts), (b + 1) * self.batch_size)
        return dict(self.processor(images=list(self.images[start:stop]), text=list(self.prompts[start:stop]),
                                   padding_side="left"))


def _first(batch: list) -> Any:
    return batch[0]


def generate_answers(model, processor, images: Sequence[Any], prompts: Sequence[str], batch_size: int = 32,
                     max_new_tokens: int = 8, progress: bool = False, workers: int = 0) -> list[str]:
    """Greedy answers (decoded text, special tokens dropped, stripped) for each ``(image, prompt)`` pair.

    Each prompt must hold one ``<image>`` placeholder. Batches are left padded; the model is put in eval mode.
    ``workers`` > 0 processes the next batches' images in that many workers while the model generates.
    """
    import torch

    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer = processor.tokenizer
    model.eval()
    answers: list[str] = []
    batches = _PromptBatches(processor, images, prompts, batch_size)
    loader = ordered_batches(batches, 1, workers, collate_fn=_first)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, total=len(batches), desc="evaluating", unit="batch", leave=False)
    for inputs in loader:
        inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def _ratio(correct: int, total: int) -> dict[str, Any]:
    return {"correct": correct, "total": total, "accuracy": correct / total if total else None}


def score_predictions(predictions: Sequence[str], answers: Sequence[str], kinds: Sequence[str],
                      fine_detail_kinds: Sequence[str] = FINE_DETAIL_KINDS) -> dict[str, Any]:
    """Accuracy per kind, over the fine-detail kinds, and overall.

    Returns ``{"per_kind": {kind: {"correct", "total", "accuracy"}}, "fine_detail": {...}, "all": {...},
    "correct": [bool per item]}``; ``accuracy`` is a fraction in [0, 1] (None when there is no item). Kinds are
    listed in `KINDS` order (unknown kinds after them, sorted).
    """
    if not (len(predictions) == len(answers) == len(kinds)):
        raise ValueError(f"got {len(predictions)} predictions, {len(answers)} answers and {len(kinds)} kinds")
    correct = [bool(is_correct(p, a, k)) for p, a, k in zip(predictions, answers, kinds)]
    present = set(kinds)
    order = [k for k in KINDS if k in present] + sorted(present - set(KINDS))
    per_kind = {}
    for kind in order:
        hits = [c for c, k in zip(correct, kinds) if k == kind]
        per_kind[kind] = _ratio(sum(hits), len(hits))
    fine = set(fine_detail_kinds)
    fine_hits = [c for c, k in zip(correct, kinds) if k in fine]
    return {"per_kind": per_kind, "fine_detail": _ratio(sum(fine_hits), len(fine_hits)),
            "all": _ratio(sum(correct), len(correct)), "correct": correct}


def evaluate_samples(model, processor, samples: Sequence[Any], batch_size: int = 32, max_new_tokens: int = 8,
                     prompt: Callable[[str], str] | None = None, progress: bool = False,
                     fine_detail_kinds: Sequence[str] = FINE_DETAIL_KINDS, workers: int = 0) -> dict[str, Any]:
    """Greedy answers to ``samples`` and their scores: `score_predictions`'s dict plus ``"predictions"``.
    ``prompt(question)`` makes each prompt (default: the processor's `question_prompt`)."""
    prompt = prompt or processor.question_prompt
    prompts = [prompt(s.question) for s in samples]
    predictions = generate_answers(model, processor, [s.image for s in samples], prompts, batch_size,
                                   max_new_tokens, progress, workers)
    scores = score_predictions(predictions, [s.answer for s in samples], [s.kind for s in samples],
                               fine_detail_kinds)
    scores["predictions"] = predictions
    return scores


def prior_answers(kind_answer_pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Per kind, the most frequent answer of ``(kind, answer)`` training pairs (ties: alphabetical): what a model
    that ignores the image answers."""
    by_kind: dict[str, Counter] = {}
    for kind, answer in kind_answer_pairs:
        by_kind.setdefault(kind, Counter())[answer] += 1
    return {k: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for k, c in by_kind.items()}


def score_prior(prior: dict[str, str], samples: Sequence[Any], fine_detail_kinds: Sequence[str] = FINE_DETAIL_KINDS
                ) -> dict[str, Any]:
    """The "prior" row: `score_predictions` of answering every sample with its kind's `prior_answers` entry,
    without the per-item list, plus ``"answers"`` (the prior itself)."""
    scores = score_predictions([prior.get(s.kind, "") for s in samples], [s.answer for s in samples],
                               [s.kind for s in samples], fine_detail_kinds)
    scores.pop("correct")
    return {"answers": prior, **scores}
