"""`llava-uhd ablate` (llava_uhd.train.ablation) and the synthetic evaluation (llava_uhd.eval.synthetic_eval)."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from llava_uhd.data.synthetic import FINE_DETAIL_KINDS
from llava_uhd.eval.synthetic_eval import default_prompt, evaluate_samples, generate_answers, score_predictions
from llava_uhd.flops import llm_prefill_flops, mlp_projector_flops, resampler_flops, vit_crop_flops
from llava_uhd.slicing import SliceConfig, plan_slices
from llava_uhd.train import ablation
from llava_uhd.train.ablation import (
    VARIANTS,
    AblationSettings,
    add_ablate_arguments,
    build_processor,
    build_tokenizer,
    make_samples,
    run_ablate,
    sample_cost,
    vision_spec_of,
)

QUICK_ARGS = ["--quick", "--train-samples", "24", "--eval-samples", "12", "--steps", "2", "--threads", "1",
              "--no-progress"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One end-to-end `--quick` run through the CLI entry points (a few dozen samples, 2 steps per variant)."""
    out = tmp_path_factory.mktemp("ablate")
    parser = add_ablate_arguments(argparse.ArgumentParser())
    args = parser.parse_args([*QUICK_ARGS, "--out", str(out)])
    args.argv = [*QUICK_ARGS, "--out", str(out)]
    assert run_ablate(args) == 0
    return out, json.loads((out / "results.json").read_text())


def expected_visual_tokens(variant: str, width: int, height: int, settings: AblationSettings) -> int:
    """Visual tokens of one image, from the slicing plan alone (independent of the processor)."""
    config = SliceConfig(image_size=(settings.image_size, settings.image_size), patch_size=settings.patch_size,
                         max_slices=settings.max_slices)
    q = settings.num_queries
    if variant == "pad":  # one native view whatever the image
        return q
    plan = plan_slices(width, height, config)
    schema = variant != "uhd-no-schema"
    if variant == "uhd-mlp":
        return plan.num_patches + plan.num_separators(schema)
    return plan.num_tokens(q, schema)


def test_quick_run_writes_everything(quick_run, capsys):
    out, results = quick_run
    assert (out / "accuracy.png").stat().st_size > 5000
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "RESULTS.md").read_text()
    assert "llava-uhd ablate --quick" in md and "| uhd-mlp |" in md
    assert set(results["variants"]) == set(VARIANTS)
    kinds = results["kinds"]
    assert kinds == list(ablation.ABLATION_KINDS)
    fine = [k for k in kinds if k in FINE_DETAIL_KINDS or k in ablation.PROBE_KINDS]
    assert results["fine_detail_kinds"] == fine and fine
    assert "grey_probe" not in results["fine_detail_kinds"]
    for name, r in results["variants"].items():
        assert r["steps"] == 2 and len(r["loss_curve"]) == 2 and r["train_time_s"] > 0
        assert len(r["predictions"]) == 12
        present = {p["kind"] for p in r["predictions"]}
        assert set(r["per_kind"]) == present
        for acc in [v["accuracy"] for v in r["per_kind"].values()] + [r["fine_detail"]["accuracy"]]:
            assert 0.0 <= acc <= 1.0
    table = ablation.format_table(results)
    for name in VARIANTS:
        assert name in table
    for kind in kinds:
        assert kind in table and kind in md


def test_quick_run_token_counts_and_flops(quick_run):
    _, results = quick_run
    settings = AblationSettings.quick()
    v = results["variants"]
    for name, r in v.items():
        sizes = [p["size"] for p in r["predictions"]]
        expected = sum(expected_visual_tokens(name, w, h, settings) for w, h in sizes) / len(sizes)
        assert r["cost"]["visual_tokens"] == pytest.approx(expected)
        assert r["cost"]["total_flops"] > 0
        assert r["cost"]["total_flops"] == pytest.approx(
            r["cost"]["vit_flops"] + r["cost"]["projector_flops"] + r["cost"]["llm_flops"])
    assert v["pad"]["cost"]["visual_tokens"] == settings.num_queries
    # the MLP keeps every patch: many times the resampler's tokens, and more FLOPs
    assert v["uhd-mlp"]["cost"]["visual_tokens"] >= 5 * v["uhd"]["cost"]["visual_tokens"]
    assert v["uhd-mlp"]["cost"]["total_flops"] > v["uhd"]["cost"]["total_flops"] > v["pad"]["cost"]["total_flops"]
    assert v["uhd"]["cost"]["visual_tokens"] > v["uhd-no-schema"]["cost"]["visual_tokens"]
    assert v["uhd"]["cost"]["vit_flops"] == v["uhd-mlp"]["cost"]["vit_flops"]  # same crops


def test_sample_cost_uses_the_flops_convention():
    settings = AblationSettings.quick()
    tokenizer = build_tokenizer(["USER: What colour is it? ASSISTANT: red"], 300)
    vision = vision_spec_of(settings)
    llm = SimpleNamespace(params=1000, hidden=192, layers=3)
    w, h = 300, 100
    plan = plan_slices(w, h, SliceConfig(image_size=(64, 64), patch_size=8, max_slices=settings.max_slices))
    patches = [c.num_patches for c in plan.crops]
    assert plan.is_sliced and len(patches) > 2
    vit = sum(vit_crop_flops(n, vision, vision.layers) for n in patches)  # feature layer -1: every layer
    uhd = sample_cost(build_processor(tokenizer, settings, "uhd"), w, h, 10, vision, llm, settings)
    tokens = plan.num_tokens(settings.num_queries)
    assert uhd["visual_tokens"] == tokens and uhd["llm_tokens"] == tokens + 10
    assert uhd["vit_flops"] == vit
    assert uhd["projector_flops"] == sum(resampler_flops(n, 96, 192, settings.num_queries) for n in patches)
    assert uhd["llm_flops"] == llm_prefill_flops(tokens + 10, llm)
    mlp = sample_cost(build_processor(tokenizer, settings, "uhd-mlp"), w, h, 10, vision, llm, settings)
    assert mlp["projector_flops"] == mlp_projector_flops(sum(patches), 96, 192)
    assert mlp["visual_tokens"] == sum(patches) + plan.num_separators()
    pad = sample_cost(build_processor(tokenizer, settings, "pad"), w, h, 10, vision, llm, settings)
    assert pad["crops"] == 1 and pad["vit_patches"] == 64 and pad["visual_tokens"] == settings.num_queries


def test_score_predictions_on_fake_outputs():
    predictions = ["Red.", "blue", "3", "three", "a circle", "red or blue", "grey", "", "Gray"]
    answers = ["red", "green", "3", "3", "circle", "red", "grey", "2", "grey"]
    kinds = ["corner_colour", "corner_colour", "count", "count", "shape_at", "edge_colour", "grey_probe", "count",
             "grey_probe"]
    s = score_predictions(predictions, answers, kinds)
    assert s["correct"] == [True, False, True, True, True, False, True, False, True]
    assert list(s["per_kind"]) == ["count", "corner_colour", "edge_colour", "shape_at", "grey_probe"]  # KINDS order
    assert s["per_kind"]["corner_colour"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert s["per_kind"]["count"]["accuracy"] == pytest.approx(2 / 3)
    assert s["per_kind"]["edge_colour"]["accuracy"] == 0.0
    assert s["fine_detail"] == {"correct": 4, "total": 7, "accuracy": 4 / 7}  # grey_probe is not fine detail
    assert s["all"] == {"correct": 6, "total": 9, "accuracy": 6 / 9}
    empty = score_predictions([], [], [])
    assert empty["fine_detail"]["accuracy"] is None and empty["per_kind"] == {}
    with pytest.raises(ValueError):
        score_predictions(["a"], [], [])


class FakeModel:
    """Answers every prompt with fixed text: what `generate` returns is the prompt plus those tokens."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, reply: str):
        self.reply = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.calls = []

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, pixel_values, patch_grid_hw, max_new_tokens, **kwargs):
        self.calls.append({"batch": input_ids.shape[0], "left_padded": bool((attention_mask[:, -1] == 1).all()),
                           "max_new_tokens": max_new_tokens, "do_sample": kwargs.get("do_sample")})
        new = torch.tensor(self.reply[:max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], dim=1)


def test_evaluate_samples_with_a_fake_model():
    settings = AblationSettings.quick()
    samples = make_samples(5, 3, settings)
    tokenizer = build_tokenizer(ablation._corpus(samples), 300)
    processor = build_processor(tokenizer, settings, "uhd")
    prompt = default_prompt(processor, "What colour is it?")
    assert prompt == "USER: <image>\nWhat colour is it? ASSISTANT:"
    model = FakeModel(tokenizer, " red")
    answers = generate_answers(model, processor, [s.image for s in samples[:3]], [prompt] * 3, batch_size=2,
                               max_new_tokens=4)
    assert answers == ["red"] * 3
    assert [c["batch"] for c in model.calls] == [2, 1]
    assert all(c["left_padded"] and c["do_sample"] is False for c in model.calls)
    result = evaluate_samples(FakeModel(tokenizer, " red"), processor, samples, batch_size=4)
    assert result["predictions"] == ["red"] * 5
    assert result["correct"] == [s.answer == "red" for s in samples]
    with pytest.raises(ValueError):
        generate_answers(model, processor, [samples[0].image], [prompt, prompt])


def test_training_prompt_matches_generation_prompt():
    """The answer is trained right after the exact prompt used for generation."""
    from llava_uhd.data.templates import tokenize_conversation

    settings = AblationSettings.quick()
    samples = make_samples(6, 0, settings)
    tokenizer = build_tokenizer(ablation._corpus(samples), 320)
    processor = build_processor(tokenizer, settings, "pad")
    s = samples[0]
    turns = [{"role": "user", "content": "<image>\n" + s.question}, {"role": "assistant", "content": s.answer}]
    ids, labels = tokenize_conversation(turns, tokenizer, "chat_template")
    prompt_ids = tokenizer(default_prompt(processor, s.question))["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    trained = [t for t, lab in zip(ids, labels) if lab != -100]
    assert trained == ids[len(prompt_ids):] and trained[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained, skip_special_tokens=True).strip() == s.answer


def test_settings_from_args_and_unknown_variant(tmp_path):
    parser = add_ablate_arguments(argparse.ArgumentParser())
    s = ablation.settings_from_args(parser.parse_args(["--steps", "7", "--seed", "3", "--variants", "uhd"]))
    assert s.steps == 7 and s.seed == 3 and s.held_out_seed == 4 and s.train_samples == AblationSettings().train_samples
    q = ablation.settings_from_args(parser.parse_args(["--quick", "--steps", "3"]))
    assert q.steps == 3 and q.train_samples == AblationSettings.quick().train_samples
    with pytest.raises(SystemExit):
        parser.parse_args(["--variants", "nope"])
    with pytest.raises(ValueError, match="unknown variants"):
        ablation.run_ablation(AblationSettings.quick(), tmp_path, ["nope"], progress=False)


def test_probe_samples_are_deterministic_and_true_to_their_pixels():
    import numpy as np

    from llava_uhd.data.synthetic import COLOURS

    settings = AblationSettings(kinds=tuple(ablation.PROBE_KINDS), max_side=300)
    a, b = make_samples(30, 5, settings), make_samples(30, 5, settings)
    assert [s.answer for s in a] == [s.answer for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert {s.kind for s in a} == set(ablation.PROBE_KINDS)
    for s in a:
        w, h = s.image.size
        assert settings.min_side <= min(w, h) and max(w, h) <= settings.max_side
        shape = s.metadata["shape"]
        x0, y0, x1, y1 = shape["box"]
        arr = np.asarray(s.image)
        hits = np.argwhere((arr == COLOURS[shape["colour"]]).all(-1))  # (y, x) of the shape's pixels
        assert len(hits) > 0 and hits[:, 1].min() >= x0 and hits[:, 1].max() < x1 and hits[:, 0].min() >= y0
        assert hits[:, 0].max() < y1  # the only pixels of that colour are the shape's
        assert (x1 <= w // 2 or x0 >= w - w // 2) and (y1 <= h // 2 or y0 >= h - h // 2)  # never on a midline
        quarter = ("top" if y0 < h / 2 else "bottom") + "-" + ("left" if x0 < w / 2 else "right")
        expected = {"probe_shape": shape["shape"], "probe_colour": shape["colour"], "probe_where": quarter}
        assert s.answer == expected[s.kind]


def test_generator_kinds_give_the_generate_dataset_samples():
    import numpy as np

    from llava_uhd.data.synthetic import generate_sample, sample_seed

    settings = AblationSettings(kinds=("corner_colour", "count"), max_side=200)
    ours = make_samples(4, 9, settings)
    for i, s in enumerate(ours):
        ref = generate_sample(sample_seed(9, i), ["corner_colour", "count"], 64, 200, 6.0)
        assert (s.question, s.answer, s.kind) == (ref.question, ref.answer, ref.kind)
        assert np.array_equal(np.asarray(s.image), np.asarray(ref.image))
