#!/bin/sh
# Create or refresh ./.venv with scdm and its test extras (idempotent; reinstalls only when setup.py
# changed). Sourced by test.sh and demo.sh; PYTHON picks the base interpreter (default python3).
set -eu
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.scdm-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
