"""Big-model loading: ``from_pretrained(device_map=..., max_memory=..., offload_folder=...)`` splits a saved
LLaVA-UHD over the CPU and the disk (accelerate) and gives the unsplit model's logits and greedy tokens; a sharded
save loads back identically. Reference: the same tiny model, loaded whole. Tolerance: relative error < 1e-5 in
float32 (the split model runs the same kernels on the same weights)."""

import pytest
import torch
from conftest import build_tiny, random_image, rel_err

from llava_uhd import LlavaUHDConfig, LlavaUHDForConditionalGeneration
from llava_uhd.processing import LlavaUHDProcessor

PROMPT = "USER: <image>\nWhat colour is the shape? ASSISTANT:"
TOL = 1e-5


def saved_tiny(folder, kind="clip", tie=False, **settings):
    """A tiny model (tied input / output embeddings if ``tie``) and its processor saved in ``folder``; returns
    the model."""
    model, processor = build_tiny(kind, **settings)
    if tie:
        config = LlavaUHDConfig.from_dict(model.config.to_dict())
        config.text_config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = LlavaUHDForConditionalGeneration(config).eval()
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


def inputs_for(folder):
    processor = LlavaUHDProcessor.from_pretrained(folder)
    return processor(images=[random_image(70, 40, seed=3)], text=[PROMPT])


@torch.no_grad()
def run(model, inputs):
    logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return logits, tokens


def model_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def device_of(model, name):
    """The device-map entry that holds module ``name``."""
    keys = [k for k in model.hf_device_map if k == "" or name == k or name.startswith(k + ".")]
    return model.hf_device_map[max(keys, key=len)]


def assert_no_block_split(model):
    """No device-map entry lies strictly inside a module of a `_no_split_modules` class."""
    blocks = [name for name, module in model.named_modules() if type(module).__name__ in model._no_split_modules]
    for key in model.hf_device_map:
        assert not any(key.startswith(block + ".") for block in blocks), f"{key} splits a no-split block"


def test_no_split_modules_are_the_submodels_own_plus_the_projector():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    for kind, settings, projector in [("clip", {}, "PerceiverResampler"),
                                      ("siglip", {"projector": "mlp"}, "MLPProjector"),
                                      ("dinov2", {"resampler_type": "spatial"}, "SpatialResampler")]:
        model, _ = build_tiny(kind, **settings)
        own = {*model.vision_tower.vision_model._no_split_modules, *model.language_model._no_split_modules}
        assert set(model._no_split_modules) == own | {projector}
    # transformers' own LLaVA over the same tower and LLM collects the same blocks (it has no resampler)
    model, _ = build_tiny("clip")
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=model.config.vision_config.to_dict(),
                                                      text_config=model.config.text_config.to_dict()))
    assert set(llava._no_split_modules) | {"PerceiverResampler"} == set(model._no_split_modules)


@pytest.mark.parametrize("budget", ["cpu+disk", "cpu only"])
def test_auto_device_map_over_cpu_and_disk_matches_the_unsplit_model(tmp_path, budget):
    reference = saved_tiny(tmp_path / "model", tie=True)
    inputs = inputs_for(tmp_path / "model")
    ref_logits, ref_tokens = run(reference, inputs)
    cpu = model_bytes(reference) // 2
    max_memory = {"cpu": cpu, "disk": 10**9} if budget == "cpu+disk" else {"cpu": cpu}  # the rest goes to disk
    model = LlavaUHDForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory=max_memory, offload_folder=tmp_path / "offload")
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert_no_block_split(model)
    logits, tokens = run(model, inputs)
    assert rel_err(logits, ref_logits) < TOL
    assert torch.equal(tokens, ref_tokens)
    # tied input / output embeddings are placed together (accelerate loads the shared tensor once per use)
    assert device_of(model, "language_model.model.embed_tokens") == device_of(model, "language_model.lm_head")


def offload_everything_read_directly(kind):
    """A device map putting on the disk what the model reads without calling it: the tower's embeddings (CLS and
    position embeddings), the projector (queries, ``attn.out_proj``); plus a tower layer and LLM parts."""
    tower = "vision_tower.vision_model."
    layers = tower + ("encoder.layer." if kind == "dinov2" else "encoder.layers.")
    tail = {"clip": ["pre_layrnorm", "post_layernorm"], "siglip": ["post_layernorm", "head"],
            "dinov2": ["layernorm"]}[kind]
    llm = "language_model."
    return {tower + "embeddings": "disk", layers + "0": "cpu", layers + "1": "disk",
            **{tower + name: "cpu" for name in tail}, "projector": "disk", llm + "model.embed_tokens": "disk",
            llm + "model.layers.0": "cpu", llm + "model.layers.1": "disk", llm + "model.norm": "disk",
            llm + "model.rotary_emb": "cpu", llm + "lm_head": "disk"}


@pytest.mark.parametrize("kind, settings", [("clip", {}), ("siglip", {"projector": "mlp"}),
                                            ("dinov2", {"resampler_type": "spatial"})])
def test_explicit_device_map_with_weights_read_outside_forward_on_disk(tmp_path, kind, settings):
    reference = saved_tiny(tmp_path / "model", kind, **settings)
    inputs = inputs_for(tmp_path / "model")
    ref_logits, ref_tokens = run(reference, inputs)
    model = LlavaUHDForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map=offload_everything_read_directly(kind), offload_folder=tmp_path / "offload")
    # offloaded: only meta tensors in the model until a hook (or `offload.onloaded`) loads them
    assert all(p.device.type == "meta" for p in model.vision_tower.vision_model.embeddings.parameters())
    assert all(p.device.type == "meta" for p in model.projector.parameters())
    logits, tokens = run(model, inputs)
    assert rel_err(logits, ref_logits) < TOL
    assert torch.equal(tokens, ref_tokens)


def test_sharded_save_loads_back_identically_whole_and_split(tmp_path):
    reference = saved_tiny(tmp_path / "model")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    inputs = inputs_for(tmp_path / "model")
    ref_logits, ref_tokens = run(reference, inputs)

    loaded = LlavaUHDForConditionalGeneration.from_pretrained(tmp_path / "sharded").eval()
    expected = reference.state_dict()
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    logits, tokens = run(loaded, inputs)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)

    split = LlavaUHDForConditionalGeneration.from_pretrained(
        tmp_path / "sharded", device_map="auto", max_memory={"cpu": model_bytes(reference) // 2},
        offload_folder=tmp_path / "offload")
    assert set(split.hf_device_map.values()) == {"cpu", "disk"}
    logits, tokens = run(split, inputs)
    assert rel_err(logits, ref_logits) < TOL and torch.equal(tokens, ref_tokens)
