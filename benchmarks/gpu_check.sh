#!/usr/bin/env bash
# One GPU call for the training and decoding benchmarks, results under $OUT (JSON + logs).
# Prove it on a CPU first with a tiny configuration:
#   OUT=/tmp/gpu PRESET=tiny TRAIN_USERS=300 MEM=1 TIMED=4 EVAL_USERS=64 bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/pod-gpu}
mkdir -p "$OUT"
PRESET=${PRESET:-t5-small}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
$PY - <<'PYEOF' 2>&1 | tee "$OUT/env.log"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
PYEOF
$PY benchmarks/train_throughput.py --preset "$PRESET" --users "${TRAIN_USERS:-5000}" --memory-gib "${MEM:-32}" \
    --seconds "${TIMED:-40}" --out "$OUT/train_throughput.json" 2>&1 | grep -v Warning | tee "$OUT/train_throughput.log"
$PY benchmarks/eval_throughput.py --preset "$PRESET" --users "${EVAL_USERS:-0}" --batch-size 32 \
    --out "$OUT/eval_throughput.json" 2>&1 | grep -v -i warning | tee "$OUT/eval_throughput.log"
