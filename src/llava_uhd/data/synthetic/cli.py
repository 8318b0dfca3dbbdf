"""The ``llava-uhd synth`` command: generate a synthetic dataset and print a summary.

    parser = add_synth_arguments(argparse.ArgumentParser())
    sys.exit(run_synth(parser.parse_args()))
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from ...commandline import non_negative_int, positive_float, positive_int
from .dataset import generate_dataset, load_records
from .vocabulary import KINDS, SHORT_ANSWER_PROMPT

__all__ = ["add_synth_arguments", "run_synth"]


def add_synth_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``llava-uhd synth`` options to ``parser`` (for the CLI)."""
    parser.add_argument("--out", required=True, help="output folder (images/ and synthetic.json[l] are written there)")
    parser.add_argument("--n", type=positive_int, default=100, help="number of samples (default 100)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=None, metavar="KIND",
                        help=f"question kinds to draw from (default all: {', '.join(KINDS)})")
    parser.add_argument("--min-side", type=positive_int, default=64,
                        help="shortest image side in pixels (default 64, >= 32)")
    parser.add_argument("--max-side", type=positive_int, default=2000,
                        help="longest image side in pixels (default 2000)")
    parser.add_argument("--max-aspect", type=positive_float, default=6.0,
                        help="largest aspect ratio, either way (default 6)")
    parser.add_argument("--format", choices=["json", "jsonl"], default="json",
                        help="annotations as one JSON list (LLaVA) or JSON lines (default json)")
    parser.add_argument("--image-format", choices=["png", "jpg"], default="png",
                        help="png (exact colours; default) or jpg (lossy)")
    parser.add_argument("--workers", type=positive_int, default=1, help="threads encoding images (default 1)")
    parser.add_argument("--no-answer-prompt", action="store_true",
                        help=f"do not append {SHORT_ANSWER_PROMPT!r} to the questions")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_synth(args) -> int:
    """Generate the dataset described by parsed `add_synth_arguments` options and print a summary."""
    start = time.perf_counter()
    try:
        path = generate_dataset(
            args.out, args.n, args.seed, kinds=args.kinds, format=args.format, image_format=args.image_format,
            min_side=args.min_side, max_side=args.max_side, max_aspect=args.max_aspect,
            progress=not args.no_progress, workers=max(1, args.workers),
            answer_prompt=None if args.no_answer_prompt else SHORT_ANSWER_PROMPT)
    except ValueError as e:
        print(f"llava-uhd synth: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    records = load_records(path)
    print(f"wrote {len(records)} samples to {path} (images in {Path(args.out) / 'images'}) in {elapsed:.1f} s")
    if records:
        counts = Counter(r["kind"] for r in records)
        widths = [r["metadata"]["width"] for r in records]
        heights = [r["metadata"]["height"] for r in records]
        aspects = [max(w, h) / min(w, h) for w, h in zip(widths, heights)]
        print("kind            samples  fine-detail")
        for kind in KINDS:
            if counts[kind]:
                print(f"  {kind:<14}{counts[kind]:>8}  {'yes' if KINDS[kind].fine_detail else 'no'}")
        print(f"width {min(widths)}-{max(widths)} px, height {min(heights)}-{max(heights)} px, "
              f"aspect ratio up to {max(aspects):.2f}:1, "
              f"{sum(w * h for w, h in zip(widths, heights)) / 1e6:.1f} Mpixels in all")
    return 0
