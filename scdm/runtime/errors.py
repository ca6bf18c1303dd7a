"""One convention for mistakes a user can fix, in every command-line tool of the project.

A bad path, flag, label id or checkpoint ends in one line, `error: <what and where>`, on stderr
and exit code 2, never a traceback. Ctrl-C ends with exit code 130. Each area raises its own
subclass of `UserError` (datasets, checkpoints, evaluations, image_process, the quickstart), so
callers can catch one family; ValueError, FileNotFoundError and PermissionError raised by
argument checks count as user errors too.
"""
import contextlib
import os
import signal
import sys
import threading
import traceback
import warnings

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C: `finally` blocks and `except
    KeyboardInterrupt` cleanups run (temporary files, worker pools, half-built trees)."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()


class UserError(ValueError):
    """Something the user can fix; the message names the file or flag and what was expected."""


USER_ERRORS = (UserError, ValueError, FileNotFoundError, PermissionError)


def print_error(exc, where=""):
    """Report `exc` the way every tool does and return the exit code it calls for: one line for a
    user error (2) or Ctrl-C (130), the traceback for anything else (1). `where` names the process
    when there are several (e.g. "rank 1")."""
    if where:  # another process's progress bar may hold the current line
        print(file=sys.stderr, flush=True)
    where = f"{where}: " if where else ""
    if isinstance(exc, Terminated):
        print(f"{where}stopped by SIGTERM", file=sys.stderr, flush=True)
        return 128 + int(exc.signum)
    if isinstance(exc, KeyboardInterrupt):
        print(f"{where}interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if isinstance(exc, USER_ERRORS):
        print(f"error: {where}{exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    if where:
        print(f"{where[:-2]} failed:", file=sys.stderr, flush=True)
    traceback.print_exception(exc)
    sys.stderr.flush()
    return 1


@contextlib.contextmanager
def warnings_as_lines(prefix="warning"):
    """Python warnings raised in the block, each printed as one `warning: ...` line on stderr when
    it ends (not Python's file:line form with the source line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            seen = set()
            for w in caught:
                text = str(w.message)
                if text not in seen:
                    seen.add(text)
                    print(f"{prefix}: {text}", file=sys.stderr, flush=True)


def run_cli(main, argv=None, extra_errors=()):
    """Run `main(argv)` and return its result; a user error prints `error: ...` and exits 2.

    `extra_errors`: exception types that are user errors for this tool only. An integer that
    `main` returns becomes the exit code (as `sys.exit` would do with it). While `main` runs,
    SIGTERM raises `Terminated` (exit 143) unless `main` installs its own handler."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        result = main(argv)
    except USER_ERRORS + tuple(extra_errors) as e:
        sys.exit(print_error(e))
    except KeyboardInterrupt as e:
        sys.exit(print_error(e))
    except BrokenPipeError:  # `... | head` closed the pipe: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, old)
    if isinstance(result, int) and not isinstance(result, bool) and result:
        sys.exit(result)
    return result
