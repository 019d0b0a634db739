#!/usr/bin/env bash
# One GPU call (10 minutes of wall time at most) that reproduces the paper's Beauty tables with the t5-small
# shape from random weights, bf16 autocast; everything lands under $OUT (results.json/.md, eval JSONs, logs).
#
# Plan for a 600 s call (H100/H200; step times from ../shared/REFERENCE.md, decoding from benchmarks/NOTES.md):
#   start-up, data preparation, tokenizer          ~ 20 s
#   training, time-boxed (TRAIN_MIN=4.5)            270 s + one validation on VAL_LIMIT users at the stop
#     batch 256 (BATCH): ~75 ms/step sequential, ~250 ms/step top-N, so an epoch of Beauty (2 x 22,363
#     samples, 2 x 88 steps) is ~30 s: about 9 epochs, ~1,600 steps in the box
#   sequential evaluation, full test split          22,363 users at ~300 users/s (batch 64, 20 beams): ~75 s
#   top-N evaluation (beam search only)             22,363 users, ~500-token inputs: ~150 s (estimate)
#   results                                         a few seconds; written after every stage
# The whole thing runs under `timeout $TOTAL_S`, so a slow stage costs only itself: the results of the
# finished stages are already under $OUT. SASRec does not need a GPU: run benchmarks/baselines/sasrec.py on a
# CPU and pass its JSON with SASREC_JSON (carried in the tree), or SASREC_MIN>0 to train it here.
#
# Prove it on a CPU first with a tiny configuration (about 2 minutes on a quiet 2-core machine):
#   OUT=/tmp/repro-gpu DATASET=synthetic PRESET=tiny BATCH=16 TRAIN_MIN=0.2 VAL_LIMIT=50 EVAL_LIMIT=16 \
#       EVAL_BATCH=16 BEAMS=5 SASREC_MIN=0.1 DEVICE=cpu bash benchmarks/reproduce_gpu.sh
# On the GPU machine (torch 2.11, transformers 5.x; sacrebleu/matplotlib/sentencepiece are there, rouge-score
# is not: `pod.metrics` imports it only when explanations are scored, so Beauty needs nothing carried; for
# DATASET=music carry wheels of rouge-score, nltk and absl-py and pip-install them first).
# Data: ../shared does not travel to the GPU machine. Prepare here and carry the prepared folder (runs/ is
# ignored; `carry` takes ignored paths):
#   pod data prepare --format pod ../shared/data/beauty --out runs/data/beauty-keep
#   run(command="DATA=runs/data/beauty-keep SASREC_JSON=runs/repro/sasrec-beauty-keep.json \
#                bash benchmarks/reproduce_gpu.sh", carry=["runs/data/beauty-keep", "runs/repro/sasrec-beauty-keep.json"], timeout_s=600)
set -uo pipefail
OUT=${OUT:-/tmp/pod-repro}
mkdir -p "$OUT"
PY=${PY:-python3}
DATASET=${DATASET:-beauty}
INDEX=${INDEX:-keep}
PRESET=${PRESET:-t5-small}
BATCH=${BATCH:-256}
LR=${LR:-5e-4}
WARMUP=${WARMUP:-100}
TRAIN_MIN=${TRAIN_MIN:-4.5}
VAL_LIMIT=${VAL_LIMIT:-2000}
EVAL_BATCH=${EVAL_BATCH:-64}
BEAMS=${BEAMS:-20}
SASREC_MIN=${SASREC_MIN:-0}
TOTAL_S=${TOTAL_S:-570}
DEVICE=${DEVICE:-auto}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -n "${SHARED:-}" ] && export POD_SHARED_DIR=$SHARED

$PY - <<'PYEOF' 2>&1 | tee "$OUT/env.log"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
PYEOF

args=("$DATASET" --item-index "$INDEX" --preset "$PRESET" --train-minutes "$TRAIN_MIN" --batch-size "$BATCH"
      --lr "$LR" --warmup-steps "$WARMUP" --val-limit "$VAL_LIMIT" --eval-batch-size "$EVAL_BATCH"
      --beams "$BEAMS" --no-topn-scoring --device "$DEVICE" --out "$OUT/run"
      --note "GPU variant: benchmarks/reproduce_gpu.sh, one ${TOTAL_S}s call")
[ -n "${DATA:-}" ] && args+=(--data "$DATA")
[ -n "${EVAL_LIMIT:-}" ] && args+=(--eval-limit "$EVAL_LIMIT")
[ -n "${SASREC_JSON:-}" ] && args+=(--sasrec-report "$SASREC_JSON")
[ "$SASREC_MIN" != "0" ] && args+=(--sasrec-minutes "$SASREC_MIN")

timeout --signal=TERM "$TOTAL_S" $PY benchmarks/reproduce.py "${args[@]}" 2>&1 | grep -v -i warning | tee "$OUT/reproduce.log"
status=${PIPESTATUS[0]}
# bring back the small files only ($OUT/a/b/file is the deepest that returns; checkpoints stay behind)
for f in results.json results.md; do
    [ -f "$OUT/run/$f" ] && cp "$OUT/run/$f" "$OUT/$f"
done
[ -f "$OUT/run/run/log.jsonl" ] && cp "$OUT/run/run/log.jsonl" "$OUT/train-log.jsonl"
rm -rf "$OUT/run"
echo "reproduce.py exit status $status (124: the ${TOTAL_S}s box ended it; finished stages are in results.json)"
exit 0
