#!/usr/bin/env bash
# GPU variant of bench/encode.py: ViT-B/16-224 and ViT-L/14-336 CLIP towers (random weights, full depth),
# bf16 then fp32, batched (bucket and varlen packing) vs crop-by-crop loop vs padding + mask.
#
# Run from the repository root (or anywhere: it cd's there) on a machine with a CUDA GPU:
#     bash bench/gpu_encode.sh
# Uses python3 with torch + transformers already installed; the package comes from ./src (PYTHONPATH), nothing is
# installed. Results go to $OUT if set (else bench/out/): gpu_encode.json, gpu_encode.md, gpu_encode.log,
# nvidia-smi.txt. Expected wall time on one H100: about 1-2 minutes (budget: under 4).
# Environment overrides: PYTHON (default python3), REPEATS (10), WARMUP (3), DTYPES (bfloat16,float32),
# TOWERS (b16,l14), BENCH_TIMEOUT (230 s for the python run; results of the finished cases are kept).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/out}
mkdir -p "$OUT_DIR"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" - <<'EOF'
import sys
try:
    import torch
except Exception as err:
    sys.exit(f"error: cannot import torch ({err})")
if not torch.cuda.is_available():
    sys.exit(f"error: CUDA is not available to torch {torch.__version__} "
             f"(torch.version.cuda={torch.version.cuda}); this benchmark needs an NVIDIA GPU")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF
then
    exit 2
fi

nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true

# timeout: a hung run must not eat the whole device budget.
timeout "${BENCH_TIMEOUT:-230}" "$PYTHON" bench/encode.py \
    --device cuda \
    --dtype "${DTYPES:-bfloat16,float32}" \
    --towers "${TOWERS:-b16,l14}" \
    --repeats "${REPEATS:-10}" \
    --warmup "${WARMUP:-3}" \
    --json "$OUT_DIR/gpu_encode.json" \
    --markdown "$OUT_DIR/gpu_encode.md" \
    2>&1 | tee "$OUT_DIR/gpu_encode.log"
echo "results: $OUT_DIR/gpu_encode.{json,md,log}"
