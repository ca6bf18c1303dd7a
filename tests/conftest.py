"""Shared test setup: few threads (CI has 2 cores), deterministic seeds, the ../shared/compat path,
one fast-path tuning cache for the whole session (every process reuses the first timing), and the
CPU: tests marked `gpu` run only with `-m gpu` on a machine with CUDA; all others never see a GPU,
in this process or in the ones they start. Below them, the helpers the command-line tests share
(`run_command`, `write_toy`, `toy_train_argv`, `launch_argv`, `error_lines`), imported as `from conftest import ...`."""
import os
import sys
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from scdm.presets import PRESETS, as_argv

torch.set_num_threads(1)
# One tuning cache for the session; xdist's workers inherit the controller's (the cache takes a lock).
_OWN_TUNING_DIR = "SCDM_TEST_TUNING_DIR" not in os.environ
if _OWN_TUNING_DIR:
    os.environ["SCDM_TEST_TUNING_DIR"] = tempfile.mkdtemp(prefix="scdm-tests-tuning-")
os.environ["SCDM_TUNING_CACHE"] = os.path.join(os.environ["SCDM_TEST_TUNING_DIR"], "fast_paths.json")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; runs only with -m gpu (e.g. on a device machine)")
    if "gpu" not in (config.option.markexpr or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA


# The files that take longest, first: the test command gives each pytest worker a file at a time,
# and a long file started last would leave the other workers idle at the end (scheduling only).
LONGEST_FIRST = ("test_quickstart.py", "test_robustness.py", "test_run_faults.py", "test_train_sample.py",
                 "test_sample_bytes.py", "test_slurm.py", "test_docs.py", "test_ddp_gradients.py",
                 "test_prompt_exit.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    wanted = "gpu" in (config.option.markexpr or "")
    for item in items:
        if "gpu" in item.keywords and not (wanted and torch.cuda.is_available()):
            item.add_marker(pytest.mark.skip(reason="a gpu test: run with -m gpu on a machine with CUDA"))


def pytest_unconfigure(config):
    if _OWN_TUNING_DIR:
        shutil.rmtree(os.environ["SCDM_TEST_TUNING_DIR"], ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPAT = ROOT.parent / "shared" / "compat"


@pytest.fixture
def compat_dir():
    if not COMPAT.is_dir():
        pytest.skip("../shared/compat is not present")
    return COMPAT


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    from scdm.fast.fast_paths import route_details
    route_details()  # an in-process run's log sinks end with its test


TINY_FLAGS = dict(
    image_size=16, num_classes=4, num_channels=32, num_res_blocks=1, channel_mult="1,2",
    attention_resolutions="8", num_head_channels=16, learn_sigma=True, no_instance=False,
    resblock_updown=True, use_scale_shift_norm=True, diffusion_steps=100, noise_schedule="linear",
)


@pytest.fixture
def tiny_flags():
    """Flags of a tiny SPADE UNet (4 classes + edge channel, 16x16) for fast CPU tests."""
    return dict(TINY_FLAGS)


def random_label_map(b, num_classes, h, w, with_edge=True, generator=None):
    """A random one-hot label map (+ an edge channel) as the model takes it."""
    ids = torch.randint(0, num_classes, (b, h, w), generator=generator)
    onehot = torch.nn.functional.one_hot(ids, num_classes).permute(0, 3, 1, 2).float()
    if not with_edge:
        return onehot
    edge = (torch.rand(b, 1, h, w, generator=generator) < 0.2).float()
    return torch.cat([onehot, edge], dim=1)


def in_ci():
    """Whether the suite runs under CI (CI=true), where everything it tests must run, not skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def auto_precision_here():
    """What `--precision auto` must pick on this machine's CPU, read from /proc/cpuinfo independently of
    scdm: bf16 where the CPU has native bf16 instructions, else fp32."""
    with open("/proc/cpuinfo") as f:
        words = set(f.read().split())
    return "bf16" if {"avx512_bf16", "amx_bf16"} & words else "fp32"


def require_test_extra(module):
    """Imports a module of the test extras (setup.py): a skip on a partial local install, a failure
    under CI=true, where everything the suite tests must run."""
    if in_ci():
        return __import__("importlib").import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install -e .[test])")


SAFETY_LIMIT = 300  # seconds: only a hung process hits it; pass/fail never depends on speed


def wait_for(condition, proc=None, what="the readiness signal", limit=SAFETY_LIMIT):
    """Polls `condition()` until true. Fails (with the process's output) when `proc` ends first or
    the safety limit passes, so a signal is never sent to a process that is not ready yet."""
    import time
    deadline = time.monotonic() + limit
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"ended ({proc.returncode}) before {what}: {(out or '')[-1500:]}{(err or '')[-3000:]}")
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
            raise AssertionError(f"no {what} within {limit} s")
        time.sleep(0.05)


def run_in_process(module, argv, cwd=None):
    """`python -m module argv` inside this process (runpy, as `-m` does, without a new interpreter
    and torch import): the exit code and the printed lines as `subprocess.run` gives them."""
    import contextlib
    import io
    import runpy
    import warnings

    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    code, saved_argv = 0, sys.argv
    sys.argv = [module, *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd or os.getcwd()):
            try:
                with warnings.catch_warnings():
                    as_a_new_process_warns()
                    # an imported entry module is run afresh, as -m does
                    warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=sys.stderr)
    finally:
        sys.argv = saved_argv
    return subprocess.CompletedProcess(["python", "-m", module, *argv], code, out.getvalue(), err.getvalue())


def as_a_new_process_warns():
    """Inside `warnings.catch_warnings()`: Python's default warning filters, warnings printed on (the
    redirected) sys.stderr instead of collected by pytest, and the once-per-process warnings armed again."""
    import warnings

    from scdm.fast import performance

    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
        warnings.formatwarning(message, category, filename, lineno, line))
    performance.reset_warnings()


IN_PROCESS_MODULES = ("scdm.image_train", "scdm.image_sample", "scdm.toy", "scdm.class_schedule",
                      "scdm.plot_progress", "scdm.presets", "scdm.classes", "scdm.generate", "evaluations.miou")


def in_process_if_cli(args, cwd=None, **subprocess_options):
    """For a test's `run` helper: `[python, "-m", module, ...]` of one of our CLIs that needs nothing
    of a real process (no launcher, resource limits or other environment) runs in this process,
    which saves the interpreter and torch start of a subprocess. Returns None otherwise."""
    args = [str(a) for a in args]
    if subprocess_options or len(args) < 3 or args[0] != sys.executable or args[1] != "-m" \
            or args[2] not in IN_PROCESS_MODULES:
        return None
    return run_in_process(args[2], args[3:], cwd=cwd)


def run_command(args, env, cwd=ROOT, check=True, timeout=240, in_process=True, **subprocess_options):
    """A test's command line: one of our CLIs in this process where `in_process_if_cli` allows it (and
    `in_process`, the caller's own condition, does), anything else as a subprocess in `cwd` with `env`,
    its output captured as text. `check`: a non-zero exit fails with the end of both outputs."""
    p = in_process_if_cli(args, **subprocess_options) if in_process else None
    if p is None:
        p = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                           **subprocess_options)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def error_lines(stderr):
    """The `error:` lines (a progress bar redraws its line with carriage returns)."""
    lines = [part.strip() for line in stderr.splitlines() for part in line.split("\r")]
    return [line for line in lines if line.startswith("error:")]


# The toy architecture with uniform label diffusion: no class-schedule file needed.
TOY_ARCH = as_argv(dict(PRESETS["toy"].model, cond_opt="discrete_zero_uniform"))


def write_toy(out, num_train, num_test, size=32):
    """The toy dataset in `out` as `python -m scdm.toy` writes it (run in this process); returns `out`."""
    run_command([sys.executable, "-m", "scdm.toy", "--out_dir", out, "--num_train", num_train, "--num_test", num_test,
                 "--size", size], env=None)
    return out


def toy_train_argv(data, log_dir, *extra, arch=TOY_ARCH, workers=0):
    """`-m scdm.image_train` on `data` into `log_dir`: a batch of 2 per process, `workers` loader
    workers, a progress line per step, then `extra`."""
    return ["-m", "scdm.image_train", *arch, "--data_dir", data, "--log_dir", log_dir, "--batch_size", 2,
            "--num_workers", workers, "--log_interval", 1, *extra]


def launch_argv(launcher):
    """The start of a two-process command line under `launcher` ("mpiexec", "torchrun"; else one
    process): what comes before `-m module` or a script."""
    if launcher == "mpiexec":
        require_test_extra("mpi4py")
        return [shutil.which("mpiexec", path=str(BIN)) or "mpiexec", "-n", "2", sys.executable]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    return [sys.executable]
