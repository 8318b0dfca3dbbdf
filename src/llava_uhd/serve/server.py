"""``llava-uhd serve``: an OpenAI-compatible HTTP server with request batching, and a web page to try it.

    llava-uhd serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--max-batch-size 16] [--max-queue 64]

    app = create_app(model, processor, "my-model", Limits(), max_batch_size=16)   # a FastAPI app (uvicorn runs it)

Endpoints: ``POST /v1/chat/completions`` (OpenAI's format: text and ``image_url`` parts with base64 ``data:``
URLs, several images, multi-turn; ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``stream``;
``usage`` counts image tokens; the extra field ``max_slices`` caps the request's slices), ``GET /v1/models``,
``GET /health``, ``GET /v1/plan?width=W&height=H[&max_slices=K]`` (the slicing plan and token count of an image
size) and ``GET /`` (the web page). Requests go through `BatchingEngine`: a bounded queue (full: 503 with
``Retry-After``) feeding one model thread that decodes compatible requests together. A client that disconnects is
cancelled; SIGTERM (uvicorn) stops accepting connections, finishes the requests in flight, then stops the engine.
Every refusal is OpenAI's error object with a 4xx status; an unexpected failure is a 500 without a traceback.

FastAPI and uvicorn come with the ``serve`` extra (``pip install 'llava-uhd[serve]'``); they load when the command
runs, so ``llava-uhd --help`` stays light.
"""

# (no `from __future__ import annotations`: FastAPI reads the handlers' annotations, whose types are imported inside
# `create_app`, at run time)
import argparse
import asyncio
import json
import logging
import uuid
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from pathlib import Path

from ..commandline import non_negative_int, positive_int
from .options import CommandError, add_model_arguments, load_from_args, prepare_runtime, run_command

__all__ = ["create_app", "running_server", "add_serve_arguments", "run_serve"]

logger = logging.getLogger("llava_uhd.serve")


def create_app(model, processor, model_name: str, limits=None, max_batch_size: int = 16, max_queue: int = 64):
    """The FastAPI app serving ``model`` (eval mode) as ``model_name``; the engine starts and stops with it."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from ..image_io import load_rgb, rgb_size
    from ..modeling.context import check_context, context_limit
    from .engine import BatchingEngine, EngineBusy, EngineStopped, Job
    from .openai_api import APIError, Limits, chunk, completion, decode_image_url, error_body, parse_chat_request, \
        usage

    limits = limits or Limits()
    engine = BatchingEngine(model, processor, max_batch_size=max_batch_size, max_queue=max_queue)
    context = context_limit(model.config)
    image_processor = processor.image_processor

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)  # uvicorn has waited for the requests in flight

    app = FastAPI(title="llava-uhd", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.limits, app.state.model_name = engine, limits, model_name

    def refuse(error: APIError):
        headers = {"Retry-After": "1"} if error.status == 503 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return refuse(error)

    @app.exception_handler(HTTPException)
    async def _http_error(request, error: HTTPException):
        return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, error: Exception):  # logged here, never sent: no traceback leaves the server
        logger.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body("internal error", "server_error"), status_code=500)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(413, f"the request body is larger than {limits.max_body_bytes} bytes", None,
                           "request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limits.max_body_bytes:
                raise APIError(413, f"the request body is larger than {limits.max_body_bytes} bytes", None,
                               "request_too_large")
        return bytes(body)

    def load_image(k: int, url: str, max_slices: int | None):
        data = decode_image_url(url, limits)
        try:
            return load_rgb(data, image_processor.max_pixels, keep_pixels=image_processor.keep_pixels(max_slices))
        except ValueError as e:
            too_large = "exceeds max_pixels" in str(e)
            raise APIError(413 if too_large else 400, f"image {k}: {e}", "image_url",
                           "image_too_large" if too_large else "invalid_image") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await read_body(request)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        chat = parse_chat_request(body, limits, model_name)
        images = [await run_in_threadpool(load_image, k, url, chat.max_slices) for k, url in enumerate(chat.image_urls)]
        try:
            prompt = processor.render_chat(chat.messages)
        except Exception as e:  # the chat template refused the conversation (roles out of order, ...)
            raise APIError(400, f"the conversation does not fit the chat template: {e}", "messages") from None
        sizes = [rgb_size(im) for im in images]
        prompt_tokens = processor.count_prompt_tokens(prompt, sizes, chat.max_slices)
        try:
            check_context([prompt_tokens], chat.settings.max_new_tokens, context)
        except ValueError as e:
            raise APIError(400, str(e), "messages", "context_length_exceeded") from None

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(prompt, images, chat.settings, chat.stop, chat.max_slices,
                  on_text=lambda piece: loop.call_soon_threadsafe(events.put_nowait, piece),
                  on_done=lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
        try:
            engine.submit(job)
        except EngineBusy as e:
            raise APIError(503, f"the server is busy ({e}); retry shortly", None, "overloaded", "server_error")
        except EngineStopped as e:
            raise APIError(503, str(e), None, "shutting_down", "server_error")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"

        def result():
            if job.error is not None:
                logger.error("request %s failed: %s", request_id, job.error)
                raise APIError(500, "generation failed", None, "generation_failed", "server_error")
            return job.text, job.finish_reason, usage(prompt_tokens, job.completion_tokens)

        if not chat.stream:
            while True:
                try:
                    if await asyncio.wait_for(events.get(), timeout=0.5) is None:
                        break
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse({}, status_code=499)
            text, finish, used = result()
            return completion(request_id, model_name, text, finish, used["prompt_tokens"],
                              used["completion_tokens"])

        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        async def stream():
            finished = False
            try:
                yield event(chunk(request_id, model_name, content="", role="assistant"))
                while (piece := await events.get()) is not None:
                    yield event(chunk(request_id, model_name, content=piece))
                finished = True
                if job.error is not None:
                    logger.error("request %s failed: %s", request_id, job.error)
                    yield event(error_body("generation failed", "server_error", None, "generation_failed"))
                else:
                    yield event(chunk(request_id, model_name, finish_reason=job.finish_reason))
                    if chat.include_usage:
                        yield event(chunk(request_id, model_name, usage_=usage(prompt_tokens, job.completion_tokens)))
                yield "data: [DONE]\n\n"
            finally:
                if not finished:  # the client went away: stop decoding for it
                    job.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "llava-uhd"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queued": engine.queued}

    @app.get("/v1/plan")
    async def plan(width: str = "", height: str = "", max_slices: str | None = None):
        values = {}
        for name, text in (("width", width), ("height", height), ("max_slices", max_slices)):
            if text is None:
                continue
            if not text.isdigit() or int(text) < 1:
                raise APIError(400, f"{name} must be a positive integer, got {text!r}", name)
            values[name] = int(text)
        if "width" not in values or "height" not in values:
            raise APIError(400, "give width and height", "width")
        w, h, cap = values["width"], values["height"], values.get("max_slices")
        try:
            layout = image_processor.plan(w, h, cap)
        except ValueError as e:
            raise APIError(400, str(e), "width") from None
        d = layout.to_dict(processor.num_queries)
        return {"width": w, "height": h, "cols": d["cols"], "rows": d["rows"], "slices": d["slices"],
                "overview": d["overview"], "patches": layout.num_patches,
                "tokens": processor.num_image_tokens(w, h, cap)}

    page = resources.files(__package__).joinpath("static/index.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    return app


@contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60):
    """``app`` served by uvicorn in a thread of this process (tests, benchmarks, scripts): yields the base URL
    (``port`` 0: a free one), and shuts the server down gracefully on exit."""
    import socket
    import threading
    import time

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="llava-uhd-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``llava-uhd serve``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=non_negative_int, default=8000, help="port (default 8000; 0: any free)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: llava-uhd-nano, or the --model folder's name)")
    parser.add_argument("--max-batch-size", type=positive_int, default=16,
                        help="most requests decoded together (default 16; 1 answers one at a time)")
    parser.add_argument("--max-queue", type=positive_int, default=64,
                        help="most requests waiting; more are answered 503 with Retry-After (default 64)")
    parser.add_argument("--max-tokens", type=positive_int, default=1024,
                        help="largest max_tokens a request may ask for (default 1024)")
    parser.add_argument("--max-images", type=positive_int, default=8, help="most images in a request (default 8)")
    parser.add_argument("--max-image-bytes", type=positive_int, default=20 << 20,
                        help="largest encoded image in bytes (default 20 MiB)")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs (10 s timeout, --max-image-bytes); refused by default")
    add_model_arguments(parser)
    return parser


def _serve(args) -> int:
    from .openai_api import Limits

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise CommandError(f"needs the 'serve' extra ({e.name} is not installed): pip install 'llava-uhd[serve]'")
    prepare_runtime(args)
    model, processor, info = load_from_args(args, "llava-uhd serve")
    name = args.served_model_name or ("llava-uhd-nano" if info.get("builtin") else Path(args.model).name)
    limits = Limits(max_body_bytes=max(32 << 20, 2 * args.max_image_bytes * args.max_images),
                    max_image_bytes=args.max_image_bytes, max_images=args.max_images, max_tokens=args.max_tokens,
                    allow_remote_images=args.allow_remote_images)
    app = create_app(model, processor, name, limits, args.max_batch_size, args.max_queue)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def run_serve(args) -> int:
    """``llava-uhd serve``: 0 when the server stops, 2 on a usage error."""
    return run_command("llava-uhd serve", _serve, args)
