#!/bin/sh
# The README's first command: set up .venv, then the quickstart on built-in toy data (CPU, no download):
# train SCDM and an SDM baseline, sample them on clean / DS / Edge / Random label maps, score them, and
# write results/quickstart/{grid.png,results.md,results.json}. Arguments go to `python -m quickstart`
# (--quick: a smaller smoke run, measured times in --help; --fresh: start over). Rerunning continues an
# interrupted run.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup_env.sh
exec .venv/bin/python -m quickstart "$@"
