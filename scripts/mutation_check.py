"""Mutation check of the core modules: how many small changes to the code (a ``<`` turned ``<=``, a constant
changed, a call argument dropped) the matching tests notice. A tool to run by hand, not part of CI (a module takes
minutes to an hour of CPU).

    pip install -e ".[mutation]"
    python scripts/mutation_check.py [MODULE ...] [--max-children 2] [--out results/mutation] [--keep]

MODULE is a name of `MODULES` (default: all of them). For each, `mutmut <https://mutmut.readthedocs.io>`_ (3.x)
runs in a scratch copy of the project, ``mutants/<module>/`` (git-ignored): ``src/`` and ``tests/`` are copied
there with a ``pyproject.toml`` whose ``[tool.mutmut]`` section mutates only the module's file(s) and runs only
its test files (``-m "not slow"``, hypothesis seeded). mutmut 3 mutates function bodies, one mutant at a time, and
runs, for each mutant, only the tests that called the mutated function.

Writes OUT/<module>.json (the counts, the time, every surviving mutant with its diff) and OUT/summary.json +
OUT/summary.md (a table over all modules run so far; a module not run this time keeps its last result). What the
survivors mean, module by module, is written by hand in OUT/README.md.

``--keep`` reuses the module's scratch copy and mutmut's recorded results (only mutants not yet tested are run);
without it the copy is made afresh, so edited sources and tests are picked up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> files to mutate, the pytest arguments that select its tests, and (optionally) the mutants to run, as
# mutmut's globs over "module.x_function__mutmut_N" names (all of the files' mutants when absent)
MODULES: dict[str, dict] = {
    "slicing": {"mutate": ["src/llava_uhd/slicing.py"], "tests": ["tests/test_slicing.py"]},
    "processing": {"mutate": ["src/llava_uhd/processing.py"], "tests": ["tests/test_processing.py"]},
    # test_processing.py: `from_backbones` is where the image processor meets a checkpoint's mean / std
    "image_processing": {"mutate": ["src/llava_uhd/image_processing.py"],
                         "tests": ["tests/test_image_processing.py", "tests/test_processing.py"]},
    "resampler": {"mutate": ["src/llava_uhd/modeling/resampler.py"], "tests": ["tests/test_resampler.py"]},
    "vision": {"mutate": ["src/llava_uhd/modeling/vision.py"],
               "tests": ["tests/test_vision.py", "tests/test_pos_embed.py"]},
    "templates": {"mutate": ["src/llava_uhd/data/templates.py"], "tests": ["tests/test_data.py"]},
    # resuming a run: which checkpoint it continues from, and the per-epoch sample order it replays
    "train_resume": {
        "mutate": ["src/llava_uhd/train/run.py", "src/llava_uhd/train/trainer.py"],
        "tests": ["tests/test_train.py::test_incomplete_checkpoint_is_skipped",
                  "tests/test_train.py::test_the_newest_checkpoint_is_the_largest_step_as_a_number",
                  "tests/test_trainer.py"],
        "functions": ["llava_uhd.train.run.x_last_complete_checkpoint__mutmut_*",
                      "llava_uhd.train.trainer.xǁEpochSamplerǁ*"],
    },
}

# what every mutant's test run gets: the fast set, hypothesis with a fixed seed (the same examples for every
# mutant, so a result can be reproduced), no pytest cache in the scratch copy
PYTEST_ARGS = ["-p", "no:cacheprovider", "-m", "not slow", "--hypothesis-seed=0"]

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", 37: "caught by type check",
          -11: "segfault", -9: "segfault", None: "not checked"}


def toml_list(values) -> str:
    return json.dumps([str(v) for v in values])  # a JSON list of strings is a TOML array


def prepare(name: str, spec: dict, work: Path, keep: bool, timeout_multiplier: float) -> None:
    if work.exists() and not keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache", "*.egg-info")
    for folder in ("src", "tests"):
        if not (work / folder).exists():
            shutil.copytree(ROOT / folder, work / folder, ignore=ignore)
    # the project's pytest settings (markers, warning filters) and mutmut's for this module
    section = "\n".join([
        "", "[tool.mutmut]",
        'source_paths = ["src/"]',
        f"only_mutate = {toml_list(spec['mutate'])}",
        f"pytest_add_cli_args = {toml_list(PYTEST_ARGS)}",
        f"pytest_add_cli_args_test_selection = {toml_list(spec['tests'])}",
        f"timeout_multiplier = {float(timeout_multiplier)}",
        "use_git_change_detection = false",
        "",
    ])
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + section)


def results_of(spec: dict, work: Path) -> dict[str, str]:
    """mutant name -> status, from mutmut's per-file records (``mutants/<file>.meta``)."""
    from fnmatch import fnmatch

    statuses = {}
    for path in spec["mutate"]:
        meta = work / "mutants" / (path + ".meta")
        if not meta.exists():
            continue
        for mutant, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if spec.get("functions") and not any(fnmatch(mutant, g) for g in spec["functions"]):
                continue
            statuses[mutant] = STATUS.get(code, "suspicious")
    return statuses


def diffs_of(mutants: list[str], work: Path, env: dict) -> dict[str, str]:
    if not mutants:
        return {}
    code = ("import json, sys\n"
            "from mutmut.mutation.diff_apply import get_diff_for_mutant\n"
            "print(json.dumps({m: get_diff_for_mutant(m) for m in json.loads(sys.argv[1])}))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(mutants)], cwd=work, env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        return {m: f"(no diff: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'mutmut failed'})"
                for m in mutants}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_module(name: str, args) -> dict:
    import mutmut

    spec = MODULES[name]
    work = args.workdir / name
    prepare(name, spec, work, args.keep, args.timeout_multiplier)
    # offline: a mutant that asks the Hub for a model (a path turned into None) fails at once instead of waiting on
    # the network until it times out
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONDONTWRITEBYTECODE": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children),
               *spec.get("functions", [])]
    print(f"[{name}] mutmut run in {work} ({' '.join(spec['tests'])})", flush=True)
    start = time.monotonic()
    with open(work / "mutmut.log", "w") as log:
        rc = subprocess.run(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - start
    statuses = results_of(spec, work)
    counts = Counter(statuses.values())
    survivors = sorted(m for m, s in statuses.items() if s != "killed")
    record = {
        "module": name,
        "mutated": spec["mutate"],
        "tests": spec["tests"],
        "functions": spec.get("functions"),
        "pytest_args": PYTEST_ARGS,
        "mutmut": mutmut.__version__,
        "exit_status": rc,
        "seconds": round(seconds, 1),
        "total": len(statuses),
        "killed": counts.get("killed", 0),
        "survived": counts.get("survived", 0),
        "timeout": counts.get("timeout", 0),
        "other": {k: v for k, v in counts.items() if k not in ("killed", "survived", "timeout")},
        "not_killed": {m: {"status": statuses[m], "diff": d} for m, d in diffs_of(survivors, work, env).items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    if rc != 0 or not statuses:
        tail = (work / "mutmut.log").read_text(errors="replace")[-3000:]
        record["log_tail"] = tail
        print(f"[{name}] mutmut exited with {rc}; the end of its log:\n{tail}", flush=True)
    print(f"[{name}] {record['killed']} killed, {record['survived']} survived, {record['timeout']} timeout, "
          f"{record['total']} in all ({seconds:.0f} s)", flush=True)
    return record


def write_summary(out: Path) -> None:
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "summary.json"]
    records.sort(key=lambda r: list(MODULES).index(r["module"]) if r["module"] in MODULES else 99)
    (out / "summary.json").write_text(json.dumps(
        {r["module"]: {k: r[k] for k in ("killed", "survived", "timeout", "total", "other", "seconds", "date")}
         for r in records}, indent=2) + "\n")
    lines = ["# Mutation check: summary", "",
             "Written by `scripts/mutation_check.py` (mutmut 3; each mutant against the module's tests, "
             "`-m \"not slow\"`). Not killed = survived + timeout + other; each module's survivors and their diffs "
             "are in `<module>.json`, what they mean in `README.md`.", "",
             "| module | mutated | tests | killed | survived | timeout | other | total | time (s) | date |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        other = ", ".join(f"{k}: {v}" for k, v in r["other"].items()) or "0"
        mutated = ", ".join(f"`{p.removeprefix('src/llava_uhd/')}`" for p in r["mutated"])
        if r.get("functions"):
            mutated += " (only " + ", ".join(f"`{g}`" for g in r["functions"]) + ")"
        tests = ", ".join(f"`{t.removeprefix('tests/')}`" for t in r["tests"])
        lines.append(f"| {r['module']} | {mutated} | {tests} | {r['killed']} | {r['survived']} | {r['timeout']} | "
                     f"{other} | {r['total']} | {r['seconds']:.0f} | {r['date']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"modules to check (default: all): {', '.join(MODULES)}")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel (default 2)")
    parser.add_argument("--timeout-multiplier", type=float, default=15.0,
                        help="a mutant times out after (its tests' clean time + 1 s) x this x 2 CPU seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "mutation")
    parser.add_argument("--workdir", type=Path, default=ROOT / "mutants", help="scratch copies (git-ignored)")
    parser.add_argument("--keep", action="store_true", help="reuse the scratch copy and mutmut's earlier results")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    sys.path.insert(0, str(ROOT / "src"))
    from llava_uhd.commandline import require_extra

    try:
        require_extra("mutation")
    except ValueError as e:
        parser.error(str(e))
    args.workdir, args.out = args.workdir.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in args.modules or list(MODULES):
        record = run_module(name, args)
        failed += record["exit_status"] != 0 or record["total"] == 0
        (args.out / f"{name}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        write_summary(args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
