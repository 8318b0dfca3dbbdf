"""`llava-uhd convert`: the authors' release layout -> this project's format (the spatial resampler it needs:
`test_spatial_resampler`)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from conftest import build_tiny_tokenizer, random_image, rel_err

from llava_uhd.convert import ConversionError, add_convert_arguments, convert_release, run_convert
from llava_uhd.modeling.spatial_resampler import SpatialResampler

# tiny sizes that keep the release's rules: CLIP heads of 64 dims, resampler heads = hidden / 128, 12x12 queries
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, patch_size=14,
              image_size=56)
LLM = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
           max_position_embeddings=2048, rms_norm_eps=1e-6)  # 5 crops x 144 queries fit
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."


# ------------------------------------------------------------------------------------- a synthetic release
def release_state(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in exactly the release's key layout (every tensor perturbed, LayerNorms included)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vision = CLIPVisionModel(CLIPVisionConfig(**VISION))
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **LLM))
    resampler = SpatialResampler(VISION["hidden_size"], LLM["hidden_size"], 144)
    state = {}
    for k, v in vision.state_dict().items():  # transformers 5 drops the "vision_model." level; the release has it
        state[VISION_PREFIX + k.removeprefix("vision_model.")] = v
    for k, v in llm.state_dict().items():
        state[k] = v
    for k, v in resampler.state_dict().items():
        state["model.mm_projector." + k] = v
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and not k.endswith("pos_embed"):
            v = v + 0.05 * torch.randn(v.shape, generator=g)
        out[k] = v.clone().contiguous()
    # a derived buffer old transformers versions saved: dropped on purpose
    out[VISION_PREFIX + "embeddings.position_ids"] = torch.arange(17)[None]
    return out


def release_config(vocab_size: int, **overrides) -> dict:
    return {
        "_name_or_path": "lmsys/vicuna-13b-v1.5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "hidden_act": "silu", "initializer_range": 0.02, "pretraining_tp": 1, "rope_scaling": None,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
        "vocab_size": vocab_size, **LLM,
        "image_aspect_ratio": "pad", "freeze_mm_mlp_adapter": False, "mm_hidden_size": VISION["hidden_size"],
        "mm_projector_lr": None, "mm_projector_type": "adapt_spatial_resampler", "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False, "use_mm_proj": True,
        **overrides,
    }


def write_release(path, state, config, shards: int = 3, fmt: str = "safetensors"):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    build_tiny_tokenizer(with_image_token=False).save_pretrained(path)
    keys = list(state)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for s in range(shards):
        part = {k: state[k] for k in keys[s * per:(s + 1) * per]}
        if fmt == "safetensors":
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
            save_file(part, str(path / name), metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin" if shards > 1 else "pytorch_model.bin"
            torch.save(part, path / name)
        weight_map.update({k: name for k in part})
    if shards > 1:
        index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
        (path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def vocab_size():
    return len(build_tiny_tokenizer(with_image_token=False))


@pytest.fixture(scope="module")
def release(tmp_path_factory, vocab_size):
    state = release_state(vocab_size)
    path = write_release(tmp_path_factory.mktemp("release") / "llava-uhd-144-tiny", state, release_config(vocab_size))
    return path, state


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    src, state = release
    out = tmp_path_factory.mktemp("converted") / "out"
    report = convert_release(src, out)
    return out, report


# ------------------------------------------------------------------------------------- conversion
def test_every_key_lands_where_expected(release, converted):
    from safetensors.torch import load_file

    _, state = release
    out, report = converted
    assert report.ignored == [VISION_PREFIX + "embeddings.position_ids"]
    assert report.num_tensors == len(state) - 1
    saved = {}
    for f in out.glob("*.safetensors"):
        saved.update(load_file(str(f)))
    expected = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        if k.startswith(VISION_PREFIX):
            expected["vision_tower.vision_model." + k[len(VISION_PREFIX):]] = v
        elif k.startswith("model.mm_projector."):
            expected["projector." + k[len("model.mm_projector."):]] = v
        else:
            expected["language_model." + k] = v
    assert set(saved) == set(expected)
    for k, v in expected.items():
        assert torch.equal(saved[k], v), k
    # the resampler's tensors, named explicitly
    for name in ("query", "pos_embed", "kv_proj.weight", "attn.in_proj_weight", "attn.in_proj_bias",
                 "attn.out_proj.weight", "attn.out_proj.bias", "ln_q.weight", "ln_kv.bias", "ln_post.weight",
                 "proj"):
        assert torch.equal(saved["projector." + name], state["model.mm_projector." + name])


@torch.no_grad()
def test_converted_model_loads_runs_and_generates(release, converted):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import llava_uhd  # noqa: F401  (registers the Auto classes)
    from llava_uhd import LlavaUHDForConditionalGeneration

    _, state = release
    out, _ = converted
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(model) is LlavaUHDForConditionalGeneration
    c = model.config
    assert (c.resampler_type, c.num_queries, c.resampler_heads, c.max_slices) == ("spatial", 144, 2, 7)
    assert (c.overview_position, c.spatial_schema, c.vision_feature_layer) == ("after", True, -2)
    v = c.vision_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size,
            v.intermediate_size) == (64, 2, 1, 14, 56, 128)
    assert (c.text_config.hidden_size, c.text_config.num_hidden_layers) == (256, 2)
    assert type(model.projector) is SpatialResampler
    assert torch.equal(model.projector.pos_embed, state["model.mm_projector.pos_embed"])
    assert torch.equal(model.projector.proj, state["model.mm_projector.proj"])
    assert processor.num_queries == 144 and processor.image_processor.max_slices == 7
    assert processor.image_processor.size == {"height": 56, "width": 56}
    assert processor.image_token_id == c.image_token_id
    assert processor.tokenizer.decode([processor.comma_id]) == ","
    assert processor.tokenizer.decode([processor.newline_id]) == "\n"

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("A chat between") and prompt.endswith("ASSISTANT:")  # vicuna_v1
    image = random_image(150, 90)  # sliced: 3 x 2 slices + overview at a 56 px native size
    batch = processor(images=[image], text=[prompt])
    n_crops = batch["patch_grid_hw"].shape[0]
    assert n_crops > 1
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 144 * n_crops
    logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == batch["input_ids"].shape[1] + 4 or gen[0, -1] == processor.tokenizer.eos_token_id


@torch.no_grad()
def test_converted_logits_match_a_slow_reference_built_from_the_release(release, converted):
    """The converted model's logits against a float64 forward assembled from the release's own tensors, without
    this project's modeling code: transformers' CLIP layers and Llama loaded from the release's keys, each crop
    embedded by its own conv + the float64 bicubic position-embedding reference (`test_pos_embed`), layer
    ``-2`` without its CLS, the spatial resampler one query at a time (`test_spatial_resampler`), its outputs put
    in place of the image tokens in order. Tolerance: rel_err 1e-5 (float32 against float64 on tiny towers)."""
    import torch.nn.functional as F
    from test_pos_embed import reference_interpolation
    from test_spatial_resampler import _reference as resampler_reference
    from transformers import (AutoModelForImageTextToText, AutoProcessor, CLIPVisionConfig, CLIPVisionModel,
                              LlamaConfig, LlamaForCausalLM)

    import llava_uhd  # noqa: F401  (registers the Auto classes)

    _, state = release
    out, _ = converted
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    prompt = processor.question_prompt("What colour is it?")
    batch = processor(images=[random_image(150, 90)], text=[prompt])
    got = model(**batch).logits[0]

    vision = CLIPVisionModel(CLIPVisionConfig(**VISION)).double().eval()
    vision.load_state_dict({k[len(VISION_PREFIX):]: v for k, v in state.items()
                            if k.startswith(VISION_PREFIX) and not k.endswith("position_ids")})
    llm_state = {k: v for k, v in state.items() if not k.startswith(("model.vision_tower.", "model.mm_projector."))}
    vocab = llm_state["lm_head.weight"].shape[0]
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **LLM)).double().eval()
    llm.load_state_dict(llm_state)
    resampler = SpatialResampler(VISION["hidden_size"], LLM["hidden_size"], 144).double().eval()
    resampler.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in state.items()
                               if k.startswith("model.mm_projector.")})

    tower = getattr(vision, "vision_model", vision)  # transformers 5 drops the vision_model level
    emb, p, c = tower.embeddings, VISION["patch_size"], 3
    native = VISION["image_size"] // p
    pos = emb.position_embedding.weight
    crops, start = [], 0
    for h, w in batch["patch_grid_hw"].tolist():
        patches = batch["pixel_values"][start:start + h * w].double()  # row-major patches, each (c, p, p)
        start += h * w
        image = patches.view(h, w, c, p, p).permute(2, 0, 3, 1, 4).reshape(1, c, h * p, w * p)
        tokens = F.conv2d(image, emb.patch_embedding.weight, stride=p).flatten(2)[0].T  # (h*w, D)
        table = reference_interpolation(pos[1:].reshape(native, native, -1).numpy(), (h, w))
        tokens = tokens + torch.from_numpy(table)
        hidden = torch.cat([(emb.class_embedding + pos[0])[None], tokens])[None]
        hidden = tower.pre_layrnorm(hidden)
        for layer in tower.encoder.layers[:-1]:  # hidden_states[-2]: every layer but the last
            hidden = layer(hidden, None)
        crops.append(resampler_reference(resampler, hidden[0, 1:], h, w))
    ids = batch["input_ids"][0]
    is_image = ids == processor.image_token_id
    embeds = llm.model.embed_tokens(ids.masked_fill(is_image, 0))
    embeds[is_image] = torch.cat(crops)
    want = llm(inputs_embeds=embeds[None]).logits[0]

    # 150x90 on the 56 px ViT: N = ceil(13500 / 3136) = 5; slice aspect 5n / 3m, (3, 2) the closest to 1 (1.11):
    # 3 x 2 slices + overview
    assert len(crops) == 7 and int(is_image.sum()) == 7 * 144
    assert got.shape[-1] >= vocab
    assert rel_err(got[:, :vocab], want) < 1e-5, rel_err(got[:, :vocab], want)


def test_bin_weights_and_cli(tmp_path, release, vocab_size):
    """A single pytorch_model.bin (read with weights_only=True) converts the same, through run_convert."""
    from safetensors.torch import load_file

    _, state = release
    src = write_release(tmp_path / "bin", state, release_config(vocab_size), shards=1, fmt="bin")
    parser = add_convert_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--from", str(src), "--to", str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert run_convert(args) == 0
    saved = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        saved.update(load_file(str(f)))
    assert saved["projector.query"].dtype == torch.bfloat16
    assert torch.equal(saved["projector.query"], state["model.mm_projector.query"].to(torch.bfloat16))
    # a second run into the same folder refuses to overwrite
    assert run_convert(args) == 2


def test_a_failed_write_leaves_no_output_folder(tmp_path, release, monkeypatch):
    from llava_uhd.processing import LlavaUHDProcessor

    def fail(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(LlavaUHDProcessor, "save_pretrained", fail)  # after the model's weights were written
    with pytest.raises(OSError, match="No space left"):
        convert_release(release[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_wrong_projector_type_is_a_clear_error(tmp_path, release, vocab_size):
    _, state = release
    src = write_release(tmp_path / "mlp", {}, release_config(vocab_size, mm_projector_type="mlp2x_gelu"), shards=1)
    with pytest.raises(ConversionError, match="mm_projector_type 'mlp2x_gelu' is not supported"):
        convert_release(src, tmp_path / "out")


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_missing_unexpected_or_misshapen_keys_are_named(tmp_path, release, vocab_size, change):
    _, state = release
    state = dict(state)
    if change == "missing":
        del state["model.mm_projector.ln_post.bias"]
        del state["model.layers.1.mlp.up_proj.weight"]
        pattern = r"missing key\(s\): model\.layers\.1\.mlp\.up_proj\.weight, model\.mm_projector\.ln_post\.bias"
    elif change == "unexpected":
        state["model.mm_projector.query_1"] = torch.zeros(144, 256)
        state["model.image_newline"] = torch.zeros(256)
        pattern = r"unexpected key\(s\): model\.image_newline, model\.mm_projector\.query_1"
    else:
        state["model.mm_projector.kv_proj.weight"] = torch.zeros(256, 32)
        pattern = r"shape mismatch .*model\.mm_projector\.kv_proj\.weight: \(256, 32\) vs \(256, 64\)"
    src = write_release(tmp_path / change, state, release_config(vocab_size), shards=2)
    with pytest.raises(ConversionError, match=pattern):
        convert_release(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_index_that_does_not_match_the_shards(tmp_path, release, vocab_size):
    _, state = release
    src = write_release(tmp_path / "bad_index", state, release_config(vocab_size), shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.mm_projector.ghost"] = next(iter(index["weight_map"].values()))
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"listed but absent: model\.mm_projector\.ghost"):
        convert_release(src, tmp_path / "out")
