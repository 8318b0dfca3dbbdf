"""Time to first token: LLaVA-UHD against transformers' LLaVA-NeXT and LLaVA-1.5 on the same tower and LLM.

The three systems of `ttft_systems.py` share one CLIP-L/14-336-shaped tower and one Llama-shaped LLM. For each image
size, each system's time to first token is measured end to end: its processor on a PIL image and the prompt, then
``generate(max_new_tokens=1)`` (vision tower, projector, LLM prefill, one token). The systems alternate inside every
repeat (UHD, NeXT, 1.5, UHD, NeXT, 1.5, ...) and the script prints, per size, medians and minima of the per-repeat
ratios NeXT/UHD and 1.5/UHD, the breakdown (preprocess, vision, projector, LLM prefill, the rest), the visual tokens,
peak memory, and the FLOP ratio NeXT/UHD that `llava-uhd cost` gives for the same configuration (the limit the
measured ratio approaches as the model's work dominates).

Peak memory is measured in a separate pass after the timing, one run per system and size: on CUDA
``max_memory_allocated`` above what was allocated before the run; on the CPU the process's resident-set high-water
mark (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set before the run, after returning
freed heap to the system (``malloc_trim``). "activation" is that rise; "total" adds what was resident before (the
shared weights, counted once for all systems).

    .venv/bin/python bench/ttft.py --scale quick                     # CPU, a few minutes
    .venv/bin/python bench/ttft.py --scale 1b --repeats 3             # full CLIP-L + a 1B Llama
    .venv/bin/python bench/ttft.py --scale 7b --sizes 672x1008 --device cuda --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ttft_systems import SCALES, SYSTEMS, StageTimer, build_systems, llm_decoder_params  # noqa: E402

from llava_uhd.flops import VisionSpec, cost_table  # noqa: E402
from llava_uhd.runinfo import machine, versions  # noqa: E402

DEFAULT_SIZES = "336x336,672x1008,1344x2016,672x672,1008x1008,1344x1344"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
STAGES = ("preprocess", "vision", "projector", "llm", "other")


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour gradients plus mild noise (so resizes do real work)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / (37 + 13 * c) + y / (53 + 7 * c) + c) for c in range(3)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory(run, device: torch.device) -> dict | None:
    """Bytes ``{"activation": rise during run(), "total": peak}`` (see the module docstring); None when the
    platform cannot say."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"activation": peak - before, "total": peak}
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = _status_kib("VmRSS") * 1024
        run()
        peak = _status_kib("VmHWM") * 1024
    except (OSError, KeyError, AttributeError):
        return None
    return {"activation": max(0, peak - before), "total": peak}


def flop_ratio(scale, width: int, height: int, llm_params: int, text_tokens: int, max_slices: int) -> dict:
    """`llava-uhd cost` for this configuration: every system's TFLOPs and visual tokens, and NeXT/UHD."""
    spec = VisionSpec(f"clip-l-336 ({scale.vision_layers} layers)", scale.image_size, 14, scale.vision_hidden,
                      scale.vision_intermediate, scale.vision_layers, True)
    table = cost_table(width, height, spec, llm_params, llm_hidden=scale.llm_hidden, llm_layers=scale.llm_layers,
                       text_tokens=text_tokens, max_slices=max_slices)
    return {"tflops": {k: v["total_tflops"] for k, v in table.items()},
            "stage_tflops": {k: {"vision": v["vit_tflops"], "projector": v["projector_tflops"], "llm": v["llm_tflops"]}
                             for k, v in table.items()},
            "visual_tokens": {k: v["visual_tokens"] for k, v in table.items()},
            "next_over_uhd": table["llava-next"]["total_flops"] / table["llava-uhd"]["total_flops"],
            "llava15_over_uhd": table["llava-1.5"]["total_flops"] / table["llava-uhd"]["total_flops"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="quick")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"WxH, comma separated (default {DEFAULT_SIZES})")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="which systems, comma separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per size (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per size first (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--max-slices", type=int, default=6)
    parser.add_argument("--resampler-attention", choices=("plain", "folded"), default="plain")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    names = [n.strip() for n in args.systems.split(",")]
    unknown = set(names) - set(SYSTEMS)
    if unknown or "llava-uhd" not in names:
        parser.error(f"--systems must include llava-uhd and name only {', '.join(SYSTEMS)}")
    scale = SCALES[args.scale]

    t = time.perf_counter()
    systems = build_systems(scale, dtype, max_slices=args.max_slices, resampler_attention=args.resampler_attention)
    systems = {n: systems[n].to(device) for n in names}
    llm_params = llm_decoder_params(systems["llava-uhd"])
    print(f"built {args.scale} ({scale}) in {time.perf_counter() - t:.1f} s; LLM decoder params "
          f"{llm_params / 1e9:.3f} B; device {device}, {args.dtype}, {torch.get_num_threads()} threads", flush=True)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    timer = StageTimer(systems, sync)

    def run_once(system, image) -> tuple[dict, int]:
        timer.reset()
        sync()
        start = time.perf_counter()
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in system.prepare(image).items()}
        sync()
        prep = time.perf_counter() - start
        with torch.inference_mode():
            system.model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                                  pad_token_id=system.processor.tokenizer.pad_token_id)
        sync()
        total = time.perf_counter() - start
        stages = {"preprocess": prep, **timer.times}
        stages["other"] = total - sum(stages.values())
        return {"total": total, **stages}, int(inputs["input_ids"].shape[1])

    results = {"machine": machine(args.device), "versions": versions(), "scale": vars(scale) | {"name": args.scale},
               "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup, "max_slices": args.max_slices,
               "resampler_attention": args.resampler_attention, "llm_decoder_params": llm_params, "sizes": []}
    for width, height in sizes:
        image = photo(width, height)
        load = [os.getloadavg()[0]]
        runs = {n: [] for n in names}
        tokens = {}
        for r in range(args.warmup + args.repeats):
            for n in names:  # alternate the systems within every repeat
                timing, tokens[n] = run_once(systems[n], image)
                if r >= args.warmup:
                    runs[n].append(timing)
        load.append(os.getloadavg()[0])
        memory = {}
        if not args.no_memory:
            for n in names:
                memory[n] = peak_memory(lambda: run_once(systems[n], image), device)
        text_tokens = tokens.get("llava-1.5", tokens["llava-uhd"]) - (576 if "llava-1.5" in tokens else 0)
        flops = flop_ratio(scale, width, height, llm_params, text_tokens, args.max_slices) \
            if "llava-1.5" in tokens else None
        entry = {"width": width, "height": height, "load1": load, "llm_tokens": tokens, "runs": runs,
                 "memory": memory, "flops": flops, "systems": {}}
        for n in names:
            entry["systems"][n] = {
                "ttft_median": statistics.median(x["total"] for x in runs[n]),
                "ttft_min": min(x["total"] for x in runs[n]),
                "breakdown_median": {s: statistics.median(x[s] for x in runs[n]) for s in STAGES}}
        for peer, key in (("llava-next", "next_over_uhd"), ("llava-1.5", "llava15_over_uhd")):
            if peer in names:
                ratios = [p["total"] / u["total"] for p, u in zip(runs[peer], runs["llava-uhd"])]
                entry[key] = {"median": statistics.median(ratios), "min": min(ratios), "per_repeat": ratios}
                if flops:
                    entry[key]["of_flop_ratio"] = entry[key]["median"] / flops[key]
        results["sizes"].append(entry)
        print(format_size(entry), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def stage_rates(entry: dict) -> dict:
    """Per system, the vision tower's and the LLM's achieved TFLOP/s: `llava-uhd cost`'s stage FLOPs over the
    median stage time. The FLOP ratio is the TTFT ratio's limit only where every stage runs at the same rate; a
    system whose FLOPs sit in a slower stage falls short of it by the difference. Empty without FLOP counts."""
    stage_tflops = (entry.get("flops") or {}).get("stage_tflops")
    if not stage_tflops:
        return {}
    return {n: {st: stage_tflops[n][st] / s["breakdown_median"][st] for st in ("vision", "llm")
                if s["breakdown_median"].get(st)}
            for n, s in entry["systems"].items() if n in stage_tflops}


def format_size(entry: dict) -> str:
    """One size's table: per system TTFT, breakdown, LLM tokens and memory; then the ratios."""
    lines = [f"\n{entry['width']}x{entry['height']} (load {entry['load1'][0]:.2f} -> {entry['load1'][1]:.2f})",
             f"  {'system':<11}{'LLM tok':>8}{'TTFT med':>10}{'min':>8}"
             + "".join(f"{s[:7]:>9}" for s in STAGES) + f"{'act MB':>9}{'total MB':>10}"]
    for n, s in entry["systems"].items():
        mem = entry["memory"].get(n) or {}
        lines.append(f"  {n:<11}{entry['llm_tokens'][n]:>8}{s['ttft_median']:>9.3f}s{s['ttft_min']:>7.3f}s"
                     + "".join(f"{s['breakdown_median'][st]:>8.3f}s" for st in STAGES)
                     + (f"{mem['activation'] / 2**20:>9.0f}{mem['total'] / 2**20:>10.0f}" if mem else ""))
    for key, label in (("next_over_uhd", "NeXT/UHD"), ("llava15_over_uhd", "1.5/UHD")):
        if key in entry:
            r = entry[key]
            flop = entry["flops"][key] if entry["flops"] else float("nan")
            lines.append(f"  TTFT {label}: median {r['median']:.2f}x, min {r['min']:.2f}x; FLOP ratio {flop:.2f}x "
                         f"(measured/FLOP {r.get('of_flop_ratio', float('nan')):.0%})")
    rates = stage_rates(entry)
    if rates:
        lines.append("  achieved TFLOP/s (stage FLOPs / median stage time): " + "; ".join(
            f"{n} " + ", ".join(f"{st} {r:.2f}" for st, r in per.items()) for n, per in rates.items()))
    mem = entry["memory"]
    if mem.get("llava-next") and mem.get("llava-uhd"):
        lines.append(f"  peak memory UHD/NeXT: activation {mem['llava-uhd']['activation'] / max(1, mem['llava-next']['activation']):.2f}x, "
                     f"total {mem['llava-uhd']['total'] / mem['llava-next']['total']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    from llava_uhd.commandline import quiet_import_noise

    quiet_import_noise()
    main()
