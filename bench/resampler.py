"""Benchmark the perceiver resampler's two attention forms: ``folded`` (the default) against ``plain``.

The same weights run both ways (`PerceiverResampler(attention=...)`) on the packed features of one image's crops:
by default the paper's 672x1008 image with CLIP-L/14-336 (6 slices of 24x24 patches + an overview of 24x16: 4,000
patch tokens of width 1024) into an LLM of width ``--hidden`` (2048 by default; 5120 for a 13B model). The two forms
alternate within every repeat (plain, folded, plain, folded, ...), and the script prints the median and minimum of
the per-repeat time ratio plain / folded, the outputs' relative difference, the machine and the load average.

    .venv/bin/python bench/resampler.py                                  # CPU, float32, width 2048
    .venv/bin/python bench/resampler.py --hidden 5120 --dtype bfloat16 --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from llava_uhd.modeling.resampler import PerceiverResampler
from llava_uhd.runinfo import machine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048, help="the LLM's width (default 2048)")
    parser.add_argument("--vision-dim", type=int, default=1024, help="the ViT's width (default 1024, CLIP-L)")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--grids", default="24x24*6,16x24", help="crops as HxW*count, comma separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grids = []
    for part in args.grids.split(","):
        shape, _, count = part.partition("*")
        h, w = (int(v) for v in shape.split("x"))
        grids += [(h, w)] * int(count or 1)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    folded = PerceiverResampler(args.vision_dim, args.hidden, args.queries).to(device, dtype).eval()
    plain = PerceiverResampler(args.vision_dim, args.hidden, args.queries, attention="plain").to(device, dtype).eval()
    plain.load_state_dict(folded.state_dict())
    features = torch.randn(sum(h * w for h, w in grids), args.vision_dim, device=device, dtype=dtype)
    grid_hw = torch.tensor(grids, device=device)

    def timed(module) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            module(features, grid_hw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.inference_mode():
        a, b = plain(features, grid_hw).float(), folded(features, grid_hw).float()
    rel = float((a - b).norm() / a.norm())
    load_start = os.getloadavg()[0]
    timed(plain), timed(folded)  # warm-up
    times = {"plain": [], "folded": []}
    for _ in range(args.repeats):
        for name, module in (("plain", plain), ("folded", folded)):
            times[name].append(timed(module))
    ratios = [p / f for p, f in zip(times["plain"], times["folded"])]
    result = {"machine": machine(), "device": str(device), "dtype": args.dtype, "hidden": args.hidden,
              "vision_dim": args.vision_dim, "queries": args.queries, "grids": grids, "tokens": features.shape[0],
              "heads": folded.num_heads, "plain_s": times["plain"], "folded_s": times["folded"],
              "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "output_rel_diff": rel,
              "load1": [load_start, os.getloadavg()[0]]}
    print(f"{features.shape[0]} tokens of width {args.vision_dim} -> {len(grids)} crops x {args.queries} queries of "
          f"width {args.hidden} ({folded.num_heads} heads), {args.dtype} on {device}")
    print(f"plain  median {statistics.median(times['plain']) * 1e3:7.1f} ms  min {min(times['plain']) * 1e3:7.1f} ms")
    print(f"folded median {statistics.median(times['folded']) * 1e3:7.1f} ms  min {min(times['folded']) * 1e3:7.1f} ms")
    print(f"plain / folded per repeat: median {result['ratio_median']:.2f}x, min {result['ratio_min']:.2f}x; outputs "
          f"differ by {rel:.1e} (relative); load {load_start:.2f} -> {result['load1'][1]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
