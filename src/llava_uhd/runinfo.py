"""What a recorded run ran on: the machine, the package versions, and file checksums.

Benchmarks, the ablation and the nano training all record these beside their numbers, so a result can be traced to
its machine and software::

    from llava_uhd.runinfo import machine, versions, sha256_file
    record = {"machine": machine("cuda"), "versions": versions(), "sha256": sha256_file("weights.safetensors")}

Imports nothing heavy at module level: torch is imported only by `machine`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["DISTRIBUTIONS", "cpu_model", "machine", "versions", "sha256_file"]

DISTRIBUTIONS: tuple[str, ...] = ("llava-uhd", "torch", "transformers", "peft", "accelerate", "safetensors",
                                  "tokenizers", "gguf", "onnx", "numpy", "pillow")
"""The distributions `versions` reports by default."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str | None = None) -> dict[str, Any]:
    """CPU model, cores, torch threads, Python, torch and the platform; with a ``device`` (``"cpu"``, ``"cuda"``,
    ``"cuda:1"``, or a `torch.device`) also ``device`` and, on CUDA, the GPU's name, memory and CUDA version."""
    import torch

    info: dict[str, Any] = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform()}
    if device is not None:
        device = torch.device(device)
        info["device"] = str(device)
        if device.type == "cuda" and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(device)
            info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        cuda=torch.version.cuda)
    return info


def versions(distributions: tuple[str, ...] = DISTRIBUTIONS) -> dict[str, str | None]:
    """``{"python": ..., dist: version or None}`` for each installed distribution."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in distributions:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()
