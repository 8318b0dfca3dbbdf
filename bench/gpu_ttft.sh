#!/usr/bin/env bash
# Issue 18's GPU check, one prepared script: time to first token of LLaVA-UHD against transformers' LLaVA-NeXT and
# LLaVA-1.5 with a 7B-shaped LLM (Vicuna-7B shape, full CLIP-L/14-336, bf16; bench/ttft.py --scale 7b), then the
# vision encoder's throughput as a fraction of the measured bf16 matmul peak (bench/encode.py, CLIP-L/14-336), and
# the resampler's two attention forms (bench/resampler.py).
#
# Run from anywhere on a machine with a CUDA GPU (about 24 GB of GPU memory is enough):
#     bash bench/gpu_ttft.sh
# Uses python3 with torch + transformers installed; the package comes from ./src (PYTHONPATH), nothing is installed.
# Results go to $OUT if set (else bench/out/): gpu_ttft.json, gpu_ttft.log, gpu_encode.json, gpu_encode.md,
# gpu_encode.log, gpu_resampler.json, gpu_resampler.log, nvidia-smi.txt. Expected wall time on one H100/H200: 3-5 minutes (budget: under 8).
# Overrides: PYTHON (python3), SIZES (all six), REPEATS (5), TTFT_TIMEOUT (300 s), ENCODE_TIMEOUT (150 s).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/out}
mkdir -p "$OUT_DIR"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PYTHON" - <<'PY'
import sys
try:
    import torch
except Exception as err:
    sys.exit(f"error: cannot import torch ({err})")
if not torch.cuda.is_available():
    sys.exit(f"error: CUDA is not available to torch {torch.__version__}; this benchmark needs an NVIDIA GPU")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
then
    exit 2
fi
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true

# A hung or slow run must not eat the device budget: each part has its own timeout and keeps what it wrote.
timeout "${TTFT_TIMEOUT:-300}" "$PYTHON" bench/ttft.py --scale 7b --device cuda --dtype bfloat16 \
    --sizes "${SIZES:-336x336,672x1008,1344x2016,672x672,1008x1008,1344x1344}" \
    --repeats "${REPEATS:-5}" --warmup 2 --json "$OUT_DIR/gpu_ttft.json" 2>&1 | tee "$OUT_DIR/gpu_ttft.log"
timeout "${ENCODE_TIMEOUT:-150}" "$PYTHON" bench/encode.py --device cuda --dtype bfloat16 --towers l14 \
    --repeats 10 --warmup 3 --skip-loop --json "$OUT_DIR/gpu_encode.json" --markdown "$OUT_DIR/gpu_encode.md" \
    2>&1 | tee "$OUT_DIR/gpu_encode.log"
# The resampler's folded attention against the plain one at a 7B LLM's width (it becomes the default only if it
# is faster on the GPU as well as the CPU).
timeout 60 "$PYTHON" bench/resampler.py --device cuda --dtype bfloat16 --hidden 4096 --repeats 20 \
    --json "$OUT_DIR/gpu_resampler.json" 2>&1 | tee "$OUT_DIR/gpu_resampler.log"
echo "results: $OUT_DIR/gpu_ttft.{json,log} $OUT_DIR/gpu_encode.{json,md,log} $OUT_DIR/gpu_resampler.{json,log}"
