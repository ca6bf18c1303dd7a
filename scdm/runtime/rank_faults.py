"""One rank's fatal error stops every rank within seconds, under every launcher.

Without this, a rank that stops on a bad file leaves its peers waiting in the next collective
(a gradient all-reduce, a barrier) until the process group's timeout, 30 minutes by default. Every
rank runs a small watchdog thread that polls the process group's key-value store; a failing rank
writes its message there before it exits, and its peers exit at once. Rank 0 says which rank
failed; the failing rank prints the error itself. A peer that vanishes (SIGKILL, a crash) shows as
a store that no longer answers (rank 0 hosts it) or as a failed collective (`lost_peer_message`).
"""
import contextlib
import os
import sys
import threading
import time
import traceback

import torch.distributed as dist

from .errors import EXIT_USER_ERROR, UserError, print_error
from .fileio import write_json
from .stop_signals import reap_workers

FAULT_KEY = "scdm/fault"
POLL_SECONDS = 0.5
# Store errors in a row before a peer counts as lost (rank 0 may be finishing normally).
STORE_FAILURES_TO_STOP = 6

_watchdog = None


def _store():
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return get() if get is not None else None
    except (RuntimeError, ValueError):
        return None


def _exit_now(code, message=None):
    if message:
        print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    reap_workers()  # os._exit skips the exit hooks that would otherwise end them
    os._exit(code)


class _Watchdog(threading.Thread):
    def __init__(self, store, rank):
        super().__init__(name="scdm-rank-faults", daemon=True)
        self.store, self.rank = store, rank
        self.stopped = threading.Event()
        self.reported = False  # this rank reported the fault itself: it exits on its own

    def run(self):
        failures = 0
        while not self.stopped.wait(POLL_SECONDS):
            try:
                found = self.store.check([FAULT_KEY])
                failures = 0
            except Exception:  # noqa: BLE001 (any store error means the store is gone)
                failures += 1
                if failures >= STORE_FAILURES_TO_STOP and not self.stopped.is_set():
                    _exit_now(EXIT_USER_ERROR, f"error: rank {self.rank} lost contact with rank 0 (it stopped or "
                                               "died); stopping this rank too")
                continue
            if found and not self.reported and not self.stopped.is_set():
                who = self.store.get(FAULT_KEY).decode(errors="replace")
                _exit_now(EXIT_USER_ERROR,
                          f"error: stopping all ranks: {who} failed (see its error)" if self.rank == 0 else None)


def _tell_torchrun(exc, code, message=None):
    """torchrun prints a summary of failed ranks after ours; an error file makes its root cause our
    message instead of "<N/A>" (the format of torch.distributed.elastic's error handler)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    stamp = int(time.time())
    if message:  # stopped by another rank's fault: one second later, so torchrun names that one the root cause
        line, stamp = message, stamp + 1
    else:
        line = f"{type(exc).__name__}: {exc}" if code != 1 else "".join(traceback.format_exception(exc))
    try:
        write_json({"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(stamp)}}},
                   path)
    except (OSError, UserError):
        pass


def report(exc):
    """Tell the other ranks that this one is stopping on `exc` (best effort, never raises)."""
    store = _store()
    if store is None:
        return
    if _watchdog is not None:
        _watchdog.reported = True
    try:  # the first rank to fail is the one named
        store.compare_set(FAULT_KEY, "", f"rank {dist.get_rank()} ({type(exc).__name__})")
    except Exception:  # noqa: BLE001 (the store may already be gone; peers then see that instead)
        pass


# What gloo and the TCP store say when the other end of a connection went away.
LOST_PEER_WORDS = ("Connection closed by peer", "Connection reset", "Broken pipe", "Read error", "recvBytes",
                   "Socket Timeout", "timed out", "Connection refused")


def lost_peer_message(exc):
    """One line for a collective that failed because a peer process went away, else None. The
    failure arrives as DistBackendError or as the plain RuntimeError that DDP's bucket rebuild
    raises; when the peer reported its own error first, the line names it."""
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    if not any(s in text for s in LOST_PEER_WORDS):
        return None
    who = _reported_fault()
    if who:
        return f"stopping all ranks: {who} failed (see its error)"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"rank {dist.get_rank()}: another rank stopped or died during a collective operation ({first[:200]})"


def _reported_fault():
    """The rank that reported a fault to the store, if one did and the store still answers."""
    store = _store()
    try:
        if store is not None and store.check([FAULT_KEY]):
            return store.get(FAULT_KEY).decode(errors="replace")
    except Exception:  # noqa: BLE001 (the store may be gone with the rank that hosted it)
        pass
    return None


@contextlib.contextmanager
def watched():
    """Run the body with the watchdog on (multi-rank runs only). An exception in the body is
    reported to the other ranks before it propagates; a normal end stops the watchdog and waits
    for every rank, so that no rank mistakes another's normal shutdown for a fault."""
    global _watchdog
    store = _store()
    if store is None:
        yield
        return
    _watchdog = _Watchdog(store, dist.get_rank())
    _watchdog.start()
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:
        # Said here and at once: a launcher may kill this process as soon as a peer exits.
        message = lost_peer_message(e)
        code = EXIT_USER_ERROR if message else print_error(e, where=f"rank {dist.get_rank()}")
        if not message:  # a lost peer is not a fault of this rank's own to report
            report(e)
        _tell_torchrun(e, code, message)
        _exit_now(code, f"error: {message}" if message else None)
    else:
        _watchdog.stopped.set()
        _watchdog.join()
        dist.barrier()
    finally:
        _watchdog.stopped.set()
        _watchdog = None
