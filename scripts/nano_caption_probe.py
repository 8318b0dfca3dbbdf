"""Teacher-forced caption accuracy of a stage-1 nano resampler on held-out samples (how much of the probe it sees).

Usage, with LLAVA_UHD_CACHE at the converted backbones (run 3's settings: 16 queries, 2000 samples):

    python scripts/nano_caption_probe.py OUT/state/uhd-stage1/trained.safetensors 60    (or "none": a fresh one)

Prints three captions against their teacher-forced predictions, how many whole captions were right, and the
accuracy at each of the first six caption tokens (for a single-shape probe: colour, shape, "at", place, ".").
"""

import sys

import torch
from safetensors.torch import load_file

from llava_uhd.data.probes import SyntheticSamples
from llava_uhd.nano.build import build_model, resolve_backbones
from llava_uhd.nano.data import caption, encode_sample
from llava_uhd.nano.settings import NanoSettings


def main(trained: str, n: int) -> None:
    torch.set_num_threads(1)
    settings = NanoSettings(num_queries=16, batch_size=16, train_samples=2000, eval_samples=400)
    model, processor = build_model(resolve_backbones(settings), settings, "uhd", seed=0)
    if trained != "none":
        model.load_state_dict(load_file(trained), strict=False)
    model.eval()
    samples = SyntheticSamples(n, settings.held_out_seed, settings)
    tokenizer = processor.tokenizer
    whole, per_position = 0, {}
    for i in range(len(samples)):
        sample = samples[i]
        enc = encode_sample(sample, processor, (("caption", "plain", "caption"),))
        ids, labels = enc["caption"]
        with torch.no_grad():
            out = model(input_ids=ids[None], labels=labels[None], pixel_values=enc["pixel_values"],
                        patch_grid_hw=enc["patch_grid_hw"], crop_image_ids=enc["crop_image_ids"],
                        crop_is_overview=enc["crop_is_overview"], attention_mask=torch.ones_like(ids)[None])
        predicted, target = out.logits[0, :-1].argmax(-1), labels[1:]
        answer = target != -100
        right = predicted[answer] == target[answer]
        whole += int(right.all())
        for j, ok in enumerate(right[:6].tolist()):
            per_position.setdefault(j, []).append(ok)
        if i < 3:
            print(caption(sample), "| predicted:", tokenizer.decode(predicted[answer]))
    print("whole caption right:", whole, "/", len(samples))
    print("per position accuracy:", {j: round(sum(v) / len(v), 2) for j, v in per_position.items()})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
