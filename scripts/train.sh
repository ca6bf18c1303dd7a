#!/bin/sh
# Train SCDM with a preset:  sh scripts/train.sh PRESET [scratch|finetune] [extra flags...]
#   PRESET: ade20k | coco | celeba | cityscapes (256x256, GPUs) | toy (built-in data, CPU, minutes);
#   the flags of each come from scdm/presets.py (`python -m scdm.presets PRESET train` prints them).
#   scratch: train from scratch; finetune: classifier-free fine-tuning (drop_rate 0.2) from RESUME.
# Environment: NUM_GPUS, DATA_DIR (default data/PRESET), LOG_DIR (default OUTPUT/PRESET-SCDM[-FINETUNE]),
#   CLASS_SCHEDULE (per-class lambda .npy; computed from the data into LOG_DIR when unset), MAX_STEPS,
#   RESUME (checkpoint for finetune, e.g. OUTPUT/ade20k-SCDM/model300000.pt), PYTHON, LAUNCHER=torchrun.
#   A rerun continues from the latest complete checkpoint in LOG_DIR. Relative paths are taken from the
#   folder you run the script in.
set -eu
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
. "$(dirname "$0")/common.sh"
case "${1:-}" in
    -h|--help|help) usage; exit 0 ;;
esac
preset=${1:-}
case " $PRESET_NAMES " in
    *" $preset "*) [ -n "$preset" ] && shift ;;
    *) preset="" ;;
esac
if [ -z "$preset" ]; then
    echo "error: unknown preset '${1:-}'; choose one of: $PRESET_NAMES" >&2; usage >&2; exit 2
fi
stage=scratch
case "${1:-}" in scratch|finetune) stage=$1; shift ;; esac

DATA_DIR=${DATA_DIR:-data/$preset}
suffix=""; [ "$stage" = finetune ] && suffix="-FINETUNE"
LOG_DIR=${LOG_DIR:-OUTPUT/$preset-SCDM$suffix}
mode=$(preset_flags "$preset" model --get dataset_mode)
# A run continues from the latest complete checkpoint set in LOG_DIR (`--resume_checkpoint auto`, a
# fresh start when there is none); a finetune run starts from RESUME until it has checkpoints of its own.
resume=auto
if [ "$stage" = finetune ]; then
    if ! ls "$LOG_DIR"/model*.pt >/dev/null 2>&1; then
        if [ -z "${RESUME:-}" ]; then
            echo "error: finetune needs RESUME=path/to/modelNNNNNN.pt (the scratch run's checkpoint)" >&2; exit 2
        fi
        resume=$RESUME
    fi
    flags=$(preset_flags "$preset" finetune)
else
    flags=$(preset_flags "$preset" train)
fi
set -- --resume_checkpoint "$resume" "$@"
[ -n "${MAX_STEPS:-}" ] && set -- --max_steps "$MAX_STEPS" "$@"
if [ "$preset" = toy ]; then
    [ -d "$DATA_DIR/train" ] || "$PYTHON" -m scdm.toy --out_dir "$DATA_DIR"
fi
# Every flag, the data, the resume and LOG_DIR are checked before the class schedule (minutes on a
# real dataset) is computed.
# shellcheck disable=SC2086
"$PYTHON" -m scdm.image_train --dry_run --data_dir "$DATA_DIR" --log_dir "$LOG_DIR" $flags "$@" >/dev/null
if [ -z "${CLASS_SCHEDULE:-}" ]; then
    CLASS_SCHEDULE="$LOG_DIR/class_schedule.npy"
    [ -f "$CLASS_SCHEDULE" ] || "$PYTHON" -m scdm.class_schedule --dataset_mode "$mode" \
        --data_dir "$DATA_DIR" --out "$CLASS_SCHEDULE"
fi
# shellcheck disable=SC2086
launch scdm.image_train --data_dir "$DATA_DIR" --log_dir "$LOG_DIR" --class_schedule "$CLASS_SCHEDULE" \
    $flags "$@"
