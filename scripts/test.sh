#!/bin/sh
# The test command (README, .ci/run): create or refresh ./.venv, install scdm with its test extras,
# run pytest. Extra arguments go to pytest, e.g. `sh scripts/test.sh -k unet`.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# Reinstall only when setup.py changed since the last successful install.
stamp=.venv/.scdm-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
exec .venv/bin/python -m pytest -q "$@"
