"""Benchmark the adaptive vision encoder: batched (bucket / varlen packing) vs a crop-by-crop loop vs padding.

Eight images of mixed sizes and aspect ratios go through `LlavaUHDImageProcessor` at the tower's native size and
patch (LLaVA-UHD slices + overview, at most 6 slices each) and are encoded by a randomly initialised CLIP tower of
ViT-B/16-224 size and/or ViT-L/14-336 size, three ways:

  (a) batched: `AdaptiveVisionEncoder` on all crops at once, once per packing mode the device runs
      (``bucket``: one dense batch per distinct sequence length; ``varlen``: one packed sequence with
      block-diagonal attention: torch's flash varlen kernel on CUDA in bf16, SDPA per length elsewhere);
  (b) loop: the same encoder called once per crop;
  (c) padded: every crop's token sequence padded to the longest one, one dense batch through the tower's layers
      with an additive key-padding mask (the encoder's own embedding and layer internals, so only the batching
      differs).

With ``--max-batch-tokens N`` the bucket mode is also timed with ``AdaptiveVisionEncoder(max_batch_tokens=N)``
(dense sub-batches of at most N tokens).

Each method's throughput is also given in TFLOP/s (the tower's matmul FLOPs by `llava_uhd.flops.vit_crop_flops`
over the layers run) and as a fraction of the dense matmul peak measured in the same run on the same device and
dtype (square ``--peak-size`` matmuls: ``8192`` on a GPU, ``2048`` on the CPU by default).

All results are checked against each other (features of the real tokens). Timings are the median of
``--repeats`` runs after ``--warmup`` runs (``torch.cuda.synchronize`` around each on a GPU), under
``torch.inference_mode``. Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU no per-method
peak is reported (the process's max RSS is a high-water mark over the whole run, not per method).

Usage::

    PYTHONPATH=src python bench/encode.py --device cpu --towers b16,l14 --layers 3 --repeats 3
    PYTHONPATH=src python bench/encode.py --device cuda --dtype bfloat16,float32 --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Images as (width, height): portrait, landscape, 16:9, 1:4, 7.5:1, square, small (not sliced), 4:3.
IMAGE_SIZES = [(672, 1008), (1024, 768), (1920, 1080), (500, 2000), (3000, 400), (800, 800), (336, 336), (1200, 900)]

TOWERS = {
    "b16": dict(label="ViT-B/16-224", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, patch_size=16, image_size=224),
    "l14": dict(label="ViT-L/14-336", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                intermediate_size=4096, patch_size=14, image_size=336),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Relative error allowed between two ways of computing the same features.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}  # a bug gives O(1)


def import_llava_uhd():
    """`LlavaUHDImageProcessor` and `AdaptiveVisionEncoder`, from the installed package or ``src/``.

    If the package's ``__init__`` cannot be imported (e.g. the full model needs a newer transformers than the
    machine has), only the two modules the benchmark needs are loaded, bypassing the package ``__init__``s."""
    src = Path(__file__).resolve().parent.parent / "src"
    if src.is_dir() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    try:
        from llava_uhd.image_processing import LlavaUHDImageProcessor
        from llava_uhd.modeling import vision
    except ImportError as err:
        print(f"note: `import llava_uhd` failed ({err}); loading llava_uhd.image_processing and "
              "llava_uhd.modeling.vision without the package __init__", flush=True)
        for name in [n for n in sys.modules if n == "llava_uhd" or n.startswith("llava_uhd.")]:
            del sys.modules[name]
        for name, path in [("llava_uhd", src / "llava_uhd"), ("llava_uhd.modeling", src / "llava_uhd" / "modeling")]:
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module
        from llava_uhd.image_processing import LlavaUHDImageProcessor
        from llava_uhd.modeling import vision
    return LlavaUHDImageProcessor, vision


def machine_description(device: torch.device) -> dict:
    """`llava_uhd.runinfo.machine` (CPU, threads, versions; the GPU on CUDA) plus the transformers version."""
    import transformers
    from llava_uhd.runinfo import machine  # after import_llava_uhd: from src/ if not installed

    return {**machine(device), "transformers": transformers.__version__}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_batch(processor_cls, tower: dict):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in IMAGE_SIZES]
    side = tower["image_size"]
    processor = processor_cls(size={"height": side, "width": side}, patch_size=tower["patch_size"])
    batch = processor(images, return_tensors="pt")
    return batch["pixel_values"], batch["patch_grid_hw"]


def build_encoder(vision, tower: dict, layers: int | None, device, dtype):
    from transformers import CLIPVisionConfig

    kw = {k: v for k, v in tower.items() if k != "label"}
    if layers is not None:
        kw["num_hidden_layers"] = layers
    torch.manual_seed(0)
    config = CLIPVisionConfig(**kw)
    encoder = vision.AdaptiveVisionEncoder.from_config(config, packing="bucket")
    return encoder.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------- the three ways
def run_batched(encoder, pixel_values, grids, mode, max_batch_tokens=None):
    encoder.packing, encoder.max_batch_tokens = mode, max_batch_tokens
    return encoder(pixel_values, grids)


def run_loop(encoder, pixel_values, grids):
    encoder.packing, encoder.max_batch_tokens = "bucket", None
    out, start = [], 0
    for h, w in grids.tolist():
        n = h * w
        out.append(encoder(pixel_values[start:start + n], grids.new_tensor([[h, w]])))
        start += n
    return torch.cat(out)


def run_padded(encoder, pixel_values, grids):
    """Pad every crop's sequence to the longest with an additive key-padding mask: one dense batch."""
    groups = encoder.embed_crops(pixel_values, [tuple(g) for g in grids.tolist()])
    hidden_list = [hidden for hidden, _ in groups]
    longest = max(h.shape[1] for h in hidden_list)
    lengths = torch.tensor([h.shape[1] for h in hidden_list for _ in range(h.shape[0])],
                           device=hidden_list[0].device)
    padded = torch.cat([F.pad(h, (0, 0, 0, longest - h.shape[1])) for h in hidden_list])  # (K, L_max, D)
    dtype = padded.dtype
    is_pad = torch.arange(longest, device=padded.device)[None, :] >= lengths[:, None]  # (K, L_max)
    mask = torch.zeros(is_pad.shape, dtype=dtype, device=padded.device).masked_fill(is_pad, torch.finfo(dtype).min)
    out = encoder.run_layers(padded, attention_mask=mask[:, None, None, :])  # (K, 1, 1, L_max) additive
    feats, k = [], 0
    prefix = encoder.num_prefix_tokens
    for h in hidden_list:
        b, n = h.shape[:2]
        feats.append(out[k:k + b, prefix:n].reshape(-1, out.shape[-1]))
        k += b
    order = torch.cat([rows for _, rows in groups]).argsort()
    return torch.cat(feats)[order]


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def peak_memory_mib(fn, device):
    """Peak MiB allocated by one run over what was allocated before it (CUDA only; None on the CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    sync(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def matmul_peak_tflops(device, dtype, size: int, repeats: int = 10) -> float:
    """The dense matmul rate this device reaches in ``dtype``: the median of ``repeats`` square ``size`` matmuls."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    with torch.inference_mode():
        for _ in range(2):
            a @ b
        times = [timed(lambda: a @ b, device)[0] for _ in range(repeats)]
    return 2 * size**3 / statistics.median(times) / 1e12


def tower_flops(tower: dict, grids, layers_run: int, prefix_tokens: int) -> int:
    """Matmul FLOPs of encoding ``grids`` through ``layers_run`` layers (`llava_uhd.flops.vit_crop_flops`)."""
    from llava_uhd.flops import VisionSpec, vit_crop_flops

    spec = VisionSpec(tower["label"], tower["image_size"], tower["patch_size"], tower["hidden_size"],
                      tower["intermediate_size"], tower["num_hidden_layers"], prefix_tokens > 0)
    return sum(vit_crop_flops(h * w, spec, layers_run) for h, w in grids)


def bench_case(vision, processor_cls, tower_key, dtype, args, device):
    tower = TOWERS[tower_key]
    t0 = time.perf_counter()
    pixel_values, grids = make_batch(processor_cls, tower)
    encoder = build_encoder(vision, tower, args.layers, device, dtype)
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    setup_s = time.perf_counter() - t0
    layers_total = len(encoder.layers)
    layers_run = encoder.num_layers_to_run
    grid_list = [tuple(g) for g in grids.tolist()]
    seq_lens = [h * w + encoder.num_prefix_tokens for h, w in grid_list]
    case = {
        "tower": tower["label"], "tower_key": tower_key, "dtype": str(dtype).replace("torch.", ""),
        "layers_in_tower": layers_total, "layers_run": layers_run,
        "layers_overridden": args.layers is not None,
        "attn_implementation": encoder.vision_model.config._attn_implementation,
        "images": len(IMAGE_SIZES), "crops": len(grid_list), "distinct_grids": len(set(grid_list)),
        "distinct_lengths": len(set(seq_lens)), "tokens": sum(seq_lens),
        "padded_tokens": len(seq_lens) * max(seq_lens), "setup_s": round(setup_s, 2), "methods": {},
    }
    name = f"{tower['label']} {case['dtype']} ({layers_run} of {layers_total} layers run"
    name += ", --layers override)" if args.layers is not None else ")"
    print(f"\n== {name}: {case['images']} images -> {case['crops']} crops, {case['distinct_grids']} grids, "
          f"{case['distinct_lengths']} lengths, {case['tokens']} tokens ({case['padded_tokens']} padded); "
          f"attention backend {case['attn_implementation']}; setup {setup_s:.1f}s", flush=True)

    modes = ["bucket", "varlen"]
    encoder.packing = "auto"
    auto = encoder.resolve_packing(device, dtype)  # what the default packing runs here
    methods = [(f"batched-{m}", (lambda m=m: run_batched(encoder, pixel_values, grids, m))) for m in modes]
    if args.max_batch_tokens:
        cap = args.max_batch_tokens
        methods.append((f"batched-bucket-cap{cap}", lambda: run_batched(encoder, pixel_values, grids, "bucket", cap)))
    methods += [("loop", lambda: run_loop(encoder, pixel_values, grids)),
                ("padded", lambda: run_padded(encoder, pixel_values, grids))]
    methods = [(m, fn) for m, fn in methods if not (m == "loop" and args.skip_loop)]
    repeats = {m: max(1, args.loop_repeats if m == "loop" and args.loop_repeats else args.repeats) for m, _ in methods}
    outputs, times = {}, {m: [] for m, _ in methods}
    load_before = os.getloadavg()
    with torch.inference_mode():
        for method, fn in methods:  # warm-up, and the output the checks compare
            t_first, outputs[method] = timed(fn, device)
            for _ in range(args.warmup - 1):
                timed(fn, device)
            print(f"  warm-up {method:15s} first run {t_first * 1e3:9.1f} ms", flush=True)
        # Timed runs round-robin over the methods, so a slow spell of the machine hits all of them alike.
        for r in range(max(repeats.values())):
            line = []
            for method, fn in methods:
                if r < repeats[method]:
                    dt, out = timed(fn, device)
                    del out
                    times[method].append(dt)
                    line.append(f"{method} {dt * 1e3:.1f}")
            print(f"  round {r + 1}/{max(repeats.values())}: " + ", ".join(line) + " ms", flush=True)
        peaks = {method: peak_memory_mib(fn, device) for method, fn in methods}
    case["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    flops = tower_flops(tower, grid_list, layers_run, encoder.num_prefix_tokens)
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    case["tflops"] = flops / 1e12
    case["matmul_peak_tflops_per_s"] = round(matmul_peak_tflops(device, dtype, peak_size), 2)
    case["matmul_peak_size"] = peak_size
    print(f"  {flops / 1e12:.3f} TFLOP per run; dense {peak_size}^3 matmul peak "
          f"{case['matmul_peak_tflops_per_s']:.1f} TFLOP/s", flush=True)
    for method, _ in methods:
        median = statistics.median(times[method])
        peak = peaks[method]
        entry = {"median_ms": round(median * 1e3, 2), "min_ms": round(min(times[method]) * 1e3, 2),
                 "times_ms": [round(t * 1e3, 2) for t in times[method]],
                 "peak_mib": None if peak is None else round(peak, 1),
                 "tokens_per_s": round(case["tokens"] / median),
                 "tflops_per_s": round(flops / median / 1e12, 2),
                 "of_matmul_peak": round(flops / median / 1e12 / case["matmul_peak_tflops_per_s"], 3)}
        if method == "batched-varlen":
            encoder.packing = "varlen"
            resolved = encoder.resolve_packing(device, dtype)
            kernel = ("flash varlen_attn" if vision.varlen_kernel_available(device, dtype) else "SDPA per length")
            entry["resolved"] = resolved
            entry["attention"] = kernel if resolved == "varlen" else "fell back to bucket"
        case["methods"][method] = entry
        mem = f", peak +{peak:.0f} MiB" if peak is not None else ""
        extra = f" [{entry['attention']}]" if "attention" in entry else ""
        print(f"  {method:15s} median {median * 1e3:9.1f} ms  (min {min(times[method]) * 1e3:9.1f}){mem}{extra}"
              f", {entry['tflops_per_s']:.1f} TFLOP/s = {entry['of_matmul_peak']:.0%} of the matmul peak", flush=True)
    print(f"  1-min load average before / after: {case['loadavg_before_after']} "
          f"({os.cpu_count()} CPUs; a load above the CPU count means other processes competed)", flush=True)

    # Checks: every way gives the features of the bucket mode (the reference).
    ref = outputs["batched-bucket"]
    tol = TOLERANCE[dtype]
    case["checks"] = {}
    for method, out in outputs.items():
        if method == "batched-bucket":
            continue
        err = rel_err(out, ref)
        case["checks"][method] = {"rel_err_vs_bucket": err, "ok": bool(out.shape == ref.shape and err < tol)}
    bad = [m for m, c in case["checks"].items() if not c["ok"]]
    print(f"  checks vs batched-bucket (rel err < {tol:g}): "
          + ", ".join(f"{m} {c['rel_err_vs_bucket']:.1e}" for m, c in case["checks"].items())
          + (f"  MISMATCH: {bad}" if bad else "  OK"), flush=True)

    case["auto_mode"] = auto
    headline = "batched-varlen" if auto == "varlen" else "batched-bucket"
    case["headline"] = headline
    t = {m: e["median_ms"] for m, e in case["methods"].items()}
    ratios = {}
    for m in [m for m in t if m.startswith("batched")]:
        if "loop" in t:
            ratios[f"loop/{m}"] = round(t["loop"] / t[m], 2)
        ratios[f"padded/{m}"] = round(t["padded"] / t[m], 2)
    case["ratios"] = ratios
    print(f"  packing='auto' runs {auto}; speed-up of batched ({headline}): "
          + (f"{ratios[f'loop/{headline}']:.2f}x vs loop, " if "loop" in t else "")
          + f"{ratios[f'padded/{headline}']:.2f}x vs padded  (time ratios loop/batched, padded/batched)", flush=True)
    del encoder, outputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return case


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: {m.get('gpu', m['cpu'])}" + (f" (CPU {m['cpu']})" if "gpu" in m else "")
             + f", torch {m['torch']}, transformers {m['transformers']}, {m['torch_threads']} threads",
             f"Command: `{results['command']}`", "",
             "| tower | dtype | layers run | crops / lengths | method | median ms | min ms | peak MiB | TFLOP/s "
             "(of matmul peak) | loop / this | padded / this | check vs bucket |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for case in results["cases"]:
        layers = f"{case['layers_run']} of {case['layers_in_tower']}"
        if case["layers_overridden"]:
            layers += " (override)"
        for method, e in case["methods"].items():
            r = case["ratios"]
            loop_r = r.get(f"loop/{method}", "") if method.startswith("batched") else ""
            pad_r = r.get(f"padded/{method}", "") if method.startswith("batched") else ""
            check = case["checks"].get(method)
            if check is None:
                check = "reference"
            else:
                check = f"{check['rel_err_vs_bucket']:.1e} {'ok' if check['ok'] else 'MISMATCH'}"
            label = method + (" (auto)" if method == case["headline"] else "")
            if "attention" in e:
                label += f" [{e['attention']}]"
            peak = "" if e["peak_mib"] is None else f"{e['peak_mib']:.0f}"
            lines.append(f"| {case['tower']} | {case['dtype']} | {layers} | {case['crops']} / "
                         f"{case['distinct_lengths']} | {label} | {e['median_ms']:.1f} | {e['min_ms']:.1f} | {peak} "
                         f"| {e['tflops_per_s']:.1f} ({e['of_matmul_peak']:.0%}) "
                         f"| {loop_r} | {pad_r} | {check} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32",
                        help="float32, bfloat16 or float16; several comma-separated (default float32)")
    parser.add_argument("--towers", default="b16,l14", help="comma-separated: b16 (ViT-B/16-224), l14 (ViT-L/14-336)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method (median reported)")
    parser.add_argument("--loop-repeats", type=int, default=None, help="timed runs for the loop (default --repeats)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per method first")
    parser.add_argument("--layers", type=int, default=None,
                        help="override the towers' number of layers (quick CPU runs; the penultimate layer is "
                             "returned, so N-1 layers run)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="also time bucket packing with AdaptiveVisionEncoder(max_batch_tokens=N)")
    parser.add_argument("--peak-size", type=int, default=None,
                        help="side of the square matmuls that measure the peak (default 8192 on a GPU, 2048 on the CPU)")
    parser.add_argument("--skip-loop", action="store_true", help="do not time the crop-by-crop loop")
    parser.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write a markdown table of the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [DTYPES[d.strip()] for d in args.dtype.split(",") if d.strip()]
    towers = [t.strip() for t in args.towers.split(",") if t.strip()]
    for t in towers:
        if t not in TOWERS:
            parser.error(f"unknown tower {t!r}; choose from {sorted(TOWERS)}")

    processor_cls, vision = import_llava_uhd()
    machine = machine_description(device)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)
    print(f"varlen_attn in this torch: {vision.torch_has_varlen_attn()}", flush=True)
    if args.layers is not None:
        print(f"NOTE: --layers {args.layers}: towers cut to {args.layers} layers ({args.layers - 1} run); "
              "times are not full-model times", flush=True)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    results = {"machine": machine, "command": command, "args": vars(args), "images": IMAGE_SIZES, "cases": []}
    t_start = time.perf_counter()
    for tower in towers:
        for dtype in dtypes:
            results["cases"].append(bench_case(vision, processor_cls, tower, dtype, args, device))
            if args.json_out:  # keep partial results if the run is cut short
                Path(args.json_out).write_text(json.dumps(results, indent=1))
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    print(f"\ntotal {results['total_s']} s", flush=True)
    table = markdown(results)
    print("\n" + table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    failed = [(c["tower"], c["dtype"], m) for c in results["cases"] for m, chk in c["checks"].items() if not chk["ok"]]
    if failed:
        print(f"FEATURE MISMATCH: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
