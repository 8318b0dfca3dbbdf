"""``llava-uhd probe position|resolution|padding``: the paper's pilot experiments (Fig. 1-3) run against a local model
or any OpenAI-compatible endpoint, written as raw answers, a summary and a picture.

    llava-uhd probe position --out probes/pos                          # the built-in nano model, colour question
    llava-uhd probe position --question count --endpoint http://127.0.0.1:8000 --out probes/pos-server
    llava-uhd probe resolution --model out/stage2 --device cuda --repeats 8 --temperature 0.7 --seed 0 --out r/
    llava-uhd probe padding --image-strategy pad --label "nano, padded view" --out probes/pad --quick

Writes into ``--out``: ``answers.jsonl`` (one line per answer: the picture's id and place in the sweep, question,
truth, answer, parsed value, right or not), ``summary.json`` (settings, the system, timings and
`llava_uhd.eval.probes.aggregate`'s values) and ``<probe>.png`` (heat map, answer distribution per size, or accuracy
per aspect ratio); ``--save-images`` adds the pictures. ``--quick`` runs a small sweep (under a minute on the nano
model on 2 CPU cores). With ``--endpoint`` nothing of torch is imported: the client is the standard library's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..commandline import positive_float, positive_int, require_extra
from ..serve.options import CommandError, add_generation_arguments, add_model_arguments, run_command
from .probes import PROBES, QUESTIONS, SIDES, PadSettings, PositionSettings, ResolutionSettings, parse_ratio

__all__ = ["add_probe_arguments", "run_probe", "probe_settings", "main"]

PROG = "llava-uhd probe"
_QUICK = {"position": {"size": (448, 336), "grid": (4, 2), "variants": 1},
          "resolution": {"sizes": (224, 448, 672, 896), "variants": 1},
          "padding": {"aspects": (1 / 3, 1.0, 3.0), "sides": ("left", "top"), "long_side": 448}}


def _pair(text: str) -> tuple[int, int]:
    """``"896x672"`` as (896, 672)."""
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH such as 896x672, got {text!r}") from None
    if a < 1 or b < 1:
        raise argparse.ArgumentTypeError(f"both numbers must be >= 1, got {text!r}")
    return a, b


def _ratio(text: str) -> float:
    try:
        return parse_ratio(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_probe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``llava-uhd probe``."""
    parser.add_argument("probe", choices=PROBES, help="position (Fig. 1), resolution (Fig. 2) or padding (Fig. 3)")
    parser.add_argument("--out", required=True, help="output folder (created): answers.jsonl, summary.json, PNG")
    parser.add_argument("--quick", action="store_true", help="a small sweep (under a minute on the nano model)")
    g = parser.add_argument_group("the system asked (default: the built-in nano model)")
    g.add_argument("--endpoint", default=None, help="an OpenAI-compatible server's URL (http://host:port or .../v1): "
                                                    "POST /v1/chat/completions with the picture as a data: URL")
    g.add_argument("--endpoint-model", default=None, help="the model name sent (default: the first of /v1/models)")
    g.add_argument("--api-key", default=None, help="bearer token for the endpoint (default $OPENAI_API_KEY)")
    g.add_argument("--concurrency", type=positive_int, default=4, help="endpoint requests at a time (default 4)")
    g.add_argument("--timeout", type=positive_float, default=300.0, help="seconds per endpoint request")
    g.add_argument("--label", default=None, help="the system's name in the pictures (default: the model's name)")
    g.add_argument("--batch-size", type=positive_int, default=16, help="local model: pictures per batch")
    g.add_argument("--image-strategy", choices=("model", "pad"), default="model",
                   help="local model: its own slicing (default) or LLaVA-1.5's one padded square view")
    add_model_arguments(g)
    add_generation_arguments(g, 8)
    p = parser.add_argument_group("the sweep (defaults: see the README; --quick makes them small)")
    p.add_argument("--question", choices=QUESTIONS, default="colour",
                   help="position / resolution: the small shape's colour (default) or quarter (what the nano model "
                        "knows), or how many circles (the paper's question, for real models)")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="ask each picture N times (needs --temperature > 0: greedy answers repeat exactly)")
    p.add_argument("--variants", type=positive_int, default=None,
                   help="pictures per sweep point (colours and kinds rotate; default 2 position, 6 resolution, "
                        "1 padding)")
    p.add_argument("--grid", type=_pair, default=None, help="position: COLSxROWS cells (default 6x4)")
    p.add_argument("--size", type=_pair, default=None, help="position: the canvas, WxH (default 896x672)")
    p.add_argument("--shape-size", type=positive_int, default=None, help="position: shape side in px (default 18)")
    p.add_argument("--count", type=positive_int, default=None, help="--question count: circles drawn (default 3)")
    p.add_argument("--sizes", type=positive_int, nargs="+", default=None,
                   help="resolution: long sides in px (default 224 320 448 640 896 1120 1344 1792)")
    p.add_argument("--aspect", type=_ratio, default=None, help="resolution: W:H of the pictures (default 3:2)")
    p.add_argument("--aspects", type=_ratio, nargs="+", default=None,
                   help="padding: W:H ratios (default 1:4 1:3 1:2 1:1 2:1 3:1 4:1)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=None, help="padding: band sides (default all four)")
    p.add_argument("--long-side", type=positive_int, default=None, help="padding: long side in px (default 896)")
    p.add_argument("--save-images", action="store_true", help="also write every picture under OUT/images/")
    return parser


def probe_settings(args):
    """The probe's settings from the options: explicit ones, else ``--quick``'s, else the defaults."""
    quick = _QUICK[args.probe] if args.quick else {}
    seed = args.seed if args.seed is not None else 0

    def pick(name, default=None):
        value = getattr(args, name, None)
        return value if value is not None else quick.get(name, default)

    if args.probe == "position":
        d = PositionSettings()
        (w, h), (c, r) = pick("size", (d.width, d.height)), pick("grid", (d.cols, d.rows))
        return PositionSettings(width=w, height=h, cols=c, rows=r, question=args.question,
                                variants=pick("variants", d.variants), shape_size=pick("shape_size", d.shape_size),
                                count=pick("count", d.count), seed=seed)
    if args.probe == "resolution":
        d = ResolutionSettings()
        return ResolutionSettings(sizes=tuple(pick("sizes", d.sizes)), aspect=pick("aspect", d.aspect),
                                  question=args.question, variants=pick("variants", d.variants),
                                  count=pick("count", d.count), seed=seed)
    d = PadSettings()
    return PadSettings(aspects=tuple(pick("aspects", d.aspects)), long_side=pick("long_side", d.long_side),
                       sides=tuple(pick("sides", d.sides)), variants=pick("variants", d.variants), seed=seed)


def _check_decoding(args) -> None:
    """The decoding options an endpoint gets (a local model's are checked by `generation_settings`)."""
    if not args.temperature >= 0:
        raise CommandError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CommandError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.repeats > 1 and args.temperature == 0:
        raise CommandError(f"--repeats {args.repeats} needs --temperature > 0: greedy answers repeat exactly")


def _system(args):
    """The system the options name: an `EndpointSystem`, or a loaded `LocalSystem`."""
    from .probe_systems import EndpointSystem, LocalSystem, ProbeError

    if args.endpoint is not None:
        if args.model is not None:
            raise CommandError("give --model or --endpoint, not both")
        local_only = [o for o, v in (("--num-beams", args.num_beams > 1), ("--quantize", args.quantize != "none"),
                                     ("--image-strategy", args.image_strategy != "model")) if v]
        if local_only:
            raise CommandError(f"{', '.join(local_only)}: for a local model, not an --endpoint")
        try:
            system = EndpointSystem(args.endpoint, args.endpoint_model,
                                    args.api_key or os.environ.get("OPENAI_API_KEY"), args.max_new_tokens,
                                    args.temperature, args.top_p, args.seed, args.concurrency, args.timeout, args.label)
            system.model_name()  # reachable, and its model known, before any picture is sent
            return system
        except ProbeError as e:
            raise CommandError(str(e)) from None
    try:
        require_extra("nano")
    except ValueError as e:
        raise CommandError(str(e)) from None
    from ..serve.options import generation_settings, load_from_args, prepare_runtime

    settings = generation_settings(args)
    prepare_runtime(args)
    model, processor, info = load_from_args(args, PROG)
    if args.image_strategy == "pad":
        processor.image_processor.image_strategy = "pad"
    label = args.label or info["name"] + (" (padded view)" if args.image_strategy == "pad" else "")
    return LocalSystem(model, processor, settings, args.batch_size, args.max_slices, label, info)


def _draw(probe: str, summary: dict, settings, system, title: str):
    from .probe_plots import distribution_plot, heat_map, padding_plot

    if probe == "position":
        plan = system.plan(settings.width, settings.height)
        return heat_map(summary, settings.width, settings.height, title, plan["boxes"] if plan else None)
    if probe == "resolution":
        return distribution_plot(summary, title)
    return padding_plot(summary, title)


def _report(probe: str, summary: dict) -> str:
    """A few lines for the terminal."""
    count = summary["answer_type"] == "count"

    def show(stats):
        if count:
            return "-" if stats.get("mean") is None else f"{stats['mean']:.2f}"
        return "-" if stats["accuracy"] is None else f"{100 * stats['accuracy']:.0f}%"

    lines = [f"overall: {show(summary['overall'])} ({'mean count' if count else 'right'}, "
             f"{summary['overall']['answers']} answers, {summary['overall']['unreadable']} unreadable)"]
    if probe == "position":
        lines += ["  " + " ".join(f"{show(c):>6}" for c in row) for row in summary["cells"]]
    elif probe == "resolution":
        lines += [f"  {s['width']}x{s['height']}: {show(s)}  {s['distribution']}" for s in summary["sizes"]]
    else:
        lines += [f"  {a['aspect']:>5}: grey {show(a['grey'])}, coloured {show(a['coloured'])}"
                  for a in summary["aspects"]]
    return "\n".join(lines)


def _probe(args) -> int:
    from .probe_systems import ProbeError
    from .probes import aggregate, items_for, score, settings_dict

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; give a folder")
    if args.endpoint is not None:
        _check_decoding(args)
    elif args.repeats > 1 and args.temperature == 0:
        raise CommandError(f"--repeats {args.repeats} needs --temperature > 0: greedy answers repeat exactly")
    settings = probe_settings(args)
    try:
        items = items_for(args.probe, settings)
    except ValueError as e:
        raise CommandError(str(e)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(f"cannot create --out {out}: {e.strerror or e}") from None
    t0 = time.perf_counter()
    system = _system(args)
    t_load = time.perf_counter() - t0
    print(f"{PROG} {args.probe}: {len(items)} pictures x {args.repeats} to {system.label}", file=sys.stderr)
    t1 = time.perf_counter()
    try:
        answers = system.answer([i.image for i in items], [i.question for i in items], args.repeats,
                                progress=sys.stderr.isatty())
    except ProbeError as e:
        raise CommandError(str(e)) from None
    except ValueError as e:  # a picture the model cannot take (too long for its context, ...)
        raise CommandError(str(e).splitlines()[0]) from None
    t_answer = time.perf_counter() - t1
    records = score(items, answers)
    summary = aggregate(args.probe, items, records)
    if args.probe == "resolution" and hasattr(system, "processor"):
        for s in summary["sizes"]:
            plan = system.plan(s["width"], s["height"])
            s["slices"], s["visual_tokens"] = f"{plan['cols']}x{plan['rows']}", plan["visual_tokens"]
    with open(out / "answers.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"probe": args.probe, "system": system.label, **r}) + "\n")
    picture = out / f"{args.probe}.png"
    title = f"{args.probe}: {system.label}"
    _draw(args.probe, summary, settings, system, title).save(picture)
    plan = system.plan(settings.width, settings.height) if args.probe == "position" else None
    document = {"probe": args.probe, "system": system.describe(), "settings": settings_dict(settings),
                "questions": sorted({i.question for i in items}),
                "pictures": len(items), "repeats": args.repeats, "quick": args.quick,
                "slices": plan, "timings": {"load_s": round(t_load, 2), "answer_s": round(t_answer, 2)},
                "aggregate": summary, "files": ["answers.jsonl", picture.name]}
    if args.save_images:
        (out / "images").mkdir(exist_ok=True)
        for item in items:
            item.image.save(out / "images" / f"{item.id}.png")
        document["files"].append("images/")
    (out / "summary.json").write_text(json.dumps(document, indent=1) + "\n")
    print(_report(args.probe, summary))
    print(f"wrote {out / 'answers.jsonl'}, {out / 'summary.json'}, {picture} ({t_answer:.0f} s answering)")
    return 0


def run_probe(args) -> int:
    """``llava-uhd probe``: user mistakes are one line on stderr, exit status 2."""
    return run_command(PROG, _probe, args)


def main(argv: list[str] | None = None) -> int:
    from ..serve.options import command_main

    return command_main(PROG, __doc__, add_probe_arguments, run_probe, argv)


if __name__ == "__main__":
    sys.exit(main())
