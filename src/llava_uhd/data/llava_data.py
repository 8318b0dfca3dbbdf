"""LLaVA-format training data for LLaVA-UHD: `LazySupervisedDataset` and `DataCollatorForLlavaUHD`.

Inputs: LLaVA JSON / JSONL files, lists of records, `datasets` tables or ``save_to_disk`` folders, read and checked
by `llava_uhd.data.records` (the formats, what makes a record malformed, `DataError`). Every record is checked when
the dataset is built (``validate=True``) and again when read; a malformed one is a `DataError` naming the data file,
the record's index and id and the problem, or, with ``skip_bad_records=True``, a skipped record (counted in
``stats["skipped_bad_record"]``, listed in ``dataset.skipped``, logged).

Each ``<image>`` is expanded into the exact LLaVA-UHD layout by the `LlavaUHDProcessor` (`image_layouts`: slices
row-major with the tokenizer's "," / "\\n" separators, then the overview); labels are ``-100`` over all of it.

Length rule (``max_length``): a sample longer than ``max_length`` tokens is cut at ``max_length``; if that point falls
inside an image's token block (its slices, separators and overview), the cut moves back to the start of that block,
so the sample ends with the last complete image block or text before it and the cut image is dropped along with its
pixels (no partial image block, ever; the packed image fields keep only the images whose blocks survive). The
truncated sample is kept if at least one trained label survives (at a position > 0: the label at position 0 is
never predicted); otherwise it is skipped. Counted in ``stats["truncated"]`` / ``stats["skipped_too_long"]``.

Bad images: a missing file raises `MissingFileError` (a `FileNotFoundError`), an unreadable / truncated / non-image
file a `DataError` (a `ValueError`), both naming the file, the record index and the id. With
``skip_bad_images=True`` the sample is skipped instead, counted in ``stats["skipped_bad_image"]``, listed in
``dataset.skipped`` and logged (a warning naming the file). Never a silent substitution: a skipped sample is never
replaced by another one.

Skipping before training (`prepare`, what ``llava-uhd train`` does): every skip is decided once, up front, in the
calling process, and the skipped records leave the dataset's index, so no batch can lose a sample. `prepare` drops
malformed records (``skip_bad_records``), decodes every image once with ``skip_bad_images`` (`scan_images`) or else
reads each image's header (a missing or unreadable one is an error now, not in the middle of training), tokenizes
every record and expands its images from their header sizes to find its exact length: records with no answer
token before the cut are dropped, the ones that will be cut are counted as truncated. The counts are then exact
whatever reads the samples later (``DataLoader`` worker processes keep their own copy of the counters, which the
main process never sees). Costs one tokenization of the data (about 0.5 ms a record on one CPU core) and one
header read per image, or one decode per image with ``skip_bad_images``.

Skipping while reading (a dataset used without `prepare`, or an image that goes bad after it): ``__getitem__``
returns ``None`` for a skipped sample (too long or, with ``skip_bad_images``, a bad image) and
`DataCollatorForLlavaUHD` drops ``None`` samples, counting them in ``collator.skipped``; the batch is just smaller.
A batch whose samples were all skipped raises a `DataError` (an empty batch cannot be trained on).
``dataset.summary()`` / ``collator.summary()`` report the counts.

``lengths`` / ``modality_lengths`` (for `llava_uhd.data.sampler.LengthGroupedSampler`): after `prepare`, the exact
token count of each sample (after its cut). Before, cheap estimates, computed once and cached: the number of
whitespace-separated words of the text that is tokenized (for ``plain`` only the caption) plus, for each image, its
exact LLaVA-UHD token count from the slicing plan of its size; an image whose header cannot be read counts as one
crop (bad images are reported when the sample is read, not here). Image sizes come from the header
(``PIL.Image.open(...).size``, nothing decoded). EXIF rotation is ignored: the plan of an ``H x W`` image is the
transpose of that of ``W x H``, same token count. ``modality_lengths`` follows LLaVA: positive for samples with
images, negative for text-only ones (never 0).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch.utils.data import Dataset

from .records import DataError, MissingFileError, Record, load_records, parse_record, record_name
from .templates import IGNORE_INDEX, TEMPLATES, tokenize_conversation

__all__ = ["LazySupervisedDataset", "DataCollatorForLlavaUHD", "DataError", "MissingFileError", "Record",
           "load_records", "parse_record", "IMAGE_FIELDS"]

logger = logging.getLogger(__name__)

IMAGE_FIELDS = ("pixel_values", "patch_grid_hw", "crop_image_ids", "crop_is_overview", "image_layout", "image_sizes")

SKIP_KINDS = ("too_long", "bad_image", "bad_record")


# ------------------------------------------------------------------------------------------------ dataset
class LazySupervisedDataset(Dataset):
    """LLaVA-format supervised data for LLaVA-UHD, read lazily (images decoded when a sample is read).

    Args:
        records_or_path: records, a `datasets.Dataset`, a ``.json`` / ``.jsonl`` file or a ``save_to_disk``
            directory (see `llava_uhd.data.records`).
        processor: the `LlavaUHDProcessor` (tokenizer, image processor, token layout).
        template: ``"plain"`` (stage 1), ``"vicuna_v1"`` (stage 2) or ``"chat_template"`` (the tokenizer's own);
            see `llava_uhd.data.templates`.
        image_folder: the folder relative image paths are resolved against.
        max_length: the longest sample in tokens (None: no limit); see the module docstring for the cut rule.
        skip_bad_images: skip (count, report) samples whose images are missing or unreadable instead of raising.
        skip_bad_records: skip (count, report) malformed records (see `llava_uhd.data.records`) instead of raising.
        max_slices: slice cap for the image processor (None: the processor's).
        validate: check every record's structure when the dataset is built.

    ``dataset[i]`` is None (skipped: see the module docstring) or a dict with ``input_ids`` and ``labels``
    (LongTensor ``(T,)``) and, when the sample has images, the image processor's packed fields for them
    (``pixel_values (P, 3p^2)``, ``patch_grid_hw (K, 2)``, ``crop_image_ids (K,)`` numbering the sample's own
    images from 0, ``crop_is_overview (K,)``, ``image_layout (B_i, 2)``, ``image_sizes (B_i, 2)``).
    """

    def __init__(
        self,
        records_or_path,
        processor,
        template: str = "vicuna_v1",
        image_folder: str | os.PathLike | None = None,
        max_length: int | None = 2048,
        skip_bad_images: bool = False,
        max_slices: int | None = None,
        validate: bool = True,
        skip_bad_records: bool = False,
    ):
        super().__init__()
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}: expected one of {TEMPLATES}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.records = load_records(records_or_path)
        # the data file, named in every message about one of its records
        self.source = os.fspath(records_or_path) if isinstance(records_or_path, (str, os.PathLike)) else None
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.image_folder = image_folder
        self.max_length = max_length
        self.skip_bad_images = bool(skip_bad_images)
        self.skip_bad_records = bool(skip_bad_records)
        self.max_slices = max_slices
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self._indices = list(range(len(self.records)))  # dataset position -> record index
        self._lengths: list[int] | None = None
        self._modality_lengths: list[int] | None = None
        self._truncated: set[int] = set()
        self._skipped: dict[int, tuple[str, str]] = {}  # record index -> (kind, reason)
        if validate:
            bad = set()
            for i in self._indices:
                try:
                    self.record(i)
                except DataError as e:
                    if not self.skip_bad_records:
                        raise
                    self._skip(i, "bad_record", e.problem)
                    bad.add(i)
            self._drop(bad)

    # ------------------------------------------------------------------------------------ records
    def __len__(self) -> int:
        return len(self._indices)

    def record(self, index: int) -> Record:
        """The parsed record at record index ``index`` (raises a `DataError` naming it if malformed)."""
        return parse_record(self.records[index], index, self.image_token, self.image_folder, self.source)

    def _drop(self, indices: set[int]) -> None:
        """Take records out of the dataset (they were skipped); the lengths are measured again when asked."""
        if indices:
            self._indices = [i for i in self._indices if i not in indices]
            self._lengths = self._modality_lengths = None

    # ------------------------------------------------------------------------------------ reporting
    @property
    def stats(self) -> dict[str, int]:
        """Records truncated / skipped so far (each record counted once, however often it is read)."""
        kinds = [kind for kind, _ in self._skipped.values()]
        return {"truncated": len(self._truncated), **{f"skipped_{kind}": kinds.count(kind) for kind in SKIP_KINDS}}

    @property
    def skipped(self) -> list[dict]:
        """Every skipped record: ``{"index", "id", "kind" ("too_long" | "bad_image" | "bad_record"), "reason"}``."""
        out = []
        for index, (kind, reason) in sorted(self._skipped.items()):
            raw = self.records[index]
            out.append({"index": index, "id": raw.get("id") if isinstance(raw, dict) else None, "kind": kind,
                        "reason": reason})
        return out

    def summary(self) -> str:
        s = self.stats
        lines = [f"{type(self).__name__}: {len(self)} samples; truncated {s['truncated']}, skipped (too long) "
                 f"{s['skipped_too_long']}, skipped (bad image) {s['skipped_bad_image']}, skipped (bad record) "
                 f"{s['skipped_bad_record']}"]
        lines += [f"  skipped record {d['index']} (id {d['id']!r}, {d['kind']}): {d['reason']}" for d in self.skipped]
        return "\n".join(lines)

    def _skip(self, index: int, kind: str, reason: str) -> None:
        if index not in self._skipped:
            raw = self.records[index]
            name = record_name(index, raw.get("id") if isinstance(raw, dict) else None, self.source)
            logger.warning("skipping %s: %s", name, reason)
        self._skipped[index] = (kind, reason)

    # ------------------------------------------------------------------------------------ images
    def _load_images(self, record: Record):
        for j, image in enumerate(record.images):
            if not isinstance(image, Image.Image) and not os.path.exists(image):
                raise record.error(f"image {j} not found: '{image}'", MissingFileError)
        try:
            return self.processor.image_processor(record.images, max_slices=self.max_slices, return_tensors="pt")
        except ValueError as e:  # the image processor names the image ("image j ('path'): reason")
            raise record.error(str(e)) from e

    def scan_images(self, num_threads: int = 8) -> list[dict]:
        """Decode every image once (in threads) before training.

        With ``skip_bad_images``, records with a missing or unreadable image are removed from the dataset (counted
        in ``stats["skipped_bad_image"]``, listed in ``skipped``); without it a `DataError` lists them all. Returns
        the bad records found (``{"index", "id", "kind", "reason"}``). Call it before building the sampler (it
        changes ``len(self)`` and the lengths)."""
        from ..image_io import describe_image, load_rgb

        def check(i: int):
            record = self.record(i)
            for j, image in enumerate(record.images):
                if not isinstance(image, Image.Image) and not os.path.exists(image):
                    return record, f"image {j} not found: '{image}'"
                try:
                    load_rgb(image, self.processor.image_processor.max_pixels)
                except ValueError as e:
                    return record, f"image {j} ({describe_image(image)}): {e}"
            return None

        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            results = [r for r in pool.map(check, self._indices) if r is not None]
        if results and not self.skip_bad_images:
            listing = "\n".join(f"  {rec.name}: {reason}" for rec, reason in results[:50])
            more = f"\n  ... and {len(results) - 50} more" if len(results) > 50 else ""
            raise DataError(f"{len(results)} record(s) with bad images (pass skip_bad_images=True to skip them):\n"
                            f"{listing}{more}")
        for rec, reason in results:
            self._skip(rec.index, "bad_image", reason)
        bad = {rec.index for rec, _ in results}
        self._drop(bad)
        return [d for d in self.skipped if d["index"] in bad]

    def _image_size(self, image) -> tuple[int, int]:
        """``(width, height)``, from the header when Pillow reads it (nothing decoded), else from `load_rgb`, whose
        `ValueError` says what is wrong with the file in the words every command uses."""
        if isinstance(image, Image.Image):
            return image.size
        try:
            with Image.open(image) as im:
                return im.size
        except Exception:  # unreadable, or over Pillow's own size guard (max_pixels decides, in load_rgb)
            from ..image_io import load_rgb, rgb_size

            return rgb_size(load_rgb(image, self.processor.image_processor.max_pixels))

    def _image_tokens(self, image) -> int:
        try:
            width, height = self._image_size(image)
        except Exception:  # reported when the sample is read; here only an estimate is needed
            width, height = self.processor.image_processor.size["width"], self.processor.image_processor.size["height"]
        return self.processor.num_image_tokens(width, height, self.max_slices)

    # ------------------------------------------------------------------------------------ up front
    def prepare(self, num_threads: int = 8) -> list[dict]:
        """Decide every skip now, before training (see the module docstring): bad images (decoded with
        ``skip_bad_images``, else their headers read), records the template cannot render, too-long records;
        truncations are counted and ``lengths`` become exact. Raises the first `DataError` found unless the matching
        skip flag is set. Returns every skipped record (``skipped``)."""
        t0 = time.perf_counter()
        if self.skip_bad_images:
            self.scan_images(num_threads)
        records = [self.record(i) for i in self._indices]
        images = [(record, j, image) for record in records for j, image in enumerate(record.images)]
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            sizes = iter(list(pool.map(lambda item: self._checked_size(*item), images)))
        lengths, modality, bad = [], [], set()
        for record in records:
            tokens = [next(sizes) for _ in record.images]
            try:
                ids, labels = self._tokenize(record)
            except DataError as e:  # the template cannot render it: a malformed record
                if not self.skip_bad_records:
                    raise
                self._skip(record.index, "bad_record", e.problem)
                bad.add(record.index)
                continue
            problem = next((t for t in tokens if isinstance(t, DataError)), None)
            if problem is not None:
                if not self.skip_bad_images:
                    raise problem
                self._skip(record.index, "bad_image", problem.problem)
                bad.add(record.index)
                continue
            length, blocks, first_trained = _expanded(ids, labels, self.image_token_id, tokens)
            kept = length
            if self.max_length is not None and length > self.max_length:
                kept = _cut_point(blocks, self.max_length)
                if first_trained is None or first_trained >= kept:  # as __getitem__ decides it, from the ids
                    self._skip(record.index, "too_long", _too_long(length, self.max_length))
                    bad.add(record.index)
                    continue
                self._truncated.add(record.index)
            with_images = any(end <= kept for _, end in blocks)
            lengths.append(kept)
            modality.append(kept if with_images else -kept)
        self._indices = [i for i in self._indices if i not in bad]
        self._lengths, self._modality_lengths = lengths, modality
        logger.info("checked %d records in %.1f s: %s", len(records), time.perf_counter() - t0, self.stats)
        return self.skipped

    def _checked_size(self, record: Record, j: int, image) -> int | DataError:
        """The token count of ``record``'s image ``j`` from its header, or the `DataError` saying why not."""
        from ..image_io import describe_image

        if not isinstance(image, Image.Image) and not os.path.exists(image):
            return record.error(f"image {j} not found: '{image}'", MissingFileError)
        try:
            width, height = self._image_size(image)
        except ValueError as e:
            return record.error(f"image {j} ({describe_image(image)}): {e}")
        max_pixels = self.processor.image_processor.max_pixels
        if max_pixels is not None and width * height > max_pixels:
            return record.error(f"image {j} ({describe_image(image)}): {width}x{height} = {width * height} pixels "
                                f"exceeds max_pixels={max_pixels}")
        return self.processor.num_image_tokens(width, height, self.max_slices)

    # ------------------------------------------------------------------------------------ lengths
    def _compute_lengths(self) -> None:
        records = [self.record(i) for i in self._indices]
        images = [im for r in records for im in r.images]
        with ThreadPoolExecutor(8) as pool:
            costs = iter(list(pool.map(self._image_tokens, images)))
        lengths, modality = [], []
        for r in records:
            turns = [t for t in r.turns if t["role"] == "assistant"] if self.template == "plain" else r.turns
            words = sum(len(t["content"].replace(self.image_token, " ").split()) for t in turns)
            tokens = words + sum(next(costs) for _ in r.images)
            lengths.append(max(1, tokens))
            modality.append(max(1, tokens) if r.images else -max(1, words))
        self._lengths, self._modality_lengths = lengths, modality

    @property
    def lengths(self) -> list[int]:
        """Length of each sample: exact after `prepare`, else an estimate (see the module docstring)."""
        if self._lengths is None:
            self._compute_lengths()
        return self._lengths

    @property
    def modality_lengths(self) -> list[int]:
        """`lengths`, negated for text-only samples (LLaVA's convention)."""
        if self._modality_lengths is None:
            self._compute_lengths()
        return self._modality_lengths

    # ------------------------------------------------------------------------------------ samples
    def _tokenize(self, record: Record) -> tuple[list[int], list[int]]:
        """Token ids and labels of ``record``'s conversation, one image token per image."""
        try:
            ids, labels = tokenize_conversation(record.turns, self.tokenizer, self.template, self.image_token)
        except ValueError as e:
            raise record.error(str(e)) from e
        n_placeholders = ids.count(self.image_token_id)
        if n_placeholders != len(record.images):
            raise record.error(f"the {self.template} template gave {n_placeholders} image token(s) for "
                               f"{len(record.images)} image(s)")
        return ids, labels

    def __getitem__(self, i: int) -> dict[str, torch.Tensor] | None:
        record = self.record(self._indices[i])
        ids, labels = self._tokenize(record)
        image_inputs = None
        blocks: list[tuple[int, int]] = []
        if record.images:
            try:
                image_inputs = self._load_images(record)
            except DataError as e:
                if not self.skip_bad_images:
                    raise
                self._skip(record.index, "bad_image", e.problem)
                return None
            ids, labels, blocks = self._expand(ids, labels, self.processor.image_layouts(image_inputs))
        if self.max_length is not None and len(ids) > self.max_length:
            cut = _cut_point(blocks, self.max_length)
            if not any(label != IGNORE_INDEX for label in labels[1:cut]):
                self._skip(record.index, "too_long", _too_long(len(ids), self.max_length))
                return None
            n_kept = sum(1 for _, end in blocks if end <= cut)
            full_length = len(ids)
            ids, labels = ids[:cut], labels[:cut]
            if image_inputs is not None:
                image_inputs = _keep_images(image_inputs, n_kept)
            if record.index not in self._truncated:
                logger.info("truncated %s from %d to %d tokens (%d of %d images kept)", record.name, full_length,
                            cut, n_kept, len(blocks))
            self._truncated.add(record.index)
        sample = {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                  "sample_id": str(record.id) if record.id is not None else str(record.index)}
        if image_inputs is not None:
            sample.update({k: image_inputs[k] for k in IMAGE_FIELDS})
        return sample

    def _expand(self, ids: list[int], labels: list[int], layouts: list[list[int]]):
        """Replace each image token with its image's layout; returns the new ids, labels and the blocks' spans."""
        out_ids, out_labels, blocks = [], [], []
        k = 0
        for token, label in zip(ids, labels):
            if token == self.image_token_id:
                start = len(out_ids)
                out_ids += layouts[k]
                out_labels += [IGNORE_INDEX] * len(layouts[k])
                blocks.append((start, len(out_ids)))
                k += 1
            else:
                out_ids.append(token)
                out_labels.append(label)
        return out_ids, out_labels, blocks


def _keep_images(image_inputs, n_keep: int) -> dict | None:
    """The packed image fields restricted to the first ``n_keep`` images (None if none is kept)."""
    if n_keep == 0:
        return None
    owners = image_inputs["crop_image_ids"]
    keep = owners < n_keep  # crops are ordered by image, so the kept crops are a prefix
    grids = image_inputs["patch_grid_hw"]
    n_patches = int((grids[keep, 0] * grids[keep, 1]).sum())
    return {
        "pixel_values": image_inputs["pixel_values"][:n_patches],
        "patch_grid_hw": grids[keep],
        "crop_image_ids": owners[keep],
        "crop_is_overview": image_inputs["crop_is_overview"][keep],
        "image_layout": image_inputs["image_layout"][:n_keep],
        "image_sizes": image_inputs["image_sizes"][:n_keep],
    }


def _cut_point(blocks: list[tuple[int, int]], max_length: int) -> int:
    """Where a sample longer than ``max_length`` is cut: at ``max_length``, or at the start of the image block
    (``[start, end)`` token span) it would split."""
    for start, end in blocks:
        if start < max_length < end:
            return start  # never keep part of an image block
    return max_length


def _too_long(length: int, max_length: int) -> str:
    return (f"{length} tokens > max_length={max_length} and no answer token survives a cut outside the image "
            "blocks")


def _expanded(ids: list[int], labels: list[int], image_token_id: int, image_tokens: list[int]):
    """What expanding each image token into ``image_tokens[k]`` tokens gives, without building it: the length, the
    image blocks' spans and the position of the first trained label after position 0 (None if there is none)."""
    length, blocks, first, k = 0, [], None, 0
    for token, label in zip(ids, labels):
        if token == image_token_id:
            blocks.append((length, length + image_tokens[k]))
            length += image_tokens[k]
            k += 1
            continue
        if first is None and label != IGNORE_INDEX and length >= 1:
            first = length
        length += 1
    return length, blocks, first


# ------------------------------------------------------------------------------------------------ collator
class DataCollatorForLlavaUHD:
    """Batch `LazySupervisedDataset` samples.

    Pads ``input_ids`` (with the tokenizer's pad id), ``labels`` (``-100``) and builds ``attention_mask`` on
    ``padding_side``; concatenates the packed image fields of the batch in reading order (sample 0's images first,
    the order in which the model scatters image features into the image tokens), offsetting ``crop_image_ids`` so
    they index the batch's images. ``None`` samples (skipped by the dataset) are dropped and counted in
    ``skipped``; a batch with no sample left raises a `DataError`. A batch without images has no image fields.
    """

    def __init__(self, processor, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.processor = processor
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        pad_id = processor.tokenizer.pad_token_id
        self.pad_token_id = pad_id if pad_id is not None else 0
        self.skipped = 0
        self.batches = 0

    def summary(self) -> str:
        return f"{type(self).__name__}: {self.batches} batches, {self.skipped} skipped samples dropped"

    def __call__(self, instances: Sequence[dict | None]) -> dict[str, torch.Tensor]:
        kept = [x for x in instances if x is not None]
        self.skipped += len(instances) - len(kept)
        if not kept:
            raise DataError(f"all {len(instances)} samples of this batch were skipped (too long or bad images); "
                            "call dataset.prepare() before training: it takes them out of the dataset up front")
        self.batches += 1
        length = max(len(x["input_ids"]) for x in kept)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(kept), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(kept), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(kept), length), dtype=torch.long)
        for row, x in enumerate(kept):
            n = len(x["input_ids"])
            cols = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[row, cols] = torch.as_tensor(x["input_ids"])
            labels[row, cols] = torch.as_tensor(x["labels"])
            attention_mask[row, cols] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if all("sample_id" in x for x in kept):
            # not a model input: LlavaUHDTrainer pops it (and can trace the data order with it)
            batch["sample_ids"] = [x["sample_id"] for x in kept]
        with_images = [x for x in kept if x.get("pixel_values") is not None]
        if with_images:
            parts = {k: [] for k in IMAGE_FIELDS}
            offset = 0
            for x in with_images:
                for k in IMAGE_FIELDS:
                    v = torch.as_tensor(x[k])
                    parts[k].append(v + offset if k == "crop_image_ids" else v)
                offset += len(x["image_layout"])
            batch.update({k: torch.cat(v) for k, v in parts.items()})
        return batch
