# The header every script in scripts/ shares: source it with `. "$(dirname "$0")/common.sh"` after `set -eu`.
# Sourcing it only sets ROOT, VENV_PYTHON and PRESET_NAMES and defines the functions below; each script calls
# the ones it needs, so that PYTHON keeps the meaning its own header gives it.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# The repository's virtual environment, made and refreshed by setup_venv (scripts/setup_env.sh).
VENV_PYTHON="$ROOT/.venv/bin/python"
PRESET_NAMES="ade20k coco celeba cityscapes toy"

at_root() {  # the scripts that work on the checkout itself (its venv, lock file, tests) run from its root
    cd "$ROOT"
}

base_python() {  # base_python ARGS...: the interpreter that makes a new venv (PYTHON, default python3)
    "${PYTHON:-python3}" "$@"
}

setup_venv() {  # create or refresh the repository's .venv from the lock file (idempotent)
    sh "$ROOT/scripts/setup_env.sh"
}

# ----- train.sh and sample.sh: run the tools in the caller's folder, so relative DATA_DIR, LOG_DIR, MODEL,
# ... paths mean what they say.
# PYTHON: interpreter (default: the repository's .venv/bin/python when present, else python).
# NUM_GPUS: processes to launch (default: visible GPUs, or 1). More than one uses mpiexec,
# or torchrun when LAUNCHER=torchrun. LAUNCHER=srun (inside a Slurm job): srun starts the job's tasks.
run_env() {  # sets PYTHON and NUM_GPUS as above and puts the repository on PYTHONPATH
    if [ -z "${PYTHON:-}" ]; then
        if [ -x "$VENV_PYTHON" ]; then PYTHON="$VENV_PYTHON"; else PYTHON=python; fi
    fi
    if [ -z "${NUM_GPUS:-}" ]; then
        NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        [ "${NUM_GPUS:-0}" -ge 1 ] 2>/dev/null || NUM_GPUS=1
    fi
    case "$NUM_GPUS" in
        ''|*[!0-9]*|0) echo "error: NUM_GPUS=$NUM_GPUS: expected a whole number of processes >= 1" >&2; exit 2 ;;
    esac
    # The package is importable from any folder, also without an install.
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

preset_flags() {  # preset_flags PRESET STAGE [--get FLAG]: flags from scdm/presets.py (the one table)
    "$PYTHON" -m scdm.presets "$@"
}

flag_value() {  # flag_value NAME DEFAULT ARGS...: the last --NAME V or --NAME=V in ARGS (as argparse takes it), else DEFAULT
    name=$1; value=$2; shift 2
    prev=""
    for word in "$@"; do
        [ "$prev" = "--$name" ] && value=$word
        case "$word" in --"$name"=*) value=${word#*=} ;; esac
        prev=$word
    done
    printf '%s\n' "$value"
}

unknown_word() {  # unknown_word WHAT WORD CHOICES: the error for a word that is neither a choice nor a --flag
    echo "error: unknown $1 '$2'; choose one of: $3 (or give no $1 and only --flags)" >&2; usage >&2; exit 2
}

launch() {  # launch MODULE ARGS...: one process, NUM_GPUS under mpiexec / torchrun, or the job's srun tasks
    module=$1; shift
    if [ "${LAUNCHER:-}" = srun ]; then
        set -- "${SRUN:-srun}" --kill-on-bad-exit=1 "$PYTHON" -m "$module" "$@"
    elif [ "$NUM_GPUS" -gt 1 ]; then
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
    exec "$@"
}
