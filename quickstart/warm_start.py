"""Entry points started as forks of a process that has already imported torch and our packages.

Every stage of the quickstart and of the robustness study is its own process (a crash or a Ctrl-C stays
in it), and a fresh interpreter spends about 3 s of CPU importing torch before it does anything. A
multiprocessing fork server imports them once; each stage is then a fork of it, in its own session, that
runs `python -m module argv` (runpy, as `-m` does) with the stage's environment and exits with its code.
The server never runs a torch operation or touches CUDA, so its forks start as clean as a new
interpreter: no thread pool, no CUDA context, no module state.

`WarmProcess` answers like `subprocess.Popen` (pid, poll, wait, send_signal, kill), so the callers stop and
wait for either kind alike.
"""
import atexit
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings

# What each stage would otherwise import itself: torch and the entry points the stages run.
PRELOAD = ["torch", "scdm.toy", "scdm.class_schedule", "scdm.image_train", "scdm.image_sample",
           "image_process.downsample", "image_process.edge", "image_process.random", "image_process.painter"]

_context = None
_context_lock = threading.Lock()


def available():
    return "forkserver" in multiprocessing.get_all_start_methods()


def _fork_server():
    global _context
    with _context_lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            _context = context
        return _context


def start(module, argv, env, threads=None):
    """`python -m module argv` with `env`, forked from the preloaded server; a `WarmProcess`."""
    proc = _fork_server().Process(target=_run_module, args=(module, [str(a) for a in argv], dict(env), threads),
                                  name=module, daemon=False)
    proc.start()
    return WarmProcess(proc)


class WarmProcess:
    """The `subprocess.Popen` calls the stage runners use, for a forked entry point."""

    def __init__(self, proc):
        self._proc = proc
        self.pid = proc.pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            self.returncode = self._proc.exitcode
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        self._proc.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self._proc.name, timeout if deadline else None)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self):
        self.send_signal(signal.SIGKILL)


def _run_module(module, argv, env, threads):
    """In the fork: become what `python -m module argv` with `env` would be, run it, exit with its code."""
    os.setsid()  # like start_new_session: Ctrl-C in the terminal reaches the orchestrator only
    os.environ.clear()
    os.environ.update(env)
    if threads:
        import torch
        torch.set_num_threads(threads)  # OMP_NUM_THREADS was read when the server loaded torch
    sys.argv = [module, *argv]
    code = 0
    try:
        with warnings.catch_warnings():  # a preloaded entry module is run afresh as __main__, as -m does
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    # what an interpreter does at its end: wait for non-daemon threads, run the atexit functions, flush
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
