"""Quickstart and miniature robustness benchmark: SCDM vs SDM on noisy toy label maps, on CPU.

    python -m quickstart                  # default budget (measured times: docs/quickstart.md)
    python -m quickstart --quick          # smoke run (its times: --help), in results/quickstart-quick
    python -m quickstart --fresh          # wipe the results folder first

An experiment driver, kept out of the `scdm` library: it runs the project's entry points one after
another (`stages`; `quickstart.stages.run(cfg)` is the whole run as a function), scores the samples
and writes `<out_dir>/{grid.png,results.md,results.json}` (`report`). Reruns reuse the folder:
finished stages are skipped, training resumes from its last checkpoint, sampling skips finished
images. Ctrl-C (or SIGTERM) asks a running training to save a checkpoint before stopping. A folder
that is not a quickstart folder is never touched.
"""
from .config import QuickstartError, build_parser, resolve_config  # noqa: F401  (light: no torch for --help)
