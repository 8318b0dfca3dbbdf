#!/usr/bin/env bash
# Sharded training on the GPU machine: stage 1, then stage 2 from its output, of the nano LLaVA-UHD (DINOv2-S/14 +
# SmolLM2-135M, a new resampler) on synthetic data, once with FSDP2 (the Trainer's --fsdp, configs/fsdp2.json) and
# once with DeepSpeed ZeRO-3 (configs/zero3.json), on every GPU present (torchrun --nproc_per_node <GPUs>), a few
# hundred steps each, the recipes' settings (configs/stage1.yaml, stage2.yaml: bf16, activation checkpointing).
# Records per run: the loss curve (every 10 steps), samples/s, tokens/s (the non-padding input tokens of all ranks
# over the training time) and the peak CUDA memory of every rank (--sharding_report), into sharded_gpu.json / .md.
#
# 1. HERE, once (CPU; .venv with the package, the PyPI index):
#      bash scripts/train_sharded_gpu.sh --prepare
#    = scripts/train_nano_gpu.sh --prepare (transformers / peft / gguf / regex wheels, the backbones split in
#    .nano_blobs/part-1, part-2) plus, into .whl/, the wheels of accelerate and DeepSpeed (built here from its sdist,
#    no ops compiled) and DeepSpeed's pure-Python requirements.
# 2. THERE (device tool, repo root, $OUT set), two calls BACK TO BACK, as for train_nano_gpu.sh:
#      call 1: carry [".whl", ".nano_blobs/part-1"]   command: bash scripts/train_sharded_gpu.sh
#      call 2: carry [".nano_blobs/part-2"]           command: bash scripts/train_sharded_gpu.sh
#    Staging is train_nano_gpu.sh's own (NANO_STAGE_ONLY=1: stash, install the wheels, unpack the backbones); a call
#    that leaves something missing prints "STAGED" and exits 0; the call that completes the set trains.
# Knobs (environment): SHARDED_STEPS (optimizer steps per run, default 200), SHARDED_BATCH (per GPU, default 16),
#   SHARDED_SAMPLES (synthetic samples, default 4000), SHARDED_ENGINES (default "fsdp2 zero3"), SHARDED_TIMEOUT
#   (s per run, default 170), SHARDED_DEVICE=cpu (a dry run without a GPU: the presets installed here, 2 processes
#   on gloo, float32, OUT defaults to /tmp/llava_uhd_sharded_dry; e.g. SHARDED_STEPS=2 SHARDED_BATCH=1).
# Device time: call 1 ~50 s with the machine's start; call 2 ~60 s (unpacking, backbones, data) + 4 runs x
#   (~40 s start + the steps): give it timeout_s 600 and SHARDED_STEPS to fit.
# Comes back in $OUT: sharded_gpu.json, sharded_gpu.md (copy both to results/), <engine>-stage<N>.log, env.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    PY=${PY:-.venv/bin/python}
    bash scripts/train_nano_gpu.sh --prepare
    ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
    ds=$(ver deepspeed 2>/dev/null || echo 0.19.8)
    echo "building the deepspeed $ds wheel (DS_BUILD_OPS=0: no ops compiled) and downloading its requirements"
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl "deepspeed==$ds"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "accelerate==$(ver accelerate)" hjson py-cpuinfo msgpack einops ninja nvidia-ml-py
    du -b .whl/*.whl | sort -k2
    echo "carry plan: call 1 [.whl, .nano_blobs/part-1], then call 2 [.nano_blobs/part-2], back to back"
    exit 0
fi

DEVICE=${SHARDED_DEVICE:-cuda}
STEPS=${SHARDED_STEPS:-200}
BATCH=${SHARDED_BATCH:-16}
SAMPLES=${SHARDED_SAMPLES:-4000}
ENGINES=${SHARDED_ENGINES:-fsdp2 zero3}
RUN_TIMEOUT=${SHARDED_TIMEOUT:-170}
say() { echo "[train_sharded_gpu $(date +%T)] $*"; }

if [[ "$DEVICE" == cuda ]]; then
    OUT=${OUT:?OUT must be set (the device tool sets it)}
    STASH=${NANO_STASH:-/tmp/llava_uhd_nano_stash}
    SITE=${NANO_SITE:-/tmp/site}
    set +e
    staged=$(NANO_STAGE_ONLY=1 bash scripts/train_nano_gpu.sh 2>&1)
    status=$?
    set -e
    echo "$staged"
    if (( status != 0 )); then say "FAIL: staging (train_nano_gpu.sh)"; exit "$status"; fi
    if ! grep -q STAGED_ALL <<<"$staged"; then say "STAGED: make the next call (see above)"; exit 0; fi
    PY=${NANO_PYTHON:-python3}
    export PYTHONPATH="$SITE:$PWD/src"
    NPROC=$(nvidia-smi -L | wc -l)
    VISION_BUNDLE="$STASH/unpacked/dinov2-s14-int8"
    PRECISION=(--bf16 true)
    WORKERS=4
else  # dry run on this machine: presets from the installed wheels, gloo
    OUT=${OUT:-/tmp/llava_uhd_sharded_dry}
    PY=${NANO_PYTHON:-.venv/bin/python}
    NPROC=2
    VISION_BUNDLE=""
    PRECISION=(--bf16 false --use_cpu true)
    WORKERS=0
fi
RUN=${SHARDED_RUN:-/tmp/llava_uhd_sharded_run}
export PYTHONUNBUFFERED=1 LLAVA_UHD_CACHE=${LLAVA_UHD_CACHE:-/tmp/llava_uhd_cache} HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
    PYTHONWARNINGS=ignore::FutureWarning  # DeepSpeed's deprecated collectives: one warning per call
mkdir -p "$OUT" "$RUN"
{
    [[ "$DEVICE" == cuda ]] && nvidia-smi
    "$PY" -c "import torch, transformers, accelerate, peft, deepspeed; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', \
peft.__version__, 'deepspeed', deepspeed.__version__)"
} > "$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; say "FAIL: a package is missing (env.txt)"; exit 1; }
say "$(tail -1 "$OUT/env.txt"); $NPROC processes on $DEVICE"

# ---- the model (DINOv2-S/14 + SmolLM2-135M, a new resampler) and the data, once
if [[ ! -f "$RUN/base/config.json" ]]; then
    "$PY" - "$RUN" "$VISION_BUNDLE" <<'EOF'
import sys
from llava_uhd.backbones import build_model
run, bundle = sys.argv[1], sys.argv[2]
vision = "dinov2-s14"
if bundle:  # the int8-rounded DINOv2 the GPU bundle carries, as a loadable folder
    from llava_uhd.nano.bundle import unpack_vision_bundle
    vision = unpack_vision_bundle(bundle, f"{run}/dinov2-s14")
build_model(vision, "smollm2-135m-instruct", f"{run}/base")
EOF
fi
if [[ ! -f "$RUN/synth/synthetic.json" ]]; then
    "$PY" -m llava_uhd.cli synth --out "$RUN/synth" --n "$SAMPLES" --seed 0 --max-side 1200 >/dev/null
fi

# ---- stage 1 then stage 2, per engine
for engine in $ENGINES; do
    case "$engine" in
        fsdp2) ENGINE_ARGS=(--fsdp full_shard --fsdp_config configs/fsdp2.json) ;;
        zero3) ENGINE_ARGS=(--deepspeed configs/zero3.json) ;;
        zero2) ENGINE_ARGS=(--deepspeed configs/zero2.json) ;;
        *) say "FAIL: unknown engine $engine"; exit 2 ;;
    esac
    [[ "$DEVICE" != cuda && "$engine" == zero* ]] && PREC=(--bf16 false) || PREC=("${PRECISION[@]}")
    model="$RUN/base"
    for stage in 1 2; do
        name="$engine-stage$stage"
        rm -rf "$RUN/$name" "$RUN/$name.report.jsonl"
        say "$name: $STEPS steps, batch $BATCH x $NPROC"
        set +e
        timeout -k 15 "$RUN_TIMEOUT" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
            -m llava_uhd.train.run --stage "$stage" --config "configs/stage$stage.yaml" --model "$model" \
            --data "$RUN/synth/synthetic.json" --images "$RUN/synth" --output "$RUN/$name" \
            --max_steps "$STEPS" --per_device_train_batch_size "$BATCH" --save_steps "$STEPS" \
            --logging_steps $(( STEPS < 10 ? 1 : 10 )) \
            --dataloader_num_workers "$WORKERS" \
            --max_length 1024 \
            --sharding_report "$RUN/$name.report.jsonl" "${PREC[@]}" "${ENGINE_ARGS[@]}" > "$OUT/$name.log" 2>&1
        rc=$?
        set -e
        if (( rc != 0 )); then
            tail -30 "$OUT/$name.log"; say "FAIL: $name exited $rc (124/137: timeout); log: $name.log"
            break
        fi
        say "$name: $(grep -o "stage $stage done.*" "$OUT/$name.log" | cut -c1-120)"
        model="$RUN/$name"
    done
done

# ---- the numbers
"$PY" - "$RUN" "$OUT" "$ENGINES" "$NPROC" "$DEVICE" "$STEPS" <<'EOF'
import json, re, sys
from pathlib import Path

run, out, engines = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split()
nproc, device = int(sys.argv[4]), sys.argv[5]
rows = []
for engine in engines:
    for stage in (1, 2):
        name = f"{engine}-stage{stage}"
        state = run / name / "checkpoint-{}".format(sys.argv[6]) / "trainer_state.json"  # a sharded checkpoint
        if not state.exists():
            rows.append({"run": name, "ok": False})
            continue
        history = json.loads(state.read_text())["log_history"]
        # the summary the Trainer prints at the end (after the checkpoint's trainer_state.json was written)
        end = re.findall(r"'train_runtime': '([0-9.e+-]+)', 'train_samples_per_second': '([0-9.e+-]+)'",
                         (out / f"{name}.log").read_text())
        end = {"train_runtime": float(end[-1][0]), "train_samples_per_second": float(end[-1][1])}
        report = [json.loads(line) for line in (run / f"{name}.report.jsonl").read_text().splitlines()]
        tokens = sum(r.get("tokens", 0) for r in report)  # non-padding input tokens, all ranks
        rows.append({
            "run": name, "ok": True, "engine": engine, "stage": stage, "processes": nproc, "device": device,
            "steps": json.loads(state.read_text())["global_step"],
            "loss": [(h["step"], h["loss"]) for h in history if "loss" in h],
            "train_runtime_s": end["train_runtime"], "samples_per_s": end["train_samples_per_second"],
            "tokens_per_s": tokens / end["train_runtime"] if tokens else None,
            "per_rank": [{k: r.get(k) for k in ("rank", "param_bytes", "optimizer_bytes", "peak_rss_bytes",
                                                 "peak_cuda_allocated_bytes", "peak_cuda_reserved_bytes")}
                         for r in sorted(report, key=lambda r: r["rank"])],
        })
(out / "sharded_gpu.json").write_text(json.dumps(rows, indent=1))
gib = lambda b: f"{b / 2**30:.2f}" if b else "-"
lines = ["| run | steps | loss first -> last | samples/s | tokens/s | peak CUDA allocated / reserved per rank (GiB) |",
         "|---|---|---|---|---|---|"]
for r in rows:
    if not r["ok"]:
        lines.append(f"| {r['run']} | failed | | | | |")
        continue
    loss = r["loss"] or [(0, float("nan"))]
    mem = "; ".join(f"{gib(p['peak_cuda_allocated_bytes'])} / {gib(p['peak_cuda_reserved_bytes'])}"
                    for p in r["per_rank"])
    tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
    lines.append(f"| {r['run']} | {r['steps']} | {loss[0][1]:.3f} -> {loss[-1][1]:.3f} | {r['samples_per_s']:.1f} | "
                 f"{tps} | {mem} |")
(out / "sharded_gpu.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
ls -la "$OUT"
