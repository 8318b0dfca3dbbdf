"""Ordered, parallel batches of a map-style dataset (`llava_uhd.data.batches`)."""

from __future__ import annotations

import torch

from llava_uhd.data import batches
from llava_uhd.data.batches import ordered_batches, unshared


def test_batches_keep_the_order_with_processes_threads_or_neither(monkeypatch):
    data = list(range(11))
    for workers in (0, 2):
        got = list(ordered_batches(data, 4, workers))
        assert [x for b in got for x in b] == data and len(got) == 3
    monkeypatch.setattr(batches, "MIN_SHM_BYTES", 2**62)  # no room in /dev/shm: threads
    got = list(ordered_batches(data, 4, 2, collate_fn=sum))
    assert got == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7, 8 + 9 + 10]


def test_unshared_copies_only_shared_tensors():
    shared, plain = torch.arange(3).share_memory_(), torch.arange(3)
    out = unshared((shared, [plain, "x"]))
    assert not out[0].is_shared() and torch.equal(out[0], shared)
    assert out[1][0] is plain and out[1][1] == "x" and isinstance(out[1], list)
