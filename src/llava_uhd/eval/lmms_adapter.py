"""LLaVA-UHD as an lmms-eval model (``--model llava_uhd``), registered through lmms-eval's ``lmms_eval.models``
entry-point group.

    python -m lmms_eval --model llava_uhd \\
        --model_args pretrained=out/llava-uhd-144-13b,max_slices=7,dtype=bfloat16,device=cuda \\
        --tasks textvqa_val,pope,mme --batch_size 8

This module needs lmms-eval (``pip install 'llava-uhd[eval]'``); nothing else in the package imports it, and
``import llava_uhd`` does not load it. lmms-eval finds the model through the package's entry point
``[project.entry-points."lmms_eval.models"] llava_uhd = "llava_uhd.eval.lmms_adapter:lmms_eval_manifest"``
(`ModelRegistryV2.load_entrypoint_manifests` in ``lmms_eval/models/registry_v2.py``); the class is also put in
lmms-eval's older ``MODEL_REGISTRY`` (`register_model`) for code that looks there.

`LlavaUHDLmms` is a "simple" lmms-eval model (``doc_to_visual`` + ``doc_to_text`` tasks):

* ``generate_until``: each request's text goes into the processor's chat template with one ``<image>`` per visual
  before it (a text that holds its own placeholders, one per visual, keeps them where they are; no visual: a
  text-only prompt), exactly as `llava_uhd.serve.generation.generate` is prompted by ``llava-uhd ask``. Requests
  are grouped by decoding settings (``max_new_tokens``, ``temperature`` / ``do_sample``, ``top_p``,
  ``num_beams``) and ``max_slices`` (a per-task generation kwarg; default the ``max_slices`` model argument, else
  the checkpoint's), sorted longest prompt first (image tokens counted from the image sizes) and decoded in
  left-padded batches of ``batch_size``; answers come back in the requests' order and greedy answers equal the
  one-at-a-time ones. Each row stops on its own at the end of sequence or at the first of its ``until`` strings,
  and its answer is cut there. A prompt whose answer budget would run past the model's context gets the room
  that is left (a warning says how often); a prompt with no room left is an error naming the task and document.
* ``loglikelihood``: the continuation's token log-probabilities given the prompt (the same chat prompt, images
  included), summed; ``is_greedy`` says whether greedy decoding would produce those tokens. The context and the
  continuation are tokenized together (the continuation's tokens are those after the context's). What is
  returned first follows lmms-eval's convention (``likelihood=loss``, the default): the mean negative
  log-probability per continuation token, as lmms-eval's own LLaVA models return and as its multiple-choice
  scoring (``np.argmin``) expects; ``likelihood=logprob`` returns the summed log-probability instead (the base
  class's documented meaning, lm-evaluation-harness' convention).
* ``generate_until_multi_round``: the protocol of lmms-eval's ``llava_onevision``: round 0 answers the request's
  context; after each round the task's ``doc_to_text(doc, previous_output=..., round_idx=..., previous_round_info=...)``
  returns ``(visuals, context, terminal, round_outputs, round_info)``; on ``terminal`` the request's result is
  ``round_outputs``. Requests advance round by round together, each round batched like ``generate_until``.

Model arguments (``--model_args k=v,...``): ``pretrained`` (a saved LLaVA-UHD folder, e.g. a ``llava-uhd
convert`` output, or a nano weights folder; omitted: the built-in nano model), ``device`` (default ``cuda`` when
there is one, else ``cpu``; under ``accelerate launch`` each process takes ``cuda:<local rank>`` and its share of
the requests), ``dtype`` (``float32``, ``bfloat16``, ``float16``; default ``auto``: ``bfloat16`` on a GPU that
computes it natively, and for the nano model on a CPU with AMX or AVX-512-BF16; else ``float32``), ``batch_size``, ``max_slices``, ``max_new_tokens`` (when a task gives none; default 1024, as lmms-eval's
LLaVA), ``likelihood`` (``loss`` / ``logprob``), ``quantize`` (``none`` / ``int8``, CPU) and ``cache_dir`` (the
nano backbones' cache). Unknown arguments are refused by name.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria

try:
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ModuleNotFoundError as e:  # pragma: no cover - the message is the point
    raise ModuleNotFoundError(f"llava_uhd.eval.lmms_adapter needs lmms-eval ({e}): pip install 'llava-uhd[eval]'",
                              name=e.name) from e

__all__ = ["LlavaUHDLmms", "lmms_eval_manifest", "MODEL_NAME"]

MODEL_NAME = "llava_uhd"
"""The name lmms-eval knows the model by (``--model llava_uhd``)."""

DEFAULT_MAX_NEW_TOKENS = 1024
"""The answer budget when a task's generation kwargs give none (lmms-eval's LLaVA models use the same)."""

MAX_ROUNDS = 64
"""``generate_until_multi_round`` stops with an error when a task's ``doc_to_text`` has not ended by then."""

LIKELIHOODS = ("loss", "logprob")

# generation kwargs that lmms-eval tasks pass and that mean nothing here (other models' switches)
_IGNORED_GEN_KWARGS = {"image_aspect_ratio", "use_cache", "modalities", "image_sizes"}


def lmms_eval_manifest():
    """The entry point's payload: lmms-eval's `ModelManifest` for ``llava_uhd`` (a "simple" model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.LlavaUHDLmms")


@dataclass
class _Job:
    """One prompt to answer: where its result goes (``index``, and ``round`` outputs so far for multi-round),
    its rendered prompt, how to fetch its visuals again, and how to decode it."""

    index: int
    prompt: str
    visuals: Callable[[], list]
    sizes: list[tuple[int, int]]
    settings: Any  # GenerationSettings
    max_slices: int | None
    until: tuple[str, ...]
    length: int
    where: str
    outputs: list[str] = field(default_factory=list)


@register_model(MODEL_NAME)
class LlavaUHDLmms(lmms):
    """LLaVA-UHD for lmms-eval; see the module docstring for what each request type does."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 1, max_slices: int | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, likelihood: str = "loss", quantize: str = "none",
                 cache_dir: str | None = None, max_batch_size: int | None = None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"llava_uhd: unknown model argument(s) {', '.join(sorted(kwargs))}; known: pretrained, "
                             "device, dtype, batch_size, max_slices, max_new_tokens, likelihood, quantize, cache_dir")
        from ..serve.loading import load_model

        if str(batch_size).startswith("auto"):
            raise ValueError("llava_uhd: batch_size=auto is not supported; give a number (e.g. --batch_size 8)")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"llava_uhd: batch_size must be >= 1, got {batch_size}")
        self.max_slices = None if max_slices in (None, "", "None") else int(max_slices)
        if self.max_slices is not None and self.max_slices < 1:
            raise ValueError(f"llava_uhd: max_slices must be >= 1, got {max_slices}")
        self.max_new_tokens = int(max_new_tokens)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"llava_uhd: likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
        self.likelihood = likelihood

        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch / torchrun: one process per GPU
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            device = f"cuda:{self.accelerator.local_process_index}"
        if device in (None, "", "None"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype in (None, "", "None"):
            dtype = "auto"  # bfloat16 where the device computes it natively (`resolve_dtype`)
        self._device = torch.device(device)
        self._model, self._processor, self.info = load_model(pretrained, cache_dir=cache_dir, device=device,
                                                             dtype=dtype, quantize=quantize)
        self._model.eval()
        self.clamped = 0
        self._ignored: set[str] = set()

    # ----------------------------------------------------------------------------------------- properties
    @property
    def model(self):
        return self._model

    @property
    def processor(self):
        return self._processor

    @property
    def tokenizer(self):
        return self._processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int | None:
        from ..modeling.context import context_limit

        return context_limit(self._model.config)

    # ----------------------------------------------------------------------------------------- generation
    def generate_until(self, requests) -> list:
        """One answer per request (``args``: context, generation kwargs, doc_to_visual, doc_id, task, split)."""
        jobs = []
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args[:6]
            fetch = self._fetcher(doc_to_visual, doc_id, task, split)
            jobs.append(self._job(i, context, fetch, gen_kwargs, f"{task} doc {doc_id}"))
        results: list = [None] * len(jobs)
        for job, (text, prompt_tokens, new_tokens) in self._run(jobs, "Model Responding"):
            results[job.index] = _result(text, prompt_tokens, new_tokens)
        return results

    def generate_until_multi_round(self, requests) -> list:
        """Each request's answers, one per round (``args``: context, generation kwargs, doc_to_visual,
        doc_to_text, doc_id, task, split); see the module docstring for the protocol."""
        active, results, info = [], [None] * len(requests), [None] * len(requests)
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args[:7]
            fetch = self._fetcher(doc_to_visual, doc_id, task, split)
            job = self._job(i, context, fetch, gen_kwargs, f"{task} doc {doc_id}")
            active.append((job, gen_kwargs, doc_to_text, doc_id, task, split))
        for round_idx in range(1, MAX_ROUNDS + 1):
            if not active:
                return results
            for job, (text, _, _) in self._run([a[0] for a in active], f"Round {round_idx}"):
                job.outputs.append(text)
            still = []
            for job, gen_kwargs, doc_to_text, doc_id, task, split in active:
                doc = self.task_dict[task][split][doc_id]
                step = doc_to_text(doc, previous_output=list(job.outputs), round_idx=round_idx,
                                   previous_round_info=info[job.index])
                visuals, context, terminal, outputs, info[job.index] = step
                if terminal:
                    results[job.index] = list(outputs) if outputs is not None else list(job.outputs)
                    continue
                fetch = _constant(_flatten(visuals))
                nxt = self._job(job.index, context, fetch, gen_kwargs, job.where)
                nxt.outputs = list(outputs) if outputs is not None else job.outputs
                still.append((nxt, gen_kwargs, doc_to_text, doc_id, task, split))
            active = still
        if active:
            raise RuntimeError(f"llava_uhd: {active[0][0].where}: doc_to_text did not end the conversation within "
                               f"{MAX_ROUNDS} rounds")
        return results

    def _fetcher(self, doc_to_visual, doc_id, task, split) -> Callable[[], list]:
        """A function giving the document's visuals (called again when its batch runs, so that a whole benchmark's
        decoded images are never held at once)."""
        if doc_to_visual is None:
            return _constant([])
        return lambda: _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))

    def _job(self, index: int, context, fetch, gen_kwargs, where: str) -> _Job:
        settings, max_slices, until = self._decoding(gen_kwargs)
        visuals = fetch()
        sizes = [_size(v, where, k) for k, v in enumerate(visuals)]
        prompt = self._prompt(context, len(visuals), where)
        length = self._processor.count_prompt_tokens(prompt, sizes, max_slices)
        limit = self.max_length
        if limit is not None:
            room = limit - length
            if room < 1:
                raise ValueError(f"llava_uhd: {where}: the prompt is {length} tokens (image tokens included), "
                                 f"the model's context is {limit}: no room for an answer (try a lower max_slices)")
            if room < settings.max_new_tokens:
                settings = replace(settings, max_new_tokens=room)
                self.clamped += 1
                if self.clamped == 1:
                    _warn(f"llava_uhd: {where}: the answer budget is cut to the {room} tokens left in the model's "
                          f"context of {limit} (the prompt is {length} tokens); later cuts are only counted "
                          "(the adapter's clamped attribute)")
        return _Job(index, prompt, fetch, sizes, settings, max_slices, until, length, where)

    def _decoding(self, gen_kwargs) -> tuple:
        """``(GenerationSettings, max_slices, until)`` from a request's generation kwargs."""
        from ..serve.generation import GenerationSettings

        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if not all(isinstance(s, str) for s in until):
            raise ValueError(f"llava_uhd: until must be a string or a list of strings, got {until!r}")
        max_slices = kw.pop("max_slices", self.max_slices)
        max_slices = None if max_slices is None else int(max_slices)
        max_new_tokens = int(kw.pop("max_new_tokens", None) or self.max_new_tokens)
        temperature = float(kw.pop("temperature", 0) or 0)
        do_sample = kw.pop("do_sample", None)
        top_p = kw.pop("top_p", None)
        num_beams = int(kw.pop("num_beams", 1) or 1)
        if do_sample is not None and not do_sample:
            temperature = 0.0  # transformers' meaning: do_sample=False decodes greedily whatever the temperature
        elif do_sample and temperature == 0:
            temperature = 1.0
        top_p = float(top_p) if temperature > 0 and top_p is not None and 0 < float(top_p) <= 1 else None
        unknown = set(kw) - _IGNORED_GEN_KWARGS - self._ignored
        if unknown:
            self._ignored |= unknown
            _warn(f"llava_uhd: generation kwargs ignored: {', '.join(sorted(unknown))}")
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      num_beams=num_beams)
        return settings, max_slices, tuple(s for s in until if s)

    def _prompt(self, context, num_images: int, where: str) -> str:
        """The chat prompt for a request's text (or a JSON conversation ``[{"value": ...}, ...]``, turns
        alternating user / assistant) with ``num_images`` images."""
        if isinstance(context, (list, tuple)):
            context = context[0] if context else ""
        context = "" if context is None else str(context)
        turns = _conversation(context)
        try:
            if turns is not None:
                messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": text}
                            for k, text in enumerate(turns)]
                if num_images and self._processor.image_token not in context:
                    messages[0]["content"] = [{"type": "image"}] * num_images + [{"type": "text", "text": turns[0]}]
                return self._processor.render_chat(messages)
            if not context.strip():  # an image-only (or empty) user turn
                content = [{"type": "image"}] * num_images if num_images else ""
                return self._processor.render_chat([{"role": "user", "content": content}])
            return self._processor.question_prompt(context, num_images=num_images)
        except ValueError as e:
            raise ValueError(f"llava_uhd: {where}: {e}") from None

    def _run(self, jobs: Sequence[_Job], desc: str):
        """``(job, (text, prompt_tokens, new_tokens))`` for every job, batched: grouped by decoding settings and
        max_slices, longest first."""
        from tqdm import tqdm

        groups: dict[tuple, list[_Job]] = defaultdict(list)
        for job in jobs:
            groups[(job.settings, job.max_slices)].append(job)
        bar = tqdm(total=len(jobs), disable=self.rank != 0 or not jobs, desc=desc)
        for (settings, max_slices), group in groups.items():
            group.sort(key=lambda j: -j.length)  # stable: equal lengths keep the requests' order
            for start in range(0, len(group), self.batch_size):
                batch = group[start:start + self.batch_size]
                yield from zip(batch, self._generate(batch, settings, max_slices))
                bar.update(len(batch))
        bar.close()

    def _generate(self, batch: Sequence[_Job], settings, max_slices) -> list[tuple[str, int, int]]:
        from ..serve.generation import generate

        images = []
        for job in batch:
            visuals = job.visuals()
            if len(visuals) != len(job.sizes):
                raise RuntimeError(f"llava_uhd: {job.where}: doc_to_visual gave {len(visuals)} visuals, then "
                                   f"{len(job.sizes)}")
            images.append(visuals)
        stops = [job.until for job in batch]
        criteria = None
        if any(stops) and settings.num_beams == 1:  # beams are rows of their own: those are cut afterwards only
            criteria = [_StopStrings(self.tokenizer, stops)]
        try:
            out = generate(self._model, self._processor, [job.prompt for job in batch], images, settings,
                           max_slices=max_slices, stopping_criteria=criteria)
        except ValueError as e:
            raise ValueError(f"llava_uhd: {', '.join(job.where for job in batch)}: {e}") from None
        texts = []
        for job, result in zip(batch, out.results):
            raw = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
            cut = _first_stop(raw, job.until)
            texts.append(((raw if cut is None else raw[:cut]).strip(), result.prompt_tokens, result.new_tokens))
        return texts

    # ----------------------------------------------------------------------------------------- likelihood
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(value, is_greedy)`` per request (``args``: context, continuation (a string or doc_to_target),
        doc_to_visual, doc_id, task, split; or just context and continuation); ``value`` is the mean negative
        log-probability per continuation token (``likelihood=loss``) or the summed log-probability
        (``likelihood=logprob``)."""
        scored = self.continuation_logprobs(requests, progress=self.rank == 0)
        pairs = [(float(total if self.likelihood == "logprob" else (-total / n if n else 0.0)), bool(greedy))
                 for total, n, greedy in scored]
        return _deliverable(pairs)

    def continuation_logprobs(self, requests, progress: bool = False) -> list[tuple[float, int, bool]]:
        """``(summed log-probability, continuation tokens, is_greedy)`` per loglikelihood request, batched like
        `generate_until` (sorted longest first, left padded, ``batch_size`` at a time)."""
        from tqdm import tqdm

        from ..processing import ChatPrompt

        items = []
        for i, request in enumerate(requests):
            args = request.args
            context, target = args[0], args[1]
            if len(args) >= 6:
                doc_to_visual, doc_id, task, split = args[2:6]
                where = f"{task} doc {doc_id}"
                doc = self.task_dict[task][split][doc_id] if (callable(target) or doc_to_visual) else None
                fetch = self._fetcher(doc_to_visual, doc_id, task, split)
            else:
                where, doc, fetch = f"request {i}", None, _constant([])
            continuation = target(doc) if callable(target) else target
            if isinstance(continuation, (list, tuple)):
                continuation = continuation[0]
            continuation = str(continuation)
            visuals = fetch()
            sizes = [_size(v, where, k) for k, v in enumerate(visuals)]
            prompt = self._prompt(context, len(visuals), where)
            full = ChatPrompt(prompt + continuation, getattr(prompt, "user_spans", ()))
            ctx_ids = self._processor.encode_text(prompt)
            full_ids = self._processor.encode_text(full)
            common = 0
            while common < min(len(ctx_ids), len(full_ids)) and ctx_ids[common] == full_ids[common]:
                common += 1
            n = len(full_ids) - common
            length = self._processor.count_prompt_tokens(full, sizes, self.max_slices)
            limit = self.max_length
            if limit is not None and length > limit:
                raise ValueError(f"llava_uhd: {where}: the context and continuation are {length} tokens (image "
                                 f"tokens included), past the model's context of {limit} (try a lower max_slices)")
            items.append((i, full, fetch, n, length, where))
        results: list = [None] * len(items)
        todo = []
        for i, full, fetch, n, length, where in items:
            if n == 0:
                results[i] = (0.0, 0, True)
            else:
                todo.append((i, full, fetch, n, length, where))
        todo.sort(key=lambda item: -item[4])
        pbar = tqdm(total=len(todo), desc="Model Responding", disable=not (progress and todo))
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start:start + self.batch_size]
            images = [image for item in batch for image in item[2]()]
            try:
                inputs = self._processor(images=images or None, text=[item[1] for item in batch],
                                         max_slices=self.max_slices, padding_side="left").to(self._device)
            except ValueError as e:
                raise ValueError(f"llava_uhd: {', '.join(item[5] for item in batch)}: {e}") from None
            keep = max(item[3] for item in batch) + 1
            with torch.inference_mode():
                logits = self._model(**inputs, logits_to_keep=keep).logits
            ids = inputs["input_ids"]
            for row, (i, _, _, n, _, _) in enumerate(batch):
                window = logits[row, keep - n - 1:keep - 1].float()
                target = ids[row, -n:]
                logprobs = torch.log_softmax(window, dim=-1).gather(-1, target[:, None])[:, 0]
                greedy = bool((window.argmax(-1) == target).all())
                results[i] = (float(logprobs.sum()), n, greedy)
            pbar.update(len(batch))
        pbar.close()
        return results


# --------------------------------------------------------------------------------------------- helpers
def _result(text: str, prompt_tokens: int, new_tokens: int):
    """lmms-eval's `GenerationResult` (the answer with its token counts) where the installed version has it."""
    try:
        from lmms_eval.api.instance import GenerationResult, TokenCounts
    except ImportError:
        return text
    return GenerationResult(text=text, token_counts=TokenCounts(input_tokens=prompt_tokens, output_tokens=new_tokens))


def _deliverable(pairs: list[tuple[float, bool]]) -> list:
    """``pairs`` as the installed lmms-eval's evaluator can take them. lmms-eval 0.7.3 passes every model output
    through ``unwrap_generation_output`` (``lmms_eval/api/instance.py``), which turns a ``(float, bool)`` pair into
    its string, so that ``multiple_choice`` scoring fails (``lls, is_greedy = zip(*results)``: "too many values
    to unpack") for every model; it hands a `GenerationResult`'s ``text`` through untouched, so there each pair
    travels as one. Where the pairs survive as they are (other versions), they are returned as they are."""
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:
        return pairs
    if unwrap_generation_output((0.0, True))[0] == (0.0, True):
        return pairs
    return [GenerationResult(text=pair) for pair in pairs]


def _constant(value: list) -> Callable[[], list]:
    return lambda: value


def _flatten(visuals) -> list:
    """A task's visuals as one flat list (None and empty entries dropped)."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out = []
    for v in visuals:
        out += _flatten(v)
    return out


def _size(visual, where: str, k: int) -> tuple[int, int]:
    """``(width, height)`` of a visual, read from a PIL image's header without decoding; anything else is read
    with `load_rgb` (a video or audio is refused here, naming the document)."""
    from PIL import Image

    if isinstance(visual, Image.Image):
        return visual.size
    if isinstance(visual, dict):
        raise ValueError(f"llava_uhd: {where}: visual {k} is audio or another non-image input; LLaVA-UHD reads "
                         "images")
    from ..image_io import load_rgb, rgb_size

    try:
        image = load_rgb(visual)
    except ValueError as e:
        raise ValueError(f"llava_uhd: {where}: visual {k}: {e} (LLaVA-UHD reads images, not videos)") from None
    return rgb_size(image)


def _conversation(context: str) -> list[str] | None:
    """The turns of a JSON conversation context (``[{"from": ..., "value": ...}, ...]``), else None."""
    if not context.lstrip().startswith("["):
        return None
    try:
        data = json.loads(context)
    except ValueError:
        return None
    if isinstance(data, list) and data and all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in data):
        return [t["value"] for t in data]
    return None


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first of ``stops`` begins in ``text`` (None: nowhere)."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _warn(message: str) -> None:
    from loguru import logger

    logger.warning(message)


class _StopStrings(StoppingCriteria):
    """Tells ``generate`` which rows hold one of their own stop strings in the text generated so far (decoded as
    the answer is: special tokens dropped), so that each row stops on its own."""

    def __init__(self, tokenizer, stops: Sequence[Sequence[str]]):
        self.tokenizer, self.stops = tokenizer, [tuple(s for s in row if s) for row in stops]
        self.done = [False] * len(self.stops)
        self.start: int | None = None

    def __call__(self, input_ids, scores, **kwargs):
        if self.start is None:  # the first call comes after the first new token
            self.start = input_ids.shape[1] - 1
        for r, stops in enumerate(self.stops):
            if stops and not self.done[r]:
                text = self.tokenizer.decode(input_ids[r, self.start:].tolist(), skip_special_tokens=True)
                self.done[r] = _first_stop(text, stops) is not None
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)
