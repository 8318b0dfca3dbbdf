"""What a run records of its machine and software (`llava_uhd.runinfo`)."""

from __future__ import annotations

import hashlib
import os

import torch

from llava_uhd.runinfo import machine, sha256_file, versions


def test_machine_describes_the_cpu_and_the_device():
    info = machine()
    assert info["cpu"] and info["cpu_count"] == os.cpu_count() and info["torch"] == torch.__version__
    assert info["torch_threads"] == torch.get_num_threads() and "device" not in info
    assert machine("cpu")["device"] == "cpu" and "gpu" not in machine("cpu")


def test_versions_name_each_distribution_or_none():
    got = versions(("torch", "no-such-distribution-here"))
    assert got["python"] and torch.__version__.startswith(got["torch"].split("+")[0])
    assert got["no-such-distribution-here"] is None


def test_sha256_of_a_file_read_in_chunks(tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk_bytes=333) == hashlib.sha256(data).hexdigest()
