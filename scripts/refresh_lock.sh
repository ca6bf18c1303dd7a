#!/bin/sh
# Refresh constraints.txt (the lock file): install the newest versions that setup.py allows into a
# scratch environment, run the whole test suite there, and only when it passes write its exact
# versions to constraints.txt. Usage: sh scripts/refresh_lock.sh [pytest args]; then review and commit
# the diff. PYTHON picks the base interpreter (default python3); the scratch venv is .venv-lock/.
set -eu
. "$(dirname "$0")/common.sh"
at_root
rm -rf .venv-lock
base_python -m venv .venv-lock
.venv-lock/bin/python -m pip install -q --upgrade pip
.venv-lock/bin/python -m pip install -q -e '.[test]'
echo "testing the newest versions (.venv-lock) ..." >&2
.venv-lock/bin/python -m pytest -q "$@"
{
    echo "# The lock file: the exact versions the test suite last passed with (pip constraints format)."
    echo "# scripts/setup_env.sh installs with it; refresh with: sh scripts/refresh_lock.sh"
    echo "# Made with $(.venv-lock/bin/python -V) on $(uname -sm)."
    .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -v -i -E '^(setuptools|wheel)=='
} > constraints.txt.new
mv constraints.txt.new constraints.txt
rm -rf .venv-lock
echo "wrote constraints.txt; review it (git diff constraints.txt) and commit" >&2
