"""bench/ttft.py: the three systems really share their tower and LLM, their processors give the token counts that
`llava-uhd cost` predicts, and the stage timer accounts for a run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # the time-to-first-token bench, end to end

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def ttft():
    sys.path.insert(0, str(BENCH))
    try:
        import ttft
        import ttft_systems
        yield ttft, ttft_systems
    finally:
        sys.path.remove(str(BENCH))


def test_systems_share_tower_and_llm(ttft):
    _, systems_mod = ttft
    systems = systems_mod.build_systems(systems_mod.SCALES["tiny"], dtype=torch.float32)
    uhd, nxt, l15 = (systems[n].model for n in systems_mod.SYSTEMS)
    for peer in (nxt, l15):
        assert peer.model.vision_tower is uhd.vision_tower.vision_model
        assert peer.model.language_model is uhd.language_model.model
        assert peer.lm_head is uhd.language_model.lm_head
        # nothing was left on the meta device
        assert all(p.device.type == "cpu" for p in peer.parameters())
    # the same 336 view through NeXT's feature path and through the UHD tower: equal features
    image = ttft[0].photo(336, 336)
    pixels = systems["llava-1.5"].prepare(image)["pixel_values"]
    with torch.inference_mode():
        peer_features = l15.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        packed = systems["llava-uhd"].processor.image_processor(image, return_tensors="pt")
        uhd_features = uhd.vision_tower(packed["pixel_values"], packed["patch_grid_hw"])
    assert packed["patch_grid_hw"].tolist() == [[24, 24]]
    # The two processors resize differently (shortest edge + crop vs the slicer); at 336x336 both are identity.
    torch.testing.assert_close(uhd_features, peer_features[0], rtol=1e-4, atol=1e-4)


def test_token_counts_match_cost_model_and_stages_add_up(ttft, capsys):
    bench, _ = ttft
    results = bench.main(["--scale", "tiny", "--sizes", "672x1008,500x300", "--repeats", "1", "--warmup", "0",
                          "--dtype", "float32"])
    for entry in results["sizes"]:
        text = entry["llm_tokens"]["llava-1.5"] - 576
        for name, tokens in entry["llm_tokens"].items():
            assert tokens - text == entry["flops"]["visual_tokens"][name], (entry["width"], name)
        for name, system in entry["systems"].items():
            run = entry["runs"][name][0]
            stages = sum(run[s] for s in bench.STAGES)
            assert stages == pytest.approx(run["total"])
            assert all(run[s] > 0 for s in ("preprocess", "vision", "projector", "llm")), (name, run)
        assert entry["next_over_uhd"]["median"] > 0
        # achieved rates: the stage's FLOPs from the cost model over its measured time
        rates = bench.stage_rates(entry)
        for name, per in rates.items():
            expected = entry["flops"]["stage_tflops"][name]["llm"] / entry["systems"][name]["breakdown_median"]["llm"]
            assert per["llm"] == pytest.approx(expected)
        stage_sum = sum(entry["flops"]["stage_tflops"]["llava-uhd"].values())
        assert stage_sum == pytest.approx(entry["flops"]["tflops"]["llava-uhd"])
    out = capsys.readouterr().out
    assert "TTFT NeXT/UHD" in out and "achieved TFLOP/s" in out
