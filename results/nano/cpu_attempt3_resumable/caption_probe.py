"""Teacher-forced caption accuracy of a stage-1 resampler on held-out samples (how much of the probe it sees).

Run 3's settings (16 queries, 2000 samples) are written below. Usage, with LLAVA_UHD_CACHE at the converted
backbones:  python caption_probe.py OUT/state/uhd-stage1/trained.safetensors 60   (or "none": a fresh resampler)
Prints three captions against their teacher-forced predictions, how many whole captions were right, and the
accuracy at each of the first six caption tokens (for a single-shape probe: colour, shape, "at", place, ".").
"""
import sys, torch
from safetensors.torch import load_file
from llava_uhd.nano import (NanoSettings, _SyntheticSamples, _resolve_backbones, _build, encode_sample, caption)
torch.set_num_threads(1)
s = NanoSettings(num_queries=16, batch_size=16, train_samples=2000, eval_samples=400)
b = _resolve_backbones(s, None, None, None)
model, proc = _build(b, s, "uhd", 0)
trained = sys.argv[1]
if trained != "none":
    model.load_state_dict(load_file(trained), strict=False)
model.eval()
ds = _SyntheticSamples(int(sys.argv[2]), 1, s)
tok = proc.tokenizer
stats = {"all": 0, "n": 0}
first_word = {}
for i in range(len(ds)):
    smp = ds[i]
    enc = encode_sample(smp, proc, (("caption", "plain", "caption"),))
    ids, labels = enc["caption"]
    with torch.no_grad():
        out = model(input_ids=ids[None], labels=labels[None], pixel_values=enc["pixel_values"],
                    patch_grid_hw=enc["patch_grid_hw"], crop_image_ids=enc["crop_image_ids"],
                    crop_is_overview=enc["crop_is_overview"], image_layout=enc["image_layout"],
                    image_sizes=enc["image_sizes"], attention_mask=torch.ones_like(ids)[None])
    pred = out.logits[0, :-1].argmax(-1)
    tgt = labels[1:]
    m = tgt != -100
    ok = (pred[m] == tgt[m])
    stats["n"] += 1
    stats["all"] += int(ok.all())
    words = tok.convert_ids_to_tokens(tgt[m].tolist())
    for j, (w, o) in enumerate(zip(words[:6], ok[:6].tolist())):
        first_word.setdefault(j, []).append(o)
    if i < 3:
        print(caption(smp), "| predicted:", tok.decode(pred[m]))
print("whole caption right:", stats["all"], "/", stats["n"])
print("per position accuracy:", {j: round(sum(v) / len(v), 2) for j, v in first_word.items()})
