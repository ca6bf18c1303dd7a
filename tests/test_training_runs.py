"""Runs you can trust: a log dir holds one run (refused restarts, `--resume_checkpoint auto` that skips
broken checkpoint sets), EMA warm-up, the run config in args.json, and flag help."""
import csv
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scdm.checkpoint import latest_complete_set, load_adamw_state, model_name, resolve_resume
from scdm.image_train import create_argparser
from scdm.presets import PRESETS, as_argv
from scdm.flags import DIFFUSION_FLAGS, LAUNCH_FLAGS, MODEL_FLAGS, SAMPLE_FLAGS, TRAIN_FLAGS
from scdm.script_util import architecture_conflicts, model_and_diffusion_defaults
from scdm.training.train_util import TrainLoop, adamw, ema_decay

from conftest import ROOT, TOY_ARCH, run_command, toy_train_argv, write_toy

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
RATES = "0.9999,0.2"  # 0.2 < (1 + s) / (10 + s) from s = 2 on: warm-up takes both branches of min()
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S")


def run(args, cwd=ROOT, check=True):
    return run_command(args, ENV, cwd=cwd, check=check, in_process=cwd == ROOT)


def train(data, log_dir, *extra, arch=TOY_ARCH, cwd=ROOT, check=True):
    return run([sys.executable, *toy_train_argv(data, log_dir, "--save_interval", 1, "--ema_rate", RATES, *extra,
                                                arch=arch)], cwd=cwd, check=check)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("toy"), num_train=8, num_test=2)


@pytest.fixture(scope="module")
def base(toy, tmp_path_factory):
    """A finished 3-step run without EMA warm-up, checkpoint sets at steps 1, 2, 3."""
    log_dir = tmp_path_factory.mktemp("base")
    p = train(toy, log_dir, "--max_steps", 3)
    assert "img/s" in p.stderr  # the progress bar shows the throughput
    return log_dir


@pytest.fixture
def copy_of_base(base, tmp_path):
    return Path(shutil.copytree(base, tmp_path / "run"))


def snapshot(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def progress_steps(log_dir):
    text = (log_dir / "progress.csv").read_text()
    assert sum(line.startswith("step,") for line in text.splitlines()) == 1, text
    return [int(float(r["step"])) for r in csv.DictReader(text.splitlines())]


def states(log_dir, name):
    return torch.load(log_dir / name, map_location="cpu")


# ----- a log dir holds one run ---------------------------------------------------------------------
def test_restart_over_an_existing_run_is_refused_and_changes_nothing(toy, copy_of_base):
    before = snapshot(copy_of_base)
    p = train(toy, copy_of_base, "--max_steps", 4, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert str(copy_of_base) in lines[0] and "model000003.pt" in lines[0]
    assert "--resume_checkpoint auto" in lines[0] and "another --log_dir" in lines[0]
    assert snapshot(copy_of_base) == before


def test_resume_contradicting_the_run_config_is_refused(toy, copy_of_base):
    before = snapshot(copy_of_base)
    p = train(toy, copy_of_base, "--max_steps", 4, "--resume_checkpoint", "auto", "--num_channels", 64,
              "--diffusion_steps", 500, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "num_channels=64 (run: 32)" in p.stderr and "diffusion_steps=500 (run: 1000)" in p.stderr
    assert snapshot(copy_of_base) == before


def test_auto_resumes_at_the_last_step_and_continues_the_logs(toy, copy_of_base):
    train(toy, copy_of_base, "--max_steps", 4, "--resume_checkpoint", "auto")
    log = (copy_of_base / "log.txt").read_text().splitlines()
    assert f"resumed from {copy_of_base / 'model000003.pt'} at step 3" in "\n".join(log)
    assert all(STAMP.match(line) for line in log[-3:]), log[-3:]  # lines written by this version
    assert progress_steps(copy_of_base) == [1, 2, 3, 4]
    assert (copy_of_base / "model000004.pt").exists()
    config = json.loads((copy_of_base / "args.json").read_text())
    assert config["resume_checkpoint"] == str(copy_of_base / "model000003.pt")
    assert config["num_classes"] == 8 and config["unlabeled_id"] == 7 and config["ema_warmup"] is False


def test_a_resume_past_its_step_limit_says_there_is_nothing_to_train(toy, copy_of_base):
    before = {k: v for k, v in snapshot(copy_of_base).items() if k.endswith(".pt")}
    p = train(toy, copy_of_base, "--max_steps", 2, "--resume_checkpoint", "auto")
    assert "note: nothing to train: the run is at step 3 and --max_steps is 2" in p.stderr, p.stderr[-2000:]
    assert {k: v for k, v in snapshot(copy_of_base).items() if k.endswith(".pt")} == before


def test_auto_alone_continues_the_run_as_it_was(toy, copy_of_base, tmp_path):
    """`--log_dir X --resume_checkpoint auto` with no other flag, from another folder: data, architecture,
    EMA rates and batch size come from the run's args.json (one note names them)."""
    p = run([sys.executable, "-m", "scdm.image_train", "--log_dir", copy_of_base, "--resume_checkpoint", "auto",
             "--max_steps", 4], cwd=tmp_path)
    assert "note: resuming with the run's own" in p.stderr and "num_channels" in p.stderr
    assert progress_steps(copy_of_base) == [1, 2, 3, 4]
    assert (copy_of_base / "model000004.pt").exists() and (copy_of_base / "ema_0.2_000004.pt").exists()
    config = json.loads((copy_of_base / "args.json").read_text())
    assert config["data_dir"] == str(toy) and config["cond_opt"] == "discrete_zero_uniform"
    assert config["batch_size"] == 2 and config["ema_rate"] == RATES and config["max_steps"] == 4


@pytest.mark.parametrize("damage", ["optimizer missing", "ema truncated"])
def test_auto_skips_an_incomplete_last_set(toy, copy_of_base, damage):
    if damage == "optimizer missing":
        bad = copy_of_base / "opt000003.pt"
        bad.unlink()
    else:
        bad = copy_of_base / "ema_0.2_000003.pt"
        bad.write_bytes(bad.read_bytes()[:10])
    p = train(toy, copy_of_base, "--max_steps", 3, "--resume_checkpoint", "auto")
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "step 3" in warnings[0], p.stderr[-2000:]
    log = (copy_of_base / "log.txt").read_text()
    assert f"resumed from {copy_of_base / 'model000002.pt'} at step 2" in log and str(bad) in log
    assert progress_steps(copy_of_base) == [1, 2, 3]  # the old step-3 row gave way to the new one
    assert torch.load(copy_of_base / "opt000003.pt")  # the set of step 3 is whole again


def fake_set(folder, step, rates=("0.9999",), skip=()):
    names = [model_name(step), *(f"ema_{r}_{step:06d}.pt" for r in rates), f"opt{step:06d}.pt"]
    for name in names:
        if name not in skip:
            torch.save({"w": torch.full((2,), float(step))}, folder / name)


def test_resolve_resume_rules(tmp_path):
    log_dir = tmp_path / "run"
    assert resolve_resume(log_dir, "auto", ["0.9999"]) == ""  # no folder yet
    log_dir.mkdir()
    (log_dir / "class_schedule.npy").write_bytes(b"x")
    (log_dir / "args.json").write_text("{}")
    assert resolve_resume(log_dir, "", ["0.9999"]) == ""       # a fresh run, as scripts/train.sh prepares it
    assert resolve_resume(log_dir, "auto", ["0.9999"]) == ""
    assert resolve_resume(log_dir, "/else/model000007.pt", ["0.9999"]) == "/else/model000007.pt"
    (log_dir / "progress.csv").write_text("step\n1\n")
    for flag in ("", "auto"):  # a curve without weights: neither restart over it nor resume it
        with pytest.raises(ValueError, match="--log_dir"):
            resolve_resume(log_dir, flag, ["0.9999"])
    fake_set(log_dir, 5)
    fake_set(log_dir, 10, skip=("model000010.pt",))  # killed while saving: the model goes last
    warnings = []
    assert resolve_resume(log_dir, "auto", ["0.9999"], warn=warnings.append) == str(log_dir / "model000005.pt")
    assert len(warnings) == 1 and "model000010.pt is missing" in warnings[0]
    assert latest_complete_set(log_dir, ["0.9999", "0.5"], warn=warnings.append) is None  # no EMA 0.5 anywhere
    with pytest.raises(ValueError, match=r"last checkpoint: model000005.pt\); pass --resume_checkpoint auto"):
        resolve_resume(log_dir, "", ["0.9999"])
    (log_dir / "opt000005.pt").write_bytes(b"cut")  # now no set is whole: the error says why of each
    warnings.clear()
    with pytest.raises(ValueError) as e:
        resolve_resume(log_dir, "auto", ["0.9999"], warn=warnings.append)
    assert f"(checkpoint set of step 10: {log_dir / 'model000010.pt'} is missing; checkpoint set of step 5: " \
           f"{log_dir / 'opt000005.pt'} cannot be read (truncated or not a torch file))" in str(e.value)
    assert warnings == []  # said once, in the error


# ----- EMA warm-up ---------------------------------------------------------------------------------
def test_ema_decay_formula():
    assert ema_decay(0.9999, 0) == 0.9999
    assert ema_decay(0.9999, 0, warmup=True) == pytest.approx(0.1)
    assert ema_decay(0.9999, 590, warmup=True) == pytest.approx(591 / 600)
    assert ema_decay(0.2, 1, warmup=True) == pytest.approx(2 / 11) and ema_decay(0.2, 2, warmup=True) == 0.2


def replay_ema(log_dir, rate, first, last, warmup):
    """The EMA of step `last` from the saved EMA of step `first` and the saved raw weights after it,
    in float64: ema_k = d * ema_{k-1} + (1 - d) * w_k, d the decay of the update made at step k - 1."""
    ema = {k: v.double() for k, v in states(log_dir, f"ema_{rate}_{first:06d}.pt").items()}
    for k in range(first + 1, last + 1):
        d = min(float(rate), k / (9 + k)) if warmup else float(rate)
        weights = states(log_dir, model_name(k))
        ema = {n: d * e + (1 - d) * weights[n].double() for n, e in ema.items()}
    return ema


def assert_same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n].double(), rtol=1e-5, atol=1e-6), n


@pytest.fixture(scope="module")
def warm(toy, tmp_path_factory):
    """A 4-step run of the toy architecture (class-wise label diffusion) with EMA warm-up, started
    from another directory with relative paths for its log dir and class schedule."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    np.save(cwd / "lambdas.npy", np.linspace(0.5, 3.0, 8))
    train(toy, "warm", "--max_steps", 4, "--ema_warmup", "--class_schedule", "lambdas.npy",
          arch=as_argv(PRESETS["toy"].model), cwd=cwd)
    return cwd


def test_ema_with_warmup_follows_the_recurrence(warm):
    log_dir = warm / "warm"
    for rate in RATES.split(","):
        assert_same(replay_ema(log_dir, rate, 1, 4, warmup=True), states(log_dir, f"ema_{rate}_000004.pt"))
    plain = replay_ema(log_dir, "0.9999", 1, 4, warmup=False)
    assert not all(torch.allclose(plain[n], v.double()) for n, v in states(log_dir, "ema_0.9999_000004.pt").items())


def test_ema_without_warmup_is_the_plain_recurrence(base):
    for rate in RATES.split(","):
        assert_same(replay_ema(base, rate, 1, 3, warmup=False), states(base, f"ema_{rate}_000003.pt"))


# ----- the run config ------------------------------------------------------------------------------
def test_args_json_holds_the_run_config_with_an_absolute_schedule_copy(warm):
    log_dir = warm / "warm"
    config = json.loads((log_dir / "args.json").read_text())
    schedule = Path(config["class_schedule"])
    assert schedule.is_absolute() and schedule.parent.samefile(log_dir) and schedule.name == "class_schedule.npy"
    assert np.array_equal(np.load(schedule), np.load(warm / "lambdas.npy"))
    assert Path(config["log_dir"]).is_absolute() and Path(config["log_dir"]).samefile(log_dir)
    assert config["ema_warmup"] is True and config["num_classes"] == 8 and config["unlabeled_id"] == 7
    assert config["cond_opt"] == "discrete_zero_classwise" and config["resume_checkpoint"] == ""
    assert oct((log_dir / "args.json").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_architecture_conflicts_compare_only_what_was_saved():
    saved = dict(model_and_diffusion_defaults(), num_classes=8, channel_mult="1,2")
    assert architecture_conflicts(saved, dict(saved, lr=5, class_schedule="x", timestep_respacing="ddim4")) == []
    assert architecture_conflicts({"image_size": 32}, dict(saved, image_size=64)) == ["image_size=64 (run: 32)"]


# ----- flag help -----------------------------------------------------------------------------------
def test_every_training_flag_has_a_help_line_with_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: no wrapping at hyphens
    parser = create_argparser()
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    undocumented = [a.dest for a in actions if not (a.help and a.help.strip())]
    assert not undocumented
    tables = MODEL_FLAGS + DIFFUSION_FLAGS + TRAIN_FLAGS + SAMPLE_FLAGS + LAUNCH_FLAGS
    names = [f.name for f in MODEL_FLAGS + DIFFUSION_FLAGS + TRAIN_FLAGS + LAUNCH_FLAGS]
    assert len(names) == len(set(names)) and all(f.help.strip() for f in tables)  # each flag declared once
    assert {a.dest for a in actions} == set(names)
    text = " ".join(parser.format_help().split())
    assert "(default: 0.9999)" in text and "loss-second-moment (released)" in text
    assert "grad scaler on fp32 master weights" in text
    for flag in ("data_dir", "dataset_mode"):
        assert next(a for a in actions if a.dest == flag).help.startswith("required")


def _adamw_run(fused, steps, start=None, params=None, first=0):
    """`steps` AdamW steps on fixed pseudo-gradients from the same weights, optionally resuming `start`
    (a saved state); returns the weights and the optimizer."""
    g = torch.Generator().manual_seed(0)
    weights = params or [torch.randn(7, 5, generator=g), torch.randn(3, generator=g)]
    params = [w.clone().requires_grad_() for w in weights]
    opt = adamw(params, lr=1e-2, weight_decay=0.1, fused=fused)
    if start is not None:
        load_adamw_state(opt, start)
    for i in range(first, first + steps):
        for p in params:
            p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32).view(p.shape) * (i + 1) + p.detach())
        opt.step()
    return [p.detach() for p in params], opt


def test_fused_adamw_equals_the_plain_update_and_states_cross_over():
    """The fused switch changes the kernel, not the update; a state saved by either kind resumes in the
    other, which keeps its own kind (load_state_dict alone would adopt the saved flags)."""
    plain, plain_opt = _adamw_run(False, 4)
    fused, fused_opt = _adamw_run(True, 4)
    assert fused_opt.defaults["fused"] is True and not plain_opt.defaults["fused"]
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    start_weights, _ = _adamw_run(False, 2)
    for saved_by, resumed_as in ((True, False), (False, True)):
        _, opt = _adamw_run(saved_by, 2)
        state = opt.state_dict()
        resumed, resumed_opt = _adamw_run(resumed_as, 2, start=state, params=start_weights, first=2)
        assert [g["fused"] for g in resumed_opt.param_groups] == [resumed_opt.defaults["fused"]]
        step = next(iter(resumed_opt.state.values()))["step"]
        assert float(step) == 4 and step.dtype == torch.float32
        for a, b in zip(resumed, plain):  # 2 + 2 steps equal 4 in one go
            assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_gradient_check_uses_the_norm_and_the_exact_check_only_when_it_is_off():
    """The divergence guard: a finite global norm means finite gradients (no per-tensor pass); a NaN or
    Inf anywhere gives a non-finite norm and is caught; finite gradients whose squares overflow fp32
    make the norm inf, and the exact check then still says finite."""
    loop = TrainLoop.__new__(TrainLoop)  # only .model is used
    loop.model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    grads = [torch.arange(p.numel(), dtype=torch.float32).view(p.shape) - 3 for p in loop.model.parameters()]
    for p, g in zip(loop.model.parameters(), grads):
        p.grad = g.clone()
    expected = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    calls = []
    exact = loop._grads_finite
    loop._grads_finite = lambda: calls.append(1) or exact()
    norm, finite = loop._grad_norm_if_finite()
    assert finite and abs(norm - expected) <= 1e-5 * expected and calls == []
    params = list(loop.model.parameters())
    for bad in (float("nan"), float("inf"), float("-inf")):
        params[2].grad[1, 0] = bad
        norm, finite = loop._grad_norm_if_finite()
        assert not finite and not math.isfinite(norm)
    params[2].grad[1, 0] = 3e30  # finite, but its square is not a float32
    norm, finite = loop._grad_norm_if_finite()
    assert norm == math.inf and finite
