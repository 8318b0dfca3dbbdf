"""Who answers a probe: a local model in batches, or any OpenAI-compatible endpoint over HTTP.

    system = LocalSystem(model, processor, settings, batch_size=16, label="nano")      # settings: GenerationSettings
    system = EndpointSystem("http://127.0.0.1:8000", max_tokens=16, concurrency=4)     # the standard library only
    answers = system.answer(images, questions, repeats=1, progress=True)               # one list of repeats each

`LocalSystem` asks every question through `llava_uhd.serve.generation.generate` (the prompt `ask` builds: the image,
then the question), ``batch_size`` pictures per batch, each repeated ``repeats`` times in it; with a seed, batch
``b`` is seeded ``seed + b`` so sampled repeats differ yet reproduce. ``plan(width, height)`` gives the slice
boxes the model uses (drawn over the position heat map). `EndpointSystem` POSTs ``{URL}/v1/chat/completions`` with
the picture as a base64 PNG ``data:`` URL (``urllib`` only: this module never imports torch), ``concurrency``
requests at a time so a batching server can batch them; with a seed, request ``k`` sends ``seed + k``. A refusal
or an unreachable server is a `ProbeError` naming the URL and the server's message.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

__all__ = ["ProbeError", "LocalSystem", "EndpointSystem", "chat_url"]


class ProbeError(Exception):
    """A system that cannot answer (unreachable, refusing, malformed reply): one line for the user."""


def _bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="answer", leave=False)


class LocalSystem:
    """A loaded model and processor answering in left-padded batches (`generate`)."""

    def __init__(self, model, processor, settings, batch_size: int = 16, max_slices: int | None = None,
                 label: str = "model", info: dict[str, Any] | None = None):
        self.model, self.processor, self.settings = model, processor, settings
        self.batch_size, self.max_slices, self.label = batch_size, max_slices, label
        self.info = info or {}

    def describe(self) -> dict[str, Any]:
        ip = self.processor.image_processor
        return {"system": "local", "label": self.label, "image_strategy": ip.image_strategy,
                "max_slices": self.max_slices or ip.max_slices, "slice_size": [ip.size["width"], ip.size["height"]],
                "decoding": {"max_new_tokens": self.settings.max_new_tokens, "temperature": self.settings.temperature,
                             "top_p": self.settings.top_p, "num_beams": self.settings.num_beams,
                             "seed": self.settings.seed},
                **{k: v for k, v in self.info.items() if k in ("kind", "source", "name", "builtin")}}

    def plan(self, width: int, height: int) -> dict[str, Any]:
        """The slice boxes (left, top, right, bottom) the model cuts a ``width x height`` picture into, its grid and
        its visual tokens; a ``pad`` model's one view is the padded square."""
        ip = self.processor.image_processor
        plan = ip.plan(width, height, self.max_slices)
        boxes = [list(s.box) for s in plan.slices] if plan.is_sliced else []
        if ip.image_strategy == "pad":
            boxes = []
        return {"cols": plan.cols, "rows": plan.rows, "boxes": boxes, "strategy": ip.image_strategy,
                "visual_tokens": self.processor.num_image_tokens(width, height, self.max_slices)}

    def answer(self, images, questions, repeats: int = 1, progress: bool = False) -> list[list[str]]:
        from ..serve.generation import generate

        requests = [(k, image, question) for k, (image, question) in enumerate(zip(images, questions))
                    for _ in range(repeats)]
        out: list[list[str]] = [[] for _ in images]
        with _bar(len(requests), progress, self.label) as bar:
            for b, start in enumerate(range(0, len(requests), self.batch_size)):
                chunk = requests[start:start + self.batch_size]
                settings = self.settings if self.settings.seed is None else replace(self.settings,
                                                                                   seed=self.settings.seed + b)
                prompts = [self.processor.question_prompt(question, 1) for _, _, question in chunk]
                batch = generate(self.model, self.processor, prompts, [[image] for _, image, _ in chunk], settings,
                                 max_slices=self.max_slices)
                for (k, _, _), result in zip(chunk, batch.results):
                    out[k].append(result.text)
                bar.update(len(chunk))
        return out


def chat_url(url: str) -> str:
    """``{URL}/v1/chat/completions`` from a server's base URL, with or without its ``/v1``."""
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"


def _png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class EndpointSystem:
    """An OpenAI-compatible chat-completions endpoint (``/v1/chat/completions``) asked one picture at a time."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, max_tokens: int = 16,
                 temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
                 concurrency: int = 4, timeout_s: float = 300.0, label: str | None = None):
        if not url.startswith(("http://", "https://")):
            raise ProbeError(f"--endpoint must be an http:// or https:// URL, got {url!r}")
        self.url, self.chat = url, chat_url(url)
        self.model, self.api_key, self.max_tokens = model, api_key, max_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.label = label or model or url

    def describe(self) -> dict[str, Any]:
        return {"system": "endpoint", "label": self.label, "url": self.chat, "model": self.model,
                "decoding": {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                             "seed": self.seed}}

    def plan(self, width: int, height: int) -> None:
        return None  # an endpoint does not say how it cuts pictures

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _open(self, request: urllib.request.Request) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                detail = " ".join(detail.split())[:200]
            raise ProbeError(f"{request.full_url} answered {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ProbeError(f"cannot reach {request.full_url}: {reason}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise ProbeError(f"{request.full_url} did not answer JSON: {body[:120]!r}") from None

    def model_name(self) -> str:
        """``model`` as given, else the first model ``GET {URL}/v1/models`` lists."""
        if self.model is None:
            url = self.chat[:-len("/chat/completions")] + "/models"
            listed = self._open(urllib.request.Request(url, headers=self._headers()))
            try:
                self.model = listed["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                raise ProbeError(f"{url} lists no model; pass --endpoint-model NAME") from None
            if self.label == self.url:
                self.label = self.model
        return self.model

    def ask(self, image, question: str, seed: int | None = None) -> str:
        """The endpoint's answer to ``question`` about ``image`` (a PIL image)."""
        body: dict[str, Any] = {
            "model": self.model_name(), "max_tokens": self.max_tokens, "temperature": self.temperature,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _png_data_url(image)}},
                {"type": "text", "text": question}]}]}
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if seed is not None:
            body["seed"] = seed
        reply = self._open(urllib.request.Request(self.chat, data=json.dumps(body).encode(), headers=self._headers(),
                                                  method="POST"))
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ProbeError(f"{self.chat} answered without choices[0].message.content: {str(reply)[:120]}") from None
        return (content or "").strip()

    def answer(self, images, questions, repeats: int = 1, progress: bool = False) -> list[list[str]]:
        self.model_name()  # once, before the threads
        requests = [(k, image, question) for k, (image, question) in enumerate(zip(images, questions))
                    for _ in range(repeats)]
        texts: list[str | None] = [None] * len(requests)

        def one(n: int) -> None:
            _, image, question = requests[n]
            texts[n] = self.ask(image, question, None if self.seed is None else self.seed + n)

        with _bar(len(requests), progress, self.label) as bar, ThreadPoolExecutor(self.concurrency) as pool:
            for _ in pool.map(one, range(len(requests))):
                bar.update(1)
        out: list[list[str]] = [[] for _ in images]
        for (k, _, _), text in zip(requests, texts):
            out[k].append(text)
        return out
