#!/bin/sh
# Sample with a preset:  sh scripts/sample.sh PRESET [25|1000|8] [extra flags...]
#   PRESET: ade20k | coco | celeba | cityscapes | toy (flags from scdm/presets.py);
#   25: ddim25 respacing, s=1.5, extrapolation 0.8, dynamic threshold 0.95 (default, released);
#   1000: all steps, s=1.5, plain clipping (released);
#   8: ours, dpm++2m-sde on logsnr8, extrapolation 0.2 (a third of the model calls; see docs/sampling.md).
# Environment: MODEL (required: model*.pt or ema_*.pt), CLASS_SCHEDULE (required for released models:
#   the *_psiphi.npy file released with them; your own runs carry theirs),
#   DATA_DIR (default data/PRESET; point it at an image_process/ tree for noisy labels),
#   RESULTS (default RESULTS/PRESET-SCDM-STEPS), NUM_SAMPLES (default all), BATCH_SIZE, NUM_GPUS, PYTHON.
#   --data_dir and --results_path given as flags take the place of DATA_DIR and RESULTS.
#   The architecture comes from the run's args.json beside MODEL, or from the preset for released models.
#   Relative paths are taken from the folder you run the script in.
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
steps=25
case "${1:-}" in
    25|1000|8) steps=$1; shift ;;
    -*|'') ;;
    *) unknown_word "number of steps" "$1" "25 1000 8" ;;
esac

if [ -z "${MODEL:-}" ]; then echo "error: set MODEL=path/to/ema_0.9999_NNNNNN.pt" >&2; exit 2; fi
# Without CLASS_SCHEDULE the sampler uses the run's own (args.json, or class_schedule.npy beside MODEL).
if [ -n "${CLASS_SCHEDULE:-}" ]; then set -- --class_schedule "$CLASS_SCHEDULE" "$@"; fi
# --data_dir and --results_path given as flags count as DATA_DIR and RESULTS (a noisy tree's check below).
DATA_DIR=$(flag_value data_dir "${DATA_DIR:-data/$preset}" "$@")
RESULTS=$(flag_value results_path "${RESULTS:-RESULTS/$preset-SCDM-$steps}" "$@")
flags=$(preset_flags "$preset" "sample$steps" --omit_model)  # the architecture: --preset or the run's args.json
[ -n "${BATCH_SIZE:-}" ] && set -- --batch_size "$BATCH_SIZE" "$@"
# A noisy benchmark tree (it has a corruption.json): its holes reach the model as the all-zero [MASK]
# state that label diffusion taught it, not as the unlabeled class (see the README, "Noisy label maps").
if [ -f "$DATA_DIR/corruption.json" ]; then set -- --unlabeled_to_zero True "$@"; fi
# shellcheck disable=SC2086
launch scdm.image_sample --preset "$preset" --data_dir "$DATA_DIR" --model_path "$MODEL" \
    --results_path "$RESULTS" --num_samples "${NUM_SAMPLES:--1}" $flags "$@"
