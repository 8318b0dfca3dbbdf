"""Training on cached tower features (`llava_uhd.nano.features`)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from llava_uhd.data import batches
from llava_uhd.data.batches import ordered_batches
from llava_uhd.nano.features import (
    CachedFeatureCollator,
    CachedFeatureLlavaUHD,
    cache_features,
    progress_reporter,
    training_items,
)



def test_cached_feature_model_and_collator():
    """`CachedFeatureLlavaUHD` on a tiny random model: same loss as the tower path, and misuse is refused."""
    from conftest import build_tiny, random_image

    tiny, processor = build_tiny("dinov2", max_slices=4)
    model = CachedFeatureLlavaUHD(tiny.config).eval()
    model.load_state_dict(tiny.state_dict())
    batch = processor(images=[random_image(90, 40, 1), random_image(30, 70, 2)],
                      text=["<image>\nWhat colour?", "<image>\nHow many?"], answers=["red", "3"])
    sizes = [int(n) for n in torch.bincount(batch["crop_image_ids"])]
    grids = batch["patch_grid_hw"].split(sizes)
    patches = [int((g[:, 0] * g[:, 1]).sum()) for g in grids]
    pixels = batch["pixel_values"].split(patches)
    encoded = []
    for i in range(2):
        keep = batch["attention_mask"][i].bool()
        encoded.append({"index": i, "qa": (batch["input_ids"][i][keep], batch["labels"][i][keep]),
                        "pixel_values": pixels[i], "patch_grid_hw": grids[i],
                        "crop_image_ids": torch.zeros(sizes[i], dtype=torch.long),
                        "crop_is_overview": batch["crop_is_overview"].split(sizes)[i],
                        "image_layout": batch["image_layout"][i:i + 1], "image_sizes": batch["image_sizes"][i:i + 1]})
    fast = CachedFeatureCollator(processor)(training_items(cache_features(model, [encoded], "cpu"), "qa"))
    assert "vision_features" in fast and "pixel_values" not in fast and fast.pop("sample_ids") == ["0", "1"]
    with torch.no_grad():
        ref = tiny(**batch).loss
        got = model(**fast).loss
    assert abs(got.item() - ref.item()) / abs(ref.item()) < 1e-5
    with pytest.raises(ValueError, match="vision_features"):
        model(**fast, pixel_values=batch["pixel_values"])


class _ManyTensors:
    """Encoded-sample-shaped items, ten tensors each (what `EncodedSamples` gives, minus the image work)."""

    def __len__(self):
        return 300

    def __getitem__(self, i):
        ids = torch.arange(4) + i
        return {"index": i, "pixel_values": torch.full((2, 3), float(i)),
                "patch_grid_hw": torch.tensor([[1, 1], [1, 1]]),
                "crop_image_ids": torch.zeros(2, dtype=torch.long), "crop_is_overview": torch.tensor([False, True]),
                "image_layout": torch.tensor([[1, 1]]), "image_sizes": torch.tensor([[5, 5]]),
                "caption": (ids, ids.clone()), "qa": (ids + 1, ids - 1)}


@pytest.mark.slow  # starts DataLoader worker processes
def test_cache_features_keeps_no_worker_shared_memory(monkeypatch):
    """Samples from DataLoader worker processes arrive in shared memory, each tensor holding a descriptor open:
    16000 kept samples of ten tensors each passed the GPU machine's 20000-descriptor limit and the run died with
    "received 0 items of ancdata" (2216 did on a CPU with the same limit). The cache must hold its own copies."""

    def tower(pixels, grids):
        return pixels * 2

    tower.dtype = torch.float32
    monkeypatch.setattr(batches, "MIN_SHM_BYTES", 0)  # worker processes even where /dev/shm is small
    loader = ordered_batches(_ManyTensors(), batch_size=50, workers=1)
    assert isinstance(loader, torch.utils.data.DataLoader)
    cached = cache_features(SimpleNamespace(vision_tower=tower), loader, "cpu")
    assert [c["index"] for c in cached] == list(range(300))
    shared = [k for c in cached for k, v in c.items()
              for t in (v if isinstance(v, tuple) else (v,)) if torch.is_tensor(t) and t.is_shared()]
    assert not shared, shared[:5]
    last = cached[-1]
    assert torch.equal(last["pixel_values"], torch.full((2, 3), 2.0 * 299))
    assert torch.equal(last["qa"][1], torch.arange(4) + 298) and last["crop_is_overview"].tolist() == [False, True]


def test_feature_caching_reports_progress(monkeypatch):
    """Caching takes many minutes on a CPU: the run says how far it got (at most once a minute), with an ETA."""
    clock = iter([0.0, 30.0, 61.0, 90.0, 125.0, 200.0, 300.0, 400.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    said = []
    report = progress_reporter(said.append, "uhd features", total=300)

    def tower(pixels, grids):
        return pixels

    tower.dtype = torch.float32
    samples = [[_ManyTensors()[i] for i in range(s, s + 50)] for s in range(0, 300, 50)]
    cached = cache_features(SimpleNamespace(vision_tower=tower), samples, "cpu", progress=report)
    assert len(cached) == 300
    # called with 50, 100, ..., 300 done at t = 30, 61, 90, 125, 200, 300: said at 61, 125, 200 (each at least
    # 60 s after the last); nothing at 30 (too soon) nor when all are done
    assert said == ["    uhd features: 100/300 in 61 s, about 122 s left",
                    "    uhd features: 200/300 in 125 s, about 62 s left",
                    "    uhd features: 250/300 in 200 s, about 40 s left"]
