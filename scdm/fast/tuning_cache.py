"""The autotuner's choices, kept per machine so every process on it runs the same kernels.

A fresh model times its "auto" fast paths on first use (`scdm.fast.fast_paths.Autotuner`). Timings are
noisy, so two processes could pick different exact alternatives, which round differently: the
same seed would then give files that differ in the last bit. The first process to time a choice
writes it here; every later one (the other ranks, a resumed job, a rerun with another batch size)
reads it instead of timing. Entries are keyed by the machine (CPU model and flags with the torch
thread count, or the GPU), the torch version and the choice's own key (device, dtype, shapes).

The file is $SCDM_TUNING_CACHE, else $XDG_CACHE_HOME/scdm/fast_paths.json (~/.cache/scdm/...);
SCDM_TUNING_CACHE=off turns it off. A missing, unreadable or corrupt file is never an error: the
tuner times as before and says so once at DEBUG level. Processes that miss together take a lock
around the timing, so the second reads the first one's choice.
"""
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import torch

from ..runtime.fileio import WriteError, atomic_write

ENV = "SCDM_TUNING_CACHE"
FORMAT = 1
_log = logging.getLogger("scdm.fast.tuning_cache")


def default_path():
    """Where the cache lives (None: turned off)."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "scdm" / "fast_paths.json"


def machine_key(device=None):
    """What a choice depends on besides its own key: the device's hardware, torch, and CPU threads."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        hardware = f"{torch.cuda.get_device_name(index)} sm{major}{minor}"
    else:
        hardware = f"{_cpu()} threads {torch.get_num_threads()}"
    return f"torch {torch.__version__} | {device.type} | {hardware}"


@functools.lru_cache(maxsize=None)
def _cpu():
    from .performance import cpu_flags, cpu_model
    flags = " ".join(sorted(cpu_flags() or ()))
    return f"{cpu_model()} flags {hashlib.sha1(flags.encode()).hexdigest()[:10]}"


class TuningCache:
    """Choices by (machine key, choice key) in one JSON file, shared by the processes of a machine."""

    def __init__(self, path):
        self.path = Path(path)
        self._depth = 0          # nested `exclusive` blocks of this process (a choice times inner ones)
        self._lock_file = None
        self._mutex = threading.RLock()
        self._broken = False     # said once that the file cannot be used

    def _read(self):
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self._say_once(f"tuning cache {self.path} unreadable ({exc}); timing afresh")
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("machines"), dict):
            return {}
        return data["machines"]

    def _say_once(self, message):
        if not self._broken:
            self._broken = True
            _log.debug(message)

    def get(self, machine, key):
        entry = self._read().get(machine, {}).get(key)
        return entry.get("choice") if isinstance(entry, dict) else None

    def put(self, machine, key, choice, timings_ms):
        """Adds one choice (read, merge, atomic replace; under the lock when it can be taken)."""
        with self.exclusive():
            machines = self._read()
            machines.setdefault(machine, {})[key] = {"choice": choice, "ms": timings_ms}
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self.path, json.dumps({"format": FORMAT, "machines": machines}, indent=1, sort_keys=True))
            except (OSError, WriteError) as exc:  # a read-only cache only costs the timings again
                self._say_once(f"tuning cache {self.path} not written ({exc})")

    @contextlib.contextmanager
    def exclusive(self):
        """Holds the machine-wide lock (re-entrant within a process); without one, runs unlocked."""
        with self._mutex:
            if self._depth == 0:
                self._lock_file = self._take_lock()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_file is not None:
                    self._lock_file.close()  # closing releases the flock
                    self._lock_file = None

    def _take_lock(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path.with_name(self.path.name + ".lock"), "a")
        except OSError as exc:
            self._say_once(f"tuning cache {self.path}: no lock ({exc})")
            return None
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as exc:  # file systems without flock
            self._say_once(f"tuning cache {self.path}: no lock ({exc})")
        return f


_caches = {}


def default_cache():
    """The process's cache for `default_path()` (None when turned off)."""
    path = default_path()
    if path is None:
        return None
    if path not in _caches:
        _caches[path] = TuningCache(path)
    return _caches[path]


RECORD = "fast_paths.json"  # in a results or run folder: the choices its processes ran with


def reuse_record(folder, tuner, device=None):
    """Gives `tuner` the choices recorded in `folder` by an earlier run on this machine (a resumed
    job then runs the same kernels even when the machine's cache is gone). Returns how many."""
    try:
        data = json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return 0
    if (not isinstance(data, dict) or data.get("machine") != machine_key(device)
            or not isinstance(data.get("choices"), dict)):
        return 0
    tuner.reuse(data["choices"])
    return len(data["choices"])


def write_record(folder, tuner, device=None):
    """Records the tuner's choices (with the earlier ones) in `folder`/fast_paths.json."""
    path = Path(folder) / RECORD
    choices = dict(tuner.recorded)
    choices.update(tuner.record())
    if not choices:
        return
    atomic_write(path, json.dumps({"machine": machine_key(device), "choices": choices}, indent=1, sort_keys=True))
