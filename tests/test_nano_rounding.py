"""The nano tower's int8 rounding (`llava_uhd.nano.rounding`)."""

from __future__ import annotations

import json

import torch

from llava_uhd.nano.rounding import VISION_MARKER, int8_rowwise, read_vision_marker, round_linear_int8_


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
    before = lin.weight.detach().clone()
    round_linear_int8_(lin)  # rounding a rounded weight changes nothing
    assert torch.equal(lin.weight, before)


def test_only_linear_weights_are_rounded():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Embedding(5, 8))
    kept = {k: v.clone() for k, v in model.state_dict().items() if k != "0.weight"}
    assert round_linear_int8_(model) == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())


def test_vision_marker(tmp_path):
    assert read_vision_marker(tmp_path) is None
    (tmp_path / VISION_MARKER).write_text(json.dumps({"rounding": "int8-rowwise"}))
    assert read_vision_marker(tmp_path) == {"rounding": "int8-rowwise"}
