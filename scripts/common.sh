# Shared by train.sh and sample.sh: the python to use and how to launch N processes.
# PYTHON: interpreter (default: ./.venv/bin/python when present, else python).
# NUM_GPUS: processes to launch (default: visible GPUs, or 1). More than one uses mpiexec,
# or torchrun when LAUNCHER=torchrun.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${NUM_GPUS:-0}" -ge 1 ] 2>/dev/null || NUM_GPUS=1
fi

launch() {  # launch MODULE ARGS...: one process, or NUM_GPUS under mpiexec / torchrun
    module=$1; shift
    if [ "$NUM_GPUS" -gt 1 ]; then
        if [ "${LAUNCHER:-mpiexec}" = torchrun ]; then
            set -- "$(dirname "$PYTHON")/torchrun" --standalone --nproc_per_node "$NUM_GPUS" -m "$module" "$@"
        else
            MPIEXEC=${MPIEXEC:-$(command -v mpiexec || echo "$(dirname "$PYTHON")/mpiexec")}
            set -- "$MPIEXEC" -n "$NUM_GPUS" "$PYTHON" -m "$module" "$@"
        fi
    else
        set -- "$PYTHON" -m "$module" "$@"
    fi
    echo "+ $*" >&2
    cd "$ROOT" && exec "$@"
}

model_flags() {  # the released 256x256 architecture of each dataset
    case "$1" in
        ade20k) echo "--dataset_mode ade20k --num_classes 151 --no_instance True" ;;
        coco)   echo "--dataset_mode coco --num_classes 183 --no_instance False" ;;
        celeba) echo "--dataset_mode celeba --num_classes 19 --no_instance False" ;;
    esac
}
RELEASED_ARCH="--attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 --learn_sigma True \
--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True \
--use_scale_shift_norm True --class_cond True --cond_diffuse True --cond_opt discrete_zero_classwise"
TOY_ARCH="--dataset_mode folder --image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 \
--attention_resolutions 16 --num_head_channels 16 --learn_sigma True --noise_schedule linear --diffusion_steps 1000 \
--resblock_updown True --use_scale_shift_norm True --class_cond True --no_instance False \
--cond_diffuse True --cond_opt discrete_zero_classwise"
