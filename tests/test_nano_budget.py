"""Fitting a nano run to a time budget (`llava_uhd.nano.budget`)."""

from __future__ import annotations

import pytest

from llava_uhd.nano.budget import StepPlan, budget_scale, plan_steps
from llava_uhd.nano.settings import NanoSettings


def test_budget_scale_goes_down_to_fit_and_up_only_when_asked():
    assert budget_scale(100.0, 50.0, fill=False) == budget_scale(100.0, 50.0, fill=True) == 0.5
    assert budget_scale(100.0, -5.0, fill=True) == 0.0  # nothing left: the caller keeps 1 step
    assert budget_scale(100.0, 300.0, fill=False) == 1.0
    assert budget_scale(100.0, 300.0, fill=True) == pytest.approx(2.4)  # 80 % of what fits
    assert budget_scale(100.0, 110.0, fill=True) == 1.0  # never below the request when it fits
    assert budget_scale(100.0, 1e6, fill=True) == 8.0
    assert budget_scale(0.0, 10.0, fill=True) == 1.0


def test_plan_steps_scales_both_stages_alike_and_reserves_time_per_variant():
    settings = NanoSettings(steps1=100, steps2=200, eval_samples=64, batch_size=32)
    per_step = {"uhd": 1.0, "pad": 0.5}
    # training estimate: (1.15 * 100 + 1.4 * 200) * 1.5 = 592.5 s; evaluation 2 batches * 2.0 * 1.5 = 6 s
    plan = plan_steps(settings, per_step, left_s=592.5 / 2 + 6 + 40 + 1)  # 1 s over half: still 50 + 100 steps
    assert plan.record["scale"] == pytest.approx(0.5, abs=0.01)
    assert plan.steps == plan.record["used"] == {"steps1": 50, "steps2": 100}
    assert plan.record["requested"] == {"steps1": 100, "steps2": 200}
    assert plan.reserve_s["uhd"] == pytest.approx(1.0 * (1.15 * 50 + 1.4 * 100) + 4.0 + 10.0 + 10.0)
    assert plan.eval_reserve_s["pad"] == pytest.approx(0.5 * 2.0 * 2 + 10.0)
    assert "-> steps 50+100" in plan.message
    assert plan_steps(settings, per_step, left_s=-100).steps == {"steps1": 1, "steps2": 1}  # at least one


def test_step_plans_requested_and_restored():
    plan = StepPlan.requested(NanoSettings(steps1=3, steps2=4))
    assert plan.steps == {"steps1": 3, "steps2": 4} and plan.record["scale"] == 1.0
    plan.use({"steps1": 2, "steps2": 4})
    again = StepPlan.restored(plan.record)
    assert again.steps == {"steps1": 2, "steps2": 4} and again.record["requested"] == {"steps1": 3, "steps2": 4}
