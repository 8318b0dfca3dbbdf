"""`llava-uhd convert`: the authors' release layout -> this project's format, and the spatial resampler it needs."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from conftest import build_tiny_tokenizer, random_image

from llava_uhd.convert import ConversionError, add_convert_arguments, convert_release, run_convert
from llava_uhd.modeling.spatial_resampler import SpatialResampler, pooling_size

# tiny sizes that keep the release's rules: CLIP heads of 64 dims, resampler heads = hidden / 128, 12x12 queries
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, patch_size=14,
              image_size=56)
LLM = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
           max_position_embeddings=2048, rms_norm_eps=1e-6)  # 5 crops x 144 queries fit
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


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
    image = random_image(150, 90)  # sliced: 2 x 2 slices + overview at a 56 px native size
    batch = processor(images=[image], text=[prompt])
    n_crops = batch["patch_grid_hw"].shape[0]
    assert n_crops > 1
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 144 * n_crops
    logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == batch["input_ids"].shape[1] + 4 or gen[0, -1] == processor.tokenizer.eos_token_id


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


# ------------------------------------------------------------------------------------- the spatial resampler
def test_pooling_rule():
    assert pooling_size(24, 24) == (3, 3)
    assert pooling_size(20, 29) == (2, 3)  # 1.45:1 -> 3:2
    assert pooling_size(17, 33) == (2, 4)  # ~2:1
    assert pooling_size(33, 17) == (4, 2)
    assert pooling_size(21, 28) == (3, 4)  # 4:3
    assert pooling_size(1, 100) == (2, 4)  # extreme: the widest candidate
    # the candidates come in transposed pairs and the comparison is exact, so transposing a crop transposes its
    # pooled grid (a floating-point comparison could flip near-ties)
    for h in range(1, 41):
        for w in range(1, 41):
            ph, pw = pooling_size(h, w)
            assert pooling_size(w, h) == (pw, ph)


def _bilinear(feat, y, x):
    """torchvision ROI-align's bilinear sample of feat (H, W, C) at (y, x), float64, written out."""
    H, W = feat.shape[:2]
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return torch.zeros(feat.shape[-1], dtype=feat.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= H - 1:
        y0 = y1 = H - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= W - 1:
        x0 = x1 = W - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * feat[y0, x0] + hy * lx * feat[y0, x1] + ly * hx * feat[y1, x0] + ly * lx * feat[y1, x1]


def _reference(resampler: SpatialResampler, feat: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The spatial resampler straight from its description, one query at a time, float64."""
    p = {k: v.double() for k, v in resampler.state_dict().items()}
    H = resampler.hidden_size
    g = resampler.grid_size
    heads = resampler.num_heads

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-6) * p[name + ".weight"] + p[name + ".bias"]

    x = ln(feat.double() @ p["kv_proj.weight"].T, "ln_kv").reshape(h, w, H)
    table = p["pos_embed"].reshape(g, g, H).permute(2, 0, 1)[None]
    pos = torch.nn.functional.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)[0]
    keys_map = x + pos.permute(1, 2, 0)
    both = torch.cat([keys_map, x], dim=-1)
    ph, pw = pooling_size(h, w)
    queries = ln(p["query"], "ln_q") + p["pos_embed"]
    wq, wk, wv = p["attn.in_proj_weight"].chunk(3)
    bq, bk, bv = p["attn.in_proj_bias"].chunk(3)
    d = H // heads
    out = []
    for i in range(g):
        for j in range(g):
            # region (i, j) in feature units; aligned=False: no half-pixel shift, sides at least 1
            y1, x1 = i * h / g, j * w / g
            rh, rw = max(h / g, 1.0), max(w / g, 1.0)
            sy, sx = math.ceil(rh / ph), math.ceil(rw / pw)  # adaptive sampling ratio
            pooled = []  # each bin: the mean of its sy x sx bilinear samples (keys and values side by side)
            for by in range(ph):
                for bx in range(pw):
                    acc = torch.zeros(2 * H, dtype=torch.float64)
                    for iy in range(sy):
                        for ix in range(sx):
                            yy = y1 + by * rh / ph + (iy + 0.5) * rh / ph / sy
                            xx = x1 + bx * rw / pw + (ix + 0.5) * rw / pw / sx
                            acc += _bilinear(both, yy, xx)
                    pooled.append(acc / (sy * sx))
            pooled = torch.stack(pooled)
            k = pooled[:, :H] @ wk.T + bk
            v = pooled[:, H:] @ wv.T + bv
            q = queries[i * g + j] @ wq.T + bq
            heads_out = []
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                att = torch.softmax(k[:, sl] @ q[sl] / math.sqrt(d), dim=0)
                heads_out.append(att @ v[:, sl])
            o = torch.cat(heads_out) @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
            out.append(o)
    out = ln(torch.stack(out), "ln_post") @ p["proj"]
    return out


@torch.no_grad()
def test_spatial_resampler_matches_the_slow_reference():
    torch.manual_seed(0)
    resampler = SpatialResampler(24, 256, 144).eval()
    for t in resampler.parameters():  # non-trivial norms and biases
        t.add_(0.1 * torch.randn_like(t))
    # square, 3:2, an extreme slice (2 samples per bin across, regions < 1 feature down), tiny maps
    grids = [(24, 24), (20, 29), (8, 67), (5, 3), (2, 2)]
    feats = torch.randn(sum(h * w for h, w in grids), 24)
    out = resampler(feats, torch.tensor(grids))
    assert out.shape == (len(grids), 144, 256)
    start = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny float64 ops: threading only adds overhead
    try:
        refs = []
        for h, w in grids:
            refs.append(_reference(resampler, feats[start:start + h * w], h, w))
            start += h * w
    finally:
        torch.set_num_threads(threads)
    for k, ((h, w), ref) in enumerate(zip(grids, refs)):
        assert rel_err(out[k], ref) < 1e-5, (h, w, rel_err(out[k], ref))
    # packing: a crop alone gives the same result as in the batch
    alone = resampler(feats[: 24 * 24], torch.tensor([[24, 24]]))
    assert rel_err(alone[0], out[0]) < 1e-6


@torch.no_grad()
def test_each_query_sees_only_its_region():
    torch.manual_seed(1)
    resampler = SpatialResampler(16, 128, 144).eval()
    h, w = 24, 36
    feats = torch.randn(h * w, 16)
    base = resampler(feats, torch.tensor([[h, w]]))[0]
    changed = feats.clone().reshape(h, w, 16)
    changed[:2, :3] += 5.0  # region (0, 0) is rows [0, 2) x cols [0, 3)
    out = resampler(changed.reshape(-1, 16), torch.tensor([[h, w]]))[0]
    moved = ((out - base).abs().amax(-1) > 1e-6).reshape(12, 12)
    # 24x36 (3:2) pools each 2x3 region to 2x3 bins, one sample each at (r + 0.5, c + 0.5) (aligned=False): the
    # samples of region (0, 0) are the only ones reading rows 0-1 x cols 0-2
    assert moved[0, 0] and int(moved.sum()) == 1


def test_resampler_type_setting():
    from llava_uhd import LlavaUHDConfig

    assert LlavaUHDConfig().resampler_type == "perceiver"  # the paper's resampler stays the default
    with pytest.raises(ValueError, match="resampler_type"):
        LlavaUHDConfig(resampler_type="roi")
    with pytest.raises(ValueError, match="perfect square"):
        SpatialResampler(16, 128, 64 + 1)
