"""Loading a model to serve (`llava_uhd.serve.loading`): dtypes and the int8 option of ``ask`` / ``chat`` /
``infer`` (``--quantize int8``)."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import picture, save_tiny

from llava_uhd.modeling.quantization import int8_layers
from llava_uhd.serve.loading import load_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-serve")
    save_tiny(folder)
    return folder


def _first_logits(model, processor):
    inputs = processor(images=[picture(90, 50, 3)], text=[processor.question_prompt("What colour?")])
    with torch.no_grad():
        return model(**inputs).logits[0, -1].float()


def test_int8_quantizes_the_llm_and_projector_and_stays_close(saved):
    model, processor, info = load_model(saved)
    layers = int8_layers(model)
    assert layers and any(name.startswith("projector.") for name in layers) and info["quantize"] == "none"
    ref = _first_logits(model, processor)
    q_model, q_processor, q_info = load_model(saved, quantize="int8")
    assert q_info["quantize"] == "int8"
    assert all(type(q_model.get_submodule(name).weight) is not torch.nn.Parameter for name in layers)
    assert type(q_model.vision_tower.patch_conv.weight) is torch.nn.Parameter  # the tower stays float
    got = _first_logits(q_model, q_processor)
    assert (got - ref).norm() / ref.norm() < 0.02  # int8 weights and activations: 0.3 % measured


def test_loading_mistakes_are_value_errors(saved):
    with pytest.raises(ValueError, match="quantize must be one of none, int8"):
        load_model(saved, quantize="int4")
    with pytest.raises(ValueError, match="for CPU inference"):
        load_model(saved, device="cuda", quantize="int8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(saved, dtype="float64")


def test_auto_dtype_is_bfloat16_only_where_it_is_native(monkeypatch):
    from llava_uhd.serve import loading

    monkeypatch.setattr(loading, "native_bf16", lambda device="cpu": True)
    assert loading.resolve_dtype("auto", "cpu", nano=True) == "bfloat16"  # measured equal accuracy, 1.3x faster
    assert loading.resolve_dtype("auto", "cpu", nano=False) == "float32"  # a saved model on the CPU: not measured
    assert loading.resolve_dtype("auto", "cuda", nano=False) == "bfloat16"
    assert loading.resolve_dtype("float16", "cpu", nano=True) == "float16"  # a named dtype is kept
    monkeypatch.setattr(loading, "native_bf16", lambda device="cpu": False)
    assert loading.resolve_dtype("auto", "cpu", nano=True) == "float32"
    assert loading.resolve_dtype("auto", "cuda", nano=False) == "float32"


def test_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    from llava_uhd.serve import loading

    real_open = builtins.open
    for flags, expected in (("fpu sse avx512f amx_bf16 amx_tile", True), ("fpu avx512_bf16", True),
                            ("fpu sse avx2 avx512f", False)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open",
                            lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
        assert loading.native_bf16("cpu") is expected, flags
    assert loading.native_bf16("meta") is False
