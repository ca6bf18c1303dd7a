#!/bin/sh
# Sample with the released presets:  sh scripts/sample.sh PRESET [25|1000] [extra flags...]
#   PRESET: ade20k | coco | celeba | toy;  25: ddim25 respacing, s=1.5, extrapolation 0.8,
#   dynamic threshold 0.95 (default);  1000: all steps, s=1.5, plain clipping.
# Environment: MODEL (required: model*.pt or ema_*.pt), CLASS_SCHEDULE (required for released models:
#   the *_psiphi.npy file released with them; for your own runs LOG_DIR/class_schedule.npy),
#   DATA_DIR (default data/PRESET; point it at an image_process/ tree for noisy labels),
#   RESULTS (default RESULTS/PRESET-SCDM-STEPS), NUM_SAMPLES (default all), BATCH_SIZE, NUM_GPUS, PYTHON.
set -eu
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in
    -h|--help|help) usage; exit 0 ;;
    ade20k|coco|celeba|toy) preset=$1; shift ;;
    *) echo "error: unknown preset '${1:-}'; choose one of: ade20k coco celeba toy" >&2; usage >&2; exit 2 ;;
esac
steps=25
case "${1:-}" in 25|1000) steps=$1; shift ;; esac
. "$(dirname "$0")/common.sh"

if [ -z "${MODEL:-}" ]; then echo "error: set MODEL=path/to/ema_0.9999_NNNNNN.pt" >&2; exit 2; fi
if [ -z "${CLASS_SCHEDULE:-}" ]; then
    guess="$(dirname "$MODEL")/class_schedule.npy"
    if [ -f "$guess" ]; then CLASS_SCHEDULE=$guess; else
        echo "error: set CLASS_SCHEDULE=path/to/${preset}_psiphi.npy (the per-class lambda file of the model)" >&2
        exit 2
    fi
fi
DATA_DIR=${DATA_DIR:-data/$preset}
RESULTS=${RESULTS:-RESULTS/$preset-SCDM-$steps}
if [ "$preset" = toy ]; then arch="$TOY_ARCH"; bs=${BATCH_SIZE:-16}; else
    arch="$RELEASED_ARCH $(model_flags "$preset")"; bs=${BATCH_SIZE:-4}; fi
if [ "$steps" = 25 ]; then
    schedule="--timestep_respacing ddim25 --s 1.5 --extrapolation 0.8 --dynamic_threshold 0.95"
else
    schedule="--timestep_respacing 1000 --s 1.5"
fi
# shellcheck disable=SC2086
launch scdm.image_sample --data_dir "$DATA_DIR" --model_path "$MODEL" --class_schedule "$CLASS_SCHEDULE" \
    --results_path "$RESULTS" --batch_size "$bs" --num_samples "${NUM_SAMPLES:--1}" $arch $schedule "$@"
