"""Quantized inference: bitsandbytes int8 (through ``from_pretrained``), torchao int8 weight-only on the LLM, torch
dynamic int8, and the project's own ``quantize_model`` / ``quantization_config`` ("int8"), each run end to end
(forward + greedy generate) on a tiny saved model. Reference: the same model in float32. Tolerances on the
logits (relative error, norm of the difference over the norm of the float32 logits) are about 3x the error
measured here on this tiny model (see each constant)."""

import importlib.util
import warnings

import pytest
import torch
from conftest import build_tiny, random_image, rel_err
from torch import nn

from llava_uhd import LlavaUHDConfig, LlavaUHDForConditionalGeneration
from llava_uhd.modeling.quantization import (
    METHODS,
    compute_dtype,
    int8_layers,
    quantization_config,
    quantize_model,
)
from llava_uhd.processing import LlavaUHDProcessor

# the `test` extra installs both: a missing one fails here rather than skipping the tests
for _module in ("bitsandbytes", "torchao"):
    assert importlib.util.find_spec(_module) is not None, f"{_module} is missing: pip install -e '.[test]'"
with warnings.catch_warnings():  # bitsandbytes' import uses the deprecated torch.jit.script_method
    warnings.simplefilter("ignore", DeprecationWarning)
    import bitsandbytes as bnb

PROMPT = "USER: <image>\nWhat colour is the shape? ASSISTANT:"
# measured: the largest over 4 random models x 2 images
BNB_TOL = 0.03  # measured 0.0095 whole model, 0.0074 tower and lm_head in float (LLM.int8: outlier columns in float)
AO_WEIGHT_ONLY_TOL = 0.0075  # measured 0.0025 (int8 weights per output channel, float activations)
INT8_TOL = 0.025  # measured 0.0077; 0.0065 with the MLP or the spatial resampler (int8 weights and activations)
DYNAMIC_TOL = 0.07  # measured 0.024 (torch dynamic: int8 weights per tensor, int8 activations)


def quiet_torch_ao(test):
    """torch dynamic quantization (torch.ao.quantization) warns that it is deprecated in favour of torchao."""
    test = pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")(test)
    return pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")(test)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(folder, fp32 model, inputs, fp32 logits)``: a tiny model with tied embeddings (like SmolLM2), saved."""
    folder = tmp_path_factory.mktemp("tiny")
    model, processor = build_tiny("clip")
    config = LlavaUHDConfig.from_dict(model.config.to_dict())
    config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlavaUHDForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    inputs = LlavaUHDProcessor.from_pretrained(folder)(images=[random_image(70, 40, seed=3)], text=[PROMPT])
    with torch.no_grad():
        logits = model(**inputs).logits
    return folder, model, inputs, logits


@torch.no_grad()
def check_runs_close(model, saved, tol):
    """Forward within ``tol`` of float32; greedy generate runs and starts with the prompt."""
    _, _, inputs, ref = saved
    logits = model(**inputs).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert rel_err(logits, ref) < tol
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    return logits


# ------------------------------------------------------------------------------------------------ compute dtype
@quiet_torch_ao
@torch.no_grad()
def test_compute_dtype_is_what_each_kind_of_linear_layer_takes_and_returns():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    plain = nn.Linear(16, 8).to(torch.bfloat16)
    ao = nn.Sequential(nn.Linear(16, 8).to(torch.bfloat16))
    quantize_(ao, Int8WeightOnlyConfig())
    dynamic = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(16, 8)), {nn.Linear}, torch.qint8)
    int8 = bnb.nn.Linear8bitLt(16, 8, bias=False, has_fp16_weights=False)
    int8.weight = bnb.nn.Int8Params(torch.randn(8, 16), requires_grad=False, has_fp16_weights=False)
    int8 = int8.to("cpu")  # quantizes the weight: its dtype is int8 now
    assert int8.weight.dtype == torch.int8

    cases = [(plain, None, torch.bfloat16), (ao[0], None, torch.bfloat16), (dynamic[0], None, torch.float32),
             (int8, torch.bfloat16, torch.bfloat16), (int8, None, torch.float32)]
    for layer, default, expected in cases:
        dtype = compute_dtype(layer, default)
        assert dtype == expected, type(layer).__name__
        assert layer(torch.randn(3, 16).to(dtype)).dtype == dtype  # it takes that dtype and returns it


# --------------------------------------------------------------------------------------------- bitsandbytes
@pytest.mark.parametrize("skip", [None, ["vision_tower", "language_model.lm_head"]], ids=["whole-model", "llm"])
def test_bitsandbytes_int8_from_pretrained_runs_close_to_fp32(saved, skip):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    model = LlavaUHDForConditionalGeneration.from_pretrained(saved[0], quantization_config=config).eval()
    linear8 = {name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert "projector.kv_proj" in linear8 and "language_model.model.layers.0.mlp.up_proj" in linear8
    assert "language_model.lm_head" not in linear8  # transformers' default skip, and ours
    assert any(n.startswith("vision_tower.") for n in linear8) == (skip is None)
    assert model.projector.kv_proj.weight.dtype == torch.int8  # what the resampler used to cast its input to
    check_runs_close(model, saved, BNB_TOL)


# ----------------------------------------------------------------------------------------------------- torchao
def test_torchao_int8_weight_only_on_the_llm(saved):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    config = TorchAoConfig(Int8WeightOnlyConfig(),
                           modules_to_not_convert=["vision_tower", "projector", "language_model.lm_head"])
    model = LlavaUHDForConditionalGeneration.from_pretrained(saved[0], quantization_config=config).eval()
    quantized = {name for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and type(m.weight) is not nn.Parameter}
    llm_linears = {name for name, m in saved[1].named_modules()
                   if type(m) is nn.Linear and name.startswith("language_model.model.")}
    assert quantized == llm_linears
    check_runs_close(model, saved, AO_WEIGHT_ONLY_TOL)


# --------------------------------------------------------------------------------------------- torch dynamic
@quiet_torch_ao
def test_torch_dynamic_int8_runs(saved):
    model = LlavaUHDForConditionalGeneration.from_pretrained(saved[0]).eval()
    model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert callable(model.projector.kv_proj.weight)  # a method: there is no weight dtype to read
    check_runs_close(model, saved, DYNAMIC_TOL)


# ------------------------------------------------------------------------------------------- the project's API
def test_quantize_model_int8_and_quantization_config_quantize_the_same_layers_alike(saved):
    folder, fp32, _, _ = saved
    expected = set(int8_layers(fp32))
    assert "projector.kv_proj" in expected and "language_model.model.layers.1.self_attn.o_proj" in expected
    assert not any(n.startswith(("vision_tower.", "projector.attn")) or n.endswith("lm_head") for n in expected)

    in_place = quantize_model(LlavaUHDForConditionalGeneration.from_pretrained(folder).eval(), "int8")
    at_load = LlavaUHDForConditionalGeneration.from_pretrained(
        folder, quantization_config=quantization_config("int8")).eval()
    for model in (in_place, at_load):
        quantized = {name for name, m in model.named_modules()
                     if isinstance(m, nn.Linear) and type(m.weight) is not nn.Parameter}
        assert quantized == expected
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # still tied
    logits = check_runs_close(in_place, saved, INT8_TOL)
    with torch.no_grad():
        assert rel_err(at_load(**saved[2]).logits, logits) < 1e-6  # same int8 weights either way


@pytest.mark.parametrize("settings", [{"projector": "mlp"}, {"resampler_type": "spatial"}])
@torch.no_grad()
def test_quantize_model_int8_with_the_other_projectors(settings):
    model, processor = build_tiny("dinov2", **settings)
    inputs = processor(images=[random_image(60, 30)], text=[PROMPT])
    ref = model(**inputs).logits
    quantize_model(model, "int8")
    first = "projector.linear_1" if settings.get("projector") == "mlp" else "projector.kv_proj"
    assert type(dict(model.named_modules())[first].weight) is not nn.Parameter
    assert rel_err(model(**inputs).logits, ref) < INT8_TOL


def test_none_and_mistakes():
    model, _ = build_tiny("clip")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert quantize_model(model, "none") is model and quantization_config("none") is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert METHODS == ("none", "int8")
    for call in (lambda: quantize_model(model, "int4"), lambda: quantization_config("fp8")):
        with pytest.raises(ValueError, match="unknown quantization method .* expected one of 'none', 'int8'"):
            call()


def test_a_missing_torchao_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    model, _ = build_tiny("clip")
    for call in (lambda: quantize_model(model, "int8"), lambda: quantization_config("int8")):
        with pytest.raises(ValueError, match="pip install torchao"):
            call()
