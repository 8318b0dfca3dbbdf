"""Training on cached tower features: the frozen DINOv2 tower runs once per training sample, not once per step.

    cached = cache_features(model, batches, device)       # samples with the tower's (P, D_v) in "pixel_values"
    items = training_items(cached, "qa")                  # LlavaUHDTrainer samples
    trainer = LlavaUHDTrainer(model=CachedFeatureLlavaUHD..., data_collator=CachedFeatureCollator(processor), ...)

`CachedFeatureLlavaUHD` is `LlavaUHDForConditionalGeneration` plus one keyword, ``vision_features``, that stands
for the tower's output (the resampler, the spatial schema, the LLM and the loss run as usual);
`CachedFeatureCollator` hands the cached features to it. `check_feature_cache` shows both paths give one loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch

from ..data.batches import unshared
from ..data.llava_data import IMAGE_FIELDS, DataCollatorForLlavaUHD
from ..modeling import LlavaUHDForConditionalGeneration
from .data import encode_sample

__all__ = ["CachedFeatureLlavaUHD", "CachedFeatureCollator", "cache_features", "training_items",
           "check_feature_cache", "progress_reporter"]


class CachedFeatureLlavaUHD(LlavaUHDForConditionalGeneration):
    """`LlavaUHDForConditionalGeneration` that also accepts ``vision_features``: the frozen tower's output
    ``(P, D_v)`` for the batch's crops, computed beforehand (`cache_features`), in place of ``pixel_values``.
    Everything after the tower (resampler, spatial schema, LLM, loss) runs unchanged."""

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
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, features)
            input_ids = None
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels, pixel_values=pixel_values,
                               patch_grid_hw=patch_grid_hw, crop_image_ids=crop_image_ids,
                               crop_is_overview=crop_is_overview, image_layout=image_layout,
                               image_sizes=image_sizes, logits_to_keep=logits_to_keep, **kwargs)


class CachedFeatureCollator(DataCollatorForLlavaUHD):
    """`DataCollatorForLlavaUHD` whose samples carry tower features in ``pixel_values``: the batch hands them to
    `CachedFeatureLlavaUHD` as ``vision_features``."""

    def __call__(self, instances):
        batch = super().__call__(instances)
        if "pixel_values" in batch:
            batch["vision_features"] = batch.pop("pixel_values")
        return batch


def cache_features(model, batches: Iterable[list[dict]], device, feature_dtype=None,
                   progress: Callable[[int], None] | None = None) -> list[dict]:
    """Run the frozen tower once over encoded samples (an iterable of lists of `encode_sample` dicts) and return
    the samples with ``pixel_values`` replaced by the tower's features ``(P, D_v)`` (on ``device``, in
    ``feature_dtype``; default the tower's dtype). Samples are batched through the tower, as in training.
    ``progress(samples_done)``, if given, is called after every batch."""
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
                b = {k: unshared(v) for k, v in b.items() if k != "pixel_values"}
                b["pixel_values"] = f
                out.append(b)
            if progress is not None:
                progress(len(out))
    return out


def progress_reporter(say: Callable[[str], None], what: str, total: int, every_s: float = 60.0
                      ) -> Callable[[int], None]:
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


def training_items(cached: list[dict], key: str) -> list[dict]:
    """`LlavaUHDTrainer` samples: ``input_ids``, ``labels`` (the ``key`` target of `encode_sample`) and the image
    fields, with the cached features in the ``pixel_values`` slot (`CachedFeatureCollator` hands them to the model
    as ``vision_features``)."""
    items = []
    for c in cached:
        ids, labels = c[key]
        item = {"input_ids": ids, "labels": labels, "sample_id": str(c["index"])}
        item.update({k: c[k] for k in IMAGE_FIELDS})
        items.append(item)
    return items


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def check_feature_cache(model, processor, samples, cached: list[dict], templates, answer_prompt: str | None,
                        device, n: int = 2) -> dict:
    """The stage-2 loss of the first ``n`` training samples computed by running the tower on their pixels and from
    the cached features (same model, fp32, no autocast): they must agree (``rel_err``; ~1e-7 with float32 features,
    ~1e-3 with the float16 features kept on a GPU)."""
    n = min(n, len(cached))
    plain = []
    for i in range(n):
        e = encode_sample(samples[i], processor, templates, answer_prompt)
        item = {"input_ids": e["qa"][0], "labels": e["qa"][1]}
        item.update({k: e[k] for k in IMAGE_FIELDS})
        plain.append(item)
    collator = CachedFeatureCollator(processor)
    ref_batch = collator(plain)  # pixel_values -> vision_features: undo for the reference
    ref_batch["pixel_values"] = ref_batch.pop("vision_features")
    fast_batch = collator(training_items(cached[:n], "qa"))
    fast_batch.pop("sample_ids", None)
    model.eval()
    with torch.no_grad():
        ref = model(**_to(ref_batch, device)).loss.item()
        got = model(**_to(fast_batch, device)).loss.item()
    return {"samples": n, "loss_tower": ref, "loss_cached": got, "rel_err": abs(got - ref) / max(abs(ref), 1e-12)}
