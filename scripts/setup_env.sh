#!/bin/sh
# Create or refresh ./.venv with scdm and its test extras at the versions of the lock file,
# constraints.txt (idempotent; reinstalls only when setup.py or constraints.txt changed). Used by
# test.sh, demo.sh and quickstart.sh; PYTHON picks the base interpreter (default python3).
# A new lock: sh scripts/refresh_lock.sh (tests the newest versions first).
set -eu
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.scdm-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q -c constraints.txt pip
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
    touch "$stamp"
fi
