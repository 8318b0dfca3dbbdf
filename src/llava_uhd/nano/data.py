"""The nano model's training text: stage-1 captions of synthetic images and the encoding of a sample into the
image processor's fields plus tokenized conversations, exactly as `LazySupervisedDataset` tokenizes them.

    caption(sample)        # "red circle at top-left, blue star at centre."
    encode_sample(sample, processor, [("caption", "plain", "caption"), ("qa", "vicuna_v1", "answer")])
    EncodedSamples(SyntheticSamples(...), processor, templates, None)   # map-style, for data workers
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.llava_data import IMAGE_FIELDS
from ..data.templates import tokenize_conversation

__all__ = ["caption", "question_text", "encode_sample", "EncodedSamples"]

_REGIONS = (("top-left", "top", "top-right"), ("left", "centre", "right"), ("bottom-left", "bottom", "bottom-right"))


def _region(cx: float, cy: float, w: int, h: int) -> tuple[int, str]:
    col = min(2, int(3 * cx / w))
    row = min(2, int(3 * cy / h))
    return row * 3 + col, _REGIONS[row][col]


def caption(sample) -> str:
    """The stage-1 caption of a synthetic sample: its band (``grey_probe``), then every shape as ``"<colour>
    <kind> at <ninth>"`` in reading order of the 3x3 grid of ninths (then left to right), and ``"some small
    text"`` when there is text: ``"a grey band on the left, red circle at top-left, blue star at centre."``."""
    meta = sample.metadata
    w, h = int(meta["width"]), int(meta["height"])
    parts = []
    band = meta.get("band")
    if band and sample.kind == "grey_probe":
        parts.append(f"a {sample.answer} band on the {band['side']}")
    shapes = []
    listed = list(meta.get("shapes") or [])
    if meta.get("shape"):  # a single-shape probe: its box only
        x0, y0, x1, y1 = meta["shape"]["box"]
        listed.append(dict(meta["shape"], center=((x0 + x1) / 2, (y0 + y1) / 2)))
    for sh in listed:
        index, name = _region(sh["center"][0], sh["center"][1], w, h)
        shapes.append((index, sh["center"][0], sh["center"][1], f"{sh['colour']} {sh['shape']} at {name}"))
    parts += [text for *_, text in sorted(shapes)]
    if meta.get("text"):
        parts.append("some small text")
    return (", ".join(parts) if parts else "a plain background") + "."


def question_text(question: str, answer_prompt: str | None) -> str:
    """The user's text: the question, then ``answer_prompt`` on its own line if there is one."""
    return question + (f"\n{answer_prompt}" if answer_prompt else "")


def _expand(ids: list[int], labels: list[int], image_token_id: int, layout: list[int]):
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        if token == image_token_id:
            out_ids += layout
            out_labels += [-100] * len(layout)
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels


def encode_sample(sample, processor, templates: Sequence[tuple[str, str, str]], answer_prompt: str | None = None
                  ) -> dict[str, Any]:
    """The image processor's fields for ``sample.image`` (processed once) and, for each ``(key, template,
    target)`` in ``templates`` (target ``"answer"`` or ``"caption"``), ``key: (input_ids, labels)`` tokenized with
    the project's conversation templates (`tokenize_conversation`) and the image placeholder expanded into the
    image's LLaVA-UHD layout, exactly as `LazySupervisedDataset` does."""
    image_inputs = processor.image_processor([sample.image], return_tensors="pt")
    layout = processor.image_layouts(image_inputs)[0]
    out: dict[str, Any] = {k: image_inputs[k] for k in IMAGE_FIELDS}
    for key, template, target in templates:
        text = sample.answer if target == "answer" else caption(sample)
        user = f"{processor.image_token}\n{question_text(sample.question, answer_prompt)}"
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        ids, labels = tokenize_conversation(turns, processor.tokenizer, template, processor.image_token)
        ids, labels = _expand(ids, labels, processor.image_token_id, layout)
        out[key] = (torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))
    out.update(kind=sample.kind, answer=sample.answer, size=tuple(sample.image.size))
    return out


class EncodedSamples:
    """A map-style dataset (for a DataLoader's workers): sample ``i`` of ``samples``, encoded (`encode_sample`),
    with its ``index``."""

    def __init__(self, samples, processor, templates, answer_prompt: str | None):
        self.samples, self.processor, self.templates, self.answer_prompt = samples, processor, templates, answer_prompt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        out = encode_sample(self.samples[i], self.processor, self.templates, self.answer_prompt)
        out["index"] = i
        return out
