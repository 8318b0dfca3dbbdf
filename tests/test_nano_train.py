"""The nano recipe (`llava_uhd.nano.train`): a quick run end to end on the real backbones, pausing and
continuing a run."""

from __future__ import annotations

import json
import math

import pytest

from llava_uhd.nano.train import train_nano

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.slow]  # slow: a nano training run on the real backbones



def test_quick_run_end_to_end(nano_run):
    out, results, messages = nano_run
    for name in ("results.json", "results.md", "train_log.jsonl"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["variants"].keys() == {"uhd", "pad"}
    for variant in ("uhd", "pad"):
        r = results["variants"][variant]
        assert r["stage1"]["steps"] == r["stage2"]["steps"] == 1
        assert r["stage1"]["template"] == "plain" and r["stage2"]["template"] == "vicuna_v1"
        assert math.isfinite(r["stage1"]["train_loss"]) and math.isfinite(r["stage2"]["train_loss"])
        assert r["fine_detail"]["total"] + r["per_kind"].get("grey_probe", {}).get("total", 0) == 4
        assert len(r["predictions"]) == 4 and all(isinstance(p["prediction"], str) for p in r["predictions"])
    # stage 2 trains the resampler and the LoRA adapters, stage 1 the resampler alone
    uhd = results["variants"]["uhd"]
    assert uhd["stage2"]["trainable_parameters"] > uhd["stage1"]["trainable_parameters"]
    assert uhd["settings"]["image_strategy"] == "uhd" and results["variants"]["pad"]["settings"]["image_strategy"] \
        == "pad"
    assert uhd["visual_tokens_per_image"] > results["variants"]["pad"]["visual_tokens_per_image"]
    # every variant is exported: the baseline beside the model, with its own image strategy and name
    for variant, folder, name in (("uhd", "nano_weights", "llava-uhd-nano"), ("pad", "nano_weights_pad",
                                                                              "llava-uhd-nano-pad")):
        config = json.loads((out / folder / "nano_config.json").read_text())
        assert config["name"] == name and config["model"]["image_strategy"] == variant
        assert results["variants"][variant]["export"]["dir"] == str(out / folder)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {(r["variant"], r["stage"]) for r in rows} == {("uhd", 1), ("uhd", 2), ("pad", 1), ("pad", 2)}
    md = (out / "results.md").read_text()
    assert "| **uhd** |" in md and "| **pad** |" in md and "prior (no image)" in md and "Fine-detail gap" in md
    assert results["settings"]["held_out_seed"] == 1 and results["settings"]["seed"] == 0
    plan = results["plan"]  # the time budget: calibrated, nothing to scale down for a quick nano_run
    assert plan["scale"] == 1.0 and plan["used"] == plan["requested"] == {"steps1": 1, "steps2": 1}
    assert set(plan["calibration_s_per_step"]) == {"uhd", "pad"} and plan["estimated_train_s"] > 0
    # progress while training: one line per logged step, per variant and stage
    for variant in ("uhd", "pad"):
        for stage in (1, 2):
            assert any(f"{variant} stage {stage} step 1/1: loss " in m and "s/step" in m for m in messages)


def test_stop_after_and_rerun_continue_the_run(nano_cache, tmp_path):
    """``stop_after_s`` pauses (a checkpoint at the step, then return); the same call again continues: between
    stages, from a Trainer checkpoint in the middle of one, and, once finished, restores everything without
    training. The continued run matches an uninterrupted one (same data order and optimizer state; AdamW's first
    steps turn float32 noise in near-zero gradients into lr-sized moves, so the later losses agree to ~1e-3, not
    bit for bit). Other settings in the same folder are refused."""
    kw = dict(device="cpu", quick=True, variants=["uhd"], steps2=3, cache_dir=nano_cache, workers=0, threads=1,
              verify_export=False, log=None)
    ref = train_nano(tmp_path / "ref", **kw)
    out = tmp_path / "paused"
    first = train_nano(out, stop_after_s=0, checkpoint_steps=1, **kw)
    assert first["paused"]["at"] == "uhd stage 2" and not first["variants"]  # stage 1 (1 step) finished first
    assert (out / "state" / "uhd-stage1" / "stage.json").is_file()
    assert (out / "state" / "features-uhd.pt").is_file()  # kept for the rerun
    messages: list[str] = []
    second = train_nano(out, stop_after_s=0, checkpoint_steps=1, **{**kw, "log": messages.append})
    assert second["paused"]["at"] == "uhd stage 2 step 1/3"
    assert any("uhd: the training samples' features loaded from" in m for m in messages)
    assert [p.name for p in (out / "state" / "uhd-stage2").glob("checkpoint-*")] == ["checkpoint-1"]
    done = train_nano(out, checkpoint_steps=1, **{**kw, "log": messages.append})
    assert "paused" not in done and any("resuming from checkpoint-1" in m for m in messages)
    assert done["variants"]["uhd"]["stage2"]["resumed_from_step"] == 1
    assert not list((out / "state" / "uhd-stage2").glob("checkpoint-*"))  # dropped once the stage finished
    assert not (out / "state" / "features-uhd.pt").exists()  # and the features once the variant finished

    def losses(folder):
        return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, (folder / "train_log.jsonl").open())]

    want, got = losses(tmp_path / "ref"), losses(out)
    assert [w[:2] for w in want] == [g[:2] for g in got] == [(1, 1), (2, 1), (2, 2), (2, 3)]
    assert got[:2] == want[:2]  # before any resumed optimizer step: identical
    for (_, _, a), (_, _, b) in zip(want, got):
        assert abs(a - b) <= 1e-2 * abs(a), (want, got)
    assert done["variants"]["uhd"]["per_kind"].keys() == ref["variants"]["uhd"]["per_kind"].keys()

    again = train_nano(out, checkpoint_steps=1, **{**kw, "log": messages.append})
    assert messages[-1].endswith("uhd: finished by an earlier run (fine-detail accuracy "
                                 f"{100 * done['variants']['uhd']['fine_detail']['accuracy']:.1f} %)")
    assert again["variants"]["uhd"]["predictions"] == done["variants"]["uhd"]["predictions"]
    with pytest.raises(ValueError, match=r"other settings \(lr1 differ: lr1 was 0.001, now 0.5\)"):
        train_nano(out, lr1=0.5, **kw)


def test_feature_cache_gives_the_same_loss_as_the_tower(nano_run):
    """Checked inside the run on the real model: the loss of two training samples running DINOv2 on their pixels
    and from the cached features."""
    check = nano_run[1]["feature_cache_check"]
    assert check["samples"] == 2 and math.isfinite(check["loss_tower"])
    assert check["rel_err"] < 1e-4
