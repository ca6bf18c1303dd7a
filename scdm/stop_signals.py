"""Stopping a run on request: SIGTERM / SIGUSR1 (schedulers, `timeout`, systemd) and Ctrl-C.

Schedulers signal the whole process group, data-loader workers included. A worker that dies of
the signal makes the loader raise before the main process can save, so workers ignore the stop
signals (`ignore_in_worker`, a DataLoader `worker_init_fn`) and leave when the main process shuts
the loader down (or dies: torch's workers watch their parent). The main process turns the first
signal into a request (`StopRequest`) that the training loop honours at the end of its step; a
second Ctrl-C stops at once without saving.
"""
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_in_worker(_worker_id=None):
    """DataLoader `worker_init_fn`: the main process decides how the run stops."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def exit_code(signum):
    """The shell's convention for "stopped by this signal" (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(signum)


class StopRequest:
    """While active, the stop signals set `signum` instead of killing the process.

    A second SIGINT raises KeyboardInterrupt (stop now, nothing saved); the handlers that were
    installed before are restored on exit."""

    def __init__(self, announce=None):
        """`announce(message)` reports the request (default: a line on stderr)."""
        self.signum = None
        self._announce = announce or (lambda message: print(message, file=sys.stderr, flush=True))
        self._old = {}

    @property
    def requested(self):
        return self.signum is not None

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            hint = " (Ctrl-C again to stop at once without saving)" if signum == signal.SIGINT else ""
            message = (f"received {signal.Signals(signum).name}: saving a checkpoint at the end of this step, "
                       f"then stopping{hint}")
            self._announce(message)

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False
