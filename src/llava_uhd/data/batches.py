"""Batches of a map-style dataset in order, made in parallel: for work that processes images ahead of a model
(caching a frozen tower's features, batched evaluation).

    for batch in ordered_batches(dataset, batch_size=8, workers=4):   # a list of dataset[i] per batch
        ...
    kept = unshared(item)     # before keeping a worker's tensors for long

Worker processes (a DataLoader, tensors through /dev/shm) when ``workers > 0`` and /dev/shm has room, else
threads (PIL and numpy release the GIL), else this process.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["ordered_batches", "unshared", "as_list", "MIN_SHM_BYTES"]

logger = logging.getLogger(__name__)

MIN_SHM_BYTES = 4 * 2**30
"""Below this much free /dev/shm, workers are threads: a DataLoader's processes would fail mid-run."""


def as_list(batch: list) -> list:
    """The default collate function: the batch's items as they are."""
    return batch


def _shm_free_bytes() -> int:
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return 0


def ordered_batches(dataset, batch_size: int, workers: int, collate_fn: Callable[[list], Any] = as_list
                    ) -> Iterable[Any]:
    """``collate_fn([dataset[i] for i in batch])`` for consecutive batches of ``batch_size``, in order."""
    free = _shm_free_bytes() if workers > 0 else 0
    if workers > 0 and free < MIN_SHM_BYTES:
        logger.warning("/dev/shm has %.1f GiB free: data workers as threads instead of processes", free / 2**30)
        return _thread_batches(dataset, batch_size, workers, collate_fn)
    from torch.utils.data import DataLoader

    kwargs = {}
    if workers > 0:
        kwargs = {"num_workers": workers, "multiprocessing_context": "fork", "prefetch_factor": 2}
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, **kwargs)


def _thread_batches(dataset, batch_size: int, workers: int, collate_fn):
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(dataset), batch_size):
            idx = range(start, min(len(dataset), start + batch_size))
            yield collate_fn(list(pool.map(dataset.__getitem__, idx)))


def unshared(value):
    """``value`` with every tensor that a DataLoader worker sent through shared memory copied into this process.
    Each shared tensor holds a file descriptor (or a /dev/shm file) open for as long as it lives: thousands of
    kept samples exhaust the descriptors ("received 0 items of ancdata") or slow everything down."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_shared() else value
    if isinstance(value, (tuple, list)):
        return type(value)(unshared(v) for v in value)
    return value
