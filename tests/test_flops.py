import argparse
import json

import pytest

from llava_uhd.flops import (
    MODELS,
    PAPER_TFLOPS,
    VISION_PRESETS,
    add_cost_arguments,
    cost_table,
    format_cost_table,
    llm_prefill_flops,
    llm_spec,
    mlp_projector_flops,
    resampler_flops,
    run_cost,
    vision_spec,
    vit_crop_flops,
    vit_layers_used,
)

REQUIRED = ("vit_patches", "visual_tokens", "vit_tflops", "projector_tflops", "llm_tflops", "total_tflops")

# One 336x336 crop through CLIP-ViT-L/14-336 up to the penultimate layer (23 of 24), by hand:
#   n_p = 24*24 = 576 patches, n = 577 tokens (CLS), D = 1024, I = 4096, p = 14
#   patch embedding   2 * 576 * (3*14*14) * 1024            =    693_633_024
#   per layer         2 * 577 * 4 * 1024**2                 =  4_840_226_816
#                   + 2 * 577 * 2 * 1024 * 4096             =  9_680_453_632
#                   + 2 * 2 * 577**2 * 1024                 =  1_363_677_184   (sum 15_884_357_632)
#   23 layers + embedding                                   = 366_033_858_560
CLIP_L_CROP_23 = 366_033_858_560
# LLaVA-1.5-13B at 336x336: that crop + MLP 2*576*(1024*5120 + 5120**2) = 36_238_786_560
# + LLM 2*13e9*576 = 14_976_000_000_000 + causal attention 2*40*576**2*5120 = 135_895_449_600
LLAVA15_13B = 15_514_168_094_720


def test_vit_one_crop_by_hand():
    spec = vision_spec("clip-l-336")
    assert vit_layers_used(spec) == 23
    assert vit_crop_flops(576, spec, 23) == CLIP_L_CROP_23
    assert vit_crop_flops(576, spec, 24) == CLIP_L_CROP_23 + 15_884_357_632
    t = cost_table(336, 336)
    assert t["llava-1.5"]["vit_flops"] == CLIP_L_CROP_23
    assert t["llava-uhd"]["vit_flops"] == CLIP_L_CROP_23  # not sliced: one 336x336 view


def test_no_cls_tower():
    spec = vision_spec("siglip-so400m")
    d, i, p, n = 1152, 4304, 14, 729
    assert spec.native_patches == 27 * 27 == n
    assert vit_crop_flops(n, spec, 1) == 2 * n * 3 * p * p * d + 2 * n * 4 * d * d + 2 * n * 2 * d * i + 4 * n * n * d


def test_llava15_exact():
    t = cost_table(672, 1008)["llava-1.5"]
    assert t["total_flops"] == LLAVA15_13B
    assert t["projector_flops"] == 36_238_786_560


def test_paper_tflops():
    t = cost_table(672, 1008, vision="clip-l-336", llm_params=13e9, mlp_ablation=True)
    for model, paper in PAPER_TFLOPS.items():
        assert abs(t[model]["total_tflops"] / paper - 1) < 0.03, (model, t[model]["total_tflops"], paper)
    # What this convention gives exactly (regression guard; see the flops module docstring).
    assert t["llava-1.5"]["total_tflops"] == pytest.approx(15.514, abs=0.001)  # paper 15.5   (+0.1%)
    assert t["llava-uhd"]["total_tflops"] == pytest.approx(14.971, abs=0.001)  # paper 14.6   (+2.5%)
    assert t["llava-uhd-mlp"]["total_tflops"] == pytest.approx(113.731, abs=0.001)  # paper 113.65 (+0.1%)
    assert t["llava-next"]["total_tflops"] == pytest.approx(60.082, abs=0.001)
    # The paper's "12.9% of the MLP variant's compute": 13.2% here.
    assert t["llava-uhd"]["total_flops"] / t["llava-uhd-mlp"]["total_flops"] == pytest.approx(0.132, abs=0.001)


def test_paper_2x2_mlp_ablation():
    """Table 2: MLP projector with a fixed 2x2 grid + overview, 80.10 TFLOPs: 5 crops of 576, 2880 + 4 tokens."""
    spec, llm = vision_spec("clip-l-336"), llm_spec(13e9)
    total = 5 * vit_crop_flops(576, spec, 23) + mlp_projector_flops(2880, 1024, 5120) + llm_prefill_flops(2884, llm)
    assert total / 80.10e12 == pytest.approx(1, abs=0.005)


def test_tokens_and_patches_672x1008():
    t = cost_table(672, 1008)
    uhd, l15, nxt = t["llava-uhd"], t["llava-1.5"], t["llava-next"]
    assert (uhd["visual_tokens"], l15["visual_tokens"], nxt["visual_tokens"]) == (454, 576, 2160)
    assert (uhd["vit_patches"], l15["vit_patches"], nxt["vit_patches"]) == (4007, 576, 5 * 576)
    assert uhd["crop_patches"] == [576] * 6 + [19 * 29]
    assert uhd["crops"] == 7 and nxt["crops"] == 5 and l15["crops"] == 1
    for m in MODELS:
        e = t[m]
        assert e["total_flops"] == e["vit_flops"] + e["projector_flops"] + e["llm_flops"]
        assert e["total_tflops"] == pytest.approx(e["vit_tflops"] + e["projector_tflops"] + e["llm_tflops"])
        assert e["llm_tokens"] == e["visual_tokens"]  # no text by default


def test_resampler_formula():
    n, d, h, q = 576, 1024, 5120, 64
    expected = 2 * n * d * h + 4 * n * h * h + 2 * q * h * h + 4 * q * n * h + 2 * q * h * h + 2 * q * h * h
    assert resampler_flops(n, d, h, q) == expected
    assert cost_table(336, 336)["llava-uhd"]["projector_flops"] == expected


def test_llm_conventions():
    llm = llm_spec(13e9)
    assert (llm.params, llm.hidden, llm.layers) == (13_000_000_000, 5120, 40)
    assert (llm_spec(7e9).hidden, llm_spec(7e9).layers) == (4096, 32)
    assert llm_spec(13e9, hidden=4096).layers == 32
    assert llm_spec(20e9, hidden=6000).layers == round(20e9 / (12 * 6000**2))
    t = 100
    assert llm_prefill_flops(t, llm, "none") == 2 * 13_000_000_000 * t
    assert llm_prefill_flops(t, llm, "causal") == 2 * 13_000_000_000 * t + 2 * 40 * t * t * 5120
    assert llm_prefill_flops(t, llm, "full") == 2 * 13_000_000_000 * t + 4 * 40 * t * t * 5120
    with pytest.raises(ValueError):
        llm_prefill_flops(t, llm, "linear")
    # a text prompt is added to every model's LLM input
    a, b = cost_table(672, 1008), cost_table(672, 1008, text_tokens=64)
    for m in MODELS:
        assert b[m]["llm_tokens"] == a[m]["visual_tokens"] + 64
        assert b[m]["llm_flops"] > a[m]["llm_flops"] + 2 * 13e9 * 64 - 1


@pytest.mark.parametrize("aspect", [(1, 1), (2, 3), (3, 2), (16, 9), (9, 16), (4, 1), (1, 3), (7, 5)])
def test_monotone(aspect):
    """Scaling an image up (aspect ratio fixed) never lowers crops or tokens; LLaVA-NeXT's FLOPs never drop, and
    LLaVA-UHD's drop by at most 0.5% (when a side becomes odd its slices differ by a pixel and their patch grids by
    a row: 578 -> 575 patches, say); above the cap both stay flat."""
    aw, ah = aspect
    prev = None
    for k in range(1, 2400 // max(aw, ah), 3):
        t = cost_table(aw * k, ah * k)
        cur = {m: t[m] for m in ("llava-uhd", "llava-next")}
        if prev is not None:
            for m in cur:
                assert cur[m]["crops"] >= prev[m]["crops"], (m, k)
                assert cur[m]["visual_tokens"] >= prev[m]["visual_tokens"], (m, k)
            assert cur["llava-next"]["total_flops"] >= prev["llava-next"]["total_flops"], k
            assert cur["llava-uhd"]["total_flops"] >= 0.995 * prev["llava-uhd"]["total_flops"], k
        prev = cur
    big = cost_table(20 * aw * 336, 20 * ah * 336)
    assert big["llava-uhd"]["crops"] <= 7 and big["llava-next"]["crops"] <= 5
    # a slice-count increase always costs more, even after the rounding jitter
    assert big["llava-uhd"]["total_flops"] > cost_table(aw, ah)["llava-uhd"]["total_flops"]


def test_uhd_flops_grow_with_slice_count():
    costs = [cost_table(336 * k, 336)["llava-uhd"] for k in range(1, 7)]
    assert [c["crops"] for c in costs] == [1, 3, 4, 5, 6, 7]
    assert all(b["total_flops"] > a["total_flops"] for a, b in zip(costs, costs[1:]))


def test_json_and_keys():
    t = cost_table(1280, 720, mlp_ablation=True)
    assert set(t) == set(MODELS) | {"llava-uhd-mlp"}
    assert set(cost_table(1280, 720)) == set(MODELS)
    back = json.loads(json.dumps(t))
    assert back == t
    for m, e in t.items():
        for k in REQUIRED:
            assert k in e, (m, k)
            assert isinstance(e[k], (int, float)) and not isinstance(e[k], bool)


@pytest.mark.parametrize("vision", sorted(VISION_PRESETS))
def test_every_preset(vision):
    t = cost_table(1000, 700, vision=vision, llm_params=7e9)
    spec = vision_spec(vision)
    assert t["llava-1.5"]["visual_tokens"] == spec.native_patches
    assert all(p <= spec.native_patches for p in t["llava-uhd"]["crop_patches"])
    assert all(t[m]["total_tflops"] > 0 for m in MODELS)
    assert vision in format_cost_table(t)


def test_feature_layer():
    spec = vision_spec("clip-l-336")
    assert vit_layers_used(spec, -1) == 24 and vit_layers_used(spec, 12) == 12
    for bad in (0, 25, -25):
        with pytest.raises(ValueError):
            vit_layers_used(spec, bad)
    a, b = cost_table(672, 1008), cost_table(672, 1008, feature_layer=-1)
    assert b["llava-uhd"]["vit_flops"] > a["llava-uhd"]["vit_flops"]


def test_bad_input():
    with pytest.raises(ValueError):
        cost_table(672, 1008, vision="vit-h")
    with pytest.raises(ValueError):
        cost_table(672, 1008, llm_params=0)
    with pytest.raises(ValueError):
        cost_table(0, 1008)
    with pytest.raises(ValueError):
        cost_table(672, 1008, queries=0)


def test_format_and_cli_helpers():
    t = cost_table(672, 1008, mlp_ablation=True)
    text = format_cost_table(t)
    for m in t:
        assert m in text
    assert "454" in text and "2160" in text and "14.97" in text and "15.51" in text
    parser = add_cost_arguments(argparse.ArgumentParser())
    out = run_cost(parser.parse_args(["--width", "672", "--height", "1008", "--json"]))
    assert json.loads(out)["llava-uhd"]["visual_tokens"] == 454
    out = run_cost(parser.parse_args(["--width", "672", "--height", "1008", "--llm-params", "7e9"]))
    assert "7B" in out
