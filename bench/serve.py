"""Benchmark the OpenAI-compatible server (`llava_uhd.serve.server`): batching on vs one request at a time.

One process loads the built-in nano model once (CPU, ``--dtype`` float32 by default) and serves it twice, each
under uvicorn on a free 127.0.0.1 port in a thread (as ``tests/test_server.py`` does): **batched**
(``max_batch_size=16``: the engine decodes every compatible queued request together) and **one-at-a-time**
(``max_batch_size=1``). Closed-loop clients (threads, the standard library's ``http.client``, one keep-alive
connection each) send ``POST /v1/chat/completions`` back to back: a synthetic single-shape picture
(`llava_uhd.data.probes.probe_sample`, ``--size`` 336x224 by default: 2 slices + overview, 50 visual tokens) as a
base64 PNG ``data:`` URL and one of the nano model's questions (colour, shape, quarter), six different pictures so
batches mix, ``max_tokens`` (``--max-tokens`` 8), temperature 0. The nano model answers in one word, so a request
is about 2-3 completion tokens (the word and the end of sequence): the work is the vision tower and the prefill.

For every concurrency level (``--concurrency 1,4,16``) and round (``--repeats``) the two systems run alternately
(batched, one-at-a-time, batched, ...), so a slow spell of the shared machine hits both alike. Each run sends
``--requests-per-client`` requests per client (at least ``--min-requests`` per run in all), or runs for
``--seconds`` (clients stop sending then; what is in flight is waited for). Reported per system and level:
requests/s (median over rounds; completed requests / wall time of the run), p50 and p99 latency over every request
of that system and level (client side: send to last byte), the mean batch size the engine formed
(``app.state.engine.batches``) and the completion tokens per answer; per level the ratio batched / one-at-a-time
of requests/s in each round (median, min) and of p99 latency (< 1: batched is better). Every answer is checked
against the same question's answer from the other system (greedy batched decoding must give what it gives alone).
The 1-minute load average is printed at the start and the end, with the machine and package versions.

Usage (from the repository root; ``PYTHONPATH=src`` if the package is not installed)::

    .venv/bin/python bench/serve.py                                   # defaults: 1,4,16 clients, 3 rounds (~7.5 min)
    .venv/bin/python bench/serve.py --quick                           # smoke run (~1 min)
    .venv/bin/python bench/serve.py --dtype bfloat16 --json bench/serve_cpu_bf16.json
    .venv/bin/python bench/serve.py --concurrency 16 --seconds 20 --repeats 2 --json serve.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import statistics
import sys
import threading
import time
from collections import Counter
from http.client import HTTPConnection
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

SYSTEMS = {"batched": 16, "one-at-a-time": 1}  # name -> max_batch_size
KINDS = ("probe_colour", "probe_shape", "probe_where")


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def make_requests(n: int, size: tuple[int, int], max_tokens: int) -> list[dict]:
    """``n`` request bodies: probe pictures of ``size`` (seeds 0..n-1), the three question kinds in turn."""
    from llava_uhd.data.probes import SyntheticDataSettings, probe_sample

    settings = SyntheticDataSettings()
    bodies = []
    for k in range(n):
        sample = probe_sample(k, KINDS[k % len(KINDS)], settings, size=size)
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"model": "llava-uhd-nano", "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": sample.question}]}]}
        bodies.append({"payload": json.dumps(body).encode(), "truth": sample.answer, "kind": sample.kind,
                       "png_bytes": len(buf.getvalue())})
    return bodies


class Client(threading.Thread):
    """One closed-loop client: sends request bodies back to back on one keep-alive connection."""

    def __init__(self, port: int, bodies: list[dict], offset: int, count: int | None, until: float | None,
                 start: threading.Barrier):
        super().__init__(daemon=True)
        self.port, self.bodies, self.offset, self.count, self.until, self.start_barrier = \
            port, bodies, offset, count, until, start
        self.records: list[dict] = []

    def _post(self, conn: HTTPConnection, payload: bytes) -> tuple[int, bytes]:
        conn.request("POST", "/v1/chat/completions", body=payload, headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()

    def run(self) -> None:
        conn = HTTPConnection("127.0.0.1", self.port, timeout=600)
        self.start_barrier.wait()
        k = 0
        try:
            while True:
                if self.count is not None and k >= self.count:
                    break
                if self.until is not None and time.perf_counter() >= self.until:
                    break
                index = (self.offset + k) % len(self.bodies)
                t0 = time.perf_counter()
                try:
                    status, raw = self._post(conn, self.bodies[index]["payload"])
                except (OSError, ConnectionError):  # a dropped keep-alive connection: once more on a new one
                    conn.close()
                    conn = HTTPConnection("127.0.0.1", self.port, timeout=600)
                    status, raw = self._post(conn, self.bodies[index]["payload"])
                t1 = time.perf_counter()
                record = {"index": index, "start": t0, "end": t1, "latency": t1 - t0, "status": status}
                if status == 200:
                    reply = json.loads(raw)
                    record["text"] = reply["choices"][0]["message"]["content"]
                    record["completion_tokens"] = reply["usage"]["completion_tokens"]
                    record["prompt_tokens"] = reply["usage"]["prompt_tokens"]
                self.records.append(record)
                k += 1
        finally:
            conn.close()


def run_level(port: int, engine, bodies: list[dict], clients: int, per_client: int | None,
              seconds: float | None, first: int) -> dict:
    """One run: ``clients`` closed-loop clients against one server; its requests/s, latencies and batches."""
    barrier = threading.Barrier(clients + 1)
    batches_before = len(engine.batches)
    threads = [Client(port, bodies, first + c * 7, per_client, None, barrier) for c in range(clients)]
    for t in threads:
        t.start()
    if seconds is not None:  # the clients read it after the barrier
        until = time.perf_counter() + seconds
        for t in threads:
            t.until = until
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    t1 = time.perf_counter()
    records = [r for t in threads for r in t.records]
    ok = [r for r in records if r["status"] == 200]
    batches = list(engine.batches[batches_before:])
    return {"clients": clients, "requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
            "wall_s": t1 - t0, "rps": len(ok) / (t1 - t0),
            "latencies": [r["latency"] for r in ok],
            "answers": [(r["index"], r.get("text")) for r in ok],
            "completion_tokens": [r["completion_tokens"] for r in ok],
            "prompt_tokens": sorted({r["prompt_tokens"] for r in ok}),
            "batches": batches, "load1": _load1()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,16", help="concurrent client counts (default 1,4,16)")
    parser.add_argument("--requests-per-client", type=int, default=8,
                        help="requests each client sends per run (default 8)")
    parser.add_argument("--min-requests", type=int, default=16,
                        help="at least this many requests per run in all: more per client at low concurrency "
                             "(default 16)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="run each (system, level, round) for this many seconds instead of a request count")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, systems alternating in each (default 3)")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens of every request (default 8)")
    parser.add_argument("--size", default="336x224", help="picture size WxH (default 336x224)")
    parser.add_argument("--images", type=int, default=6, help="different pictures / questions (default 6)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the model's dtype, both systems (default float32; bfloat16 uses AMX / AVX-512 BF16 "
                             "where the CPU has them)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the batched server's batch cap (default 16)")
    parser.add_argument("--json", default=None, help="write every number (and each request's latency) here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1,4,16 clients, 1 round, 2 requests per client (at least 4 per run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.requests_per_client, args.min_requests = 1, 2, 4
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    width, height = (int(v) for v in args.size.lower().split("x"))
    SYSTEMS["batched"] = args.max_batch_size

    load_start = _load1()
    t_start = time.perf_counter()
    import logging

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    from llava_uhd.runinfo import machine, versions
    from llava_uhd.serve.loading import load_model
    from llava_uhd.serve.openai_api import Limits
    from llava_uhd.serve.server import create_app, running_server

    info_machine, info_versions = machine("cpu"), versions(("llava-uhd", "torch", "transformers", "fastapi",
                                                             "uvicorn", "starlette", "pillow"))
    print(f"machine: {info_machine['cpu']}, {info_machine['cpu_count']} CPUs, {args.threads} torch threads, "
          f"Python {info_machine['python']}", flush=True)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info_versions.items()), flush=True)
    print(f"load average (1 min) at start: {load_start}", flush=True)

    t0 = time.perf_counter()
    model, processor, info = load_model(None, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    print(f"loaded {info['name']} ({args.dtype}) in {load_s:.1f} s", flush=True)
    bodies = make_requests(args.images, (width, height), args.max_tokens)
    tokens = processor.num_image_tokens(width, height, None)
    print(f"{args.images} requests: {width}x{height} PNG ({bodies[0]['png_bytes']} bytes), {tokens} visual tokens, "
          f"max_tokens {args.max_tokens}", flush=True)

    apps = {name: create_app(model, processor, info["name"], Limits(), max_batch_size=size, max_queue=64)
            for name, size in SYSTEMS.items()}
    runs: list[dict] = []
    with running_server(apps["batched"]) as url_b, running_server(apps["one-at-a-time"]) as url_1:
        port_b, port_1 = (int(url.rsplit(":", 1)[1]) for url in (url_b, url_1))
        ports = {"batched": port_b, "one-at-a-time": port_1}
        # warm-up: one request alone and one full batch on each server (first calls allocate and pick kernels)
        for name in SYSTEMS:
            engine = apps[name].state.engine
            for clients in (1, max(levels)):
                run_level(ports[name], engine, bodies, clients, 1, None, 0)
        print(f"warm-up done ({time.perf_counter() - t_start:.0f} s since start); load {_load1()}", flush=True)
        first = 0
        for rnd in range(args.repeats):
            for clients in levels:
                per_client = None if args.seconds else max(args.requests_per_client,
                                                           math.ceil(args.min_requests / clients))
                for name in SYSTEMS:
                    r = run_level(ports[name], apps[name].state.engine, bodies, clients, per_client, args.seconds,
                                  first)
                    r.update(system=name, round=rnd)
                    runs.append(r)
                    mean_batch = statistics.mean(r["batches"]) if r["batches"] else float("nan")
                    print(f"round {rnd + 1}/{args.repeats}  {clients:>2} clients  {name:<13}  {r['ok']:>4} ok "
                          f"{r['errors']} err  {r['wall_s']:6.1f} s  {r['rps']:6.2f} req/s  "
                          f"p50 {_percentile(r['latencies'], 50):5.2f} s  p99 {_percentile(r['latencies'], 99):5.2f} s"
                          f"  mean batch {mean_batch:4.1f}  load {r['load1']}", flush=True)
                first += 1
    load_end = _load1()
    total_s = time.perf_counter() - t_start

    # ---------------------------------------------------------------------------------------------- summary
    summary = []
    answers: dict[tuple[str, int], Counter] = {}
    for r in runs:
        for index, text in r["answers"]:
            answers.setdefault((r["system"], index), Counter())[text] += 1
    for clients in levels:
        rows = {}
        for name in SYSTEMS:
            mine = [r for r in runs if r["system"] == name and r["clients"] == clients]
            lat = [x for r in mine for x in r["latencies"]]
            batches = [b for r in mine for b in r["batches"]]
            toks = [t for r in mine for t in r["completion_tokens"]]
            rows[name] = {"system": name, "clients": clients, "requests": sum(r["ok"] for r in mine),
                          "errors": sum(r["errors"] for r in mine),
                          "rps_median": statistics.median(r["rps"] for r in mine),
                          "rps_rounds": [r["rps"] for r in mine],
                          "p50_s": _percentile(lat, 50), "p99_s": _percentile(lat, 99), "max_s": max(lat),
                          "mean_batch": statistics.mean(batches) if batches else None,
                          "batch_sizes": dict(sorted(Counter(batches).items())),
                          "completion_tokens_mean": statistics.mean(toks) if toks else None}
        b, o = rows["batched"], rows["one-at-a-time"]
        ratios = [x / y for x, y in zip(b["rps_rounds"], o["rps_rounds"])]
        summary.append({"clients": clients, "systems": rows, "rps_ratio_rounds": ratios,
                        "rps_ratio_median": statistics.median(ratios), "rps_ratio_min": min(ratios),
                        "p99_ratio": b["p99_s"] / o["p99_s"]})
    asked = sorted({index for (_, index) in answers})
    mismatches = sum(1 for index in asked
                     if len(set(answers.get(("batched", index), ())) | set(answers.get(("one-at-a-time", index), ())))
                     > 1)
    correct = {name: sum(1 for index in asked if answers.get((name, index)) and
                         answers[(name, index)].most_common(1)[0][0].strip().lower() == bodies[index]["truth"])
               for name in SYSTEMS}

    print()
    print(f"load average (1 min): {load_start} at start, {load_end} at the end; {total_s:.0f} s in all")
    print()
    print("| clients | system | requests | req/s (median of rounds) | p50 s | p99 s | mean batch | "
          "batched / one-at-a-time req/s (median, min) | p99 batched / one-at-a-time |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        for name in SYSTEMS:
            row = s["systems"][name]
            ratio = (f"**{s['rps_ratio_median']:.2f}x** ({s['rps_ratio_min']:.2f}x)" if name == "batched" else "")
            p99r = f"{s['p99_ratio']:.2f}" if name == "batched" else ""
            mean_batch = f"{row['mean_batch']:.1f}" if row["mean_batch"] is not None else ""
            print(f"| {s['clients']} | {name} | {row['requests']} | {row['rps_median']:.2f} | {row['p50_s']:.2f} | "
                  f"{row['p99_s']:.2f} | {mean_batch} | {ratio} | {p99r} |")
    print()
    for s in summary:
        for name in SYSTEMS:
            row = s["systems"][name]
            print(f"{s['clients']:>2} clients {name:<13} batch sizes {row['batch_sizes']}  errors {row['errors']}  "
                  f"completion tokens per answer {row['completion_tokens_mean']:.2f}")
    print(f"answers: {mismatches} of {len(asked)} questions answered differently (by either system, in any run); "
          "right (the nano model vs the picture's truth): "
          + ", ".join(f"{name} {n}/{len(asked)}" for name, n in correct.items()))
    top = summary[-1]
    print(f"target at {top['clients']} clients: batched req/s >= 2x one-at-a-time: "
          f"{'met' if top['rps_ratio_median'] >= 2 else 'not met'} ({top['rps_ratio_median']:.2f}x median, "
          f"{top['rps_ratio_min']:.2f}x min); p99 no worse: {'met' if top['p99_ratio'] <= 1 else 'not met'} "
          f"({top['p99_ratio']:.2f})")

    if args.json:
        record = {"args": vars(args), "machine": info_machine, "versions": info_versions, "model": info["name"],
                  "load_model_s": load_s, "load1_start": load_start, "load1_end": load_end, "total_s": total_s,
                  "request": {"size": [width, height], "visual_tokens": tokens, "images": len(bodies),
                              "kinds": [b["kind"] for b in bodies], "truth": [b["truth"] for b in bodies]},
                  "summary": summary, "answers_mismatched": mismatches, "answers_right": correct,
                  "runs": [{k: v for k, v in r.items() if k != "answers"} for r in runs]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
