#!/bin/sh
# The whole system on built-in data, on CPU, no download: set up .venv, generate the toy dataset,
# compute its class schedule, train a small SCDM model, sample the held-out label maps.
# Environment: MAX_STEPS (default 600), OUT (default results/demo), PYTHON (base interpreter).
set -eu
. "$(dirname "$0")/common.sh"
at_root
setup_venv
OUT=${OUT:-results/demo}
export PYTHON="$VENV_PYTHON" NUM_GPUS=${NUM_GPUS:-1}
DATA_DIR="$OUT/toy" LOG_DIR="$OUT/train" MAX_STEPS=${MAX_STEPS:-600} sh scripts/train.sh toy
last=$(ls "$OUT/train"/ema_0.9999_*.pt | sort | tail -n 1)
DATA_DIR="$OUT/toy" MODEL="$last" CLASS_SCHEDULE="$OUT/train/class_schedule.npy" RESULTS="$OUT/samples" \
    sh scripts/sample.sh toy 25
echo "demo done: samples in $OUT/samples (overview.png), training log in $OUT/train/progress.csv"
