#!/bin/sh
# The test command (README, .ci/run): create or refresh ./.venv, install scdm with its test extras,
# run pytest. Extra arguments go to pytest, e.g. `sh scripts/test.sh -k unet`.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
