#!/bin/sh
# The README's first command: set up .venv, then the quickstart on built-in toy data (CPU, no download):
# train SCDM and an SDM baseline, sample them on clean / DS / Edge / Random label maps, score them, and
# write results/quickstart/{grid.png,results.md,results.json}. Arguments go to `python -m quickstart`
# (--quick: a smaller smoke run, measured times in --help; --fresh: start over). Rerunning continues an
# interrupted run.
set -eu
. "$(dirname "$0")/common.sh"
at_root
setup_venv
exec "$VENV_PYTHON" -m quickstart "$@"
