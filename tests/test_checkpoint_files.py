"""Damaged or foreign model folders (`llava_uhd.modeling.checkpoint_files`): a tiny model saved with
``save_pretrained``, then damaged (a truncated or padded safetensors file, garbage, a broken shard index, a config
value that is not a number, another ``model_type``, a truncated ``.bin``), is refused with a `ValueError` naming
the file, by ``from_pretrained`` (and so by ``ask``, ``chat``, ``infer`` and ``train --model``) and by ``convert``;
on the command line that is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from serve_helpers import picture, save_tiny

from llava_uhd.modeling.checkpoint_files import check_weight_file, load_weight_file, weight_files

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved whole, the same saved in shards, and a picture to ask about."""
    root = tmp_path_factory.mktemp("tiny-saved")
    model, _ = save_tiny(root / "whole")
    save_tiny(root / "sharded")
    (root / "sharded" / "model.safetensors").unlink()
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    assert len(list((root / "sharded").glob("model-*-of-00004.safetensors"))) == 4
    save_tiny(root / "bin")  # the same in torch's format, as older transformers saved it
    (root / "bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")
    picture(90, 50).save(root / "img.png")
    return root


def _copy(saved: Path, tmp_path: Path, which: str = "whole") -> Path:
    return Path(shutil.copytree(saved / which, tmp_path / which))


def _edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def _truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


# ------------------------------------------------------------------------------ what each damage says
def _damages():
    def header_garbage(d):  # a plausible header length, then bytes that are not JSON
        size = (d / "model.safetensors").stat().st_size
        (d / "model.safetensors").write_bytes(struct.pack("<Q", 64) + b"\xff" * 64 + b"\0" * (size - 72))

    def index(change):
        return lambda d: _edit_json(d / "model.safetensors.index.json", change)

    def swap_first(index_value):
        weight_map = index_value["weight_map"]
        name = sorted(weight_map)[0]
        weight_map[name] = sorted(set(weight_map.values()) - {weight_map[name]})[0]

    return [
        ("whole", lambda d: _truncate(d / "model.safetensors"),
         r"model\.safetensors: truncated: the tensors need \d+ bytes, the file has \d+"),
        ("whole", lambda d: (d / "model.safetensors").write_bytes(os.urandom(5000)),
         r"model\.safetensors: not a safetensors file, or truncated"),
        ("whole", lambda d: (d / "model.safetensors").write_bytes(b""), r"model\.safetensors: not a safetensors file"),
        ("whole", header_garbage, r"model\.safetensors: damaged safetensors file \(its header is not valid JSON\)"),
        ("whole", lambda d: open(d / "model.safetensors", "ab").write(b"\0" * 10),
         r"model\.safetensors: longer than its tensors"),
        ("whole", lambda d: (d / "config.json").write_text("{not json"), r"config\.json: not valid JSON"),
        ("whole", lambda d: (d / "config.json").write_text("[1, 2]"), r"config\.json: holds a JSON list"),
        ("whole", lambda d: _edit_json(d / "config.json", lambda c: c["text_config"].update(hidden_size="abc")),
         r"config\.json: text_config\.hidden_size is 'abc', expected an integer"),
        ("whole", lambda d: _edit_json(d / "config.json", lambda c: c.update(num_queries="4", max_slices=2.5)),
         r"config\.json: max_slices is 2\.5, expected an integer; num_queries is '4', expected an integer"),
        ("whole", lambda d: _edit_json(d / "config.json", lambda c: c["vision_config"].update(layer_norm_eps=True)),
         r"config\.json: vision_config\.layer_norm_eps is True, expected a number"),
        ("whole", lambda d: _edit_json(d / "config.json", lambda c: c.update(model_type="llama")),
         r"config\.json: model_type 'llama' is not 'llava_uhd'"),
        ("whole", lambda d: _edit_json(d / "config.json", lambda c: c.update(image_strategy="zoom")),
         r"config\.json: image_strategy must be one of"),
        ("sharded", lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": '),
         r"model\.safetensors\.index\.json: not a valid shard index"),
        ("sharded", index(lambda i: i.update(weight_map={})), r"index\.json: no weight_map"),
        ("sharded", lambda d: (d / "model-00002-of-00004.safetensors").unlink(),
         r"index\.json names shard\(s\) that are not in .*: model-00002-of-00004\.safetensors"),
        ("sharded", index(swap_first), r"index\.json does not match the shards: listed but absent: "),
        ("sharded", lambda d: _truncate(d / "model-00003-of-00004.safetensors", 0.9),
         r"model-00003-of-00004\.safetensors: truncated"),
        ("bin", lambda d: _truncate(d / "pytorch_model.bin"), r"pytorch_model\.bin: truncated or damaged torch"),
    ]


DAMAGES = _damages()
IDS = ["truncated", "garbage", "empty", "header-not-json", "padded", "config-not-json", "config-not-object",
       "text-hidden-size-abc", "settings-not-integers", "eps-a-bool", "model-type-llama", "refused-by-config",
       "index-not-json", "index-empty", "shard-missing", "index-wrong-shard", "shard-truncated", "bin-truncated"]


@pytest.mark.parametrize("which, damage, message", DAMAGES, ids=IDS)
def test_from_pretrained_names_the_damaged_file(saved, tmp_path, which, damage, message):
    from llava_uhd import LlavaUHDForConditionalGeneration

    folder = _copy(saved, tmp_path, which)
    damage(folder)
    with pytest.raises(ValueError, match=message) as raised:
        LlavaUHDForConditionalGeneration.from_pretrained(folder)
    assert str(folder) in str(raised.value) and "\n" not in str(raised.value)


def test_sound_folders_still_load_the_same(saved):
    from llava_uhd import LlavaUHDForConditionalGeneration

    whole = LlavaUHDForConditionalGeneration.from_pretrained(saved / "whole").state_dict()
    for other in ("sharded", "bin"):
        again = LlavaUHDForConditionalGeneration.from_pretrained(saved / other).state_dict()
        assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    assert [f.name for f in weight_files(saved / "whole")] == ["model.safetensors"]
    assert len(weight_files(saved / "sharded")) >= 2 and weight_files(saved) == []


def test_every_way_in_is_checked(saved, tmp_path):
    """The Auto classes, the serving loader and training's --model all go through the same check."""
    import llava_uhd  # noqa: F401
    from transformers import AutoModelForImageTextToText

    from llava_uhd.serve.loading import load_model
    from llava_uhd.train.arguments import ModelArguments
    from llava_uhd.train.run import build_model_and_processor

    folder = _copy(saved, tmp_path)
    _truncate(folder / "model.safetensors")
    for load in (AutoModelForImageTextToText.from_pretrained, load_model,
                 lambda f: build_model_and_processor(ModelArguments(model=str(f)))):
        with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
            load(folder)
    nano = tmp_path / "nano"
    nano.mkdir()
    (nano / "nano_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"nano_config\.json: not valid JSON"):
        load_model(nano)


@pytest.mark.parametrize("which, damage, message", [DAMAGES[i] for i in (0, 7, 10, 14, 17)],
                         ids=[IDS[i] for i in (0, 7, 10, 14, 17)])
def test_ask_says_it_in_one_line(saved, tmp_path, capsys, which, damage, message):
    from llava_uhd.cli import main

    folder = _copy(saved, tmp_path, which)
    damage(folder)
    assert main(["ask", "--model", str(folder), "--image", str(saved / "img.png"), "Which?"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("llava-uhd ask: ")
    assert str(folder) in captured.err and re.search(message, captured.err)


@pytest.mark.slow
def test_ask_in_a_process_of_its_own_prints_no_traceback(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _truncate(folder / "model.safetensors")
    proc = subprocess.run([sys.executable, "-m", "llava_uhd", "ask", "--model", str(folder), "--image",
                           str(saved / "img.png"), "Which?"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("llava-uhd ask: ")]
    assert len(lines) == 1 and "model.safetensors: truncated" in lines[0] and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ weight files alone
def test_a_truncated_bin_is_named(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(10000.0)}, path)
    assert check_weight_file(path) is None and torch.equal(load_weight_file(path)["w"], torch.arange(10000.0))
    _truncate(path, 0.6)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: truncated or damaged torch checkpoint"):
        check_weight_file(path)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: truncated or damaged torch checkpoint"):
        load_weight_file(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: truncated or damaged torch checkpoint \(0 bytes\)"):
        check_weight_file(path)


# ------------------------------------------------------------------------------ llava-uhd convert
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from test_convert import release_config, release_state, write_release
    from conftest import build_tiny_tokenizer

    vocab_size = len(build_tiny_tokenizer(with_image_token=False))
    root = tmp_path_factory.mktemp("release")
    state = release_state(vocab_size)
    write_release(root / "shards", state, release_config(vocab_size), shards=2)
    write_release(root / "bin", state, release_config(vocab_size), shards=1, fmt="bin")
    return root


def _convert(src: Path, out: Path, capsys) -> tuple[int, str]:
    from llava_uhd.cli import main

    code = main(["convert", "--from", str(src), "--to", str(out)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("which, damage, message", [
    ("shards", lambda d: _truncate(d / "model-00001-of-00002.safetensors"),
     r"model-00001-of-00002\.safetensors: truncated"),
    ("shards", lambda d: (d / "model-00002-of-00002.safetensors").unlink(),
     r"index\.json names shard\(s\) that are not in .*: model-00002-of-00002\.safetensors"),
    ("shards", lambda d: (d / "model.safetensors.index.json").write_text("nope"), r"not a valid shard index"),
    ("shards", lambda d: _edit_json(d / "config.json", lambda c: c.update(hidden_size="abc")),
     r"config\.json: hidden_size is 'abc', expected an integer"),
    ("shards", lambda d: _edit_json(d / "config.json", lambda c: c.update(mm_hidden_size="wide")),
     r"config\.json: mm_hidden_size is 'wide', expected an integer"),
    ("bin", lambda d: _truncate(d / "pytorch_model.bin"), r"pytorch_model\.bin: truncated or damaged torch checkpoint"),
    ("bin", lambda d: (d / "pytorch_model.bin").write_bytes(b"\x80\x02garbage"), r"pytorch_model\.bin: cannot be read"),
], ids=["shard-truncated", "shard-missing", "index-not-json", "hidden-size-abc", "mm-hidden-size", "bin-truncated",
        "bin-garbage"])
def test_convert_says_it_in_one_line(release, tmp_path, capsys, which, damage, message):
    src = Path(shutil.copytree(release / which, tmp_path / which))
    damage(src)
    code, err = _convert(src, tmp_path / "out", capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("llava-uhd convert: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_convert_reads_sound_release_folders(release, tmp_path, capsys):
    for which in ("shards", "bin"):
        code, err = _convert(release / which, tmp_path / which, capsys)
        assert code == 0, err
    args = argparse.Namespace(src=str(release / "shards"), out=str(tmp_path / "shards"), dtype=None, max_slices=7,
                              max_shard_size="5GB", overwrite=False)
    from llava_uhd.convert import run_convert

    assert run_convert(args) == 2 and "exists and is not empty" in capsys.readouterr().err
