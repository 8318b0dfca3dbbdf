"""Length-grouped sampling, as LLaVA trains (``group_by_modality_length`` in the paper's stage 2).

`get_length_grouped_indices`: shuffle all indices, cut them into megabatches of ``batch_size * world_size``, sort
each megabatch by length (longest first) and split it into ``world_size`` per-device batches of equal size whose
total lengths are balanced (greedy: each index, longest first, goes to the lightest batch that is not full; when the
megabatch does not divide evenly, a strided split). Samples of similar length land in the same step, so little
padding is wasted, while the order across megabatches stays random.

`get_modality_length_grouped_indices` (lengths positive for samples with images, negative for text-only ones, as
`LazySupervisedDataset.modality_lengths` gives them): the two modalities are length-grouped separately, cut into
megabatches, and the full megabatches of both are shuffled together; the two leftover partial megabatches come last
(image leftovers first, then text), so every batch is of one modality except at most one batch at the very end.

Everything is drawn from the ``generator`` passed in (LLaVA used the global RNG for the image part): the same seed
gives the same order. With a generator, each new iteration (epoch) draws a new order from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["LengthGroupedSampler", "get_length_grouped_indices", "get_modality_length_grouped_indices",
           "split_to_even_chunks"]


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Split ``indices`` into ``num_chunks`` chunks of equal size with balanced total length."""
    if len(indices) % num_chunks != 0:
        return [list(indices[i::num_chunks]) for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0] * num_chunks
    for index in indices:
        best = min((c for c in range(num_chunks) if len(chunks[c]) < per_chunk), key=lambda c: totals[c])
        chunks[best].append(index)
        totals[best] += lengths[index]
    return chunks


def _megabatches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i:i + size]) for i in range(0, len(order), size)]


def get_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int = 1,
                               generator: torch.Generator | None = None) -> list[int]:
    """A permutation of ``range(len(lengths))`` grouped by length (see the module docstring)."""
    lengths = [abs(int(v)) for v in lengths]
    order = torch.randperm(len(lengths), generator=generator).tolist()
    out = []
    for megabatch in _megabatches(order, batch_size * world_size):
        megabatch.sort(key=lambda i: lengths[i], reverse=True)
        for chunk in split_to_even_chunks(megabatch, lengths, world_size):
            out += chunk
    return out


def get_modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int = 1,
                                        generator: torch.Generator | None = None) -> list[int]:
    """A permutation of ``range(len(lengths))`` in modality-pure, length-grouped megabatches (see the module
    docstring). ``lengths`` must be non-zero: positive for multimodal samples, negative for text-only ones."""
    lengths = [int(v) for v in lengths]
    if any(v == 0 for v in lengths):
        raise ValueError("modality lengths must be non-zero (positive: with images, negative: text only)")
    if all(v > 0 for v in lengths) or all(v < 0 for v in lengths):
        return get_length_grouped_indices(lengths, batch_size, world_size, generator)
    mm = [i for i, v in enumerate(lengths) if v > 0]
    lang = [i for i, v in enumerate(lengths) if v < 0]
    size = batch_size * world_size
    mm_order = [mm[k] for k in get_length_grouped_indices([lengths[i] for i in mm], batch_size, world_size, generator)]
    lang_order = [lang[k] for k in
                  get_length_grouped_indices([-lengths[i] for i in lang], batch_size, world_size, generator)]
    mm_mega, lang_mega = _megabatches(mm_order, size), _megabatches(lang_order, size)
    leftover = []
    for mega in (mm_mega, lang_mega):
        if len(mega[-1]) < size:
            leftover += mega.pop()
    full = mm_mega + lang_mega
    shuffled = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
    return [i for mega in shuffled for i in mega] + leftover


class LengthGroupedSampler(Sampler[int]):
    """Yields dataset indices grouped by length (LLaVA's ``group_by_length`` / ``group_by_modality_length``).

    Args:
        lengths: each sample's length (with ``group_by_modality``: its modality length, negative for text-only).
        batch_size: per-device batch size.
        world_size: number of data-parallel processes (a megabatch is ``batch_size * world_size`` samples; the
            sampler yields the global order, to be sharded by consecutive batches as the Trainer / accelerate do).
        generator: a `torch.Generator` (seeded: deterministic); None uses torch's global RNG.
        group_by_modality: keep batches modality-pure.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1,
                 generator: torch.Generator | None = None, group_by_modality: bool = False):
        if lengths is None:
            raise ValueError("lengths must be provided")
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
        self.lengths = list(lengths)
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.generator = generator
        self.group_by_modality = bool(group_by_modality)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        if self.group_by_modality:
            indices = get_modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size,
                                                          self.generator)
        else:
            indices = get_length_grouped_indices(self.lengths, self.batch_size, self.world_size, self.generator)
        return iter(indices)
