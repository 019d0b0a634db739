#!/usr/bin/env bash
# One GPU call for issue 7's GPU rows (fast decoding), results under $OUT (JSON + logs):
#   batch 1, fp32: HF generate (constrained and plain) vs the PyTorch runtime + POD beam search;
#   large batches, bf16: HF constrained (batch 32, the REFERENCE anchor) and plain generate vs ours.
# t5-small shape, T5's vocabulary (../shared/tokenizers/t5/spiece.model), random weights.
# Prove it on a CPU first with a tiny configuration (about 2 minutes):
#   OUT=/tmp/gpu DEVICE=cpu PRESET=tiny REQUESTS=4 USERS=64 BATCH=32 HF_BATCH=8 bash benchmarks/gpu_decoding.sh
set -uo pipefail
OUT=${OUT:-/tmp/pod-gpu}
mkdir -p "$OUT"
PRESET=${PRESET:-t5-small}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
$PY - <<'PYEOF' 2>&1 | tee "$OUT/env.log"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
PYEOF
$PY benchmarks/runtime_latency.py --device "$DEVICE" --shapes "$PRESET" --requests "${REQUESTS:-40}" --warmup 3 \
    --rounds 2 --task sequential --out "$OUT/latency_sequential.json" 2>&1 | grep -v -i warning \
    | tee "$OUT/latency_sequential.log"
$PY benchmarks/eval_throughput.py --device "$DEVICE" --preset "$PRESET" --tokenizer auto --users "${USERS:-2048}" \
    --batch-size "${BATCH:-512}" --hf-batch-size "${HF_BATCH:-32}" --out "$OUT/throughput.json" 2>&1 \
    | grep -v -i warning | tee "$OUT/throughput.log"
