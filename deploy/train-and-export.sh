#!/bin/sh
# The `trainer` service of docker-compose.yml (and runnable as is outside Docker): make a bundle for the
# server unless one is already there. It reuses $POD_BUNDLE when it holds a bundle (a mounted one, or the
# named volume from an earlier `docker compose up`); else it writes the embedded synthetic shop, trains the
# tiny model on it for a few minutes, and exports it (with its parity checks) to $POD_BUNDLE.
# Settings (env): POD_BUNDLE, POD_WORK (data and run directory), POD_TRAIN_MINUTES, POD_TRAIN_EPOCHS,
# POD_TRAIN_MAX_STEPS (optional cap, for smoke tests), POD_SYNTH_USERS, POD_SYNTH_ITEMS.
set -eu

BUNDLE="${POD_BUNDLE:-/models/bundle}"
WORK="${POD_WORK:-/models/work}"

if [ -f "$BUNDLE/bundle.json" ]; then
    echo "trainer: $BUNDLE already holds a bundle; reusing it (delete it, or the volume, to retrain)"
    exit 0
fi

set -x
pod data synth --out "$WORK/data" --users "${POD_SYNTH_USERS:-1000}" --items "${POD_SYNTH_ITEMS:-300}"
# shellcheck disable=SC2086  # the optional cap is meant to split into a flag and its value
pod train --data "$WORK/data" --out "$WORK/run" --preset tiny --epochs "${POD_TRAIN_EPOCHS:-30}" \
    --max-minutes "${POD_TRAIN_MINUTES:-5}" --batch-size 16 --lr 1e-3 --no-progress \
    ${POD_TRAIN_MAX_STEPS:+--max-steps "$POD_TRAIN_MAX_STEPS"}
pod export --checkpoint "$WORK/run" --out "$BUNDLE"
