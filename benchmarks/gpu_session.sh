#!/usr/bin/env bash
# One GPU call (under 9 minutes) for what waits for a GPU in issues 14 and 15; results come back as two files
# under $OUT: summary.json (every figure) and gpu-session.tar.gz (logs, reports, training logs).
#
#   1. CUDA correctness: tests/test_cuda.py (train each item-id mode on CUDA, rank on CUDA as on the CPU) and
#      tests/test_static_graphs.py (its CUDA case captures the graphs and compares the lists with the eager path).
#   2. Issue 14, the recipe on real data: a grid of trainings on Beauty with leak-free random ids, one token per
#      item, every prefix a sample, run side by side on the one GPU (small models leave it mostly idle), each
#      time-boxed (TRAIN_MIN), selected by validation HR@10 on VAL_LIMIT users and then evaluated on the full
#      test split (all 22,363 users, full ranking over 12,101 items) by reproduce.py, beside popularity and the
#      next-ids rule. GRID entries are preset:dropout:lr:tasks[:init_std].
#   3. Issue 15, token-mode speed on the card, alone, with the grid's best checkpoint (by validation HR@10), or
#      without a grid a t5-small trained SPEED_STEPS steps (enough for `</s>` after an item to be certain):
#      the full test split through `pod evaluate` (sequential and top-N),
#      eval_throughput.py (ours vs HF generate, same lists) at a large batch and at batch 1, and
#      runtime_latency.py for explanations at batch 1 (t5-small shape, random weights), and device_search.py
#      (multi-token ids: the search on the card vs the NumPy search on the host, same lists). First in the
#      stage (so no time box cuts it), issue 15 item 2: batch-1 latency with static shapes and CUDA graphs
#      (`runtime_latency.py --static`: eager vs static vs CUDA graphs in one run, t5-small shape, token ids).
#
# Prove it on a CPU first (about 2 minutes each on 2 cores):
#   OUT=/tmp/gs DEVICE=cpu DATA=data/synthetic TRAIN_MIN=0.3 VAL_LIMIT=50 EVAL_LIMIT=100 THREADS=1 \
#       GRID="tiny:0.1:1e-3:sequential tiny:0.1:1e-3:sequential,topn:0.05" TP_USERS=64 B1_USERS=8 SHAPES=tiny \
#       bash benchmarks/gpu_session.sh
#   OUT=/tmp/gs DEVICE=cpu DATA=data/synthetic STAGES="tests speed" SPEED_PRESET=tiny SPEED_STEPS=30 TP_USERS=64 \
#       B1_USERS=8 SHAPES=tiny bash benchmarks/gpu_session.sh
# On the GPU machine (runs/ is ignored: carry the prepared data, made here with
#   pod data prepare --format pod ../shared/data/beauty --item-index random --out runs/data/beauty-random):
#   run(command="bash benchmarks/gpu_session.sh", carry=["runs/data/beauty-random"], timeout_s=560)
# STAGES picks a subset ("tests speed" fits in about 4 minutes); BUDGET_S bounds the whole script.
set -uo pipefail
OUT=${OUT:-/tmp/pod-gpu}
WORK=${WORK:-/tmp/pod-gpu-work}
mkdir -p "$OUT" "$WORK"
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-runs/data/beauty-random}
TRAIN_MIN=${TRAIN_MIN:-4}
BATCH=${BATCH:-256}
WARMUP=${WARMUP:-200}
VAL_LIMIT=${VAL_LIMIT:-2000}
EVAL_BATCH=${EVAL_BATCH:-1024}
THREADS=${THREADS:-3}
GRID=${GRID:-"small:0.1:1e-3:sequential:0.05 tiny:0.1:2e-3:sequential:0.05 small:0.2:1e-3:sequential,topn:0.05"}
STAGES=${STAGES:-tests grid speed}
SPEED_STEPS=${SPEED_STEPS:-300}  # without a grid: a checkpoint trained this many steps, for speed figures only
SPEED_PRESET=${SPEED_PRESET:-t5-small}
TP_USERS=${TP_USERS:-256}
B1_USERS=${B1_USERS:-100}
SHAPES=${SHAPES:-t5-small}
SEQ_BATCH=${SEQ_BATCH:-4096}   # full-split evaluations (measured on an H200: 1,024 -> 4,870 users/s, 4,096 -> 9,100)
TOPN_BATCH=${TOPN_BATCH:-4096}
ONLY=${ONLY:-}  # e.g. "speed_train eval_sequential eval_topn latency_explanation": only these steps of the stages
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
DEADLINE=$((T0 + ${BUDGET_S:-520}))  # every stage is cut to what is left, so the summary is always written
stamp() { echo "[gpu_session +$(($(date +%s) - T0)) s] $*" | tee -a "$WORK/session.log"; }
box() { local left=$((DEADLINE - $(date +%s) - 15)); echo $((left < $1 ? (left > 5 ? left : 5) : $1)); }  # <= $1 s
want() { [[ " $STAGES " == *" $1 "* ]]; }

$PY - <<'PYEOF' 2>&1 | tee "$WORK/env.log"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$WORK/env.log" 2>&1
git rev-parse HEAD >>"$WORK/env.log" 2>&1

if want tests; then
    stamp "1. CUDA correctness"
    POD_TEST_DEVICE=$DEVICE timeout "$(box 150)" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        tests/test_one_step.py tests/test_static_graphs.py 2>&1 | tail -30 >"$WORK/test_cuda.log"
    tail -3 "$WORK/test_cuda.log"
fi

if want grid; then
    stamp "2. recipe grid on $DATA: $GRID"
    n=0
    for entry in $GRID; do
        IFS=: read -r preset dropout lr tasks init_std <<<"$entry"
        n=$((n + 1))
        args=(beauty --data "$DATA" --item-index random --item-ids token --tasks "$tasks" --preset "$preset"
              --dropout "$dropout" --lr "$lr" --batch-size "$BATCH" --warmup-steps "$WARMUP" --train-minutes "$TRAIN_MIN"
              --val-limit "$VAL_LIMIT" --eval-batch-size "$EVAL_BATCH" --no-topn-scoring --device "$DEVICE"
              --out "$WORK/g$n" --note "benchmarks/gpu_session.sh grid entry $entry, ${TRAIN_MIN} min, run beside the others")
        [ -n "$init_std" ] && args+=(--init-std "$init_std")
        [ -n "${EVAL_LIMIT:-}" ] && args+=(--eval-limit "$EVAL_LIMIT")
        echo "$entry" >"$WORK/g$n.entry"
        OMP_NUM_THREADS=$THREADS timeout "$(box 900)" $PY benchmarks/reproduce.py "${args[@]}" >"$WORK/g$n.log" 2>&1 &
    done
    wait
    stamp "grid done"
fi

timed() {  # name, cap seconds, command...
    local name=$1 cap=$2; shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi  # ONLY: a subset of the steps, by name
    local t=$(date +%s)
    timeout "$(box "$cap")" "$@" 2>&1 | grep -v -i warning | tail -20 >"$WORK/$name.log"
    echo "$name: $(($(date +%s) - t)) s wall" | tee -a "$WORK/session.log"
    tail -8 "$WORK/$name.log"
}

if want speed; then
    timed latency_static 90 $PY benchmarks/runtime_latency.py --device "$DEVICE" --shapes "$SHAPES" --task sequential \
        --item-ids token --requests 30 --warmup 5 --rounds 1 --static --out "$WORK/latency_static.json"
    BEST=$($PY - "$WORK" <<'PYEOF'
import json, sys
from pathlib import Path
best, score = "", -1.0
for log in sorted(Path(sys.argv[1]).glob("g*/run/log.jsonl")):
    for line in log.read_text().splitlines():
        hr = (json.loads(line).get("val_ranking") or {}).get("sequential_hr10")
        if isinstance(hr, (int, float)) and hr > score:
            best, score = str(log.parent), hr
print(best)
PYEOF
)
    TOPN=$(grep -l topn "$WORK"/g*.entry 2>/dev/null | head -1)
    TOPN=${TOPN:+${TOPN%.entry}/run}
    if [ -z "$BEST" ]; then
        stamp "3. a $SPEED_PRESET checkpoint for the speed figures ($SPEED_STEPS steps, sequential + top-N)"
        timed speed_train 100 $PY -m cli.main train --data "$DATA" --out "$WORK/speed-run" --item-ids token \
            --tasks sequential,topn --preset "$SPEED_PRESET" --batch-size 256 --lr 1e-3 --init-std 0.05 \
            --max-steps "$SPEED_STEPS" --val-limit 100 --device "$DEVICE" --no-progress
        BEST=$WORK/speed-run TOPN=$WORK/speed-run
    fi
    stamp "3. speed, alone on the card (checkpoint $BEST; top-N ${TOPN:-none})"
    timed eval_sequential 90 $PY -m cli.main evaluate --checkpoint "$BEST" --data "$DATA" --task sequential \
        --batch-size "$SEQ_BATCH" --device "$DEVICE" --no-progress --out "$WORK/eval_sequential.json"
    if [ -n "$TOPN" ] && [ -d "$TOPN" ]; then
        timed eval_topn 90 $PY -m cli.main evaluate --checkpoint "$TOPN" --data "$DATA" --task topn \
            --batch-size "$TOPN_BATCH" --device "$DEVICE" --no-progress --out "$WORK/eval_topn.json"
    fi
    timed latency_explanation 60 $PY benchmarks/runtime_latency.py --device "$DEVICE" --shapes "$SHAPES" \
        --task explanation --requests 20 --warmup 3 --rounds 1 --static --out "$WORK/latency_explanation.json"
    timed batch1 45 $PY benchmarks/eval_throughput.py --checkpoint "$BEST" --data "$DATA" --users "$B1_USERS" \
        --batch-size 1 --hf-batch-size 1 --device "$DEVICE" --out "$WORK/batch1.json"
    timed device_search 50 $PY benchmarks/device_search.py --device "$DEVICE" --preset "$SPEED_PRESET" \
        --item-ids collaborative --users 256 --batch-size 64 --repeats 2
    # last: HF's constrained search with a 12,621-token allowed set per beam is slow at a large batch
    timed throughput 60 $PY benchmarks/eval_throughput.py --checkpoint "$BEST" --data "$DATA" --users "$TP_USERS" \
        --batch-size 512 --hf-batch-size 128 --device "$DEVICE" --out "$WORK/throughput.json"
fi
stamp "4. summary"
$PY - "$WORK" "$OUT/summary.json" <<'PYEOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
def text(name):
    f = work / name
    return f.read_text() if f.is_file() else ""
summary = {"env": text("env.log"), "cuda_tests": text("test_cuda.log")[-1500:], "grid": {}}
for entry in sorted(work.glob("g*.entry")):
    name = entry.stem
    res = work / name / "results.json"
    row = {"entry": entry.read_text().strip()}
    row["results"] = json.loads(res.read_text()) if res.is_file() else None
    log = work / name / "run" / "log.jsonl"
    row["train_log_tail"] = log.read_text().splitlines()[-40:] if log.is_file() else []
    row["log_tail"] = (work / f"{name}.log").read_text()[-2500:] if (work / f"{name}.log").is_file() else ""
    summary["grid"][name] = row
for name in ("speed_train", "eval_sequential", "eval_topn", "throughput", "batch1", "latency_static", "latency_sequential",
             "latency_explanation"):
    f = work / f"{name}.json"
    summary[name] = json.loads(f.read_text()) if f.is_file() else None
    lf = work / f"{name}.log"
    summary[f"{name}_log"] = lf.read_text() if lf.is_file() else ""
summary["session_log"] = text("session.log")
out.write_text(json.dumps(summary, indent=1, default=str))
print("wrote", out)
PYEOF
tar -C "$WORK" --exclude='*.safetensors' --exclude='*.onnx' --exclude='*.bin' --exclude='*.pt' \
    --exclude='data' -czf "$OUT/gpu-session.tar.gz" . 2>/dev/null
ls -la "$OUT"
stamp "done"
