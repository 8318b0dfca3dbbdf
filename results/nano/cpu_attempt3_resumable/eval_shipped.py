"""Evaluate exported nano weights the way `llava-uhd ask` loads them (load_nano, LoRA merged, fp32) on the run's
held-out set, and compare with the predictions the training run recorded."""
import json, sys, time
from pathlib import Path

import torch

from llava_uhd.nano import (NanoSettings, _SyntheticSamples, _fine_kinds, generate_answers, load_nano)
from llava_uhd.eval.synthetic_eval import score_predictions

weights, state = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
recipe = json.loads((state / "run.json").read_text())["recipe"]
fields = NanoSettings.__dataclass_fields__
settings = NanoSettings(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in recipe.items() if k in fields})
eval_set = _SyntheticSamples(settings.eval_samples, settings.held_out_seed, settings)
samples = [eval_set[i] for i in range(len(eval_set))]
t0 = time.perf_counter()
model, processor, config = load_nano(weights)
t1 = time.perf_counter()
preds = generate_answers(model, processor, samples, settings, 0)
t2 = time.perf_counter()
scores = score_predictions(preds, [s.answer for s in samples], [s.kind for s in samples], _fine_kinds())
recorded = [p["prediction"] for p in json.loads((state / "uhd.json").read_text())["predictions"]]
same = sum(a == b for a, b in zip(preds, recorded))
print(json.dumps({"fine_detail": scores["fine_detail"], "all": scores["all"],
                  "per_kind": scores["per_kind"], "same_as_run": [same, len(recorded)],
                  "load_s": round(t1 - t0, 1), "eval_s": round(t2 - t1, 1)}, indent=1))
