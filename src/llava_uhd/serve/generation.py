"""Generation for serving: decoding settings, batched generation over prompts with images, streamed text.

    settings = GenerationSettings(max_new_tokens=32)                      # greedy, the default
    settings = GenerationSettings(temperature=0.7, top_p=0.9, seed=0)     # sampling, reproducible
    batch = generate(model, processor, [prompt], [[image]], settings, on_text=lambda s: print(s, end=""))
    batch.results[0].text, batch.results[0].new_tokens, batch.inputs["input_ids"].shape

Prompts (rendered chat templates with one ``<image>`` per image, see `LlavaUHDProcessor`) are left padded into one
batch and decoded together; batched greedy decoding gives what each prompt gives alone. ``on_text`` receives the
answer as it is generated (TextStreamer) when one prompt is decoded without beams (transformers streams no beam
search), otherwise once at the end; the pieces join to the stripped answer.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import TextStreamer, set_seed

__all__ = ["GenerationSettings", "Generation", "GenerationBatch", "generate", "eos_token_ids", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The ``--dtype`` choices of the serving commands."""


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: greedy when ``temperature`` is 0 (the default), else sampling at that temperature (with
    ``top_p`` nucleus filtering when given); ``num_beams > 1`` runs beam search (beam sampling with a
    temperature). ``seed`` seeds every `generate` call (python, numpy and torch) for reproducible sampling."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def generation_config(self, model, tokenizer):
        """The model's generation config with these settings (and the tokenizer's pad / eos ids); sampling
        fields are cleared for greedy decoding so transformers does not warn about them."""
        config = copy.deepcopy(model.generation_config)
        config.max_new_tokens = self.max_new_tokens
        config.max_length = None
        config.num_beams = self.num_beams
        config.num_return_sequences = 1
        config.do_sample = self.do_sample
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        if self.do_sample:
            config.temperature = self.temperature
            config.top_p = self.top_p if self.top_p is not None else 1.0
        else:
            config.temperature = config.top_p = config.top_k = None
        return config


@dataclass
class Generation:
    """One prompt's answer: ``text`` (special tokens dropped, stripped), the generated ``token_ids`` (up to and
    including the end-of-sequence token), and the prompt's length in tokens (visual tokens included)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerationBatch:
    """What `generate` gives: one `Generation` per prompt, the processor's ``inputs`` (on the model's device),
    and the seconds spent preparing the inputs and generating."""

    results: list[Generation]
    inputs: dict = field(repr=False)
    preprocess_s: float
    generate_s: float


def generate(model, processor, prompts: Sequence[str], images: Sequence[Sequence], settings: GenerationSettings,
             *, max_slices: int | None = None, on_text: Callable[[str], None] | None = None, streamer=None,
             stopping_criteria=None) -> GenerationBatch:
    """Answer ``prompts`` (rendered prompts, one ``<image>`` per image) about ``images`` (one list per prompt, in
    placeholder order; anything `load_rgb` reads) in one left-padded batch. ``streamer`` and
    ``stopping_criteria`` go to transformers' `generate` as they are (the server follows every row with them);
    ``streamer`` replaces ``on_text``'s.

    Raises:
        ValueError: an unreadable image, a placeholder / image count mismatch, or a prompt that leaves no room for
            ``settings.max_new_tokens`` in the model's context (checked by the model's `generate` before the
            vision tower runs); the message names the prompt.
    """
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
    t0 = time.perf_counter()
    flat = [image for group in images for image in group]
    inputs = processor(images=flat or None, text=list(prompts), max_slices=max_slices, padding_side="left")
    lengths = inputs["attention_mask"].sum(-1).tolist()
    inputs = inputs.to(model.device)
    tokenizer = processor.tokenizer
    config = settings.generation_config(model, tokenizer)
    stream = on_text is not None and len(prompts) == 1 and settings.num_beams == 1
    if streamer is None and stream:
        streamer = _CallbackStreamer(tokenizer, on_text)
    t1 = time.perf_counter()
    if settings.seed is not None:
        set_seed(settings.seed)
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config, streamer=streamer,
                             stopping_criteria=stopping_criteria)
    t2 = time.perf_counter()
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    results, eos = [], eos_token_ids(tokenizer)
    for row, length in zip(new, lengths):
        ids = _until_eos(row, eos)
        results.append(Generation(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, int(length)))
    if on_text is not None and not stream and len(results) == 1 and results[0].text:
        on_text(results[0].text)
    return GenerationBatch(results, inputs, t1 - t0, t2 - t1)


def eos_token_ids(tokenizer) -> set[int]:
    """The tokenizer's end-of-sequence ids as a set (its ``eos_token_id`` may be one id, a list, or None)."""
    eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def _until_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """``ids`` cut after the first end-of-sequence token (rows finished early are padded after it)."""
    for k, token in enumerate(ids):
        if token in eos_ids:
            return ids[:k + 1]
    return ids


class _CallbackStreamer(TextStreamer):
    """A `TextStreamer` that hands each finalized piece of text to a callback instead of printing it, with the
    answer's leading and trailing whitespace left out (the pieces join to the stripped answer)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text
        self._held = ""
        self._started = False

    def on_finalized_text(self, text: str, stream_end: bool = False):
        text = self._held + text
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        body = text.rstrip()
        self._held = text[len(body):]
        if body:
            self._on_text(body)
