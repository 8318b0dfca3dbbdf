"""`llava-uhd ablate` (llava_uhd.train.ablation) and the synthetic evaluation (llava_uhd.eval.synthetic_eval)."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from llava_uhd.data.probes import DEFAULT_KINDS, FINE_KINDS, make_samples
from llava_uhd.flops import llm_prefill_flops, mlp_projector_flops, resampler_flops, vit_crop_flops
from llava_uhd.slicing import SliceConfig, plan_slices
from llava_uhd.train import ablation
from llava_uhd.train.ablation import (
    VARIANTS,
    AblationSettings,
    add_ablate_arguments,
    build_processor,
    build_tokenizer,
    corpus,
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


@pytest.mark.slow
def test_quick_run_writes_everything(quick_run, capsys):
    out, results = quick_run
    assert (out / "accuracy.png").stat().st_size > 5000
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "RESULTS.md").read_text()
    assert "llava-uhd ablate --quick" in md and "| uhd-mlp |" in md
    assert set(results["variants"]) == set(VARIANTS)
    kinds = results["kinds"]
    assert kinds == list(DEFAULT_KINDS)
    fine = [k for k in kinds if k in FINE_KINDS]
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


@pytest.mark.slow
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


def test_training_prompt_matches_generation_prompt():
    """The answer is trained right after the exact prompt used for generation."""
    from llava_uhd.data.templates import tokenize_conversation

    settings = AblationSettings.quick()
    samples = make_samples(6, 0, settings)
    tokenizer = build_tokenizer(corpus(samples), 320)
    processor = build_processor(tokenizer, settings, "pad")
    s = samples[0]
    turns = [{"role": "user", "content": "<image>\n" + s.question}, {"role": "assistant", "content": s.answer}]
    ids, labels = tokenize_conversation(turns, tokenizer, "chat_template")
    prompt_ids = tokenizer(processor.question_prompt(s.question))["input_ids"]
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


@pytest.mark.parametrize("variant, size, pattern", [
    # 128x64 on the 64x64 ViT (8x8 patches of 8 px), cap 6: N = 2, 2 columns x 1 row of 64x64 slices (exact);
    # the overview, 2:1 in 64 patches: sqrt(128) = 11.3 -> 11 across, sqrt(32) = 5.7 -> 6 down, 66 > 64: 11 x 5
    ("uhd", (128, 64), [("I", 8), ",", ("I", 8), "\n", ("I", 8)]),
    ("uhd-no-schema", (128, 64), [("I", 8), ("I", 8), ("I", 8)]),
    ("uhd-mlp", (128, 64), [("I", 64), ",", ("I", 64), "\n", ("I", 11 * 5)]),
    ("pad", (128, 64), [("I", 8)]),  # one padded native view, whatever the image
    # the turned image: 1 column x 2 rows, newlines only; the overview 5 x 11
    ("uhd", (64, 128), [("I", 8), "\n", ("I", 8), "\n", ("I", 8)]),
    ("uhd-mlp", (64, 128), [("I", 64), "\n", ("I", 64), "\n", ("I", 5 * 11)]),
    # 192x128: N = 6, 3 columns x 2 rows of 64x64; the overview (3:2) in 64 patches: sqrt(96) = 9.8 -> 10,
    # sqrt(42.7) = 6.5 -> 7, 70 > 64; 9 x 7 (1.29), 10 x 6 (1.67), 9 x 6 (1.5, exact): 9 x 6 = 54 patches
    ("uhd", (192, 128), [("I", 8), ",", ("I", 8), ",", ("I", 8), "\n", ("I", 8), ",", ("I", 8), ",", ("I", 8),
                         "\n", ("I", 8)]),
    ("uhd-no-schema", (192, 128), [("I", 8 * 7)]),
    ("uhd-mlp", (192, 128), [("I", 64), ",", ("I", 64), ",", ("I", 64), "\n", ("I", 64), ",", ("I", 64), ",",
                             ("I", 64), "\n", ("I", 54)]),
    ("pad", (192, 128), [("I", 8)]),
])
def test_each_variant_lays_out_the_image_tokens_as_written_by_hand(variant, size, pattern):
    """The token ids an image becomes under each ablation switch (image strategy, projector, spatial schema), with
    the quick settings (64x64 ViT, 8-px patches, 8 resampler queries), against layouts worked out by hand: runs
    of the image token, the tokenizer's own "," between the slices of a row and "\\n" after each row."""
    from conftest import random_image

    settings = AblationSettings.quick()
    assert (settings.image_size, settings.patch_size, settings.num_queries) == (64, 8, 8)
    tokenizer = build_tokenizer(["USER: What colour is it? ASSISTANT: red, blue"], 300)
    processor = build_processor(tokenizer, settings, variant)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    comma, newline = tokenizer.encode(",", add_special_tokens=False), tokenizer.encode("\n", add_special_tokens=False)
    assert len(comma) == len(newline) == 1 and comma != newline
    symbol = {",": comma, "\n": newline}
    want = [t for part in pattern for t in ([image_id] * part[1] if isinstance(part, tuple) else symbol[part])]
    out = processor(images=[random_image(*size)], text="A<image>B", return_tensors=None)
    ids = out["input_ids"][0].tolist()
    first = ids.index(image_id)
    assert ids[first:first + len(want)] == want
    rest = ids[:first] + ids[first + len(want):]
    assert not set(rest) & {image_id, *comma, *newline}
    assert processor.num_image_tokens(*size) == len(want)
