#!/bin/sh
# Train with a preset:  sh scripts/train.sh PRESET [STAGE] [extra flags...]
#   PRESET: ade20k | coco | celeba | cityscapes (256x256, GPUs) | toy (built-in data, CPU, minutes);
#   the flags of each come from scdm/presets.py (`python -m scdm.presets PRESET STAGE` prints them).
#   STAGE, SCDM's released recipe: train (default; from scratch, label dropout 0.2) | resume (the
#   released second stage: lr 2e-5 from RESUME). SDM's recipe, for baselines: sdm-train (no dropout) |
#   sdm-finetune (classifier-free fine-tuning from RESUME; `finetune` is its old name). `scratch` = train.
#   --batch_size is per process, as in the released scripts; the run prints the global batch.
# Environment: NUM_GPUS, DATA_DIR (default data/PRESET), LOG_DIR (default OUTPUT/PRESET-SCDM[-RESUME],
#   OUTPUT/PRESET-SDM[-FINETUNE]), CLASS_SCHEDULE (per-class lambda .npy; computed from the data into
#   LOG_DIR when unset), MAX_STEPS, RESUME (the checkpoint resume and sdm-finetune continue from, e.g.
#   OUTPUT/ade20k-SCDM/model300000.pt), PYTHON, LAUNCHER=torchrun.
#   --data_dir, --log_dir and --class_schedule given as flags take the place of these variables.
#   A rerun continues from the latest complete checkpoint in LOG_DIR. Relative paths are taken from the
#   folder you run the script in.
set -eu
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
. "$(dirname "$0")/common.sh"
run_env
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
stage=train
case "${1:-}" in
    train|scratch|resume|sdm-train|sdm-finetune|finetune) stage=$1; shift ;;
    -*|'') ;;
    *) unknown_word stage "$1" "train resume sdm-train sdm-finetune" ;;
esac
case "$stage" in
    scratch) stage=train ;;
    finetune) stage=sdm-finetune ;;
esac

# --data_dir, --log_dir, --class_schedule and --dataset_mode given as flags steer this script too (the
# toy data, the class schedule, RESUME's check), exactly as the environment variables do.
DATA_DIR=$(flag_value data_dir "${DATA_DIR:-data/$preset}" "$@")
LOG_DIR=$(flag_value log_dir "${LOG_DIR:-}" "$@")
CLASS_SCHEDULE=$(flag_value class_schedule "${CLASS_SCHEDULE:-}" "$@")
case "$stage" in
    train) default_log=OUTPUT/$preset-SCDM ;;
    resume) default_log=OUTPUT/$preset-SCDM-RESUME ;;
    sdm-train) default_log=OUTPUT/$preset-SDM ;;
    sdm-finetune) default_log=OUTPUT/$preset-SDM-FINETUNE ;;
esac
LOG_DIR=${LOG_DIR:-$default_log}
mode=$(flag_value dataset_mode "$(preset_flags "$preset" model --get dataset_mode)" "$@")
# A run continues from the latest complete checkpoint set in LOG_DIR (`--resume_checkpoint auto`, a
# fresh start when there is none); resume and sdm-finetune start from RESUME until they have their own.
resume=auto
case "$stage" in
    resume|sdm-finetune)
        if ! ls "$LOG_DIR"/model*.pt >/dev/null 2>&1; then
            if [ -z "${RESUME:-}" ]; then
                echo "error: $stage needs RESUME=path/to/modelNNNNNN.pt (the checkpoint to continue from)" >&2; exit 2
            fi
            resume=$RESUME
        fi ;;
esac
flags=$(preset_flags "$preset" "$stage")
set -- --resume_checkpoint "$resume" "$@"
[ -n "${MAX_STEPS:-}" ] && set -- --max_steps "$MAX_STEPS" "$@"
if [ "$preset" = toy ]; then
    [ -d "$DATA_DIR/train" ] || "$PYTHON" -m scdm.toy --out_dir "$DATA_DIR"
fi
# Every flag, the data, the resume and LOG_DIR are checked before the class schedule (minutes on a
# real dataset) is computed.
dry_run() { "$PYTHON" -m scdm.image_train --dry_run --data_dir "$DATA_DIR" --log_dir "$LOG_DIR" "$@" >/dev/null; }
# shellcheck disable=SC2086
if [ -n "${CLASS_SCHEDULE:-}" ]; then dry_run --class_schedule "$CLASS_SCHEDULE" $flags "$@"; else dry_run $flags "$@"; fi
if [ -z "${CLASS_SCHEDULE:-}" ]; then
    CLASS_SCHEDULE="$LOG_DIR/class_schedule.npy"
    [ -f "$CLASS_SCHEDULE" ] || "$PYTHON" -m scdm.class_schedule --dataset_mode "$mode" \
        --data_dir "$DATA_DIR" --out "$CLASS_SCHEDULE"
fi
# shellcheck disable=SC2086
launch scdm.image_train --data_dir "$DATA_DIR" --log_dir "$LOG_DIR" --class_schedule "$CLASS_SCHEDULE" \
    $flags "$@"
