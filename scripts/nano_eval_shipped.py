"""Evaluate exported nano weights the way ``llava-uhd ask`` loads them (`load_nano`: LoRA merged, fp32) on a run's
held-out set, and compare with the predictions the training run recorded.

    python scripts/nano_eval_shipped.py WEIGHTS_DIR RUN_DIR/state [THREADS]
"""

import json
import sys
import time
from pathlib import Path

import torch

from llava_uhd.data.probes import FINE_KINDS, SyntheticSamples
from llava_uhd.eval.synthetic_eval import score_predictions
from llava_uhd.nano.checkpoint import load_nano
from llava_uhd.nano.evaluate import answer_samples
from llava_uhd.nano.settings import NanoSettings


def main(weights: Path, state: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    recipe = json.loads((state / "run.json").read_text())["recipe"]
    fields = NanoSettings.__dataclass_fields__
    settings = NanoSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items() if k in fields})
    held_out = SyntheticSamples(settings.eval_samples, settings.held_out_seed, settings)
    samples = [held_out[i] for i in range(len(held_out))]
    t0 = time.perf_counter()
    model, processor, _ = load_nano(weights)
    t1 = time.perf_counter()
    predictions = answer_samples(model, processor, samples, settings)
    t2 = time.perf_counter()
    scores = score_predictions(predictions, [s.answer for s in samples], [s.kind for s in samples], FINE_KINDS)
    recorded = [p["prediction"] for p in json.loads((state / "uhd.json").read_text())["predictions"]]
    same = sum(a == b for a, b in zip(predictions, recorded))
    print(json.dumps({"fine_detail": scores["fine_detail"], "all": scores["all"], "per_kind": scores["per_kind"],
                      "same_as_run": [same, len(recorded)], "load_s": round(t1 - t0, 1),
                      "eval_s": round(t2 - t1, 1)}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
