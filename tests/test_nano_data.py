"""The nano model's training text (`llava_uhd.nano.data`): captions and sample encoding."""

from __future__ import annotations

import pytest
import torch

from llava_uhd.data.probes import probe_sample
from llava_uhd.data.synthetic import generate_sample
from llava_uhd.nano.data import caption, encode_sample
from llava_uhd.nano.settings import NanoSettings, model_settings

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.slow]  # slow: the real backbones



def test_encode_sample_matches_the_project_dataset(nano_cache):
    from llava_uhd.data.llava_data import LazySupervisedDataset
    from llava_uhd.processing import LlavaUHDProcessor

    settings = NanoSettings.quick()
    from llava_uhd.backbones import prepare_backbone

    vision, llm = (prepare_backbone(name, nano_cache, log=None) for name in ("dinov2-s14", "smollm2-135m-instruct"))
    processor = LlavaUHDProcessor.from_backbones(vision, llm, **model_settings(settings, "uhd"))
    sample = generate_sample(7, ["edge_colour"], 224, 448, 4.0)
    ours = encode_sample(sample, processor, (("qa", "vicuna_v1", "answer"), ("cap", "plain", "caption")))
    record = {"id": 0, "image": sample.image, "conversations": sample.conversations(answer_prompt=None)}
    theirs = LazySupervisedDataset([record], processor, template="vicuna_v1", max_length=None)[0]
    assert torch.equal(ours["qa"][0], theirs["input_ids"]) and torch.equal(ours["qa"][1], theirs["labels"])
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    ids, labels = ours["cap"]
    trained = processor.tokenizer.decode(ids[labels != -100])
    assert trained.startswith(caption(sample)) and trained.endswith(processor.tokenizer.eos_token)
    assert (ids == processor.image_token_id).sum() == (theirs["input_ids"] == processor.image_token_id).sum()


def test_caption_lists_every_shape_by_ninth():
    sample = generate_sample(11, ["corner_colour"], 300, 600, 2.0)
    text = caption(sample)
    shapes = sample.metadata["shapes"]
    assert text.endswith(".") and text.count(" at ") == len(shapes)
    for sh in shapes:
        assert f"{sh['colour']} {sh['shape']} at " in text
    band = generate_sample(5, ["grey_probe"], 300, 600, 2.0)
    assert caption(band).startswith(f"a {band.answer} band on the {band.metadata['band']['side']}")
    # a single-shape probe (the default kinds): its one shape, in the ninth that holds its centre
    probe = probe_sample(4, "probe_where", NanoSettings(), size=(900, 300))
    x0, y0, x1, y1 = probe.metadata["shape"]["box"]
    ninth = ["top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom",
             "bottom-right"][min(2, int(3 * (y0 + y1) / 2 / 300)) * 3 + min(2, int(3 * (x0 + x1) / 2 / 900))]
    sh = probe.metadata["shape"]
    assert caption(probe) == f"{sh['colour']} {sh['shape']} at {ninth}."
