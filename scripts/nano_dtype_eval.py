"""Held-out synthetic accuracy and answer time of the shipped nano model in float32 and in bfloat16.

Rebuilds the nano run's held-out questions from the recipe recorded in its ``nano_config.json`` (seed, kinds, sizes),
loads the model the way ``llava-uhd ask`` does (`load_model`, LoRA merged) once per dtype, and answers every
question with the run's prompt and batch size. Prints, and writes to ``--json``: per dtype the accuracies
(`score_predictions`: per kind, fine detail, all), the time to answer them all, and how many answers the two
dtypes share.

    python scripts/nano_dtype_eval.py [--weights DIR] [--threads N] [--limit N] [--json results/nano/dtype_eval.json]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from llava_uhd.data.probes import FINE_KINDS, SyntheticSamples
from llava_uhd.eval.synthetic_eval import score_predictions
from llava_uhd.nano.checkpoint import WEIGHTS_DIR
from llava_uhd.nano.evaluate import answer_samples
from llava_uhd.nano.settings import NanoSettings
from llava_uhd.runinfo import machine, versions
from llava_uhd.serve.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=str(WEIGHTS_DIR))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out questions")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recorded = json.loads((Path(args.weights) / "nano_config.json").read_text())["training"]["settings"]
    fields = NanoSettings.__dataclass_fields__
    settings = NanoSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in fields})
    held_out = SyntheticSamples(settings.eval_samples, settings.held_out_seed, settings)
    samples = [held_out[i] for i in range(min(len(held_out), args.limit or len(held_out)))]
    out = {"machine": machine("cpu"), "versions": versions(), "samples": len(samples), "dtypes": {}}
    predictions = {}
    for dtype in args.dtypes.split(","):
        t0 = time.perf_counter()
        model, processor, _ = load_model(args.weights, dtype=dtype)
        t1 = time.perf_counter()
        predictions[dtype] = answer_samples(model, processor, samples, settings)
        t2 = time.perf_counter()
        scores = score_predictions(predictions[dtype], [s.answer for s in samples], [s.kind for s in samples],
                                   FINE_KINDS)
        scores.pop("correct")
        out["dtypes"][dtype] = {**scores, "load_s": round(t1 - t0, 1), "answer_s": round(t2 - t1, 1)}
        print(dtype, json.dumps(out["dtypes"][dtype]), flush=True)
        del model
    names = list(predictions)
    if len(names) == 2:
        a, b = (predictions[n] for n in names)
        out["same_answers"] = [sum(x == y for x, y in zip(a, b)), len(a)]
        print("same answers:", out["same_answers"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
