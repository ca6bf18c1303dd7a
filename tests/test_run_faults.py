"""Faults during training and sampling runs: stop signals to the whole process group (loader workers
included), one rank's fatal error under mpiexec and torchrun, non-finite checkpoints, a full disk,
incomplete checkpoint sets on resume, and scripts that check before they work."""
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scdm.checkpoint import latest_complete_set
from scdm.presets import PRESETS, as_argv
from conftest import (ROOT, SAFETY_LIMIT, TOY_ARCH, error_lines, launch_argv, run_command, toy_train_argv, wait_for,
                      write_toy)

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
RATE = "0.9999"


def run(args, check=True, timeout=240, cwd=ROOT, env=ENV, **kw):
    return run_command(args, env, cwd=cwd, check=check, timeout=timeout, in_process=cwd == ROOT and env is ENV, **kw)


def train_args(data, log_dir, *extra, workers=0):
    return toy_train_argv(data, log_dir, "--ema_rate", RATE, *extra, workers=workers)


def start_training(cmd, log_dir):
    """A training run in its own process group, returned once it has logged a step."""
    proc = subprocess.Popen([str(a) for a in cmd], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: (log_dir / "progress.csv").exists(), proc, f"a logged step in {log_dir}")
    return proc


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("toy"), num_train=8, num_test=4)


@pytest.fixture(scope="module")
def base(toy, tmp_path_factory):
    """A finished 2-step run with complete checkpoint sets at steps 1 and 2."""
    log_dir = tmp_path_factory.mktemp("base")
    run([sys.executable, *train_args(toy, log_dir, "--max_steps", 2, "--save_interval", 1)])
    return log_dir


@pytest.fixture
def run_copy(base, tmp_path):
    return Path(shutil.copytree(base, tmp_path / "run"))


def truncated_copy(toy, dest, *files):
    """The toy tree with these files (relative paths) cut to 100 bytes."""
    shutil.copytree(toy, dest)
    for rel in files:
        path = dest / rel
        path.write_bytes(path.read_bytes()[:100])
    return dest


# ----- stop signals to the process group ------------------------------------------------------------
@pytest.mark.parametrize("launcher,sig", [("single", signal.SIGTERM), ("single", signal.SIGINT),
                                          ("mpiexec", signal.SIGTERM), ("torchrun", signal.SIGTERM)])
def test_stop_signal_to_the_process_group_with_workers_saves(toy, tmp_path, launcher, sig):
    """What Slurm, `timeout` and a terminal's Ctrl-C do: signal every process of the job, loader
    workers included. The run saves a complete set at the end of its step and stops."""
    cmd = [*launch_argv(launcher), *train_args(toy, tmp_path, "--max_steps", 100000, "--save_interval", 100000,
                                          workers=2)]
    proc = start_training(cmd, tmp_path)
    try:
        wait_for(lambda: len((tmp_path / "progress.csv").read_text().splitlines()) >= 3, proc,
                 "two logged steps (the workers are running)")
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=SAFETY_LIMIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    latest = latest_complete_set(tmp_path, [RATE])
    assert latest is not None, err[-3000:]
    assert "DataLoader worker" not in err
    name = signal.Signals(sig).name
    assert f"received {name}: saving a checkpoint" in err
    if launcher != "torchrun":  # torchrun's own agent reports the signal to it with its own exit code
        assert proc.returncode == 128 + sig, err[-3000:]
        assert f"stopped by {name} at step {latest[0]}" in err
        assert "Traceback" not in err
    assert not list(tmp_path.glob(".*.tmp"))


# ----- one rank's fatal error ----------------------------------------------------------------------
@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_a_bad_file_in_one_ranks_shard_stops_every_rank_in_seconds(toy, tmp_path, launcher):
    # Shard r of 2 takes files r, r + 2, ...: 00001 and 00003 are rank 1's.
    data = truncated_copy(toy, tmp_path / "data", "train/images/00001.png", "train/images/00003.png")
    start = time.time()
    p = run([*launch_argv(launcher), *train_args(data, tmp_path / "log", "--max_steps", 50)], check=False,
            timeout=SAFETY_LIMIT + 60)
    assert time.time() - start < SAFETY_LIMIT  # not the 30-minute collective timeout (a safety bound, not speed)
    assert p.returncode != 0
    errors = error_lines(p.stderr)
    assert errors and errors[0].startswith("error: rank 1: cannot read image") and "00001.png" in errors[0], p.stderr
    # Rank 0, when the launcher lets it speak before it ends the job, names rank 1 in one line; it never
    # reports the peer's vanished connection.
    assert set(errors[1:]) <= {"error: stopping all ranks: rank 1 (DatasetError) failed (see its error)"}, p.stderr
    assert "Connection reset by peer" not in p.stderr and "failed:\n" not in p.stderr, p.stderr
    if launcher == "mpiexec":
        assert "Traceback" not in p.stderr
    else:  # torchrun ends with its own summary, which names rank 1 with our message; no frame is ours.
        # (Which rank it calls the root cause depends on which exit its agent saw first: a race.)
        summary = p.stderr.split("Failures:", 1)[1]
        assert "rank      : 1" in summary and "traceback : DatasetError: cannot read image" in summary, p.stderr
        assert str(ROOT / "scdm") not in p.stderr, p.stderr


def rank_pid(marker, rank_var, rank):
    """The pid of the process whose command line holds `marker` and whose environment says it is `rank`."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and f"{rank_var}={rank}".encode() in environ and b"scdm.image_train" in cmdline:
            return int(proc.name)
    return None


@pytest.mark.parametrize("launcher,rank_var", [("mpiexec", "PMI_RANK"), ("torchrun", "RANK")])
def test_a_rank_that_dies_stops_the_others_promptly(toy, tmp_path, launcher, rank_var):
    log_dir = tmp_path / "log"
    cmd = [*launch_argv(launcher), *train_args(toy, log_dir, "--max_steps", 100000, "--save_interval", 100000)]
    proc = start_training(cmd, log_dir)
    try:
        victim = rank_pid(str(log_dir), rank_var, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        start = time.time()
        out, err = proc.communicate(timeout=SAFETY_LIMIT)
        assert time.time() - start < SAFETY_LIMIT  # far below the 30-minute collective timeout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0


def test_a_bad_label_in_one_ranks_shard_stops_sampling_in_seconds(toy, base, tmp_path):
    data = truncated_copy(toy, tmp_path / "data", "test/labels/00001.png")
    start = time.time()
    p = run([*launch_argv("mpiexec"), "-m", "scdm.image_sample", *TOY_ARCH, "--data_dir", data,
             "--model_path", base / "ema_0.9999_000002.pt", "--results_path", tmp_path / "out",
             "--timestep_respacing", "ddim3"], check=False, timeout=SAFETY_LIMIT + 60)
    assert time.time() - start < SAFETY_LIMIT  # far below the 30-minute collective timeout
    assert p.returncode == 2, p.stderr[-2000:]
    errors = error_lines(p.stderr)
    assert errors[0].startswith("error: rank 1: ") and "00001.png" in errors[0], p.stderr
    assert "Traceback" not in p.stderr


# ----- non-finite weights ----------------------------------------------------------------------------
def test_a_checkpoint_with_nan_weights_is_refused_naming_the_file(toy, base, tmp_path):
    state = torch.load(base / "model000002.pt")
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key][0] = float("nan")
    bad = tmp_path / "model000002.pt"
    torch.save(state, bad)
    p = run([sys.executable, "-m", "scdm.image_sample", *TOY_ARCH, "--data_dir", toy, "--model_path", bad,
             "--results_path", tmp_path / "out", "--timestep_respacing", "ddim2", "--num_samples", 1], check=False)
    assert p.returncode == 2
    assert error_lines(p.stderr) == [f"error: {bad} holds non-finite weights (NaN or Inf) in 1 tensor(s), e.g. "
                                        f"{key}: it would give blank samples; it comes from a diverged or damaged "
                                        "run, so use an earlier checkpoint"]
    assert not (tmp_path / "out" / "samples").exists() or not list((tmp_path / "out" / "samples").iterdir())


def test_finite_weights_with_non_finite_samples_stop_before_writing(toy, base, tmp_path):
    """Weights can be finite and still overflow: the sampler checks its output before writing."""
    state = torch.load(base / "model000002.pt")
    state["out.2.bias"].fill_(3e38)  # the learned variance overflows: exp(inf) noise, then inf - inf
    bad = tmp_path / "model000002.pt"
    torch.save(state, bad)
    p = run([sys.executable, "-m", "scdm.image_sample", *TOY_ARCH, "--data_dir", toy, "--model_path", bad,
             "--results_path", tmp_path / "out", "--timestep_respacing", "ddim3", "--num_samples", 1], check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"--model_path {bad} gave non-finite samples (NaN or Inf) for 00000" in p.stderr
    assert not list((tmp_path / "out").rglob("00000.png"))


# ----- a full disk -----------------------------------------------------------------------------------
def file_size_limit(nbytes):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def test_a_full_disk_during_a_checkpoint_save_keeps_the_last_complete_set(toy, run_copy):
    leftover = run_copy / ".model000009.pt.abcd.tmp"  # what a killed save leaves behind
    leftover.write_bytes(b"x" * 1000)
    model_bytes = (run_copy / "model000002.pt").stat().st_size
    # Room for the EMA file of step 3, not for its optimizer file (twice the size): a half set.
    p = run([sys.executable, *train_args(toy, run_copy, "--max_steps", 3, "--save_interval", 1,
                                         "--resume_checkpoint", "auto")],
            check=False, preexec_fn=file_size_limit(int(model_bytes * 1.5)))
    assert p.returncode == 2, p.stderr[-3000:]
    errors = error_lines(p.stderr)
    assert len(errors) == 1, p.stderr
    assert errors[0].startswith("error: checkpoint set of step 3 not saved (cannot write "), p.stderr
    assert "File too large" in errors[0], errors  # the OS's own words (here EFBIG; ENOSPC on a full disk)
    assert errors[0].endswith(f"the last complete set is {run_copy / 'model000002.pt'}")
    assert "Traceback" not in p.stderr
    assert not (run_copy / "ema_0.9999_000003.pt").exists()  # no half set
    assert not list(run_copy.glob(".*.tmp"))  # its own temporary files and the leftover are gone
    assert latest_complete_set(run_copy, [RATE])[0] == 2
    torch.load(run_copy / "model000002.pt")


def test_a_full_disk_during_sampling_ends_in_one_line(toy, base, tmp_path):
    p = run([sys.executable, "-m", "scdm.image_sample", *TOY_ARCH, "--data_dir", toy, "--model_path",
             base / "ema_0.9999_000002.pt", "--results_path", tmp_path / "out", "--timestep_respacing", "ddim2",
             "--num_samples", 2], check=False, preexec_fn=file_size_limit(200))
    assert p.returncode == 2, p.stderr[-3000:]
    errors = error_lines(p.stderr)
    assert len(errors) == 1 and "cannot write" in errors[0] and "File too large" in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not list((tmp_path / "out").rglob(".*.tmp"))


# ----- incomplete or foreign checkpoint sets on resume -------------------------------------------------
def test_resume_without_the_optimizer_file_is_refused_unless_allowed(toy, run_copy):
    (run_copy / "opt000002.pt").unlink()
    resume = ["--resume_checkpoint", run_copy / "model000002.pt", "--max_steps", 3, "--save_interval", 10]
    p = run([sys.executable, *train_args(toy, run_copy, *resume)], check=False)
    assert p.returncode == 2
    [error] = error_lines(p.stderr)
    assert "lacks opt000002.pt" in error and "--allow_partial_resume" in error
    assert not (run_copy / "model000003.pt").exists()
    p = run([sys.executable, *train_args(toy, run_copy, *resume, "--allow_partial_resume")])
    assert "warning: --allow_partial_resume: opt000002.pt not found; the optimizer restarts from scratch" in p.stderr
    assert (run_copy / "model000003.pt").exists()


def test_resume_with_another_ema_rate_is_refused(toy, run_copy):
    p = run([sys.executable, *train_args(toy, run_copy, "--resume_checkpoint", run_copy / "model000002.pt",
                                         "--max_steps", 3, "--ema_rate", "0.99")], check=False)
    assert p.returncode == 2
    [error] = error_lines(p.stderr)
    assert "lacks ema_0.99_000002.pt" in error and "--ema_rate" in error


def test_an_optimizer_file_of_another_architecture_is_a_message(toy, run_copy, tmp_path):
    other = tmp_path / "other"
    arch = as_argv(dict(PRESETS["toy"].model, cond_opt="discrete_zero_uniform", num_channels=64))
    run([sys.executable, "-m", "scdm.image_train", *arch, "--data_dir", toy, "--log_dir", other, "--batch_size", 2,
         "--num_workers", 0, "--max_steps", 1])
    shutil.copy(other / "opt000001.pt", run_copy / "opt000002.pt")
    p = run([sys.executable, *train_args(toy, run_copy, "--resume_checkpoint", "auto", "--max_steps", 3)],
            check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    [error] = error_lines(p.stderr)
    assert error.startswith(f"error: {run_copy / 'opt000002.pt'} does not fit this model: parameter ")
    assert "Traceback" not in p.stderr


# ----- check before work -------------------------------------------------------------------------------
@pytest.mark.parametrize("args,env,expected", [
    (["toy", "resume"], {}, "error: resume needs RESUME="),
    (["toy", "sdm-finetune"], {}, "error: sdm-finetune needs RESUME="),
    (["toy", "finetune"], {}, "error: sdm-finetune needs RESUME="),
    (["toy", "resume"], {"RESUME": "missing/model000010.pt"}, "error: --resume_checkpoint missing/model000010.pt "
                                                               "does not exist"),
    (["toy", "--lr", "abc"], {}, "argument --lr: a number"),
])
def test_train_sh_checks_everything_before_any_work(toy, tmp_path, args, env, expected):
    p = run(["sh", ROOT / "scripts" / "train.sh", *args], check=False, cwd=tmp_path,
            env=dict(ENV, DATA_DIR=str(toy), LOG_DIR=str(tmp_path / "log"), **env))
    assert p.returncode == 2
    assert expected in p.stderr, p.stderr
    assert not list(tmp_path.rglob("class_schedule*"))  # the schedule was not computed
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize("extra, expected", [
    (["--num_channels", 16], "num_channels (16) must be divisible by num_groups (32)"),
    (["--image_size", 15], "--image_size 15 must be a multiple of 2"),
    (["--batch_size", 64], "--batch_size 64 is larger than the 8 image(s)"),
    (["--dataset_mode", "ade20k"], "ade20k"),
    (["--cond_opt", "discrete_zero_classwise", "--class_schedule", "short.npy"], "has 3 values; expected one"),
    (["--resume_checkpoint", "opt000002.pt"], "is an optimizer state (opt*.pt); pass the run's model*.pt"),
])
def test_a_dry_run_finds_what_the_real_run_would_fail_on(toy, tmp_path, extra, expected):
    """--dry_run (train.sh's pre-check) builds the network, reads a given class schedule and lists the
    data, so that what it calls usable does start training; nothing is written."""
    np.save(tmp_path / "short.npy", np.ones(3))
    torch.save({"state": {}, "param_groups": []}, tmp_path / "opt000002.pt")
    extra = [str(tmp_path / e) if str(e).endswith((".npy", ".pt")) else e for e in extra]
    p = run([sys.executable, *train_args(toy, tmp_path / "log", "--dry_run", "True", *extra)], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    [error] = error_lines(p.stderr)
    assert expected in error, error
    assert not (tmp_path / "log").exists()


def test_a_dry_run_that_passes_says_what_it_checked_and_warns_of_unused_attention(toy, tmp_path):
    p = run([sys.executable, *train_args(toy, tmp_path / "log", "--dry_run", "True", "--attention_resolutions", "3")])
    assert "dry run: flags, network, data layout" in p.stdout and "nothing trained" in p.stdout
    assert "warning" not in p.stderr  # warnings are printed when training starts, with the run's other notes
    p = run([sys.executable, *train_args(toy, tmp_path / "log", "--attention_resolutions", "3", "--max_steps", 1)])
    assert "warning: --attention_resolutions 3: the UNet has no 3 px level" in p.stderr, p.stderr[-2000:]
    assert "so it attends nowhere" in p.stderr


def test_the_attention_note_follows_the_unets_own_rule():
    """The UNet's levels attend where image_size // resolution is a level's downsample rate: 7 at 16 px
    lands on the 8 px level (attended), 3 at 32 px on none."""
    from scdm.models.unet import AttentionBlock
    from scdm.script_util import attention_note, create_model
    for spec, size, attended in (("7", 16, True), ("3", 32, False), ("16", 32, True)):
        model = create_model(image_size=size, num_classes=3, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                             attention_resolutions=spec)
        levels = [*model.input_blocks, *model.output_blocks]  # the middle block always attends
        has = any(isinstance(m, AttentionBlock) for block in levels for m in block.modules())
        note = attention_note(dict(image_size=size, attention_resolutions=spec, channel_mult="1,2"))
        assert has == attended and (note is None) == attended, (spec, size, has, note)


@pytest.mark.parametrize("given", ["environment", "environment and schedule", "flags"])
def test_train_sh_with_sample_grids_on_a_fresh_run(toy, tmp_path, given):
    """The documented `sh scripts/train.sh toy --sample_interval N`: the pre-check needs no class
    schedule yet (train.sh computes it after), and takes CLASS_SCHEDULE when it is given. --data_dir
    and --log_dir given as flags count as DATA_DIR and LOG_DIR: no toy data is made in the working
    folder, and the schedule is computed from the given data into the given log folder."""
    env = dict(ENV, MAX_STEPS="1")
    flags = []
    if given == "flags":
        flags = ["--data_dir", toy, f"--log_dir={tmp_path / 'log'}"]
    else:
        env.update(DATA_DIR=str(toy), LOG_DIR=str(tmp_path / "log"))
    if given == "environment and schedule":
        run([sys.executable, "-m", "scdm.class_schedule", "--dataset_mode", "folder", "--data_dir", toy,
             "--out", tmp_path / "lambda.npy"])
        env["CLASS_SCHEDULE"] = str(tmp_path / "lambda.npy")
    p = run(["sh", ROOT / "scripts" / "train.sh", "toy", "--sample_interval", 1, "--sample_respacing", "ddim2",
             "--sample_maps", 2, "--batch_size", 2, *flags], check=False, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "log" / "model000001.pt").is_file() and list((tmp_path / "log" / "samples").glob("*.png"))
    assert sorted(os.listdir(tmp_path)) == sorted(["log", *(["lambda.npy"] if "schedule" in given else [])])
    if given == "flags":
        from scdm.class_schedule import compute_class_schedule
        written = np.load(tmp_path / "log" / "class_schedule.npy")
        np.testing.assert_allclose(written, compute_class_schedule("folder", str(toy)))


@pytest.mark.parametrize("content, reason", [
    (b"", "it is empty (0 bytes)"),
    (b"hello\n", "it holds text (6 bytes), not a torch file"),
    ("zip", "a torch zip archive that is truncated or damaged"),
])
def test_an_unreadable_checkpoint_says_what_the_file_is(tmp_path, content, reason):
    from scdm.checkpoint import CheckpointError, load_file
    path = tmp_path / "model000001.pt"
    if content == "zip":
        torch.save({"w": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_file(path, "model checkpoint")
    assert str(e.value).startswith(f"model checkpoint {path} cannot be read: ")
    assert reason in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="is a folder; expected a .pt file"):
        load_file(tmp_path, "model checkpoint")
