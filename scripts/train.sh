#!/bin/sh
# Train SCDM with the released presets:  sh scripts/train.sh PRESET [scratch|finetune] [extra flags...]
#   PRESET: ade20k | coco | celeba (released 256x256 models, GPUs) | toy (built-in data, CPU, minutes)
#   scratch: train from scratch; finetune: classifier-free fine-tuning (drop_rate 0.2) from RESUME.
# Environment: NUM_GPUS, DATA_DIR (default data/PRESET), LOG_DIR (default OUTPUT/PRESET-SCDM[-FINETUNE]),
#   CLASS_SCHEDULE (per-class lambda .npy; computed from the data into LOG_DIR when unset),
#   RESUME (checkpoint for finetune, e.g. OUTPUT/ade20k-SCDM/model300000.pt), PYTHON, LAUNCHER=torchrun.
set -eu
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in
    -h|--help|help) usage; exit 0 ;;
    ade20k|coco|celeba|toy) preset=$1; shift ;;
    *) echo "error: unknown preset '${1:-}'; choose one of: ade20k coco celeba toy" >&2; usage >&2; exit 2 ;;
esac
stage=scratch
case "${1:-}" in scratch|finetune) stage=$1; shift ;; esac
. "$(dirname "$0")/common.sh"

DATA_DIR=${DATA_DIR:-data/$preset}
suffix=""; [ "$stage" = finetune ] && suffix="-FINETUNE"
LOG_DIR=${LOG_DIR:-OUTPUT/$preset-SCDM$suffix}
mkdir -p "$LOG_DIR"
if [ "$preset" = toy ]; then
    arch="$TOY_ARCH"; mode=folder
    [ -d "$DATA_DIR/train" ] || (cd "$ROOT" && "$PYTHON" -m scdm.toy --out "$DATA_DIR")
    run="--lr 2e-4 --batch_size 8 --log_interval 20 --save_interval 500 --max_steps ${MAX_STEPS:-1000} --num_workers 0"
else
    arch="$RELEASED_ARCH $(model_flags "$preset")"; mode=$preset
    run="--lr 1e-4 --batch_size 4 --use_fp16 True --use_checkpoint True --save_interval 10000"
fi
if [ -z "${CLASS_SCHEDULE:-}" ]; then
    CLASS_SCHEDULE="$LOG_DIR/class_schedule.npy"
    [ -f "$CLASS_SCHEDULE" ] || (cd "$ROOT" && "$PYTHON" -m scdm.class_schedule --dataset_mode "$mode" \
        --data_dir "$DATA_DIR" --out "$CLASS_SCHEDULE")
fi
if [ "$stage" = finetune ]; then
    if [ -z "${RESUME:-}" ]; then
        echo "error: finetune needs RESUME=path/to/modelNNNNNN.pt (the scratch run's checkpoint)" >&2; exit 2
    fi
    [ "$preset" = toy ] || run="--lr 2e-5 --batch_size 4 --use_fp16 True --use_checkpoint True --save_interval 10000"
    run="$run --drop_rate 0.2 --resume_checkpoint $RESUME"
fi
# shellcheck disable=SC2086
launch scdm.image_train --data_dir "$DATA_DIR" --log_dir "$LOG_DIR" --class_schedule "$CLASS_SCHEDULE" \
    $arch $run "$@"
