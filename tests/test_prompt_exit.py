"""Every run ends promptly, its worker processes with it: a bad file read by a DataLoader worker, a
stop signal to the main process only, the normal end. Each run carries a marker in its environment,
so that any process it left behind (a loader worker, a pool worker) is found in /proc afterwards."""
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TOY_ARCH, error_lines, write_toy
from tiny_run import make_tiny_run

SAFETY_LIMIT = 120  # seconds; a hang is what fails, not a slow machine


def marked_env():
    marker = uuid.uuid4().hex
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), SCDM_TEST_MARKER=marker)
    return env, marker


def marked_pids(marker):
    """Live processes (zombies excluded) whose environment holds this marker."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"SCDM_TEST_MARKER={marker}".encode() not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:
            continue
        pids.append(int(proc.name))
    return pids


def assert_all_gone(marker):
    deadline = time.monotonic() + 10  # a killed worker needs a moment to be reaped by the kernel
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = marked_pids(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


def run_marked(args, cwd):
    env, marker = marked_env()
    try:
        return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=SAFETY_LIMIT)
    finally:
        assert_all_gone(marker)


def assert_one_line(p, *words):
    assert p.returncode == 2, p.stderr[-3000:]
    errors = error_lines(p.stderr)
    assert len(errors) == 1 and all(w in errors[0] for w in words), p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("toy") / "toy", num_train=8, num_test=6)


@pytest.fixture(scope="module")
def broken(toy, tmp_path_factory):
    """The toy tree with a truncated training image, test label and test image."""
    import shutil
    out = Path(shutil.copytree(toy, tmp_path_factory.mktemp("broken") / "toy"))
    for rel in ("train/images/00005.png", "train/labels/00005.png", "test/labels/00003.png", "test/images/00003.png"):
        truncate(out / rel)
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"), image_size=32, num_classes=8, unlabeled_id=7)


# ----- a bad file read by a worker: one line, exit 2, nothing left -----------------------------------
def test_training(broken, tmp_path):
    p = run_marked(["-m", "scdm.image_train", *TOY_ARCH, "--data_dir", broken, "--log_dir", tmp_path / "log",
                    "--batch_size", 2, "--num_workers", 2, "--max_steps", 20], tmp_path)
    assert_one_line(p, "cannot read", "00005.png")


def test_sampling(broken, tiny_model, tmp_path):
    p = run_marked(["-m", "scdm.image_sample", "--model_path", tiny_model, "--data_dir", broken,
                    "--results_path", tmp_path / "out", "--timestep_respacing", "ddim2", "--batch_size", 1,
                    "--num_workers", 2], tmp_path)
    assert_one_line(p, "cannot read", "00003.png")


def test_class_schedule(broken, tmp_path):
    p = run_marked(["-m", "scdm.class_schedule", "--dataset_mode", "folder", "--data_dir", broken,
                    "--out", tmp_path / "lambda.npy", "--num_workers", 2], tmp_path)
    assert_one_line(p, "cannot read", "00005.png")
    assert not (tmp_path / "lambda.npy").exists()


def test_fid(toy, broken, tmp_path):
    p = run_marked(["-m", "evaluations.fid", "--path", broken / "test" / "images", toy / "test" / "images",
                    "--weights", "random", "--dims", "64", "--device", "cpu", "--num-workers", 2, "-b", 1], tmp_path)
    assert_one_line(p, "cannot read", "00003.png")


def sample_sets(toy, broken, root):
    import shutil
    for k in range(2):
        shutil.copytree((broken if k else toy) / "test" / "images", root / f"samples_{k}")
    shutil.copytree(toy / "test" / "images", root / "images")
    shutil.copytree(toy / "test" / "labels", root / "labels")
    return root


def test_lpips(toy, broken, tmp_path):
    res = sample_sets(toy, broken, tmp_path / "res")
    p = run_marked(["-m", "evaluations.lpips", "--results", res, "--weights", "random", "--device", "cpu",
                    "--num-workers", 2, "-b", 1], tmp_path)
    assert_one_line(p, "cannot read", "00003.png")


def test_report(toy, broken, tmp_path):
    res = sample_sets(toy, broken, tmp_path / "res")
    p = run_marked(["-m", "evaluations.report", "--results", res, "--dataset_mode", "toy", "--fid-weights",
                    "random", "--lpips-weights", "random", "--dims", "64", "--device", "cpu", "--num-workers", 2],
                   tmp_path)
    assert_one_line(p, "lpips failed")  # the report goes on with the other metrics and records why
    assert "cannot read" in (res / "report.json").read_text() and "00003.png" in (res / "report.json").read_text()


def test_image_process(broken, tmp_path):
    p = run_marked(["-m", "image_process.edge", "--data_dir", broken, "--dataset_mode", "folder",
                    "--out_dir", tmp_path / "edge", "--num_workers", 2], tmp_path)
    assert_one_line(p, "00003.png")
    assert not (tmp_path / "edge").exists() or not any((tmp_path / "edge").rglob("*.png"))


# ----- the normal end and stop signals to the main process only -----------------------------------
def test_training_that_ends_normally_leaves_no_worker(toy, tmp_path):
    p = run_marked(["-m", "scdm.image_train", *TOY_ARCH, "--data_dir", toy, "--log_dir", tmp_path / "log",
                    "--batch_size", 2, "--num_workers", 2, "--max_steps", 2], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    # Quiet by default: one summary line of the fast-path autotuner; each choice is in the run's log.
    tuner_lines = [line for line in p.stderr.splitlines() if "fast paths:" in line]
    assert len(tuner_lines) == 1 and "choice(s) timed in" in tuner_lines[0], p.stderr[-3000:]
    logged = [line for line in (tmp_path / "log" / "log.txt").read_text().splitlines() if "fast paths:" in line]
    assert len(logged) > 1 and all(": using " in line for line in logged)
    assert "deprecated" not in p.stderr


def start_marked(args, cwd):
    env, marker = marked_env()
    # A shell without job control starts background jobs with SIGINT ignored, and a child inherits that:
    # the process under test gets the default disposition, as it has when a user starts it at a prompt.
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, marker


def wait_for(condition, proc, what):
    deadline = time.monotonic() + SAFETY_LIMIT
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"ended before {what}: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} within {SAFETY_LIMIT} s")
        time.sleep(0.1)


def finish(proc, marker):
    try:
        out, err = proc.communicate(timeout=SAFETY_LIMIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_all_gone(marker)
    return err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_training_stopped_by_a_signal_to_the_main_process_saves_and_leaves_no_worker(toy, tmp_path, sig):
    log_dir = tmp_path / "log"
    proc, marker = start_marked(["-m", "scdm.image_train", *TOY_ARCH, "--data_dir", toy, "--log_dir", log_dir,
                                 "--batch_size", 2, "--num_workers", 2, "--max_steps", 100000,
                                 "--save_interval", 100000, "--log_interval", 1], tmp_path)
    # Ready: a step is logged, and the two workers run beside the main process.
    wait_for(lambda: (log_dir / "progress.csv").exists() and len(marked_pids(marker)) >= 3, proc, "training step")
    proc.send_signal(sig)
    err = finish(proc, marker)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, err[-3000:]
    assert f"received {name}: saving a checkpoint" in err and f"stopped by {name}" in err
    assert list(log_dir.glob("model*.pt")), err[-3000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sampling_stopped_by_a_signal_leaves_no_worker(toy, tiny_model, tmp_path, sig):
    out = tmp_path / "out"
    proc, marker = start_marked(["-m", "scdm.image_sample", "--model_path", tiny_model, "--data_dir", toy,
                                 "--results_path", out, "--timestep_respacing", "ddim50", "--batch_size", 1,
                                 "--num_workers", 2], tmp_path)
    wait_for(lambda: any(out.rglob("samples*/*.png")) and len(marked_pids(marker)) >= 3, proc, "first sample")
    proc.send_signal(sig)
    err = finish(proc, marker)
    assert proc.returncode in (128 + sig, -sig), err[-3000:]
    assert "Traceback" not in err
    assert not list(out.rglob("*.tmp")), "a half-written file was left"


def api(base, path, body=None, method=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read()
        return json.loads(raw) if r.headers.get("Content-Type") == "application/json" else raw


def test_the_painter_serves_a_job_then_ends_on_sigterm_and_ctrl_c_even_mid_job(tiny_model, tmp_path):
    """`python -m scdm.app` end to end: readiness line, a job sampled and its PNG served; then a
    signal while jobs run ends it with the shell's code, no traceback and no native abort."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc, marker = start_marked(["-m", "scdm.app", "--model_path", tiny_model, "--port", 0, "--device", "cpu"],
                                    tmp_path)
        line = proc.stdout.readline()  # the readiness line: the server listens
        assert "scdm painter: http://" in line, proc.stderr.read()[-3000:] if proc.poll() is not None else line
        base = line.split()[2].rstrip("/")
        info = api(base, "/api/info")
        size = info["image_size"]
        ids = [[(x // 8 + y // 8) % 7 for x in range(size)] for y in range(size)]
        if sig == signal.SIGTERM:
            job = api(base, "/api/jobs", {"ids": ids, "steps": 3, "num_samples": 2, "seed": 5})
            deadline = time.time() + 120
            while job["status"] in ("queued", "running") and time.time() < deadline:
                time.sleep(0.1)
                job = api(base, f"/api/jobs/{job['id']}")
            assert job["status"] == "done", job
            png = Image.open(io.BytesIO(api(base, job["images"][1])))
            assert png.size == (size, size) and np.asarray(png).std() > 0
        # jobs that keep the worker busy until the signal comes
        busy = [api(base, "/api/jobs", {"ids": ids, "steps": 50, "num_samples": 4, "seed": k}) for k in range(3)]
        deadline = time.time() + 120
        while api(base, f"/api/jobs/{busy[0]['id']}")["status"] == "queued" and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        err = finish(proc, marker)
        assert proc.returncode in (128 + sig, -sig) and proc.returncode != -signal.SIGABRT, err[-3000:]
        assert "Traceback" not in err and "terminate called" not in err, err[-3000:]


def test_a_loader_worker_is_quiet_when_its_main_process_left_mid_batch():
    """The resource sharer of a DataLoader worker fails to hand over a batch when the main process was
    stopped: that error is dropped (the main process reports the stop); any other error is not."""
    from scdm.runtime.stop_signals import quiet_when_the_reader_left

    seen = []
    hook = quiet_when_the_reader_left(lambda kind, value, tb: seen.append(kind))

    def raised(error, filename):
        code = compile("def send():\n    raise error\n", filename, "exec")
        scope = {"error": error}
        exec(code, scope)
        try:
            scope["send"]()
        except BaseException as e:
            return type(e), e, e.__traceback__

    hook(*raised(ConnectionResetError("peer gone"), "/x/multiprocessing/resource_sharer.py"))
    hook(*raised(EOFError(), "/x/multiprocessing/resource_sharer.py"))
    assert seen == []
    hook(*raised(ConnectionResetError("elsewhere"), "/x/ours.py"))
    hook(*raised(ValueError("a bug"), "/x/multiprocessing/resource_sharer.py"))
    assert seen == [ConnectionResetError, ValueError]
