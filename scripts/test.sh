#!/bin/sh
# The test command (README, .ci/run): create or refresh ./.venv, install scdm with its test extras,
# lint (ruff, ruff.toml), run pytest. Extra arguments go to pytest, e.g. `sh scripts/test.sh -k unet`.
set -eu
. "$(dirname "$0")/common.sh"
at_root
setup_venv
"$VENV_PYTHON" -m ruff check --quiet .
# One pytest worker per usable core (at most 4; SCDM_TEST_WORKERS overrides, 0: in this process),
# a test file per worker so that its fixtures are built once.
workers=${SCDM_TEST_WORKERS:-$("$VENV_PYTHON" -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}
exec "$VENV_PYTHON" -m pytest -q -n "$workers" --dist loadfile "$@"
