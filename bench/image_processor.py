"""Image processor speed: a 4000x3000 photo (and other sizes) through LLaVA-UHD's processors and Qwen2-VL's.

Compared, on the same JPEG file, alternating within every repeat:

* ``as-filed``: the processor as it was when issue 18 was filed, rebuilt here from the same plan: full decode,
  an EXIF transpose that copies, every slice cropped into a copy and resized from full resolution (the overview
  from the whole 12 MP image), rescale and normalize as separate float passes.
* ``uhd``: `LlavaUHDImageProcessor` (JPEG draft decode, ``resize(box=...)`` with ``reducing_gap``, one in-place
  multiply-add).
* ``uhd-fast``: `LlavaUHDImageProcessorFast` (torch: crops grouped by size, ``interpolate(antialias=True)``).
* ``qwen2-vl``: transformers' `Qwen2VLImageProcessorPil` with its defaults (it keeps up to 12.8 MP, so it sees
  far more pixels than LLaVA-UHD's seven 336-sized crops: the comparison is of the processors as shipped).

Printed: median and minimum time per system, the median and minimum of the per-repeat ratios against ``uhd``, the
load average, and how far ``uhd`` and ``uhd-fast`` are from ``as-filed`` (mean and 99th percentile of the absolute
difference, normalized units).

    .venv/bin/python bench/image_processor.py                      # 4000x3000, 7 repeats
    .venv/bin/python bench/image_processor.py --sizes 4000x3000,1024x768 --repeats 11 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ttft import photo  # noqa: E402

from llava_uhd.image_processing import LlavaUHDImageProcessor, patchify  # noqa: E402
from llava_uhd.runinfo import machine, versions  # noqa: E402


def as_filed(processor: LlavaUHDImageProcessor):
    """The processor's work as it was done when issue 18 was filed (see the module docstring): same plan, same
    output layout."""
    mean = np.asarray(processor.image_mean, np.float32)
    std = np.asarray(processor.image_std, np.float32)

    def run(path):
        image = Image.open(path)
        image.load()
        image = ImageOps.exif_transpose(image).convert("RGB")  # copied even without an orientation tag
        plan = processor.plan(*image.size)
        patches, grids = [], []
        for crop in plan.crops:
            region = image.crop(crop.box) if crop.box != (0, 0, *image.size) else image
            pixels = np.asarray(region.resize(crop.size, processor.resample), dtype=np.float32)
            pixels = pixels * np.float32(processor.rescale_factor)
            pixels = (pixels - mean) / std
            patches.append(patchify(pixels.transpose(2, 0, 1), processor.patch_size))
            grids.append(crop.grid)
        return {"pixel_values": np.concatenate(patches).astype(np.float32), "patch_grid_hw": np.asarray(grids)}
    return run


def systems(names: list[str]) -> dict:
    processor = LlavaUHDImageProcessor()
    out = {}
    for name in names:
        if name == "as-filed":
            out[name] = as_filed(processor)
        elif name == "uhd":
            out[name] = lambda path: processor(path, return_tensors="np")
        elif name == "uhd-fast":
            from llava_uhd.image_processing_fast import LlavaUHDImageProcessorFast

            fast = LlavaUHDImageProcessorFast()
            out[name] = lambda path: {k: (v.numpy() if hasattr(v, "numpy") else v)
                                      for k, v in fast(path, return_tensors="pt").items()}
        elif name == "qwen2-vl":
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            qwen = Qwen2VLImageProcessorPil()
            out[name] = lambda path: qwen(Image.open(path).convert("RGB"), return_tensors="np")
        else:
            raise SystemExit(f"unknown system {name!r}")
    return out


def difference(a: dict, b: dict) -> dict | None:
    """Mean and 99th percentile of |a - b| over the pixel values, when the layouts agree."""
    if a["pixel_values"].shape != b["pixel_values"].shape or \
            not np.array_equal(np.asarray(a["patch_grid_hw"]), np.asarray(b["patch_grid_hw"])):
        return None
    d = np.abs(np.asarray(a["pixel_values"], np.float32) - np.asarray(b["pixel_values"], np.float32))
    return {"mean": float(d.mean()), "p99": float(np.percentile(d, 99)), "max": float(d.max())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="4000x3000", help="WxH, comma separated (default 4000x3000)")
    parser.add_argument("--systems", default="as-filed,uhd,uhd-fast,qwen2-vl")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for uhd-fast")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.systems.split(",")]
    if "uhd" not in names:
        parser.error("--systems must include uhd (the ratios are against it)")
    runs = systems(names)
    results = {"machine": machine(), "versions": versions(), "repeats": args.repeats, "sizes": []}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            width, height = (int(v) for v in size.lower().split("x"))
            path = os.path.join(tmp, f"photo-{width}x{height}.jpg")
            photo(width, height).save(path, quality=90)
            outputs = {n: fn(path) for n, fn in runs.items()}  # warm-up, and the outputs compared
            load = [os.getloadavg()[0]]
            times = {n: [] for n in names}
            for _ in range(args.repeats):
                for n in names:
                    start = time.perf_counter()
                    runs[n](path)
                    times[n].append(time.perf_counter() - start)
            load.append(os.getloadavg()[0])
            entry = {"width": width, "height": height, "load1": load, "times": times, "systems": {}}
            for n in names:
                ratios = [t / u for t, u in zip(times[n], times["uhd"])]
                entry["systems"][n] = {"median_s": statistics.median(times[n]), "min_s": min(times[n]),
                                       "over_uhd_median": statistics.median(ratios), "over_uhd_min": min(ratios),
                                       "patches": int(np.asarray(outputs[n]["pixel_values"]).shape[0])}
                if "as-filed" in outputs and n != "as-filed":
                    entry["systems"][n]["vs_as_filed"] = difference(outputs[n], outputs["as-filed"])
            results["sizes"].append(entry)
            print(f"\n{width}x{height} JPEG (load {load[0]:.2f} -> {load[1]:.2f}), {args.repeats} repeats")
            print(f"  {'system':<10}{'median':>9}{'min':>9}{'÷ uhd med':>11}{'min':>7}{'patches':>9}"
                  f"  |diff| vs as-filed (mean, p99)")
            for n, s in entry["systems"].items():
                diff = s.get("vs_as_filed")
                print(f"  {n:<10}{s['median_s']:>8.3f}s{s['min_s']:>8.3f}s{s['over_uhd_median']:>10.2f}x"
                      f"{s['over_uhd_min']:>6.2f}x{s['patches']:>9}"
                      + (f"  {diff['mean']:.4f}, {diff['p99']:.4f}" if diff else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    from llava_uhd.commandline import quiet_import_noise

    quiet_import_noise()
    main()
