"""Stopping a run on request: SIGTERM / SIGUSR1 (schedulers, `timeout`, systemd) and Ctrl-C.

Schedulers signal the whole process group, data-loader workers included. A worker that dies of
the signal makes the loader raise before the main process can save, so workers ignore the stop
signals (`ignore_in_worker`, a DataLoader `worker_init_fn`) and leave when the main process shuts
the loader down. The main process turns the first signal into a request (`StopRequest`) that the
training loop honours at the end of its step; a second Ctrl-C stops at once without saving.

Workers that ignore SIGTERM must still never outlive the main process. When it exits while a
loader is alive (an error, a stop, the end of `main`), torch leaves the workers to
multiprocessing's exit hook, which would send them SIGTERM and wait forever; `worker_options`
registers `reap_workers` to run first and kill them. A main process killed outright leaves them to
torch's own watch on their parent, which ends them within about five seconds.
"""
import atexit
import multiprocessing
import multiprocessing.util  # its exit hook must be registered before ours (atexit runs last-in first)
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_in_worker(_worker_id=None):
    """DataLoader `worker_init_fn`: the main process decides how the run stops, and a worker whose
    main process stopped while fetching a batch's shared memory says nothing about it."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    sys.excepthook = quiet_when_the_reader_left(sys.excepthook)


def quiet_when_the_reader_left(hook):
    """`sys.excepthook` that drops the connection errors of multiprocessing's resource sharer (the
    thread that hands a batch's file descriptors to the main process): they mean the main process
    is gone, which its own exit already reports."""
    def excepthook(kind, value, tb):
        frames, step = [], tb
        while step is not None:
            frames.append(step.tb_frame.f_code.co_filename)
            step = step.tb_next
        if issubclass(kind, (ConnectionError, EOFError)) and any(f.endswith("resource_sharer.py") for f in frames):
            return
        hook(kind, value, tb)
    return excepthook


def reap_workers(timeout=5.0):
    """Kill the daemonic child processes (loader and pool workers) and wait for them. Only for a
    main process on its way out: nothing a worker holds is worth saving then."""
    children = [p for p in multiprocessing.active_children() if p.daemon]
    if not children:
        return
    if threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler would report each killed worker as a crash of the loader.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in children:
        p.kill()
    for p in children:
        p.join(timeout)


_reaper_registered = False


def worker_options(num_workers):
    """DataLoader keyword arguments for `num_workers` processes that survive a stop signal sent to
    the whole process group and still end with the main process, however it ends."""
    global _reaper_registered
    if num_workers > 0 and not _reaper_registered:
        atexit.register(reap_workers)
        _reaper_registered = True
    return dict(num_workers=num_workers, worker_init_fn=ignore_in_worker if num_workers > 0 else None)


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


class deferred:
    """Holds the stop signals back while a short step that must not be cut in two runs (moving a
    finished tree into place file by file): a signal that arrives meanwhile is recorded, and raised
    again when the step ends, so the folder holds the old files or the new ones, never a mix. (Python
    handlers, not the thread's signal mask: a process-directed signal would reach another thread.)
    Main thread only; elsewhere it does nothing."""

    def __enter__(self):
        self.pending = []
        self.handlers = {}
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                old = signal.getsignal(s)
                # None: a handler set outside Python, which cannot be put back; SIG_IGN: nothing to hold back
                if old is not None and old != signal.SIG_IGN:
                    self.handlers[s] = old
                    signal.signal(s, lambda signum, frame: self.pending.append(signum))
        return self

    def __exit__(self, *exc):
        for s, old in self.handlers.items():
            signal.signal(s, old)
        if self.pending:
            signal.raise_signal(self.pending[0])
        return False
