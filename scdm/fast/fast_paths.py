"""Switches for the UNet's exact fast paths, held by each model instance.

Every switch keeps the released computation up to floating-point rounding; with all of them off
the model runs the plain (released) computation. The config is frozen and owned by the model, so
two models in one process can differ and nothing changes behind a caller's back; `override`
changes it for a block (debugging, tests, the benchmarks' plain path).

A switch whose benefit depends on the device, dtype or shapes (the gather-sum, unique patches with
their host sync, channels_last) defaults to "auto": the model times the alternatives once per
(device, dtype, shape) on first use, keeps the fastest (`Autotuner`, like cudnn.benchmark) and logs
the choice once. True or False forces it either way. The other switches only remove work.
"""
import contextlib
import dataclasses
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Union

import torch

AUTO = "auto"
Switch = Union[bool, str]  # True, False or AUTO

# Unique-patch evaluation is used only when it saves work: distinct patches / pixels at most this
# (nearer 1 the per-patch path costs more than the per-pixel gather; measured in docs/performance.md).
UNIQUE_PATCH_MAX_RATIO = 0.75


@dataclass(frozen=True)
class FastPaths:
    sdpa_attention: Switch = AUTO        # F.scaled_dot_product_attention instead of einsum + softmax
    spade_gather: Switch = AUTO          # one-hot label maps: mlp_shared as a table gather, not a dense conv
    spade_unique_patches: Switch = AUTO  # gamma/beta once per distinct 3x3 label patch, then gathered
    fused_gamma_beta: Switch = True      # mlp_gamma and mlp_beta as one conv (weights concatenated on the fly)
    null_label_cache: Switch = True      # all-zero map (guidance, dropped labels): closed form, cached under no_grad
    shared_encoder: Switch = True        # guidance: the label-free encoder runs once for both halves
    channels_last: Switch = AUTO         # NHWC activations in the torso
    fused_adamw: Switch = True           # training: AdamW's update as torch's fused kernel (scdm.training.train_util)

    def __post_init__(self):
        for name in self.names():
            value = getattr(self, name)
            if value is not True and value is not False and value != AUTO:
                raise ValueError(f"fast path {name}={value!r}: expected True, False or {AUTO!r}")

    @classmethod
    def names(cls):
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def all_on(cls):
        return cls()

    @classmethod
    def all_off(cls):
        return cls(**{name: False for name in cls.names()})

    def replace(self, **names):
        """A copy with the named switches changed (True, False or "auto"); unknown names raise ValueError."""
        unknown = sorted(set(names) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown fast paths {unknown}; known: {sorted(self.names())}")
        return dataclasses.replace(self, **{k: v if v == AUTO else bool(v) for k, v in names.items()})

    def for_compile(self):
        """The config torch.compile traces. The switches that decide in Python per label map (table
        gather, unique patches, the null-label cache; `fused_gamma_beta` prepares the same label object) or
        by timing (the automatic layouts) would break the graph at every call and time inside the trace, so
        they are off or fixed; what remains is the same computation for the compiler to fuse."""
        return self.replace(spade_gather=False, spade_unique_patches=False, fused_gamma_beta=False,
                            null_label_cache=False, sdpa_attention=bool(self.sdpa_attention),
                            channels_last=self.channels_last is True)

    @property
    def spade_enabled(self):
        """Whether the norms need the label map prepared as `fast_spade.SpadeLabels` (else the dense tensor)."""
        return self.spade_gather or self.fused_gamma_beta or self.null_label_cache

    def disabled(self):
        return [name for name in self.names() if not getattr(self, name)]

    def automatic(self):
        return [name for name in self.names() if getattr(self, name) == AUTO]


def from_disable_spec(spec: str) -> FastPaths:
    """The config for a `--disable_fast_paths` value: "" (all on), "all", or comma-separated names."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    if names == ["all"]:
        return FastPaths.all_off()
    unknown = sorted(set(names) - set(FastPaths.names()))
    if unknown:
        raise ValueError(f"--disable_fast_paths: unknown fast paths {unknown}; expected 'all' or a comma-separated "
                         f"list of {sorted(FastPaths.names())}")
    return FastPaths().replace(**{name: False for name in names})


_SETTINGS = {"on": True, "true": True, "off": False, "false": False, AUTO: AUTO}


def apply_settings(config: FastPaths, spec: str, flag="--fast_paths") -> FastPaths:
    """`config` with the switches of a "name=on|off|auto,..." spec changed (forces an automatic
    choice either way); ValueError naming `flag` on a bad spec."""
    changes = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or value.lower() not in _SETTINGS:
            raise ValueError(f"{flag}: {item.strip()!r} is not name=on, name=off or name=auto")
        if name not in FastPaths.names():
            raise ValueError(f"{flag}: unknown fast path {name!r}; expected one of {sorted(FastPaths.names())}")
        changes[name] = _SETTINGS[value.lower()]
    return config.replace(**changes)


_detail_sinks = []  # where the per-choice lines go (set by an entry point: its run log, stderr with --verbose)


def route_details(*sinks):
    """Send each choice's line to these callables from now on (none: only to `logging` at DEBUG).
    The console gets one `summary_line` per run instead."""
    _detail_sinks[:] = sinks


def _log_details(line):
    logging.getLogger("scdm.fast.fast_paths").debug(line)
    for sink in _detail_sinks:
        sink(line)


def summary_line(tuner):
    """One line for the console: how many choices were timed, in how long, and what won."""
    if not tuner.choices:
        return None
    won = {}
    for (name, *_), choice in tuner.choices.items():
        won.setdefault(name, Counter())[choice] += 1
    parts = "; ".join(f"{name} " + ", ".join(f"{c} {n}" for c, n in counts.most_common())
                      for name, counts in won.items())
    reused = f"; {len(tuner.reused)} reused from this machine's tuning cache" if tuner.reused else ""
    return f"fast paths: {len(tuner.choices)} choice(s) timed in {tuner.seconds:.1f} s{reused} ({parts})"


MACHINE_CACHE = "machine"  # Autotuner(cache=MACHINE_CACHE): the process's scdm.fast.tuning_cache.default_cache()


class Autotuner:
    """Chooses among exact alternatives by timing each on first use of a key and keeping the fastest.

    A key holds what the choice depends on (device, dtype, grad mode, shapes). Each candidate runs once
    to warm up (allocations, kernel selection), then `repeats` timed runs; the best counts. The choice
    is logged once per key. `clock` is injectable so tests can script the timings. Under torch.compile
    nothing is timed: the first candidate (the static default) is used."""

    def __init__(self, clock=time.perf_counter, repeats=1, log=_log_details, cache=None):
        self.clock, self.repeats, self.log = clock, repeats, log
        self.cache = cache  # a TuningCache, MACHINE_CACHE (the process's default, looked up at use) or None
        self.choices, self.timings = {}, {}
        self.reused = set()  # keys whose choice came from the machine's cache or a run's record
        self.recorded = {}  # {"name key": choice} taken over from an earlier process (`reuse`)
        self.seconds = 0.0  # wall time spent timing candidates
        self.current = None  # (name, candidate) being timed, for scripted clocks

    def _cache(self):
        if self.cache == MACHINE_CACHE:
            from .tuning_cache import default_cache
            return default_cache()
        return self.cache

    def record(self):
        """The choices made so far, as JSON-able {"name key": choice} (what a run folder keeps)."""
        return {format_key(full): choice for full, choice in self.choices.items()}

    def reuse(self, recorded):
        """Takes a `record()` of an earlier process as this tuner's choices (for keys not chosen yet)."""
        self.recorded.update({str(k): str(v) for k, v in dict(recorded).items()})

    def choose(self, name, key, candidates, device=None):
        """The chosen candidate name for `key`; `candidates` maps names to zero-argument callables."""
        names = list(candidates)
        if len(names) == 1:
            return names[0]
        full = (name, *key)
        hit = self.choices.get(full)
        if hit in candidates:
            return hit
        if torch.compiler.is_compiling():
            return names[0]
        text = format_key(full)
        hit = self.recorded.get(text)
        if hit in candidates:
            return self._reuse(full, hit, "this folder's record")
        cache = self._cache()
        if cache is None:
            return self._time(name, key, full, candidates, device)
        from .tuning_cache import machine_key
        machine = machine_key(device)
        with cache.exclusive():  # a process that misses at the same time waits, then reads this choice
            hit = cache.get(machine, text)
            if hit in candidates:
                return self._reuse(full, hit, "this machine's earlier choice")
            choice = self._time(name, key, full, candidates, device)
            cache.put(machine, text, choice, {c: round(v * 1e3, 3) for c, v in self.timings[full].items()})
        return choice

    def _reuse(self, full, choice, source):
        self.choices[full] = choice
        self.reused.add(full)
        self.log(f"fast paths: {format_key(full)}: using {choice} ({source})")
        return choice

    def _time(self, name, key, full, candidates, device):
        names = list(candidates)
        times, outer, began = {}, self.current, time.perf_counter()
        devices = [torch.device(device)] if device is not None and torch.device(device).type == "cuda" else []
        # Timing runs leave the random streams (dropout) alone, and keep their saved tensors out of an
        # enclosing gradient checkpoint (which must see the same tensors when it recomputes).
        with torch.random.fork_rng(devices=devices), torch.autograd.graph.saved_tensors_hooks(_same, _same):
            for cand, fn in candidates.items():
                self.current = (name, cand)
                fn()
                best = math.inf
                for _ in range(self.repeats):
                    _synchronize(device)
                    start = self.clock()
                    fn()
                    _synchronize(device)
                    best = min(best, self.clock() - start)
                times[cand] = best
        self.current = outer
        if outer is None:  # a nested choice's time is inside its outer one's
            self.seconds += time.perf_counter() - began
        choice = min(names, key=lambda c: times[c])
        self.choices[full], self.timings[full] = choice, times
        timed = ", ".join(f"{c} {times[c] * 1e3:.1f} ms" for c in sorted(names, key=lambda c: times[c]))
        self.log(f"fast paths: {name} {format_key(key)}: using {choice} ({timed})")
        return choice


def _same(tensor):
    return tensor


def format_key(key):
    return " ".join(str(part) for part in key)


def _synchronize(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn, params):
    """A zero-argument callable for the autotuner: runs `fn()` (a tensor or tuple of tensors) and,
    when gradients are on, its backward into `params` too (through autograd.grad, so .grad and
    gradient hooks (DDP) are untouched): a training step pays for both."""
    def run():
        outs = fn()
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        wanted = [p for p in params if p.requires_grad]
        if torch.is_grad_enabled() and wanted and any(o.requires_grad for o in outs):
            outs = [o for o in outs if o.requires_grad]
            torch.autograd.grad(outs, wanted, grad_outputs=[torch.ones_like(o) for o in outs], allow_unused=True)
    return run


def unwrap(model):
    """The model that owns the config, looking through DDP (`.module`) and torch.compile (`._orig_mod`)."""
    for _ in range(8):
        if isinstance(getattr(type(model), "fast_paths", None), property):
            return model
        inner = getattr(model, "_orig_mod", None)
        inner = getattr(model, "module", None) if inner is None else inner
        if inner is None:
            break
        model = inner
    raise TypeError(f"{type(model).__name__} has no fast-path config")


@contextlib.contextmanager
def override(model, enabled=True, **names):
    """Within the block: every switch `enabled` (None: as it is now), then the named ones.
    The previous config is restored afterwards, also when the block raises."""
    owner = unwrap(model)
    previous = owner.fast_paths
    base = previous if enabled is None else (FastPaths.all_on() if enabled else FastPaths.all_off())
    config = base.replace(**names)
    owner.fast_paths = config
    try:
        yield config
    finally:
        owner.fast_paths = previous
