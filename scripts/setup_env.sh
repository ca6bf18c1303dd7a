#!/bin/sh
# Create or refresh ./.venv with scdm and its test extras at the versions of the lock file,
# constraints.txt (idempotent; reinstalls only when setup.py or constraints.txt changed). Used by
# test.sh, demo.sh and quickstart.sh; PYTHON picks the base interpreter (default python3).
# A new lock: sh scripts/refresh_lock.sh (tests the newest versions first).
set -eu
. "$(dirname "$0")/common.sh"
at_root
if [ ! -x "$VENV_PYTHON" ]; then
    base_python -m venv .venv
fi
stamp=.venv/.scdm-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    "$VENV_PYTHON" -m pip install -q -c constraints.txt pip
    "$VENV_PYTHON" -m pip install -q -c constraints.txt -e '.[test]'
    touch "$stamp"
fi
