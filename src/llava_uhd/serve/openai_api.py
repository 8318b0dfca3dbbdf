"""OpenAI's chat-completions format for LLaVA-UHD: a request body checked field by field, and the response shapes.

    request = parse_chat_request(body, limits, model_name="llava-uhd-nano")   # APIError with status and message
    request.messages, request.image_urls, request.settings, request.stop, request.stream
    completion(request_id, model_name, text, finish_reason, prompt_tokens, completion_tokens)   # the JSON body
    chunk(request_id, model_name, content=..., finish_reason=...)                             # one SSE event

No HTTP here: the server (`llava_uhd.serve.server`) does that; `decode_image_url` turns an image URL into
bytes (``data:`` URLs through `llava_uhd.image_io.decode_data_url`). Errors follow OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with a 4xx status.
"""

from __future__ import annotations

import math
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from ..image_io import decode_data_url
from .generation import GenerationSettings

__all__ = ["APIError", "Limits", "ChatRequest", "parse_chat_request", "decode_image_url", "completion", "chunk",
           "error_body"]


class APIError(Exception):
    """A request the server refuses: ``status`` (4xx, or 503 when busy), a message for the client, and OpenAI's
    ``type`` / ``param`` / ``code`` fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. ``max_pixels``: an image's pixel count, read from its header (decompression
    bombs included); ``context``: the LLM's context, for prompt + image tokens + ``max_tokens``."""

    max_body_bytes: int = 32 << 20
    max_image_bytes: int = 20 << 20
    max_images: int = 8
    max_tokens: int = 1024
    default_max_tokens: int = 128
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0


@dataclass
class ChatRequest:
    """A checked request: ``messages`` for the processor's chat template (``{"type": "image"}`` parts in place of
    the images), the ``image_urls`` in order, how to decode, and what to return."""

    messages: list[dict]
    image_urls: list[str]
    settings: GenerationSettings
    stop: list[str] = field(default_factory=list)
    max_slices: int | None = None
    stream: bool = False
    include_usage: bool = False


_ROLES = ("system", "user", "assistant")
def parse_chat_request(body: Any, limits: Limits, model_name: str) -> ChatRequest:
    """Check ``body`` (the parsed JSON) against the format and ``limits``; `APIError` naming the first problem."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{model_name}'", "model",
                       "model_not_found")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported", name, "unsupported_parameter")
    if body.get("logprobs") or body.get("tools") or body.get("tool_choice") not in (None, "none"):
        which = "logprobs" if body.get("logprobs") else "tools"
        raise APIError(400, f"{which} is not supported", which, "unsupported_parameter")
    if body.get("n", 1) != 1:
        raise APIError(400, "n must be 1", "n")
    messages, urls = _messages(body.get("messages"))
    if len(urls) > limits.max_images:
        raise APIError(400, f"{len(urls)} images in one request; at most {limits.max_images}", "messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
    if not _is_int(max_tokens) or not 1 <= max_tokens <= limits.max_tokens:
        raise APIError(400, f"max_tokens must be an integer from 1 to {limits.max_tokens}, got {max_tokens!r}",
                       "max_tokens")
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)  # greedy unless asked: the project's default
    top_p = _number(body, "top_p", None, 0.0, 1.0)
    if top_p == 0:
        raise APIError(400, "top_p must be greater than 0", "top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError(400, f"seed must be an integer, got {seed!r}", "seed")
    max_slices = body.get("max_slices")
    if max_slices is not None and (not _is_int(max_slices) or max_slices < 1):
        raise APIError(400, f"max_slices must be an integer >= 1, got {max_slices!r}", "max_slices")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    settings = GenerationSettings(max_new_tokens=max_tokens, temperature=temperature,
                                  top_p=top_p if temperature > 0 else None, seed=seed)
    return ChatRequest(messages, urls, settings, _stops(body.get("stop")), max_slices, stream,
                       bool(options.get("include_usage")))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, default, lo: float, hi: float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise APIError(400, f"{name} must be a number from {lo:g} to {hi:g}, got {value!r}", name)
    return float(value)


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "stop must be a non-empty string or a list of up to 4 of them", "stop")
    return stops


def _messages(raw) -> tuple[list[dict], list[str]]:
    """OpenAI messages as chat-template messages, and the image URLs in the order their placeholders appear."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list", "messages")
    messages, urls = [], []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise APIError(400, f"{where}: expected an object with a role of {', '.join(_ROLES)}", where)
        content = message.get("content")
        if isinstance(content, str):
            messages.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content must be a string or a list of content parts", f"{where}.content")
        images, texts = [], []
        for k, part in enumerate(content):
            at = f"{where}.content[{k}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url:
                    raise APIError(400, f"{at}.image_url.url must be a string", f"{at}.image_url")
                if message["role"] != "user":
                    raise APIError(400, f"{at}: images go in user messages", at)
                images.append({"type": "image"})
                urls.append(url)
            else:
                raise APIError(400, f"{at}: expected a text or image_url part", at)
        # the chat templates put a message's images before its text, so the URLs keep that order
        messages.append({"role": message["role"], "content": images + texts})
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", "messages")
    last = messages[-1]["content"]
    if not (last.strip() if isinstance(last, str) else any(p["type"] == "text" and p["text"].strip() for p in last)):
        raise APIError(400, "the last user message has no text", "messages")
    return messages, urls


def decode_image_url(url: str, limits: Limits) -> bytes:
    """The bytes of an image URL: a base64 ``data:`` URL, or (with ``limits.allow_remote_images``) an http(s) one
    fetched with a timeout and a size cap. `APIError` for anything else."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if header.endswith(";base64") and len(payload) * 3 // 4 > limits.max_image_bytes:  # before decoding it
            raise APIError(413, f"an image is larger than {limits.max_image_bytes} bytes", "image_url",
                           "image_too_large")
        try:
            return decode_data_url(url)
        except ValueError as e:
            raise APIError(400, f"image: {e}", "image_url") from None
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise APIError(400, "remote image URLs are refused by this server (send the image as a data: URL, or "
                                "start the server with --allow-remote-images)", "image_url", "remote_image_refused")
        return _fetch(url, limits)
    raise APIError(400, f"unsupported image URL {url[:40]!r}: send a data: URL", "image_url")


def _fetch(url: str, limits: Limits) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as response:  # noqa: S310 (http(s) only)
            data = response.read(limits.max_image_bytes + 1)
    except Exception as e:  # network, HTTP status, timeout: all the same to the client
        raise APIError(400, f"cannot fetch {url[:100]}: {type(e).__name__}: {e}", "image_url") from None
    if len(data) > limits.max_image_bytes:
        raise APIError(413, f"the image at {url[:100]} is larger than {limits.max_image_bytes} bytes", "image_url",
                       "image_too_large")
    return data


def completion(request_id: str, model: str, text: str, finish_reason: str | None, prompt_tokens: int,
               completion_tokens: int) -> dict:
    """A ``chat.completion`` object."""
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(request_id: str, model: str, content: str | None = None, role: str | None = None,
          finish_reason: str | None = None, usage_: dict | None = None) -> dict:
    """A ``chat.completion.chunk`` object (one server-sent event). With ``usage_`` and nothing else: the usage
    chunk of ``stream_options.include_usage`` (no choices)."""
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    choices = [] if usage_ is not None and not delta and finish_reason is None else \
        [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    out = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
