"""How long the light entry points take to start, in fresh processes, against the bare interpreter and against
importing torch + transformers (what ``import llava_uhd`` cost before it became lazy).

    python bench/startup.py [--repeats 7] [--json startup.json]

Each repeat runs every command once, in the same order (interleaved, so load on a shared machine hits all of
them alike), and times the whole process. Prints per command the median and minimum wall time and the median and
minimum of the per-repeat ratio to ``python -c pass``, with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _commands(image: str) -> dict[str, list[str]]:
    py = sys.executable
    cli = [py, "-m", "llava_uhd.cli"]
    return {
        "python -c pass (baseline)": [py, "-c", "pass"],
        "import llava_uhd": [py, "-c", "import llava_uhd"],
        "llava-uhd --help": [*cli, "--help"],
        "llava-uhd slice IMG --json": [*cli, "slice", image, "--json"],
        "llava-uhd cost --width 672 --height 1008": [*cli, "cost", "--width", "672", "--height", "1008"],
        "import torch, transformers (reference)": [py, "-c", "import torch, transformers"],
    }


def _time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)
    src = Path(__file__).resolve().parent.parent / "src"
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{src}{os.pathsep}{env_path}" if env_path else str(src)
    with tempfile.TemporaryDirectory() as tmp:
        image = str(Path(tmp) / "example.png")
        subprocess.run([sys.executable, "-m", "llava_uhd.cli", "example-image", image], check=True,
                       stdout=subprocess.DEVNULL)
        commands = _commands(image)
        for cmd in commands.values():  # warm the file cache
            _time(cmd)
        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                times[name].append(_time(cmd))
        load_after = os.getloadavg()[0]
    base = times["python -c pass (baseline)"]
    rows = []
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        rows.append({"command": name, "median_s": statistics.median(ts), "min_s": min(ts),
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios)})
    print(f"{args.repeats} repeats, {os.cpu_count()} CPUs, load average {load_before:.2f} before, {load_after:.2f} "
          "after")
    print(f"{'command':<45}{'median s':>10}{'min s':>8}{'x baseline (median)':>22}{'(min)':>7}")
    for r in rows:
        print(f"{r['command']:<45}{r['median_s']:>10.3f}{r['min_s']:>8.3f}{r['ratio_median']:>22.2f}"
              f"{r['ratio_min']:>7.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"repeats": args.repeats, "cpus": os.cpu_count(),
                                                   "loadavg": [load_before, load_after], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
