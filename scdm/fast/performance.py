"""Speed knobs shared by the training and sampling entry points and the benchmarks.

The model's exact fast paths are not here: each model holds its own config (scdm.fast.fast_paths).

- `resolve_precision`: the precision the `--precision` / `--use_fp16` flags ask for; `auto_precision`:
  what `--precision auto` (sampling's default) picks for a device, and why.
- `precision_context`: autocast to bf16/fp16 where the device can do it; otherwise one clear warning
  and fp32, so asking for a precision never crashes a job. On a CPU "can do it" means native
  instructions (`cpu_half_support`: AVX512-BF16/AMX-BF16 for bf16, AVX512-FP16/AMX-FP16 for fp16):
  elsewhere autocast emulates the type and is slower than fp32.
- `maybe_compile`: torch.compile where it is available and works; otherwise one clear warning and the
  eager model.
- `describe_machine`: the facts a benchmark result needs next to it.
"""
import contextlib
import functools
import importlib.util
import os
import platform
import shutil
import warnings

import torch

PRECISIONS = ("fp32", "fp16", "bf16")
PRECISION_CHOICES = ("auto", *PRECISIONS)
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_warned = set()


def _warn_once(key, message):
    """Warn once per process and key: these are called every step and must not flood the log."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def reset_warnings():
    """Forget which warnings were issued, so that the next occurrence warns again (tests)."""
    _warned.clear()


# ----- precision ------------------------------------------------------------------------------
def resolve_precision(precision, use_fp16, device="cpu", training=False):
    """The precision to run. `precision` is the `--precision` value: one of PRECISIONS; "auto" (what fits
    `device`, see `auto_precision`); or empty, the released meaning of `--use_fp16` (fp16 when True, autocast
    on fp32 weights)."""
    if precision not in ("", *PRECISION_CHOICES):
        raise ValueError(f"--precision {precision!r}: expected one of {PRECISION_CHOICES}")
    if use_fp16 and precision not in ("", "auto", "fp16"):
        raise ValueError(f"--use_fp16 True contradicts --precision {precision}")
    if precision == "auto":
        return auto_precision(device, use_fp16, training)[0]
    return precision or ("fp16" if use_fp16 else "fp32")


def auto_precision(device, use_fp16, training=False):
    """(precision, why) of `--precision auto`: fp16 on a GPU for a `--use_fp16 True` model (the released
    sampling), bf16 on a CPU with native bf16 (`cpu_half_support`), fp32 elsewhere. Training on a CPU
    stays fp32 (a half-precision gradient there is the user's decision, not a default)."""
    device = torch.device(device)
    if device.type == "cuda":
        if use_fp16:
            return "fp16", "a GPU and a --use_fp16 True model (the released fp16)"
        return "fp32", "a GPU and a --use_fp16 False model"
    if device.type != "cpu":
        return "fp32", f"no half precision is chosen by itself on {device.type}"
    if training:
        return "fp32", "training on a CPU stays in fp32 unless --precision bf16 asks"
    native, reason = cpu_half_support("bf16")
    return ("bf16" if native else "fp32"), reason


def running_precision(device, precision):
    """What runs for `precision` on `device`: itself, or fp32 where the device cannot do it (one warning)."""
    return precision if autocast_dtype(device, precision) is not None else "fp32"


def precision_note(requested, precision, device, use_fp16=False, training=False):
    """The log line that says what precision runs, and why when `--precision auto` chose it."""
    line = f"precision {running_precision(device, precision)}"
    if requested == "auto":
        line += f" (--precision auto: {auto_precision(device, use_fp16, training)[1]})"
    return line


def autocast_dtype(device, precision):
    """The dtype autocast will use for `precision` on `device`, or None for fp32. Warns once (and
    returns None) when the device cannot do the requested precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "fp32":
        return None
    device = torch.device(device)
    dtype = _AUTOCAST_DTYPES[precision]
    reason = _autocast_unsupported(device, dtype)
    if reason:
        _warn_once(("precision", device.type, precision),
                   f"precision {precision} is not available on {device.type} ({reason}); running in fp32")
        return None
    return dtype


# /proc/cpuinfo flags that make a half type native on x86 CPUs.
CPU_HALF_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo, or None where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_half_support(precision, flags=None):
    """(native, reason) for "bf16" / "fp16" on this CPU: native when its flags show the instructions
    (CPU_HALF_FLAGS) or, without /proc/cpuinfo, when oneDNN reports the type."""
    flags = cpu_flags() if flags is None else set(flags)
    wanted = CPU_HALF_FLAGS[precision]
    if flags is not None:
        found = sorted(set(wanted) & flags)
        if found:
            return True, f"this CPU has {', '.join(found)}"
        return False, (f"this CPU ({cpu_model()}) has no {' or '.join(wanted)}: {precision} would be emulated, "
                       "slower than fp32")
    check = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[precision]
    try:
        native = bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        native = False
    return native, f"oneDNN reports {precision} {'supported' if native else 'unsupported'} on this CPU"


def _autocast_unsupported(device, dtype):
    """Why autocast to `dtype` cannot run on `device`, or '' when it can."""
    if not torch.amp.is_autocast_available(device.type):
        return f"no autocast for device type {device.type!r}"
    if device.type == "cpu":
        native, reason = cpu_half_support("bf16" if dtype == torch.bfloat16 else "fp16")
        if not native:
            return reason
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if dtype == torch.bfloat16 and not _cuda_bf16_supported(device):
            return f"{torch.cuda.get_device_name(device)} has no native bfloat16 (needs compute capability 8.0+)"
    # Autocast itself rejects dtypes a backend does not support: it warns and disables itself.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = torch.autocast(device.type, dtype=dtype)
    if not getattr(ctx, "_enabled", True) or caught:
        return str(caught[0].message).splitlines()[0] if caught else "autocast disabled itself"
    return ""


def _cuda_bf16_supported(device):
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without the argument
        return torch.cuda.get_device_capability(device)[0] >= 8


def precision_context(device, precision, model=None):
    """Context manager running the enclosed forward passes in `precision` ("fp32", "fp16", "bf16")
    through torch.autocast; fp32 (a no-op) when the device cannot do it, with one warning.
    fp16 training also needs a gradient scaler; that is the training loop's job.

    `model` (sampling, under no_grad): on a CPU an fp32 model's torso holds half copies of its weights
    instead (`UNetModel.torso_held_in`), since autocast there casts every weight again at every call (the
    copies cost half the torso's fp32 weight memory); elsewhere, and for a compiled model, autocast."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    holder = _torso_holder(model, device)
    if holder is not None:
        return holder.torso_held_in(dtype)
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _torso_holder(model, device):
    """The UNet whose torso can hold half weights for sampling on `device`, or None (autocast then)."""
    if model is None or torch.device(device).type != "cpu" or torch.is_grad_enabled():
        return None
    inner = getattr(model, "module", model)  # DDP
    if getattr(inner, "_orig_mod", None) is not None or getattr(inner, "compiled_forward", False):
        return None
    if not hasattr(inner, "torso_held_in") or inner.dtype != torch.float32:
        return None
    return inner


# ----- torch.compile --------------------------------------------------------------------------
def compile_unavailable_reason(model):
    """Why torch.compile cannot be used for `model` here, or ''."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        import torch._dynamo as dynamo
        if not dynamo.is_dynamo_supported():
            return f"TorchDynamo does not support Python {platform.python_version()}"
    except Exception as e:  # noqa: BLE001 - any import problem means "not available"
        return f"TorchDynamo cannot be imported ({type(e).__name__}: {e})"
    param = next(iter(model.parameters()), None)
    device = param.device.type if param is not None else "cpu"
    if device == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c):
        return "no C++ compiler found (the CPU backend of torch.compile needs one; set CXX)"
    if device == "cuda" and importlib.util.find_spec("triton") is None:
        return "triton is not installed (the GPU backend of torch.compile needs it)"
    return ""


def maybe_compile(model, enabled=True, **compile_kwargs):
    """torch.compile the model's forward in place when `enabled`, available and working.

    Returns the same module (state-dict keys and attributes unchanged) whose forward is compiled; a
    model with fast paths traces `FastPaths.for_compile()` (the same computation in one graph). If
    torch.compile is unavailable, or compiling fails on the first call, a warning is issued and the
    eager forward is used from then on. Errors that the eager model raises too (bad inputs) propagate.
    """
    if not enabled:
        return model
    reason = compile_unavailable_reason(model)
    if reason:
        _warn_once(("compile", reason), f"torch.compile is not available: {reason}; running the eager model")
        return model
    eager_forward = model.forward
    eager_paths = getattr(model, "fast_paths", None)
    try:
        compiled_forward = torch.compile(eager_forward, **compile_kwargs)
    except Exception as e:  # noqa: BLE001
        _warn_once(("compile", "setup"), f"torch.compile failed ({type(e).__name__}: {e}); running the eager model")
        return model
    if eager_paths is not None:
        model.fast_paths = eager_paths.for_compile()  # one graph: no Python decisions inside the trace
    failed = False

    @functools.wraps(eager_forward)
    def forward(*args, **kwargs):
        nonlocal failed
        if failed:
            return eager_forward(*args, **kwargs)
        try:
            return compiled_forward(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if eager_paths is not None:
                model.fast_paths = eager_paths  # the eager model runs its own fast paths again
            out = eager_forward(*args, **kwargs)  # raises the eager error if the inputs are at fault
            failed = True
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            _warn_once(("compile", "run"), f"torch.compile failed ({type(e).__name__}: {first_line}); "
                                           "running the eager model")
            return out

    model.forward = forward
    model.compiled_forward = True  # precision_context autocasts it: swapping its weights would retrace
    return model


# ----- machine --------------------------------------------------------------------------------
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine():
    """Machine facts for benchmark JSON: platform, CPU, cores, torch and its threads, GPU if any."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_half_support("bf16")[0],
        "cpu_native_fp16": cpu_half_support("fp16")[0],
        "mkldnn": torch.backends.mkldnn.is_available(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2 ** 30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return info
