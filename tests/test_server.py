"""``llava-uhd serve`` (`llava_uhd.serve.server`, `engine`, `openai_api`): a tiny model behind real sockets on
127.0.0.1, driven by the official ``openai`` client and by raw HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import free_port
from serve_helpers import picture, save_tiny

from llava_uhd.serve.generation import GenerationSettings, generate
from llava_uhd.serve.openai_api import Limits
from llava_uhd.serve.server import create_app, running_server

NAME = "tiny-llava-uhd"


def _data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _message(question: str, *images) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": _data_url(im)}} for im in images),
                                         {"type": "text", "text": question}]}]


class Reply:
    """A raw HTTP answer (the standard library's http.client: no HTTP package of the client side is assumed)."""

    def __init__(self, status: int, headers, body: bytes):
        self.status_code, self.headers, self.content = status, {k.lower(): v for k, v in headers}, body

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self):
        return json.loads(self.content)


def _http(method: str, url: str, json_body=None, content: bytes | None = None, params: dict | None = None,
          timeout: float = 300) -> Reply:
    from http.client import HTTPConnection
    from urllib.parse import urlencode, urlsplit

    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{urlencode(params)}" if params else "")
    body = json.dumps(json_body).encode() if json_body is not None else content
    connection = HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers={"content-type": "application/json"} if body else {})
        response = connection.getresponse()
        return Reply(response.status, response.getheaders(), response.read())
    finally:
        connection.close()


def _get(url, **kw) -> Reply:
    return _http("GET", url, **kw)


def _post_json(url, body, timeout: float = 300) -> Reply:
    return _http("POST", url, json_body=body, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-serve")
    model, processor = save_tiny(folder)
    return folder, model.eval(), processor


@pytest.fixture(scope="module")
def server(tiny):
    _, model, processor = tiny
    limits = Limits(max_body_bytes=400_000, max_image_bytes=60_000, max_images=3, max_tokens=600)
    app = create_app(model, processor, NAME, limits, max_batch_size=16, max_queue=64)
    with running_server(app) as url:
        yield url, app


def _alone(model, processor, question: str, images, max_new_tokens: int) -> str:
    """The greedy answer of one request through `generate` alone (no server, no batch)."""
    prompt = processor.render_chat([{"role": "user", "content": [{"type": "image"}] * len(images)
                                     + [{"type": "text", "text": question}]}])
    return generate(model, processor, [prompt], [list(images)], GenerationSettings(max_new_tokens=max_new_tokens)
                    ).results[0]


def test_the_openai_client_works_unchanged(server, tiny):
    from openai import OpenAI

    url, _ = server
    _, model, processor = tiny
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [NAME]
    images = [picture(90, 50, 0), picture(40, 120, 1)]
    want = _alone(model, processor, "Which one?", images, 6)
    reply = client.chat.completions.create(model=NAME, messages=_message("Which one?", *images), max_tokens=6,
                                           temperature=0)
    assert reply.choices[0].message.content == want.text
    assert reply.choices[0].finish_reason in ("stop", "length")
    # usage counts the image tokens: the same count the processor gives the batch
    assert reply.usage.prompt_tokens == want.prompt_tokens > 2 * processor.num_queries
    assert reply.usage.completion_tokens == len(want.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    stream = client.chat.completions.create(model=NAME, messages=_message("Which one?", *images), max_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens and not chunks[-1].choices


def test_multi_turn_and_max_slices(server, tiny):
    url, _ = server
    _, model, processor = tiny
    image = picture(300, 200, 2)
    messages = _message("What?", image) + [{"role": "assistant", "content": "red"},
                                           {"role": "user", "content": "And now?"}]
    body = {"model": NAME, "messages": messages, "max_tokens": 4, "max_slices": 2}
    reply = _post_json(f"{url}/v1/chat/completions", body).json()
    prompt = processor.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                                    {"role": "assistant", "content": "red"}, {"role": "user", "content": "And now?"}])
    want = generate(model, processor, [prompt], [[image]], GenerationSettings(max_new_tokens=4), max_slices=2)
    assert reply["choices"][0]["message"]["content"] == want.results[0].text
    assert reply["usage"]["prompt_tokens"] == want.results[0].prompt_tokens
    # the cap shows in the count: fewer slices, fewer tokens
    uncapped = _post_json(f"{url}/v1/chat/completions", {**body, "max_slices": None}).json()
    assert uncapped["usage"]["prompt_tokens"] > reply["usage"]["prompt_tokens"]


def test_stop_strings_cut_the_answer(server, tiny):
    url, _ = server
    _, model, processor = tiny
    images = [picture(90, 50, 0)]
    full = _alone(model, processor, "Which one?", images, 12).text
    assert len(full) > 4
    stop = full[2:4]
    reply = _post_json(f"{url}/v1/chat/completions", {
        "model": NAME, "messages": _message("Which one?", *images), "max_tokens": 12, "stop": [stop]}).json()
    assert reply["choices"][0]["message"]["content"] == full[:full.index(stop)].rstrip()
    assert reply["choices"][0]["finish_reason"] == "stop"


def _post(url, body=None, content=None):
    r = _http("POST", f"{url}/v1/chat/completions", json_body=body, content=content)
    return r.status_code, r.json()


def _noise_png(width: int, height: int) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return _data_url(Image.fromarray(pixels))


def _bad_requests():
    from conftest import png_bomb

    bomb = "data:image/png;base64," + base64.b64encode(png_bomb(20000, 20000)).decode()
    text = "data:text/plain;base64," + base64.b64encode(b"hello, not an image").decode()
    small = _data_url(picture(30, 20))

    def ask(*urls, **extra):
        content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "Hi?"}]
        return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}

    return [
        ("malformed JSON", None, b"{not json", 400, "not valid JSON"),
        ("body too large", None, b"{" + b" " * 500_000 + b"}", 413, "larger than 400000 bytes"),
        ("image bytes", ask(_noise_png(200, 200)), None, 413, "larger than 60000 bytes"),
        ("decompression bomb", ask(bomb), None, 413, "20000x20000 = 400000000 pixels exceeds max_pixels"),
        ("too many images", ask(small, small, small, small), None, 400, "4 images in one request; at most 3"),
        ("past the context", ask(small, max_tokens=500), None, 400, "past the model's context of 512 tokens"),
        ("max_tokens 0", ask(small, max_tokens=0), None, 400, "max_tokens must be an integer from 1 to 600"),
        ("max_tokens too many", ask(small, max_tokens=601), None, 400, "max_tokens must be an integer from 1 to 600"),
        ("bad data URL", ask("data:image/png;base64,@@@"), None, 400, "base64 payload is malformed"),
        ("unencoded data URL", ask("data:image/png,raw"), None, 400, "must be base64 encoded"),
        ("not an image", ask(text), None, 400, "image 0: not an image"),
        ("unknown model", {**ask(small), "model": "gpt-4o"}, None, 404, "the model 'gpt-4o' does not exist"),
        ("remote image", ask("https://example.org/cat.png"), None, 400, "remote image URLs are refused"),
        ("no messages", {"model": NAME, "messages": []}, None, 400, "messages must be a non-empty list"),
        ("bad role", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, None, 400, "role"),
        ("temperature", ask(small, temperature=-1), None, 400, "temperature must be a number from 0 to 2"),
        ("n", ask(small, n=2), None, 400, "n must be 1"),
        ("empty question", {"model": NAME, "messages": [{"role": "user", "content": " "}]}, None, 400, "no text"),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_every_bad_input_gets_its_status_and_message(server, case):
    url, _ = server
    _, body, content, status, message = case
    code, reply = _post(url, body, content)
    assert code == status, reply
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    assert message in reply["error"]["message"], reply
    assert "Traceback" not in json.dumps(reply)


def test_other_paths_and_health(server):
    url, _ = server
    r = _get(f"{url}/nowhere")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    assert _get(f"{url}/health").json() == {"status": "ok", "model": NAME, "queued": 0}
    plan = _get(f"{url}/v1/plan", params={"width": 672, "height": 1008}).json()
    assert (plan["cols"], plan["rows"], len(plan["slices"])) == (2, 3, 6)
    assert _get(f"{url}/v1/plan", params={"width": 0, "height": 5}).status_code == 400
    page = _get(url)
    assert page.status_code == 200 and "<canvas id=\"canvas\">" in page.text


def test_50_concurrent_requests_are_batched_and_each_equals_its_answer_alone(server, tiny):
    url, app = server
    _, model, processor = tiny
    cases = [(q, picture(w, h, seed)) for q, (w, h), seed in
             zip(["Which one?", "What colour?", "Where?", "How many?", "What is it?"],
                 [(90, 50), (40, 120), (200, 200), (64, 64), (300, 100)], range(5))]
    alone = [_alone(model, processor, q, [im], 5).text for q, im in cases]
    bodies = [{"model": NAME, "messages": _message(q, im), "max_tokens": 5} for q, im in cases]
    before = len(app.state.engine.batches)

    def one(k):
        r = _post_json(f"{url}/v1/chat/completions", bodies[k % 5])
        return r.status_code, r.json()

    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(one, range(50)))
    assert all(code == 200 for code, _ in replies), [r for c, r in replies if c != 200][:2]
    assert [r["choices"][0]["message"]["content"] for _, r in replies] == [alone[k % 5] for k in range(50)]
    sizes = app.state.engine.batches[before:]
    assert sum(sizes) == 50 and max(sizes) > 1 and len(sizes) < 50  # decoded together, not one at a time
    assert _get(f"{url}/health").json()["status"] == "ok"


def test_a_full_queue_answers_503_with_retry_after(tiny):
    _, model, processor = tiny
    app = create_app(model, processor, NAME, Limits(), max_batch_size=1, max_queue=1)
    body = {"model": NAME, "messages": _message("Which one?", picture(90, 50)), "max_tokens": 40}
    with running_server(app) as url:
        def one(_):
            r = _post_json(f"{url}/v1/chat/completions", body)
            return r.status_code, r.headers.get("retry-after"), r.json()

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(one, range(8)))
    busy = [r for r in replies if r[0] == 503]
    assert busy and all(retry == "1" and "busy" in reply["error"]["message"] for _, retry, reply in busy)
    assert any(code == 200 for code, _, _ in replies)


def test_a_client_that_disconnects_stops_costing_compute(server, tiny):
    url, app = server
    engine = app.state.engine
    body = {"model": NAME, "messages": _message("Tell me everything.", picture(40, 40)), "max_tokens": 300,
            "stream": True}
    from http.client import HTTPConnection
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                       headers={"content-type": "application/json"})
    response = connection.getresponse()
    while True:
        line = response.readline().decode()
        if line.startswith("data: ") and '"content": ""' not in line:
            break  # the first piece of text: go away
    connection.close()
    deadline = time.time() + 60
    while not any(reason == "cancelled" for reason, _ in engine.finished):
        assert time.time() < deadline, list(engine.finished)[-3:]
        time.sleep(0.05)
    tokens = [n for reason, n in engine.finished if reason == "cancelled"][-1]
    assert tokens < 300


def _serve_process(folder, port):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "llava_uhd", "serve", "--model", str(folder), "--port", str(port),
                             "--served-model-name", NAME, "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
def test_sigterm_finishes_the_requests_in_flight_and_refuses_new_ones(tiny):
    folder, model, processor = tiny
    port = free_port()
    process = _serve_process(folder, port)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if _get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        images = [picture(90, 50, k) for k in range(6)]
        want = [_alone(model, processor, "Which one?", [im], 30).text for im in images]
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(_post_json, f"{url}/v1/chat/completions",
                                   {"model": NAME, "messages": _message("Which one?", im), "max_tokens": 30})
                       for im in images]
            time.sleep(1.0)  # the requests are in: some decoding, some queued
            process.send_signal(signal.SIGTERM)
            replies = [f.result() for f in futures]
        assert [r.status_code for r in replies] == [200] * 6
        assert [r.json()["choices"][0]["message"]["content"] for r in replies] == want
        assert process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has finished
        assert "Finished server process" in process.stdout.read()
        with pytest.raises(OSError):
            _get(f"{url}/health", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _chromium():
    """A headless Chromium driven by Selenium (Debian's chromium and chromium-driver; `.ci/run` installs them)."""
    import shutil

    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("chromium and chromedriver are not installed (.ci/run installs them: apt-get install chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,1200"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_the_web_page_draws_the_slices_and_streams_the_answer(server, tiny, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from llava_uhd.slicing import plan_slices

    url, _ = server
    _, model, processor = tiny
    image = picture(672, 1008, 3)
    image.save(tmp_path / "photo.png")
    config = processor.image_processor.slice_config
    want_slices = len(plan_slices(672, 1008, config).slices)
    want = _alone(model, processor, "What colour?", [image], 64).text
    assert want.strip()
    browser = _chromium()
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.ID, "model").text == NAME)
        picker = browser.find_element(By.ID, "file")
        browser.execute_script("arguments[0].hidden = false", picker)
        picker.send_keys(str(tmp_path / "photo.png"))
        plan = wait.until(lambda b: b.find_element(By.ID, "plan") if b.find_element(By.ID, "plan").text else None)
        assert plan.get_attribute("data-slices") == str(want_slices) == "6"
        assert plan.get_attribute("data-tokens") == str(processor.num_image_tokens(672, 1008))
        assert "6 slices (2 cols x 3 rows) + overview" in plan.text
        canvas = browser.find_element(By.ID, "canvas")
        assert (int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))) == (600, 900)
        browser.find_element(By.ID, "question").send_keys("What colour?")
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda b: b.find_element(By.ID, "answer").get_attribute("data-done") == "1")
        assert browser.find_element(By.ID, "answer").text == want.strip()
        assert browser.find_element(By.ID, "status").text == ""
    finally:
        browser.quit()


def test_jpeg_webp_and_seeded_sampling(server, tiny):
    url, _ = server
    _, model, processor = tiny
    image = picture(120, 80, 4)
    answers = []
    for fmt in ("JPEG", "WEBP"):
        body = {"model": NAME, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(image, fmt)}}, {"type": "text", "text": "What?"}]}]}
        reply = _post_json(f"{url}/v1/chat/completions", body)
        assert reply.status_code == 200, reply.text
        answers.append(reply.json()["usage"]["prompt_tokens"])
    assert answers[0] == answers[1] == _alone(model, processor, "What?", [image], 1).prompt_tokens
    # sampling with a seed repeats; another seed (almost surely) differs at a high temperature
    body = {"model": NAME, "max_tokens": 8, "temperature": 2.0, "messages": _message("What?", image)}

    def sample(seed):
        return _post_json(f"{url}/v1/chat/completions", {**body, "seed": seed}).json()["choices"][0]["message"]

    assert sample(1) == sample(1) != sample(2)


def test_remote_images_only_when_allowed_with_a_size_limit(tiny, tmp_path):
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    _, model, processor = tiny
    picture(90, 50, 0).save(tmp_path / "small.png")
    (tmp_path / "large.bin").write_bytes(b"\0" * 70_000)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        app = create_app(model, processor, NAME, Limits(allow_remote_images=True, max_image_bytes=60_000))
        with running_server(app) as url:
            def ask(image_url):
                return _post_json(f"{url}/v1/chat/completions", {"model": NAME, "max_tokens": 3, "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                 {"type": "text", "text": "Which one?"}]}]})

            fetched = ask(f"{base}/small.png")
            assert fetched.status_code == 200
            assert fetched.json()["choices"][0]["message"]["content"] == \
                _alone(model, processor, "Which one?", [picture(90, 50, 0)], 3).text
            too_large = ask(f"{base}/large.bin")
            assert too_large.status_code == 413 and "larger than 60000 bytes" in too_large.json()["error"]["message"]
            missing = ask(f"{base}/missing.png")
            assert missing.status_code == 400 and "cannot fetch" in missing.json()["error"]["message"]
    finally:
        files.shutdown()


def test_serve_command_checks_its_extra_and_options(monkeypatch, capsys):
    import importlib.util

    from llava_uhd.cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real_find_spec(name, *a))
    assert main(["serve"]) == 2
    assert capsys.readouterr().err == ("llava-uhd serve: needs the 'serve' extra (not installed: uvicorn): "
                                       "pip install 'llava-uhd[serve]'\n")
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:
        main(["serve", "--max-batch-size", "0"])
    assert e.value.code == 2 and "argument --max-batch-size: must be >= 1, got 0" in capsys.readouterr().err
