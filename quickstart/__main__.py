"""`python -m quickstart`: parse the flags, run the pipeline, turn problems into one line and an exit code."""
import sys

from scdm.runtime.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, Terminated, UserError, run_cli

from .config import build_parser, resolve_config


def main(argv=None):
    """Returns the exit code: 0, 2 (a user error, one `error: ...` line), 130 (Ctrl-C) or 143 (SIGTERM)."""
    args = build_parser().parse_args(argv)
    from .stages import run  # after parsing: --help and flag errors need no torch
    # SIGTERM (a cluster's or a container's stop) takes the Ctrl-C path, raised as `Terminated` by
    # run_cli's handler: the child saves, then we stop.
    try:
        run(resolve_config(args), fresh=args.fresh)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        print("\n[quickstart] interrupted; rerun the same command to continue (finished stages, checkpoints and "
              "samples are kept)", file=sys.stderr, flush=True)
        return 128 + int(e.signum) if isinstance(e, Terminated) else EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    run_cli(main)
