"""LLaVA-format training data for LLaVA-UHD: `LazySupervisedDataset` and `DataCollatorForLlavaUHD`.

Inputs (``records_or_path``), the formats LLaVA users already have:

- a ``.json`` file holding a list of records (LCS-558K pretraining captions, the 665K instruction mixture), a
  ``.jsonl`` file with one record per line, a list of record dicts, a `datasets.Dataset` with the same columns, or
  a directory written by ``Dataset.save_to_disk`` (loaded with ``datasets.load_from_disk``; a ``DatasetDict`` must
  hold a single split).
- a record is ``{"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"] (optional), "conversations": [{"from": "human" |
  "gpt" | "system", "value": str}, ...]}`` (``"user"`` / ``"assistant"`` and ``"role"`` / ``"content"`` keys are
  accepted too). Each image has one ``<image>`` placeholder (the processor's ``image_token``) in a human turn, in
  reading order; text-only records have no ``"image"`` (or ``None`` / ``[]``). Relative image paths are resolved
  against ``image_folder`` (the current directory when None); PIL images in the column are used as they are.

Malformed records (unknown role, empty conversation, turns not alternating human/gpt, ``<image>`` count different
from the number of images, ``<image>`` in an answer, ...) raise a `ValueError` naming the record's index and id; they
are checked when the dataset is built (``validate=True``) and again when read.

Each ``<image>`` is expanded into the exact LLaVA-UHD layout by the `LlavaUHDProcessor` (`image_layouts`: slices
row-major with the tokenizer's "," / "\\n" separators, then the overview); labels are ``-100`` over all of it.

Length rule (``max_length``): a sample longer than ``max_length`` tokens is cut at ``max_length``; if that point falls
inside an image's token block (its slices, separators and overview), the cut moves back to the start of that block,
so the sample ends with the last complete image block or text before it and the cut image is dropped along with its
pixels (no partial image block, ever; the packed image fields keep only the images whose blocks survive). The
truncated sample is kept if at least one trained label survives (at a position > 0: the label at position 0 is
never predicted); otherwise it is skipped. Counted in ``stats["truncated"]`` / ``stats["skipped_too_long"]``.

Bad images: a missing file raises `FileNotFoundError`, an unreadable / truncated / non-image file a `ValueError`,
both naming the file, the record index and the id. With ``skip_bad_images=True`` the sample is skipped instead,
counted in ``stats["skipped_bad_image"]``, listed in ``dataset.skipped`` and logged (a warning naming the file).
Never a silent substitution: a skipped sample is never replaced by another one.

How skipping works in a map-style dataset: ``__getitem__`` returns ``None`` for a skipped sample (too long or, with
``skip_bad_images``, a bad image) and `DataCollatorForLlavaUHD` drops ``None`` samples, counting them in
``collator.skipped``; the batch is just smaller. A batch whose samples were all skipped raises a `ValueError` (an
empty batch cannot be trained on). To avoid that, or to learn of every bad file before training, call
``dataset.scan_images()`` first: it decodes every image once and removes the bad records from the dataset
(counted the same way), or raises listing them without ``skip_bad_images``. Counters are per process: with
``DataLoader(num_workers > 0)`` the dataset and the collator run in worker processes, so their counters stay there;
the per-sample warnings still reach the log, and ``scan_images()`` (run in the main process) gives exact counts.
``dataset.summary()`` / ``collator.summary()`` report the counts.

``lengths`` / ``modality_lengths`` (for `llava_uhd.data.sampler.LengthGroupedSampler`) are cheap estimates, computed
once and cached: the number of whitespace-separated words of the text that is tokenized (for ``plain`` only the
caption) plus, for each image, its exact LLaVA-UHD token count from the slicing plan of its size. The size comes from
the image header (``PIL.Image.open(...).size``, nothing decoded); an image whose header cannot be read counts as one
crop (bad images are reported when the sample is read, not here). EXIF rotation is ignored: the plan of an
``H x W`` image is the transpose of that of ``W x H``, same token count. ``modality_lengths`` follows LLaVA: positive
for samples with images, negative for text-only ones (never 0).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from .templates import IGNORE_INDEX, TEMPLATES, tokenize_conversation

__all__ = ["LazySupervisedDataset", "DataCollatorForLlavaUHD", "Record", "load_records", "parse_record",
           "IMAGE_FIELDS"]

logger = logging.getLogger(__name__)

IMAGE_FIELDS = ("pixel_values", "patch_grid_hw", "crop_image_ids", "crop_is_overview", "image_layout", "image_sizes")

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# ------------------------------------------------------------------------------------------------ records
@dataclass
class Record:
    """One parsed, checked record."""

    index: int
    id: Any
    images: list = field(default_factory=list)  # resolved paths (str) or PIL images
    turns: list[dict] = field(default_factory=list)  # {"role": "system" | "user" | "assistant", "content": str}

    @property
    def name(self) -> str:
        return f"record {self.index}" + (f" (id {self.id!r})" if self.id is not None else "")


def _name(index: int, raw: Any) -> str:
    rid = raw.get("id") if isinstance(raw, dict) else None
    return f"record {index}" + (f" (id {rid!r})" if rid is not None else "")


def parse_record(raw: Any, index: int, image_token: str = "<image>", image_folder: str | os.PathLike | None = None
                 ) -> Record:
    """Check one LLaVA record and normalize it; a `ValueError` naming the record says what is wrong."""
    where = _name(index, raw)

    def bad(what: str) -> ValueError:
        return ValueError(f"{where}: {what}")

    if not isinstance(raw, dict):
        raise bad(f"expected a dict, got {type(raw).__name__}")
    conversations = raw.get("conversations")
    if conversations is None:
        raise bad("no 'conversations'")
    if not isinstance(conversations, (list, tuple)):
        raise bad(f"'conversations' must be a list, got {type(conversations).__name__}")
    if len(conversations) == 0:
        raise bad("empty conversations")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise bad(f"turn {k} is not a dict")
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if role not in _ROLES:
            raise bad(f"turn {k} has unknown role {role!r} (expected 'human', 'gpt' or 'system')")
        if not isinstance(value, str):
            raise bad(f"turn {k} has no text value (got {type(value).__name__})")
        role = _ROLES[role]
        if role == "system" and k != 0:
            raise bad(f"turn {k}: a system turn may only come first")
        if role == "assistant" and image_token in value:
            raise bad(f"turn {k}: {image_token} in a gpt answer")
        turns.append({"role": role, "content": value})
    roles = [t["role"] for t in turns]
    start = 1 if roles[0] == "system" else 0
    if len(roles) == start:
        raise bad("no human or gpt turn")
    for k in range(start, len(roles)):
        expected = "user" if (k - start) % 2 == 0 else "assistant"
        if roles[k] != expected:
            raise bad(f"turn {k} is from {'human' if roles[k] == 'user' else 'gpt'} but "
                      f"{'human' if expected == 'user' else 'gpt'} was expected (turns alternate, human first)")
    if "assistant" not in roles:
        raise bad("no gpt turn: nothing to train on")

    image = raw.get("image")
    if image is None:
        images = []
    elif isinstance(image, (str, os.PathLike, Image.Image)):
        images = [image]
    elif isinstance(image, (list, tuple)):
        images = list(image)
    else:
        raise bad(f"'image' must be a path or a list of paths, got {type(image).__name__}")
    resolved = []
    for j, im in enumerate(images):
        if isinstance(im, Image.Image):
            resolved.append(im)
            continue
        if not isinstance(im, (str, os.PathLike)) or not os.fspath(im):
            raise bad(f"image {j} is not a path: {im!r}")
        path = os.fspath(im)
        if image_folder is not None and not os.path.isabs(path):
            path = os.path.join(os.fspath(image_folder), path)
        resolved.append(path)
    n_placeholders = sum(t["content"].count(image_token) for t in turns)
    if n_placeholders != len(resolved):
        raise bad(f"{n_placeholders} {image_token} placeholder(s) in the text but {len(resolved)} image(s)")
    return Record(index=index, id=raw.get("id"), images=resolved, turns=turns)


def load_records(records_or_path) -> Sequence:
    """A sequence of raw records from a list, a `datasets.Dataset`, a ``.json`` / ``.jsonl`` file or a
    ``save_to_disk`` directory."""
    if isinstance(records_or_path, (str, os.PathLike)):
        path = Path(records_or_path)
        if path.is_dir():
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if len(loaded) != 1:
                    raise ValueError(f"{path} holds a DatasetDict with splits {sorted(loaded)}: pass one split "
                                     "(e.g. load_from_disk(path)['train'])")
                loaded = next(iter(loaded.values()))
            return loaded
        if not path.is_file():
            raise FileNotFoundError(f"no such data file or directory: '{path}'")
        if path.suffix == ".jsonl":
            records = []
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path}, line {line_no}: not valid JSON ({e})") from e
            return records
        if path.suffix == ".json":
            with open(path, encoding="utf-8") as f:
                try:
                    records = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: not valid JSON ({e})") from e
            if not isinstance(records, list):
                raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
            return records
        raise ValueError(f"{path}: expected a .json or .jsonl file or a directory saved with datasets.save_to_disk")
    if isinstance(records_or_path, (list, tuple)):
        return list(records_or_path)
    if hasattr(records_or_path, "__getitem__") and hasattr(records_or_path, "__len__"):  # datasets.Dataset & co.
        return records_or_path
    raise TypeError(f"expected records, a path or a datasets.Dataset, got {type(records_or_path).__name__}")


# ------------------------------------------------------------------------------------------------ dataset
class LazySupervisedDataset(Dataset):
    """LLaVA-format supervised data for LLaVA-UHD, read lazily (images decoded when a sample is read).

    Args:
        records_or_path: records, a `datasets.Dataset`, a ``.json`` / ``.jsonl`` file or a ``save_to_disk``
            directory (see the module docstring).
        processor: the `LlavaUHDProcessor` (tokenizer, image processor, token layout).
        template: ``"plain"`` (stage 1), ``"vicuna_v1"`` (stage 2) or ``"chat_template"`` (the tokenizer's own);
            see `llava_uhd.data.templates`.
        image_folder: the folder relative image paths are resolved against.
        max_length: the longest sample in tokens (None: no limit); see the module docstring for the cut rule.
        skip_bad_images: skip (count, report) samples whose images are missing or unreadable instead of raising.
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
    ):
        super().__init__()
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}: expected one of {TEMPLATES}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.records = load_records(records_or_path)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.image_folder = image_folder
        self.max_length = max_length
        self.skip_bad_images = bool(skip_bad_images)
        self.max_slices = max_slices
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self._indices = list(range(len(self.records)))  # dataset position -> record index
        self._lengths: list[int] | None = None
        self._modality_lengths: list[int] | None = None
        self._truncated: set[int] = set()
        self._skipped: dict[int, tuple[str, str]] = {}  # record index -> (kind, reason)
        if validate:
            for i in self._indices:
                self.record(i)

    # ------------------------------------------------------------------------------------ records
    def __len__(self) -> int:
        return len(self._indices)

    def record(self, index: int) -> Record:
        """The parsed record at record index ``index`` (raises a `ValueError` naming it if malformed)."""
        return parse_record(self.records[index], index, self.image_token, self.image_folder)

    # ------------------------------------------------------------------------------------ reporting
    @property
    def stats(self) -> dict[str, int]:
        """Records truncated / skipped so far (each record counted once, however often it is read)."""
        kinds = [kind for kind, _ in self._skipped.values()]
        return {"truncated": len(self._truncated), "skipped_too_long": kinds.count("too_long"),
                "skipped_bad_image": kinds.count("bad_image")}

    @property
    def skipped(self) -> list[dict]:
        """Every skipped record: ``{"index", "id", "kind" ("too_long" | "bad_image"), "reason"}``."""
        out = []
        for index, (kind, reason) in sorted(self._skipped.items()):
            raw = self.records[index]
            out.append({"index": index, "id": raw.get("id") if isinstance(raw, dict) else None, "kind": kind,
                        "reason": reason})
        return out

    def summary(self) -> str:
        s = self.stats
        lines = [f"{type(self).__name__}: {len(self)} samples; truncated {s['truncated']}, skipped (too long) "
                 f"{s['skipped_too_long']}, skipped (bad image) {s['skipped_bad_image']}"]
        lines += [f"  skipped record {d['index']} (id {d['id']!r}, {d['kind']}): {d['reason']}" for d in self.skipped]
        return "\n".join(lines)

    def _skip(self, record: Record, kind: str, reason: str) -> None:
        if record.index not in self._skipped:
            logger.warning("skipping %s: %s", record.name, reason)
        self._skipped[record.index] = (kind, reason)

    # ------------------------------------------------------------------------------------ images
    def _check_file(self, record: Record, j: int, image) -> None:
        if not isinstance(image, Image.Image) and not os.path.isfile(image):
            raise FileNotFoundError(f"{record.name}: image {j} not found: '{image}'")

    def _load_images(self, record: Record):
        for j, image in enumerate(record.images):
            self._check_file(record, j, image)
        try:
            return self.processor.image_processor(record.images, max_slices=self.max_slices, return_tensors="pt")
        except ValueError as e:  # the image processor names the image ("image j ('path'): reason")
            raise ValueError(f"{record.name}: {e}") from e

    def scan_images(self, num_threads: int = 8) -> list[dict]:
        """Decode every image once (in threads) before training.

        With ``skip_bad_images``, records with a missing or unreadable image are removed from the dataset (counted
        in ``stats["skipped_bad_image"]``, listed in ``skipped``); without it a `ValueError` lists them all. Returns
        the bad records found (``{"index", "id", "kind", "reason"}``). Call it before building the sampler (it
        changes ``len(self)`` and the lengths)."""
        from ..image_io import describe_image, load_rgb

        def check(i: int):
            record = self.record(i)
            for j, image in enumerate(record.images):
                if not isinstance(image, Image.Image) and not os.path.isfile(image):
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
            raise ValueError(f"{len(results)} record(s) with bad images (pass skip_bad_images=True to skip them):\n"
                             f"{listing}{more}")
        bad = set()
        for rec, reason in results:
            self._skip(rec, "bad_image", reason)
            bad.add(rec.index)
        if bad:
            self._indices = [i for i in self._indices if i not in bad]
            self._lengths = self._modality_lengths = None
        return [d for d in self.skipped if d["index"] in bad]

    # ------------------------------------------------------------------------------------ lengths
    def _image_tokens(self, image) -> int:
        try:
            if isinstance(image, Image.Image):
                width, height = image.size
            else:
                with Image.open(image) as im:  # reads the header only
                    width, height = im.size
        except Exception:  # reported when the sample is read; here only an estimate is needed
            width, height = self.processor.image_processor.size["width"], self.processor.image_processor.size["height"]
        return self.processor.num_image_tokens(width, height, self.max_slices)

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
        """Estimated length of each sample: text words + image tokens (see the module docstring)."""
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
    def __getitem__(self, i: int) -> dict[str, torch.Tensor] | None:
        record = self.record(self._indices[i])
        try:
            ids, labels = tokenize_conversation(record.turns, self.tokenizer, self.template, self.image_token)
        except ValueError as e:
            raise ValueError(f"{record.name}: {e}") from e
        n_placeholders = ids.count(self.image_token_id)
        if n_placeholders != len(record.images):
            raise ValueError(f"{record.name}: the {self.template} template gave {n_placeholders} image token(s) for "
                             f"{len(record.images)} image(s)")
        image_inputs = None
        blocks: list[tuple[int, int]] = []
        if record.images:
            try:
                image_inputs = self._load_images(record)
            except (FileNotFoundError, ValueError) as e:
                if not self.skip_bad_images:
                    raise
                self._skip(record, "bad_image", str(e))
                return None
            ids, labels, blocks = self._expand(ids, labels, self.processor.image_layouts(image_inputs))
        if self.max_length is not None and len(ids) > self.max_length:
            cut = self.max_length
            for start, end in blocks:
                if start < cut < end:
                    cut = start  # never keep part of an image block
                    break
            if not any(label != IGNORE_INDEX for label in labels[1:cut]):
                self._skip(record, "too_long", f"{len(ids)} tokens > max_length={self.max_length} and no answer "
                                               "token survives a cut outside the image blocks")
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


# ------------------------------------------------------------------------------------------------ collator
class DataCollatorForLlavaUHD:
    """Batch `LazySupervisedDataset` samples.

    Pads ``input_ids`` (with the tokenizer's pad id), ``labels`` (``-100``) and builds ``attention_mask`` on
    ``padding_side``; concatenates the packed image fields of the batch in reading order (sample 0's images first,
    the order in which the model scatters image features into the image tokens), offsetting ``crop_image_ids`` so
    they index the batch's images. ``None`` samples (skipped by the dataset) are dropped and counted in
    ``skipped``; a batch with no sample left raises a `ValueError`. A batch without images has no image fields.
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
            raise ValueError(f"all {len(instances)} samples of this batch were skipped (too long or bad images); "
                             "run dataset.scan_images() before training to remove bad images up front")
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
