"""The README's probe pictures: every probe on the built-in nano model, on a nano model trained the same way on
LLaVA-1.5's padded views (``--pad-model``), and on the nano weights fed the padded view at inference, side by side,
plus one endpoint run through this project's own server as a cross-check.

    python scripts/probes_readme.py --pad-model NANO_RUN/nano_weights_pad [--out results/probes] [--quick] [--threads 2]

Writes OUT/<system>/<probe>/ (answers.jsonl, summary.json, <probe>.png: `llava-uhd probe`'s output),
OUT/<probe>.png (the systems side by side), OUT/endpoint_check/ (the padding probe, --quick, asked through
`llava_uhd.serve.server` on 127.0.0.1 with the standard-library client; its answers compared with the local run's)
and OUT/RESULTS.md (what was compared, the numbers, the timings, the machine).

The trained ``pad`` baseline comes from ``python -m llava_uhd.nano --variants pad ...`` with the shipped model's
recipe (its weights land in ``OUT/nano_weights_pad/``). Without ``--pad-model`` only the shipped weights run, with
their own slices and with the processor switched to ``image_strategy="pad"`` (`--image-strategy pad`): what the
padded view leaves of the pictures to a model that reads them well from slices.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from PIL import Image

from llava_uhd.cli import main as cli_main
from llava_uhd.eval.probe_plots import side_by_side

SYSTEMS = {"nano": ["--label", "nano LLaVA-UHD (its slices)"],
           "nano_pad_trained": ["--label", "nano trained on padded views (LLaVA-1.5)"],
           "nano_padded_view": ["--image-strategy", "pad", "--label", "same weights, LLaVA-1.5 padded view"]}
PROBES = ("position", "resolution", "padding")


def _run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    code = cli_main(argv)
    if code != 0:
        sys.exit(f"llava-uhd {' '.join(argv)} failed ({code})")
    return time.perf_counter() - t0


def _endpoint_check(out: Path, threads: list[str]) -> dict:
    """The padding probe (--quick) through this project's server, compared with the same probe run locally."""
    from llava_uhd.serve.loading import load_model
    from llava_uhd.serve.server import create_app, running_server

    local = out / "endpoint_check" / "local"
    _run(["probe", "padding", "--quick", "--out", str(local), *threads])
    model, processor, info = load_model(None)
    with running_server(create_app(model, processor, info["name"])) as url:
        seconds = _run(["probe", "padding", "--quick", "--endpoint", url, "--out", str(out / "endpoint_check" /
                                                                                      "endpoint")])
    read = [[json.loads(line)["answer"] for line in open(out / "endpoint_check" / k / "answers.jsonl")]
            for k in ("local", "endpoint")]
    check = {"answers": len(read[0]), "identical": sum(a == b for a, b in zip(*read)), "endpoint_s": round(seconds, 1)}
    (out / "endpoint_check" / "check.json").write_text(json.dumps(check) + "\n")
    return check


def _value(stats: dict, count: bool) -> str:
    if count:
        return "-" if stats.get("mean") is None else f"{stats['mean']:.2f}"
    return "-" if stats["accuracy"] is None else f"{100 * stats['accuracy']:.1f} %"


def _markdown(out: Path, quick: bool, check: dict | None, systems: dict) -> str:
    rows = ["| probe | system | pictures | overall | detail | load + answering |", "|---|---|---:|---:|---|---:|"]
    for probe in PROBES:
        for system in systems:
            doc = json.loads((out / system / probe / "summary.json").read_text())
            agg = doc["aggregate"]
            count = agg["answer_type"] == "count"
            if probe == "position":
                worst = min(v for row in agg["grid"] for v in row if v is not None)
                detail = f"worst cell {_value({'accuracy': worst, 'mean': worst}, count)}"
            elif probe == "resolution":
                detail = ", ".join(f"{s['long_side']}: {_value(s, count)}" for s in agg["sizes"])
            else:
                detail = ("grey bands " + ", ".join(f"{a['aspect']}: {_value(a['grey'], count)}"
                                                    for a in agg["aspects"])
                          + "; coloured bands " + ", ".join(f"{a['aspect']}: {_value(a['coloured'], count)}"
                                                           for a in agg["aspects"]))
            t = doc["timings"]
            rows.append(f"| {probe} | {doc['system']['label']} | {doc['pictures']} | {_value(agg['overall'], count)} "
                        f"| {detail} | {t['load_s']:.0f} + {t['answer_s']:.0f} s |")
    lines = ["# Probes: the pilot experiments on the nano model", "",
             f"Made by `python scripts/probes_readme.py{' --quick' if quick else ''}` "
             f"({platform.machine()}, {os.cpu_count()} CPUs shared with other work, Python "
             f"{platform.python_version()}; each run's seconds to load the model and to answer are in the table).",
             "",
             "Systems: **nano LLaVA-UHD** = the shipped nano weights with their own slicing (up to 6 slices of 224 px "
             "+ overview)"
             + ("; **nano trained on padded views** = the same backbones trained by the same recipe and data on "
                "LLaVA-1.5's view (`python -m llava_uhd.nano --variants pad`: one 224x224 view of the picture padded "
                "to a square with the mean colour, 16 visual tokens), the README's `pad` baseline"
                if "nano_pad_trained" in systems else "")
             + "; **same weights, LLaVA-1.5 padded view** = the shipped weights with the processor switched to "
             "`image_strategy=pad` at inference: what the padded view leaves of the pictures to a model that reads "
             "them from slices.", "",
             *rows, ""]
    if check is not None:
        lines += [f"Endpoint cross-check (`endpoint_check/`): the padding probe (--quick) asked through this "
                  f"project's server (`create_app` + `running_server` on 127.0.0.1, standard-library client): "
                  f"{check['identical']} of {check['answers']} answers identical to the local run's.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/probes")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", default=None)
    parser.add_argument("--no-endpoint-check", action="store_true")
    parser.add_argument("--pad-model", default=None,
                        help="the nano weights trained on padded views (a nano run's nano_weights_pad/)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite RESULTS.md and the side-by-side pictures from the runs in --out")
    args = parser.parse_args()
    out = Path(args.out)
    threads = ["--threads", args.threads] if args.threads else []
    quick = ["--quick"] if args.quick else []
    systems = dict(SYSTEMS)
    if args.pad_model:
        systems["nano_pad_trained"] = ["--model", args.pad_model, *systems["nano_pad_trained"]]
    elif args.report_only and (out / "nano_pad_trained").is_dir():
        pass  # its runs are there
    else:
        del systems["nano_pad_trained"]
    for probe in PROBES:
        for system, options in systems.items() if not args.report_only else ():
            _run(["probe", probe, "--out", str(out / system / probe), *options, *quick, *threads])
        pictures = [Image.open(out / system / probe / f"{probe}.png") for system in systems]
        side_by_side(pictures).save(out / f"{probe}.png")
    if args.report_only:
        found = out / "endpoint_check" / "check.json"
        check = json.loads(found.read_text()) if found.is_file() else None
    else:
        check = None if args.no_endpoint_check else _endpoint_check(out, threads)
    (out / "RESULTS.md").write_text(_markdown(out, args.quick, check, systems))
    print((out / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
