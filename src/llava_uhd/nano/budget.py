"""Fitting the nano run to a time budget: time one training step per variant, then scale the requested steps
(the same for both variants) down to what fits, or with ``fill_budget`` up to use the time left.

    per_step = calibrate(model, processor, {"uhd": items_uhd, "pad": items_pad}, settings)
    plan = plan_steps(settings, per_step, left_s=deadline - time.perf_counter())
    plan.steps       # {"steps1": ..., "steps2": ...}
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .features import CachedFeatureCollator
from .settings import NanoSettings

__all__ = ["StepPlan", "calibrate", "budget_scale", "plan_steps"]

# stage 2 adds LoRA (forward + weight gradients); the Trainer adds its own overhead per step
_STAGE1_FACTOR, _STAGE2_FACTOR = 1.15, 1.4
_EVAL_FACTOR = 2.0  # one generation batch against one training step
_PER_VARIANT_SLACK_S = 20.0


@dataclass
class StepPlan:
    """The steps of a run and how they were chosen. ``record`` is what ``results.json`` and ``run.json`` keep
    (``requested``, ``scale``, ``used``, and the calibration when there was one); ``reserve_s`` and
    ``eval_reserve_s`` are each variant's expected seconds with those steps (all of it, and its evaluation)."""

    steps: dict[str, int]
    record: dict
    reserve_s: dict[str, float] = field(default_factory=dict)
    eval_reserve_s: dict[str, float] = field(default_factory=dict)
    message: str | None = None

    @classmethod
    def requested(cls, settings: NanoSettings) -> "StepPlan":
        """The steps as asked, unscaled."""
        steps = {"steps1": settings.steps1, "steps2": settings.steps2}
        return cls(dict(steps), {"requested": dict(steps), "scale": 1.0, "used": dict(steps)})

    @classmethod
    def restored(cls, record: dict) -> "StepPlan":
        """The plan a paused run saved (a rerun keeps its steps)."""
        return cls(dict(record["used"]), record)

    def use(self, steps: dict[str, int]) -> None:
        self.steps = dict(steps)
        self.record["used"] = dict(steps)


def calibrate(model, processor, items_by_variant: dict[str, list], settings: NanoSettings) -> dict[str, float]:
    """Seconds of one stage-1 forward + backward on a full batch, per variant (1 warm-up, median of 2)."""
    device = settings.device
    cuda = device.startswith("cuda")
    collator = CachedFeatureCollator(processor)
    model.language_model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.train()
    out = {}
    for variant, items in items_by_variant.items():
        batch = collator(items[: settings.batch_size])
        batch.pop("sample_ids", None)
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        times = []
        for _ in range(3):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                                enabled=settings.use_bf16):
                loss = model(**batch).loss
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        out[variant] = sorted(times[1:])[len(times[1:]) // 2]
    model.eval()
    return out


def budget_scale(estimated_s: float, left_s: float, fill: bool, margin: float = 0.8, most: float = 8.0) -> float:
    """The factor for the requested steps: down to what ``left_s`` allows, or with ``fill`` also up to ``margin``
    of it (at most ``most`` times; the estimate leaves out the Trainer's own overhead, so not all of it)."""
    if estimated_s <= 0:
        return 1.0
    scale = max(0.0, left_s) / estimated_s
    if scale < 1.0 or not fill:
        return min(1.0, scale)
    return max(1.0, min(most, margin * scale))


def plan_steps(settings: NanoSettings, per_step: dict[str, float], left_s: float) -> StepPlan:
    """Scale the requested steps to ``left_s`` seconds, given each variant's `calibrate` time per step (the
    evaluations and a margin per variant are taken off first)."""
    plan = StepPlan.requested(settings)
    eval_batches = math.ceil(settings.eval_samples / settings.batch_size)
    est_train = sum(t * (_STAGE1_FACTOR * settings.steps1 + _STAGE2_FACTOR * settings.steps2)
                    for t in per_step.values())
    est_eval = sum(t * _EVAL_FACTOR * eval_batches for t in per_step.values())
    left = left_s - est_eval - _PER_VARIANT_SLACK_S * len(per_step)
    scale = budget_scale(est_train, left, settings.fill_budget)
    plan.use({k: max(1, int(v * scale)) for k, v in plan.steps.items()})
    for v, t in per_step.items():  # what each variant is expected to take: later variants' time is kept for them
        plan.eval_reserve_s[v] = t * _EVAL_FACTOR * eval_batches + 10.0
        plan.reserve_s[v] = (t * (_STAGE1_FACTOR * plan.steps["steps1"] + _STAGE2_FACTOR * plan.steps["steps2"])
                             + plan.eval_reserve_s[v] + 10.0)
    plan.record.update(scale=scale, calibration_s_per_step=per_step, estimated_train_s=est_train,
                       estimated_eval_s=est_eval, estimated_s_per_variant=dict(plan.reserve_s))
    plan.message = (f"calibration: {', '.join(f'{v} {t * 1000:.0f} ms' for v, t in per_step.items())} per fwd+bwd "
                    f"of {settings.batch_size}; estimated {est_train:.0f} s training + {est_eval:.0f} s evaluation "
                    f"for {settings.steps1}+{settings.steps2} steps; budget leaves {left:.0f} s -> steps "
                    f"{plan.steps['steps1']}+{plan.steps['steps2']}")
    return plan
