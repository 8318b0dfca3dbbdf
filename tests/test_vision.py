"""Tests of the adaptive vision encoder on tiny random CLIP / SigLIP / DINOv2 towers."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import rel_err  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llava_uhd.image_processing import patchify, unpatchify  # noqa: E402
from llava_uhd.modeling.pos_embed import interpolate_pos_embed  # noqa: E402
from llava_uhd.modeling.vision import AdaptiveVisionEncoder  # noqa: E402

PATCH = 7
IMAGE = 28  # native grid 4x4
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE, patch_size=PATCH)
# Several grids, 1xN and Nx1 included, the native one twice so a bucket holds more than one crop.
GRIDS = [(4, 4), (2, 6), (1, 5), (6, 1), (3, 5), (4, 4), (1, 1), (2, 6)]


def clip_config(**kw):
    return CLIPVisionConfig(intermediate_size=64, **{**TINY, **kw})


def siglip_config(**kw):
    return SiglipVisionConfig(intermediate_size=64, **{**TINY, **kw})


def dinov2_config(**kw):
    # layerscale_value != 1 so the test sees that the tower's layer scale is applied
    return Dinov2Config(mlp_ratio=2, layerscale_value=0.5, **{**TINY, **kw})


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return AdaptiveVisionEncoder.from_config(clip_config())


@pytest.fixture(scope="module")
def siglip():
    torch.manual_seed(1)
    return AdaptiveVisionEncoder.from_config(siglip_config())


@pytest.fixture(scope="module")
def dinov2():
    torch.manual_seed(2)
    return AdaptiveVisionEncoder.from_config(dinov2_config())


def random_crops(grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = sum(h * w for h, w in grids)
    return torch.randn(rows, 3 * PATCH * PATCH, generator=g), torch.tensor(grids, dtype=torch.int64)


def image_to_packed(images):
    """(B, 3, H, W) to packed patches via the image processor's own `patchify`."""
    return torch.from_numpy(np.concatenate([patchify(im.numpy(), PATCH) for im in images]))


def encode_one_by_one(encoder, pixel_values, grids):
    out, start = [], 0
    for h, w in grids:
        out.append(encoder(pixel_values[start:start + h * w], torch.tensor([[h, w]])))
        start += h * w
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------- native grid
# The patch embedding runs the tower's conv kernel over a batch of patches: on the CPU the same sums in the same
# order as the tower's conv over the image, so a native-size crop is bitwise identical to the tower's output.
# `test_native_grid_is_bitwise_with_exact_patch_sums` also holds when the patch sums are exact.
def hf_patch_tokens(encoder, images, prefix, **kw):
    hidden = encoder.vision_model(pixel_values=images, output_hidden_states=True, **kw).hidden_states[-2]
    return hidden[:, prefix:].reshape(-1, hidden.shape[-1])


@torch.no_grad()
@pytest.mark.parametrize("name, prefix", [("clip", 1), ("siglip", 0), ("dinov2", 1)])
def test_native_grid_matches_hf(name, prefix, request):
    enc = request.getfixturevalue(name)
    images = torch.randn(3, 3, IMAGE, IMAGE)
    out = enc(image_to_packed(images), torch.tensor([[4, 4]] * 3))
    ref = hf_patch_tokens(enc, images, prefix)
    assert out.shape == (3 * 16, 32)
    assert torch.equal(out, ref)


@torch.no_grad()
@pytest.mark.parametrize("make_config, prefix", [(clip_config, 1), (siglip_config, 0), (dinov2_config, 1)])
def test_native_grid_is_bitwise_with_exact_patch_sums(make_config, prefix):
    torch.manual_seed(8)
    enc = AdaptiveVisionEncoder.from_config(make_config())
    conv = enc.patch_conv
    # Dyadic weights times small-integer pixels: every partial sum is exact in float32, in any order.
    conv.weight.copy_(torch.randint(-8, 9, conv.weight.shape) / 64.0)
    if conv.bias is not None:
        conv.bias.copy_(torch.randint(-8, 9, conv.bias.shape) / 64.0)
    images = torch.randint(-4, 5, (2, 3, IMAGE, IMAGE)).float()
    out = enc(image_to_packed(images), torch.tensor([[4, 4]] * 2))
    assert torch.equal(out, hf_patch_tokens(enc, images, prefix))


@torch.no_grad()
def test_clip_other_grids_match_hf_interpolation(clip):
    # HF's own interpolate_pos_encoding is the same bicubic, align_corners=False (in float32 here).
    for h, w in [(6, 6), (2, 6), (5, 3)]:
        image = torch.randn(1, 3, h * PATCH, w * PATCH)
        out = clip(image_to_packed(image), torch.tensor([[h, w]]))
        assert rel_err(out, hf_patch_tokens(clip, image, 1, interpolate_pos_encoding=True)) < 1e-5


@torch.no_grad()
def test_dinov2_with_registers_drops_registers():
    torch.manual_seed(3)
    config = Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **TINY)
    enc = AdaptiveVisionEncoder.from_config(config)
    assert enc.num_prefix_tokens == 3
    images = torch.randn(2, 3, IMAGE, IMAGE)
    out = enc(image_to_packed(images), torch.tensor([[4, 4]] * 2))
    assert out.shape == (2 * 16, 32)
    assert rel_err(out, hf_patch_tokens(enc, images, 3)) < 1e-6


@torch.no_grad()
@pytest.mark.parametrize("feature_layer", [0, 1, -1, -3])
def test_feature_layer_selects_hidden_state(feature_layer):
    torch.manual_seed(4)
    enc = AdaptiveVisionEncoder.from_config(clip_config(), feature_layer=feature_layer)
    images = torch.randn(1, 3, IMAGE, IMAGE)
    ref = enc.vision_model(pixel_values=images, output_hidden_states=True).hidden_states[feature_layer][0, 1:]
    assert rel_err(enc(image_to_packed(images), torch.tensor([[4, 4]])), ref) < 1e-6


def test_feature_layer_out_of_range():
    with pytest.raises(ValueError, match="feature_layer"):
        AdaptiveVisionEncoder.from_config(clip_config(), feature_layer=-5)  # 3 layers: 4 hidden states


# ---------------------------------------------------------------------------------------- position embedding
def test_native_grid_uses_tower_embedding_without_interpolation(clip, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.functional, "interpolate", lambda *a, **k: calls.append(1))
    pos = clip.get_pos_embed((4, 4))
    assert not calls
    assert torch.equal(pos, clip.vision_model.embeddings.position_embedding.weight[1:])


def test_bf16_tower_interpolates_in_float32():
    torch.manual_seed(5)
    enc = AdaptiveVisionEncoder.from_config(clip_config()).to(torch.bfloat16)
    weight = enc.vision_model.embeddings.position_embedding.weight
    assert weight.dtype == torch.bfloat16
    pos2d = weight[1:].reshape(4, 4, -1)
    for grid in [(2, 6), (5, 3), (6, 6)]:
        got = enc.get_pos_embed(grid)
        assert got.dtype == torch.bfloat16
        expected = interpolate_pos_embed(pos2d.float(), grid).to(torch.bfloat16)
        assert torch.equal(got, expected)
    # and the whole bf16 forward runs
    pixel_values, grids = random_crops([(2, 6), (4, 4)])
    assert enc(pixel_values, grids).dtype == torch.bfloat16


def test_pos_embed_cache_follows_weight_updates():
    torch.manual_seed(6)
    enc = AdaptiveVisionEncoder.from_config(clip_config())
    weight = enc.vision_model.embeddings.position_embedding.weight
    first = enc.get_pos_embed((2, 6))
    assert enc.get_pos_embed((2, 6)) is first  # cached
    with torch.no_grad():
        weight.mul_(2.0)  # e.g. load_state_dict / an optimizer step: in place, bumps the version counter
    second = enc.get_pos_embed((2, 6))
    torch.testing.assert_close(second, 2 * first)


def test_tower_built_under_inference_mode():
    # inference tensors have no version counter: the cache is skipped rather than failing
    with torch.inference_mode():
        enc = make_encoder(clip_config, 9).to(torch.float64)
        pixel_values, grids = random_crops([(2, 6), (4, 4), (2, 6)])
        out = enc(pixel_values, grids)
    ref = make_encoder(clip_config, 9).to(torch.float64)
    with torch.no_grad():
        assert rel_err(out, ref(pixel_values, grids)) < 1e-12


def test_trainable_pos_embed_gets_gradients_every_step():
    torch.manual_seed(7)
    enc = AdaptiveVisionEncoder.from_config(clip_config(), trainable=True)
    pixel_values, grids = random_crops([(2, 6), (3, 5)])
    for _ in range(2):  # a cached, graph-bound tensor would fail on the second backward
        enc.zero_grad()
        enc(pixel_values, grids).square().mean().backward()
        assert enc.vision_model.embeddings.position_embedding.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------- batching
@torch.no_grad()
@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2"])
def test_batched_equals_one_by_one(name, request):
    enc = request.getfixturevalue(name)
    pixel_values, grids = random_crops(GRIDS)
    out = enc(pixel_values, grids)
    assert out.shape == (pixel_values.shape[0], 32) and out.dtype == torch.float32
    single = encode_one_by_one(enc, pixel_values, GRIDS)
    assert rel_err(out, single) < 1e-5
    # crop by crop, too, so a crop in the middle of the packing is not off by a few rows
    start = 0
    for h, w in GRIDS:
        n = h * w
        assert rel_err(out[start:start + n], single[start:start + n]) < 1e-5
        start += n


@torch.no_grad()
def test_each_crop_depends_only_on_itself(clip):
    pixel_values, grids = random_crops(GRIDS)
    out = clip(pixel_values, grids)
    starts = np.cumsum([0] + [h * w for h, w in GRIDS])
    for k in (0, 2, 3):  # a native crop sharing its bucket, a 1xN crop, an Nx1 crop
        perturbed = pixel_values.clone()
        perturbed[starts[k]:starts[k + 1]] += torch.randn(starts[k + 1] - starts[k], perturbed.shape[1])
        new = clip(perturbed, grids)
        changed = (new - out).abs().amax(dim=1) > 0
        assert changed[starts[k]:starts[k + 1]].all()
        assert not changed[:starts[k]].any() and not changed[starts[k + 1]:].any()


@torch.no_grad()
def test_packed_order_round_trips_through_patchify(clip):
    # A crop fed as an image through the processor's patchify gives the same features as HF on that image.
    image = torch.randn(1, 3, 3 * PATCH, 5 * PATCH)
    packed = image_to_packed(image)
    assert np.array_equal(unpatchify(packed.numpy(), (3, 5), PATCH), image[0].numpy())
    out = clip(packed, torch.tensor([[3, 5]]))
    assert rel_err(out, hf_patch_tokens(clip, image, 1, interpolate_pos_encoding=True)) < 1e-5


def test_empty_batch(clip):
    out = clip(torch.zeros(0, 3 * PATCH * PATCH), torch.zeros(0, 2, dtype=torch.int64))
    assert out.shape == (0, 32)


# ---------------------------------------------------------------------------------------------- freezing
def test_frozen_by_default_and_stays_in_eval():
    enc = AdaptiveVisionEncoder.from_config(dinov2_config(drop_path_rate=0.5, hidden_dropout_prob=0.5))
    assert not enc.trainable
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert enc.training and not enc.vision_model.training  # no dropout / drop path in a frozen tower
    pixel_values, grids = random_crops([(2, 6)])
    torch.testing.assert_close(enc(pixel_values, grids), enc(pixel_values, grids))
    enc.unfreeze()
    assert enc.trainable and enc.vision_model.training
    assert all(p.requires_grad for p in enc.parameters())
    enc.freeze()
    assert not enc.vision_model.training and not any(p.requires_grad for p in enc.parameters())


def test_state_dict_has_no_duplicate_entries(clip):
    keys = list(clip.state_dict())
    assert all(k.startswith("vision_model.") for k in keys)
    assert set(keys) == {"vision_model." + k for k in clip.vision_model.state_dict()}


def test_wraps_given_tower_and_rejects_unknown():
    tower = SiglipVisionModel(siglip_config())
    enc = AdaptiveVisionEncoder(tower)
    assert enc.vision_model is tower and enc.family == "siglip" and enc.num_prefix_tokens == 0
    assert enc.native_grid == (4, 4) and enc.patch_size == PATCH and enc.hidden_size == 32
    with pytest.raises(ValueError, match="unsupported"):
        AdaptiveVisionEncoder(torch.nn.Linear(2, 2))


# -------------------------------------------------------------------------------------------------- errors
def test_row_count_mismatch(clip):
    pixel_values, _ = random_crops([(2, 6), (3, 5)])
    with pytest.raises(ValueError, match=r"27 patch rows .* sum\(h_p\*w_p\) = 28"):
        clip(pixel_values, torch.tensor([[2, 6], [4, 4]]))


def test_patch_dim_mismatch(clip):
    with pytest.raises(ValueError, match=r"3\*p\*p = 3\*7\*7 = 147"):
        clip(torch.randn(16, 3 * 14 * 14), torch.tensor([[4, 4]]))


@pytest.mark.parametrize(
    "pixel_values, grids, match",
    [
        (torch.randn(1, 16, 147), torch.tensor([[4, 4]]), "packed patches"),
        (torch.randn(16, 147), torch.tensor([4, 4]), r"\(K, 2\)"),
        (torch.randn(16, 147), torch.tensor([[4.0, 4.0]]), "integers"),
        (torch.randn(16, 147), torch.tensor([[4, 4], [0, 3]]), "positive"),
    ],
)
def test_malformed_inputs(clip, pixel_values, grids, match):
    with pytest.raises(ValueError, match=match):
        clip(pixel_values, grids)


@torch.no_grad()
def test_336_slice_through_processor_equals_clip_vision_model():
    """A 336x336 image, processed and encoded adaptively, gives exactly CLIPVisionModel's penultimate patch tokens."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llava_uhd.image_processing import LlavaUHDImageProcessor, unpatchify

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=2, image_size=336, patch_size=14)).eval()
    enc = AdaptiveVisionEncoder(tower)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8))
    batch = LlavaUHDImageProcessor()(image, return_tensors="pt")
    assert batch["patch_grid_hw"].tolist() == [[24, 24]]
    out = enc(batch["pixel_values"], batch["patch_grid_hw"])
    pixels = torch.from_numpy(unpatchify(batch["pixel_values"].numpy(), (24, 24), 14))[None]
    ref = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][0, 1:]
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------ length buckets, varlen
from llava_uhd.modeling.packed_attention import PACKED_ATTENTION_NAME  # noqa: E402

# Grids of equal patch counts (16: 4x4, 2x8, 8x2, 16x1, 1x16; 15: 3x5, 5x3, 1x15) mixed with the ones above.
MIXED_GRIDS = GRIDS + [(2, 8), (8, 2), (16, 1), (5, 3), (1, 16), (1, 15), (3, 5)]


def count_layer_calls(encoder):
    calls = []
    handle = encoder.layers[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def make_encoder(make_config, seed, **kw):
    torch.manual_seed(seed)
    return AdaptiveVisionEncoder.from_config(make_config(), **kw)


def skip_unless_layers_forward_kwargs(enc):
    # DINOv2's layers take keyword arguments only from transformers 5.18 or so (5.17 has `forward(hidden_states)`)
    if not enc.probe_varlen():
        pytest.skip(f"{type(enc.layers[0]).__name__} does not forward kwargs in transformers "
                    f"{transformers.__version__}")


@torch.no_grad()
@pytest.mark.parametrize("make_config", [clip_config, siglip_config, dinov2_config])
def test_equal_length_grids_share_one_batch(make_config):
    enc = make_encoder(make_config, 10, packing="bucket")
    pixel_values, grids = random_crops(MIXED_GRIDS, seed=1)
    calls, handle = count_layer_calls(enc)
    out = enc(pixel_values, grids)
    handle.remove()
    assert len(calls) == len({h * w for h, w in MIXED_GRIDS})  # one pass per distinct length, not per grid
    single = encode_one_by_one(enc, pixel_values, MIXED_GRIDS)
    starts = np.cumsum([0] + [h * w for h, w in MIXED_GRIDS])
    for k in range(len(MIXED_GRIDS)):
        assert rel_err(out[starts[k]:starts[k + 1]], single[starts[k]:starts[k + 1]]) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("make_config", [clip_config, dinov2_config])
def test_varlen_equals_bucket(make_config):
    enc = make_encoder(make_config, 11, packing="bucket")
    pixel_values, grids = random_crops(MIXED_GRIDS, seed=2)
    ref = enc(pixel_values, grids)
    skip_unless_layers_forward_kwargs(enc)
    enc.packing = "varlen"
    assert enc.resolve_packing() == "varlen"
    calls, handle = count_layer_calls(enc)
    out = enc(pixel_values, grids)
    handle.remove()
    assert len(calls) == 1  # one packed sequence through the layers
    assert out.shape == ref.shape and out.dtype == torch.float32
    starts = np.cumsum([0] + [h * w for h, w in MIXED_GRIDS])
    for k in range(len(MIXED_GRIDS)):
        assert rel_err(out[starts[k]:starts[k + 1]], ref[starts[k]:starts[k + 1]]) < 1e-5
    # the tower's attention backend is switched only during the call
    assert enc.vision_model.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_varlen_with_registers_and_other_feature_layers():
    torch.manual_seed(12)
    config = Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **TINY)
    for feature_layer in (-1, 1):
        enc = AdaptiveVisionEncoder.from_config(config, feature_layer=feature_layer, packing="bucket")
        pixel_values, grids = random_crops(MIXED_GRIDS, seed=3)
        ref = enc(pixel_values, grids)
        enc.packing = "varlen"
        with warnings.catch_warnings():  # transformers <= 5.17: falls back to buckets, with a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            assert rel_err(enc(pixel_values, grids), ref) < 1e-5
    enc = AdaptiveVisionEncoder.from_config(clip_config(), feature_layer=0, packing="varlen")
    assert enc.resolve_packing() == "bucket"  # no layer to run: nothing to pack


@torch.no_grad()
def test_varlen_each_crop_depends_only_on_itself():
    enc = make_encoder(clip_config, 13, packing="varlen")
    pixel_values, grids = random_crops(MIXED_GRIDS, seed=4)
    out = enc(pixel_values, grids)
    starts = np.cumsum([0] + [h * w for h, w in MIXED_GRIDS])
    for k in (0, 2, 8, 11):  # native, 1xN, a 2x8 sharing the length-16 run, a 16x1
        perturbed = pixel_values.clone()
        perturbed[starts[k]:starts[k + 1]] += torch.randn(starts[k + 1] - starts[k], perturbed.shape[1])
        changed = (enc(perturbed, grids) - out).abs().amax(dim=1) > 0
        assert changed[starts[k]:starts[k + 1]].all()
        assert not changed[:starts[k]].any() and not changed[starts[k + 1]:].any()


def test_varlen_gradients_match_bucket():
    enc = make_encoder(clip_config, 14, trainable=True, packing="bucket")
    pixel_values, grids = random_crops([(4, 4), (2, 8), (3, 5), (1, 1)], seed=5)
    grads = {}
    for mode in ("bucket", "varlen"):
        enc.packing = mode
        enc.zero_grad()
        enc(pixel_values, grids).square().mean().backward()
        grads[mode] = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    assert grads["bucket"].keys() == grads["varlen"].keys() and grads["bucket"]
    for name, g in grads["bucket"].items():
        if name.endswith("k_proj.bias"):  # softmax ignores a key bias: its gradient is round-off around 0
            assert g.abs().max() < 1e-6 and grads["varlen"][name].abs().max() < 1e-6
            continue
        assert rel_err(grads["varlen"][name], g) < 1e-5, name


def test_packing_modes_and_auto_on_cpu():
    enc = AdaptiveVisionEncoder.from_config(clip_config())
    assert enc.packing == "auto"
    assert enc.resolve_packing() == "bucket"  # no flash varlen kernel on the CPU
    assert enc.resolve_packing(dtype=torch.bfloat16) == "bucket"
    with pytest.raises(ValueError, match="packing"):
        AdaptiveVisionEncoder.from_config(clip_config(), packing="padded")
    with pytest.raises(ValueError, match="packing"):
        enc.packing = "dense"
    assert "packing='auto'" in repr(enc)


def test_dinov2_drop_path_in_training_uses_buckets():
    enc = AdaptiveVisionEncoder.from_config(dinov2_config(drop_path_rate=0.1), packing="varlen")
    skip_unless_layers_forward_kwargs(enc)
    assert enc.resolve_packing() == "varlen"  # frozen: eval mode, no drop path
    enc.unfreeze().train()
    assert enc.resolve_packing() == "bucket"


@torch.no_grad()
def test_attn_implementation_restored_on_error():
    enc = make_encoder(clip_config, 15, packing="varlen")
    pixel_values, grids = random_crops([(4, 4), (2, 6)])

    def boom(module, args):
        assert enc.vision_model.config._attn_implementation == PACKED_ATTENTION_NAME
        raise RuntimeError("boom")

    handle = enc.layers[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        enc(pixel_values, grids)
    handle.remove()
    assert enc.vision_model.config._attn_implementation == "sdpa"


class _NoKwargsLayer(torch.nn.Module):
    """A layer whose forward takes no keyword arguments (like DINOv2's in transformers <= 5.17)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, attention_mask=None):
        return self.inner(hidden_states, attention_mask)


class _NoMaskLayer(_NoKwargsLayer):
    def forward(self, hidden_states):  # noqa: D102 - DINOv2 in transformers <= 5.17: no mask, no kwargs
        return self.inner(hidden_states, None)


class _DroppingLayer(_NoKwargsLayer):
    """Accepts keyword arguments but does not pass them on (like SigLIP's attention in transformers 5.x)."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return self.inner(hidden_states, attention_mask)


@torch.no_grad()
@pytest.mark.parametrize("wrapper", [_NoKwargsLayer, _NoMaskLayer, _DroppingLayer])
def test_layers_that_do_not_forward_kwargs_fall_back_to_buckets(wrapper):
    enc = make_encoder(clip_config, 16, packing="bucket")
    pixel_values, grids = random_crops(MIXED_GRIDS, seed=6)
    ref = enc(pixel_values, grids)
    layers = enc.vision_model.encoder.layers
    for i in range(len(layers)):
        layers[i] = wrapper(layers[i])
    assert torch.equal(enc(pixel_values, grids), ref)  # bucket mode runs such layers too
    enc.packing = "varlen"
    with pytest.warns(RuntimeWarning, match="falls back to 'bucket'"):
        assert enc.resolve_packing() == "bucket"
    assert enc.vision_model.config._attn_implementation == "sdpa"  # the probe restored it
    assert torch.equal(enc(pixel_values, grids), ref)


@torch.no_grad()
def test_siglip_varlen_matches_bucket_whatever_it_resolves_to():
    # SigLIP's attention in transformers 5.17 / 5.24 does not pass kwargs on: it falls back (with a warning).
    enc = make_encoder(siglip_config, 17, packing="bucket")
    pixel_values, grids = random_crops(MIXED_GRIDS, seed=7)
    ref = enc(pixel_values, grids)
    enc.packing = "varlen"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert rel_err(enc(pixel_values, grids), ref) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("mode", ["bucket", "varlen"])
@pytest.mark.parametrize("cap", [1, 17, 40, 100])
def test_max_batch_tokens_splits_passes(mode, cap):
    enc = make_encoder(clip_config, 19, packing="bucket")
    pixel_values, grids = random_crops(MIXED_GRIDS, seed=9)
    ref = enc(pixel_values, grids)
    enc.packing, enc.max_batch_tokens = mode, cap
    calls = []
    handle = enc.layers[0].register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[:2]))
    out = enc(pixel_values, grids)
    handle.remove()
    assert rel_err(out, ref) < 1e-5
    lengths = [h * w + 1 for h, w in MIXED_GRIDS]
    assert sum(b * n for b, n in calls) == sum(lengths)  # every token once
    if mode == "bucket":  # dense sub-batches: over the cap only as a single crop longer than the cap
        assert all(b * n <= cap or (b == 1 and n > cap) for b, n in calls)
    else:  # packs (batch 1): over the cap only as a single crop longer than the cap
        assert all(b == 1 for b, _ in calls)
        assert all(n <= cap or (n in lengths and n > cap) for _, n in calls)
        if cap >= max(lengths):
            assert len(calls) < len(MIXED_GRIDS)  # crops do share packs


@torch.no_grad()
def test_max_batch_tokens_auto_caps_dense_batches_on_the_cpu(monkeypatch):
    import llava_uhd.modeling.vision as vision

    monkeypatch.setattr(vision, "CPU_BATCH_TOKENS", 40)  # a cap the tiny crops reach
    enc = make_encoder(clip_config, 21, packing="bucket")
    assert enc.max_batch_tokens == "auto" and "max_batch_tokens" not in repr(enc)
    assert enc.resolve_max_batch_tokens("bucket") == 40
    assert enc.resolve_max_batch_tokens("varlen") is None  # a pack is one sequence: nothing to gain on a CPU
    assert enc.resolve_max_batch_tokens("bucket", "cuda") is None  # the device asked about, not the tower's
    grids = [(4, 4)] * 5  # 17 tokens each with the CLS: 2 per pass under a cap of 40
    pixel_values, grids = random_crops(grids, seed=4)
    calls = []
    handle = enc.layers[0].register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape[:2])))
    out = enc(pixel_values, grids)
    enc.max_batch_tokens = None  # no cap: one dense batch of 5
    ref = enc(pixel_values, grids)
    handle.remove()
    assert calls == [(2, 17), (2, 17), (1, 17), (5, 17)]
    assert rel_err(out, ref) < 1e-5


def test_max_batch_tokens_validation():
    enc = AdaptiveVisionEncoder.from_config(clip_config(), max_batch_tokens=4096)
    assert enc.max_batch_tokens == 4096 and "max_batch_tokens=4096" in repr(enc)
    for bad in (0, -3, 2.5, True, "x"):
        with pytest.raises((ValueError, TypeError)):
            enc.max_batch_tokens = bad
    enc.max_batch_tokens = None
    assert enc.max_batch_tokens is None and enc.resolve_max_batch_tokens("bucket") is None
    enc.max_batch_tokens = "auto"
    assert enc.max_batch_tokens == "auto"


def test_gradient_checkpointing_uses_buckets():
    enc = make_encoder(clip_config, 20, trainable=True, packing="varlen")
    enc.train()
    pixel_values, grids = random_crops([(4, 4), (2, 8), (3, 5)], seed=10)
    enc.zero_grad()
    enc(pixel_values, grids).square().mean().backward()
    ref = enc.vision_model.encoder.layers[0].self_attn.q_proj.weight.grad.clone()
    tower = enc.vision_model  # transformers 5.24 renamed gradient_checkpointing_enable
    (getattr(tower, "activation_checkpointing_enable", None) or tower.gradient_checkpointing_enable)()
    assert enc.layers[0].gradient_checkpointing
    assert enc.resolve_packing() == "bucket"  # the recomputation would run with the tower's own attention
    with torch.no_grad():
        assert enc.resolve_packing() == "varlen"  # no backward, no recomputation
    enc.zero_grad()
    enc(pixel_values, grids).square().mean().backward()
    assert rel_err(enc.vision_model.encoder.layers[0].self_attn.q_proj.weight.grad, ref) < 1e-5


# ---------------------------------------------------------------------- found by the mutation check (vision)
def test_a_wrapper_or_a_full_config_is_unwrapped():
    from transformers import CLIPConfig

    torch.manual_seed(0)
    wrapper = torch.nn.Module()  # like CLIPModel: holds the tower as .vision_model
    wrapper.vision_model = CLIPVisionModel(clip_config())
    enc = AdaptiveVisionEncoder(wrapper)
    assert enc.vision_model is wrapper.vision_model and enc.family == "clip"
    with pytest.raises(ValueError, match=r"unsupported vision config model_type 'bert'; expected one of \['clip_vision"):
        AdaptiveVisionEncoder.from_config(transformers.BertConfig())
    full = CLIPConfig(vision_config=clip_config().to_dict(), text_config={"hidden_size": 16, "intermediate_size": 32,
                      "num_hidden_layers": 1, "num_attention_heads": 2})
    enc = AdaptiveVisionEncoder.from_config(full)
    assert enc.hidden_size == 32 and len(enc.layers) == 3 and enc.native_grid == (4, 4)
    assert AdaptiveVisionEncoder.from_config(clip_config(num_hidden_layers=2)).num_layers_to_run == 1


def test_feature_layer_bounds_and_messages():
    torch.manual_seed(0)
    tower = CLIPVisionModel(clip_config())  # 3 layers: hidden states 0..3
    assert AdaptiveVisionEncoder(tower, feature_layer=-4).num_layers_to_run == 0
    assert AdaptiveVisionEncoder(tower, feature_layer=3).num_layers_to_run == 3
    for bad in (-5, 4):
        with pytest.raises(ValueError, match=rf"feature_layer={bad} out of range for a tower with 3 layers \(4 hidden states\)"):
            AdaptiveVisionEncoder(tower, feature_layer=bad)
    with pytest.raises(ValueError, match=r"unsupported vision tower Linear \(model_type None\); expected one of"):
        AdaptiveVisionEncoder(torch.nn.Linear(2, 2))


def test_native_grid_from_the_position_table():
    torch.manual_seed(0)
    # 25 positions on a tower whose config says 28 px / 7 = 4x4: the table is 5x5, square
    tower = Dinov2Model(dinov2_config(image_size=35))
    tower.config.image_size = 28
    assert AdaptiveVisionEncoder(tower).native_grid == (5, 5)
    tower = Dinov2Model(dinov2_config(image_size=(28, 42)))  # 4x6 positions, a non-square native grid
    assert AdaptiveVisionEncoder(tower).native_grid == (4, 6)


def test_packs_fill_up_to_the_cap_exactly():
    def h(n):
        return torch.zeros(1, n, 2)

    sizes = [[p.shape[1] for p in pack] for pack in AdaptiveVisionEncoder._packs([h(5), h(5), h(5), h(3)], 10)]
    assert sizes == [[5, 5], [5, 3]]
    assert [[p.shape[1] for p in pack] for pack in AdaptiveVisionEncoder._packs([h(4), h(6), h(1)], 10)] == [[4, 6], [1]]
    assert len(AdaptiveVisionEncoder._packs([h(5), h(5)], None)) == 1


@torch.no_grad()
def test_run_layers_applies_the_attention_mask():
    enc = make_encoder(clip_config, 22)
    hidden = torch.randn(1, 6, 32)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 3:] = float("-inf")  # nobody sees the last three tokens
    masked = enc.run_layers(hidden, mask)
    alone = enc.run_layers(hidden[:, :3])  # the first three tokens without the others
    assert rel_err(masked[:, :3], alone) < 1e-5
    assert rel_err(enc.run_layers(hidden)[:, :3], alone) > 1e-3


def test_no_crops_give_no_features_in_the_towers_dtype():
    enc = make_encoder(clip_config, 23).to(torch.bfloat16)
    out = enc(torch.zeros(0, 3 * PATCH * PATCH), torch.zeros(0, 2, dtype=torch.long))
    assert out.shape == (0, 32) and out.dtype == torch.bfloat16


@torch.no_grad()
def test_the_position_cache_keeps_the_newest_grids(monkeypatch):
    import llava_uhd.modeling.vision as vision

    monkeypatch.setattr(vision, "_MAX_CACHED_GRIDS", 2)
    enc = make_encoder(clip_config, 24)
    for grid in ((2, 3), (3, 2), (5, 1)):
        enc.get_pos_embed(grid)
    assert [key[0] for key in enc._pos_cache] == [(3, 2), (5, 1)]  # the oldest went
    assert enc.get_pos_embed((5, 1)) is enc.get_pos_embed((5, 1))
