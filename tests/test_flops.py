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

# The overview crop of a 672x1008 image: 19 x 29 = 551 patches, n = 552 tokens
#   patch embedding   2 * 551 * 588 * 1024                  =    663_527_424
#   per layer         2 * 552 * 4 * 1024**2                 =  4_630_511_616
#                   + 2 * 552 * 2 * 1024 * 4096             =  9_261_023_232
#                   + 2 * 2 * 552**2 * 1024                 =  1_248_067_584   (sum 15_139_602_432)
#   23 layers + embedding                                   = 348_874_383_360
CLIP_L_OVERVIEW_672x1008_23 = 348_874_383_360
# The resampler on one 336x336 crop (n = 576 patch tokens, the CLS dropped; D = 1024, H = 5120, q = 64):
#   kv_proj          2 * 576 * 1024 * 5120                  =  6_039_797_760
#   k, v in-proj     2 * 2 * 576 * 5120**2                  = 60_397_977_600
#   q in-proj        2 * 64 * 5120**2                       =  3_355_443_200
#   attention        2 * 2 * 64 * 576 * 5120                =    754_974_720
#   out_proj, proj   2 * (2 * 64 * 5120**2)                 =  6_710_886_400
#   sum                                                     = 77_259_079_680
RESAMPLER_CROP_576 = 77_259_079_680
# ... and on the overview (n = 551): 5_777_653_760 + 57_776_537_600 + 3 * 3_355_443_200 + 722_206_720
RESAMPLER_CROP_551 = 74_342_727_680
# LLaVA-UHD-13B at 672x1008 (2 x 3 slices of 576 patches + the 551-patch overview, 7 * 64 + 6 = 454 tokens):
#   ViT        6 * 366_033_858_560 + 348_874_383_360        =  2_545_077_534_720
#   resampler  6 * 77_259_079_680 + 74_342_727_680          =    537_897_205_760
#   LLM        2 * 13e9 * 454 + 2 * 40 * 454**2 * 5120      = 11_888_425_113_600  (11_804e9 + 84_425_113_600)
UHD_13B_672x1008 = 14_971_399_854_080
# the same with the MLP projector: 4007 patch tokens + 6 separators = 4013 LLM tokens
#   MLP        2 * 4007 * (1024 * 5120 + 5120**2)           =    252_098_641_920
#   LLM        2 * 13e9 * 4013 + 2 * 40 * 4013**2 * 5120    = 110_934_267_622_400
UHD_MLP_13B_672x1008 = 113_731_443_799_040
# LLaVA-NeXT-13B at 672x1008: the 2 x 2 pinpoint (672x672) + the base view, 5 crops of 576. The 48 x 48 tile
# features are unpadded to the image's 2:3 (int(672 * 48 / 1008) = 32 columns) with a newline token per row:
# 48 * 32 + 48 = 1584, + 576 base = 2160 tokens; the MLP runs on all 5 * 576 = 2880 before the unpadding.
#   ViT        5 * 366_033_858_560                          =  1_830_169_292_800
#   MLP        2 * 2880 * (1024 * 5120 + 5120**2)           =    181_193_932_800
#   LLM        2 * 13e9 * 2160 + 2 * 40 * 2160**2 * 5120    = 58_071_029_760_000
NEXT_13B_672x1008 = 60_082_392_985_600


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
    # What this convention gives exactly (worked by hand in test_672x1008_totals_worked_by_hand)
    assert t["llava-1.5"]["total_flops"] == LLAVA15_13B  # 15.514, paper 15.5   (+0.1%)
    assert t["llava-uhd"]["total_flops"] == UHD_13B_672x1008  # 14.971, paper 14.6   (+2.5%)
    assert t["llava-uhd-mlp"]["total_flops"] == UHD_MLP_13B_672x1008  # 113.731, paper 113.65 (+0.1%)
    assert t["llava-next"]["total_flops"] == NEXT_13B_672x1008  # 60.082
    # The paper's "12.9% of the MLP variant's compute": 13.2% here.
    assert t["llava-uhd"]["total_flops"] / t["llava-uhd-mlp"]["total_flops"] == pytest.approx(0.1316, abs=1e-4)


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


def test_resampler_one_crop_by_hand():
    assert resampler_flops(576, 1024, 5120) == RESAMPLER_CROP_576
    assert resampler_flops(551, 1024, 5120, queries=64) == RESAMPLER_CROP_551
    # D == H: no kv_proj (the features already have the LLM's width): 77_259_079_680 - 6_039_797_760 with D = 5120
    # in every other term unchanged
    assert resampler_flops(576, 5120, 5120) == RESAMPLER_CROP_576 - 6_039_797_760
    # 32 queries: the four q-sized terms halve (3 * 3_355_443_200 + 754_974_720 -> half)
    assert resampler_flops(576, 1024, 5120, queries=32) == RESAMPLER_CROP_576 - (3 * 3_355_443_200 + 754_974_720) // 2


def test_672x1008_totals_worked_by_hand():
    """Every component of the 672x1008 comparison against the sums written out above (not the module's output)."""
    spec = vision_spec("clip-l-336")
    assert vit_crop_flops(551, spec, 23) == CLIP_L_OVERVIEW_672x1008_23
    t = cost_table(672, 1008, mlp_ablation=True)
    uhd, mlp, nxt = t["llava-uhd"], t["llava-uhd-mlp"], t["llava-next"]
    assert uhd["vit_flops"] == mlp["vit_flops"] == 6 * CLIP_L_CROP_23 + CLIP_L_OVERVIEW_672x1008_23 \
        == 2_545_077_534_720
    assert uhd["projector_flops"] == 6 * RESAMPLER_CROP_576 + RESAMPLER_CROP_551 == 537_897_205_760
    assert uhd["llm_flops"] == 11_804_000_000_000 + 84_425_113_600
    assert uhd["total_flops"] == 2_545_077_534_720 + 537_897_205_760 + 11_888_425_113_600 == UHD_13B_672x1008
    assert mlp["llm_tokens"] == 4013 and mlp["projector_flops"] == 252_098_641_920
    assert mlp["llm_flops"] == 110_934_267_622_400
    assert mlp["total_flops"] == 2_545_077_534_720 + 252_098_641_920 + 110_934_267_622_400 == UHD_MLP_13B_672x1008
    assert nxt["visual_tokens"] == 48 * 32 + 48 + 576 == 2160
    assert nxt["vit_flops"] == 5 * CLIP_L_CROP_23 and nxt["projector_flops"] == 181_193_932_800
    assert nxt["llm_flops"] == 58_071_029_760_000
    assert nxt["total_flops"] == 1_830_169_292_800 + 181_193_932_800 + 58_071_029_760_000 == NEXT_13B_672x1008
    assert uhd["total_tflops"] == UHD_13B_672x1008 / 1e12
