"""What a nano run writes: ``results.json`` (everything), ``results.md`` (the accuracy table and how the run was
made), ``train_log.jsonl`` (the logged losses), and the summary kept in the shipped ``nano_config.json``.

    write_results(out_dir, results, log_rows, start)      # all three files (the wall time up to now)
    print(format_markdown(results))
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..eval.reporting import accuracy_table, markdown_table

__all__ = ["format_markdown", "summary", "write_results"]


def summary(results: dict) -> dict:
    """The results in short (accuracies per variant, the prior, the gap), as ``nano_config.json`` keeps them."""
    out = {}
    for name, r in results["variants"].items():
        out[name] = {"fine_detail": r["fine_detail"]["accuracy"], "all": r["all"]["accuracy"],
                     "per_kind": {k: v["accuracy"] for k, v in r["per_kind"].items()}}
    out["prior"] = {"fine_detail": results["prior"]["fine_detail"]["accuracy"]}
    for key in ("gap_fine_detail_points", "meets_target"):
        if key in results:
            out[key] = results[key]
    out["eval_samples"] = results["settings"]["eval_samples"]
    out["held_out_seed"] = results["settings"]["held_out_seed"]
    return out


def write_results(out: Path, results: dict, log_rows: list[dict], start: float) -> None:
    """``results.json``, ``results.md`` and ``train_log.jsonl`` in ``out``; ``wall_time_s`` counts from ``start``
    (a `time.perf_counter` reading)."""
    results["wall_time_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(format_markdown(results))
    with open(out / "train_log.jsonl", "w") as f:
        for row in log_rows:
            f.write(json.dumps(row) + "\n")


def _stages(r: dict) -> list[dict]:
    return [r.get(f"stage{i}", {}) for i in (1, 2)]


_EXTRA_COLUMNS = (
    ("visual tokens / image", lambda r: f"{r.get('visual_tokens_per_image', 0):.0f}"),
    ("train steps", lambda r: "+".join(str(s.get("steps", "-")) for s in _stages(r))),
    ("train time (s)", lambda r: f"{sum(s.get('seconds', 0) for s in _stages(r)):.0f}"),
)


def format_markdown(results: dict) -> str:
    """``results.md``: accuracy per kind, fine-detail and overall for each variant and the prior, and how."""
    header, rows = accuracy_table(results, _EXTRA_COLUMNS, overall=True, counts=True, bold=True)
    s = results["settings"]
    lines = ["# nano LLaVA-UHD vs the same model with LLaVA-1.5 padding", ""]
    lines += [f"Accuracy (%) on {s['eval_samples']} held-out synthetic questions (seed {s['held_out_seed']}), greedy "
              f"decoding, scored with `is_correct`; fine-detail = "
              + ", ".join(f"`{k}`" for k in results["fine_detail_kinds"]) + " together.", ""]
    lines += markdown_table(header, rows)
    if "gap_fine_detail_points" in results:
        lines += ["", f"Fine-detail gap uhd - pad: **{results['gap_fine_detail_points']:+.1f} points** (target +15: "
                      f"{'met' if results['meets_target'] else 'NOT met'})."]
    plan = results.get("plan", {})
    used = plan.get("used", {})
    m = results.get("machine", {})
    continued = any(r.get("stage1", {}).get("restored") or r.get("stage2", {}).get("resumed_from_step")
                    for r in results["variants"].values())
    lines += ["", "## How it was made", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    lines += [
        f"- backbones: {s['vision']} (frozen, Linear weights rounded {s['vision_rounding']}) + {s['llm']}; slice "
        f"{s['slice_size']} px (16x16 patches), at most {s['max_slices']} slices + overview, perceiver resampler "
        f"with {s['num_queries']} queries",
        f"- data: {s['train_samples']} training samples (seed {s['seed']}), kinds {', '.join(s['kinds'])}; images "
        f"{s['min_side']}-{s['max_side']} px per side, aspect ratio up to {s['max_aspect']:g}:1",
        f"- stage 1: resampler only, template `{s['template1']}` (caption of every shape), lr {s['lr1']:g}, "
        f"{used.get('steps1', s['steps1'])} steps; stage 2: resampler (lr {s['projector_lr2']:g}) + LoRA r "
        f"{s['lora_r']} alpha {s['lora_alpha']} on {'/'.join(t.split('_')[0] for t in s['lora_targets'])} (lr "
        f"{s['lr2']:g}), template `{s['template2']}`, {used.get('steps2', s['steps2'])} steps; batch "
        f"{s['batch_size']}, cosine, {100 * s['warmup_fraction']:g}% warmup, the same for both variants"
        + (f" (steps scaled by {plan['scale']:.2f} to the time budget)" if plan.get("scale", 1.0) != 1.0 else ""),
        f"- machine: {m.get('gpu') or m.get('cpu') or 'CPU'} ({m.get('device')}, {m.get('cpu_count')} CPUs, "
        f"{m.get('torch_threads')} torch threads); total wall time {results.get('wall_time_s', 0) / 60:.1f} min"
        + (" in this run (it continued an earlier one)" if continued else ""),
        "",
        "`pad` differs from `uhd` only in the image strategy (pad to a square with the mean colour, one "
        f"{s['slice_size']}x{s['slice_size']} view, no slices). The prior row answers each question with its kind's "
        "most frequent training answer.",
        "",
    ]
    return "\n".join(lines)
