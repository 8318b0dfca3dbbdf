"""Batched generation for the server: requests queue up, and each batch decodes together, every row on its own terms.

    engine = BatchingEngine(model, processor, max_batch_size=16, max_queue=64).start()
    job = Job(prompt, images, GenerationSettings(max_new_tokens=64), stop=["\\n\\n"],
              on_text=lambda piece: ..., on_done=lambda job: ...)      # both called from the engine's thread
    engine.submit(job)            # EngineBusy when the queue is full; job.cancel() when the client goes away
    engine.stop()                 # finishes what is queued, then the thread ends

One thread runs the model. It takes the oldest waiting job and every queued job that can share its batch (same
decoding settings and slice cap; a seeded sampling job goes alone, so its seed means what it means alone), up to
``max_batch_size``, and answers them in one left-padded `generate` call: requests that arrive meanwhile join the next
batch. Within a batch each row stops on its own: at the end-of-sequence token, at one of its ``stop`` strings, at
its own ``max_new_tokens``, or when it is cancelled; a batch whose rows are all done ends early, so a client that
disconnects stops costing compute. Greedy rows give what they give alone (left padding is masked).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from .generation import GenerationSettings, eos_token_ids, generate

__all__ = ["Job", "BatchingEngine", "EngineBusy", "EngineStopped"]

logger = logging.getLogger("llava_uhd.serve")


class EngineBusy(RuntimeError):
    """The queue is full: the request should be retried later (HTTP 503 with ``Retry-After``)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new work."""


@dataclass(eq=False)
class Job:
    """One request: a rendered ``prompt`` (one ``<image>`` per image), its decoded ``images``, how to decode, and
    where the answer goes. After ``on_done``: ``text``, ``finish_reason`` (``"stop"``, ``"length"`` or
    ``"cancelled"``), ``prompt_tokens`` and ``completion_tokens``, or ``error`` (a message) when it failed."""

    prompt: str
    images: Sequence = ()
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    stop: Sequence[str] = ()
    max_slices: int | None = None
    on_text: Callable[[str], None] | None = None
    on_done: Callable[["Job"], None] | None = None
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    reported: bool = False  # on_done was called
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _order: int = field(default_factory=itertools.count().__next__, repr=False)

    def cancel(self) -> None:
        """Stop spending compute on this job (its row ends at the next decoding step)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share a batch."""
        s = self.settings
        alone = s.do_sample and s.seed is not None  # a seed reproduces a sampled answer only alone
        return (s.temperature, s.top_p, s.num_beams, self.max_slices, self._order if alone else None)


class BatchingEngine:
    """A bounded queue of `Job` s and one thread that answers them in batches (see the module docstring)."""

    def __init__(self, model, processor, max_batch_size: int = 16, max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.model, self.processor = model, processor
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self._queue: deque[Job] = deque()
        self._lock = threading.Condition()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self.batches: list[int] = []  # the size of every batch run (for tests and the benchmark)
        self.finished: deque[tuple[str | None, int]] = deque(maxlen=1000)  # (finish_reason, tokens) of recent jobs

    def start(self) -> "BatchingEngine":
        self._thread = threading.Thread(target=self._run, name="llava-uhd-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def submit(self, job: Job) -> None:
        """Queue ``job``; `EngineBusy` when ``max_queue`` jobs already wait, `EngineStopped` after `stop`."""
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise EngineBusy(f"{len(self._queue)} requests are waiting")
            self._queue.append(job)
            self._lock.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new jobs, answer the queued ones, end the thread."""
        with self._lock:
            self._accepting = False
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------------ the thread
    def _next_batch(self) -> list[Job] | None:
        with self._lock:
            while not self._queue:
                if not self._accepting:
                    return None
                self._lock.wait(0.5)
            first = self._queue.popleft()
            batch, key = [first], first.batch_key()
            for job in list(self._queue):
                if len(batch) >= self.max_batch_size:
                    break
                if job.batch_key() == key:
                    self._queue.remove(job)
                    batch.append(job)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [job for job in batch if not job.cancelled]
            for job in batch:
                if job.cancelled:
                    _finish(job, "cancelled", self)
            if not live:
                continue
            self.batches.append(len(live))
            try:
                self._answer(live)
            except Exception as e:  # a failure of the batch is each job's failure; the engine goes on
                logger.exception("generation failed for a batch of %d", len(live))
                for job in live:
                    if not job.reported:
                        job.error = f"{type(e).__name__}: {e}"
                        _finish(job, None, self)

    def _answer(self, jobs: list[Job]) -> None:
        settings = jobs[0].settings
        longest = max(job.settings.max_new_tokens for job in jobs)
        rows = _Rows(self.processor.tokenizer, jobs)
        t0 = time.perf_counter()
        batch = generate(self.model, self.processor, [job.prompt for job in jobs], [list(job.images) for job in jobs],
                         replace(settings, max_new_tokens=longest), max_slices=jobs[0].max_slices, streamer=rows,
                         stopping_criteria=[rows])
        rows.end()
        logger.info("batch of %d answered in %.2f s", len(jobs), time.perf_counter() - t0)
        for job, result in zip(jobs, batch.results):
            job.prompt_tokens = result.prompt_tokens
            _finish(job, job.finish_reason, self)


def _finish(job: Job, reason: str | None, engine: "BatchingEngine | None" = None) -> None:
    job.finish_reason, job.reported = reason, True
    if engine is not None:
        engine.finished.append((reason, job.completion_tokens))
    if job.on_done is not None:
        job.on_done(job)


class _Rows(BaseStreamer, StoppingCriteria):
    """Follows every row of a batch as it decodes: collects its tokens, streams its text (``on_text``), and tells
    `generate` which rows are done (end of sequence, a stop string, their own token budget, cancelled)."""

    def __init__(self, tokenizer, jobs: list[Job]):
        self.tokenizer, self.jobs = tokenizer, jobs
        self.eos = eos_token_ids(tokenizer)
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.sent = [""] * len(jobs)
        self.done = [False] * len(jobs)
        self._prompt_seen = False

    # BaseStreamer: the prompt first (B, T), then each step's new tokens (B,)
    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for r, token in enumerate(value.reshape(-1).tolist()):
            job = self.jobs[r]
            if self.done[r]:
                continue
            if job.cancelled:
                self._close(r, "cancelled")
                continue
            self.ids[r].append(token)
            job.completion_tokens = len(self.ids[r])
            if token in self.eos:
                self._close(r, "stop")
                continue
            text = self._text(r)
            cut = _first_stop(text, job.stop)
            if cut is not None:
                self._close(r, "stop", text[:cut])
            elif len(self.ids[r]) >= job.settings.max_new_tokens:
                self._close(r, "length", text)
            else:
                self._send(r, _stable_prefix(text, job.stop))

    def end(self) -> None:
        for r in range(len(self.jobs)):
            if not self.done[r]:
                self._close(r, "cancelled" if self.jobs[r].cancelled else "length")

    # StoppingCriteria: called after each step's `put`
    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for r, job in enumerate(self.jobs):
            if job.cancelled and not self.done[r]:
                self._close(r, "cancelled")
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _text(self, r: int) -> str:
        return self.tokenizer.decode(self.ids[r], skip_special_tokens=True).lstrip()

    def _send(self, r: int, text: str) -> None:
        """Stream what ``text`` adds to what was sent (never a piece that a later token could change)."""
        if len(text) > len(self.sent[r]) and text.startswith(self.sent[r]):
            piece, self.sent[r] = text[len(self.sent[r]):], text
            if self.jobs[r].on_text is not None:
                self.jobs[r].on_text(piece)

    def _close(self, r: int, reason: str, text: str | None = None) -> None:
        self.done[r] = True
        job = self.jobs[r]
        job.finish_reason = reason
        if reason != "cancelled":
            job.text = (self._text(r) if text is None else text).rstrip()
            self._send(r, job.text)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first of ``stops`` begins in ``text`` (None: nowhere)."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _stable_prefix(text: str, stops: Sequence[str]) -> str:
    """The part of ``text`` no later token can change: without a trailing half character (U+FFFD), trailing
    whitespace (it may end the answer and be stripped) or a tail that may be the start of a stop string."""
    text = text.rstrip("\ufffd").rstrip()
    hold = max((len(s) - 1 for s in stops if s), default=0)
    for k in range(min(hold, len(text)), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return text[:-k]
    return text
