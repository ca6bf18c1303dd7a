"""Training and sampling entry points on toy data: launchers, replicas, resume, atomic checkpoints,
rank-independent sampling, and user errors (exit code 2, one message)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from scdm.checkpoint import save_atomic
from conftest import ROOT, SAFETY_LIMIT, TOY_ARCH, launch_argv, run_command, toy_train_argv, wait_for, write_toy

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(args, timeout=240, check=True):
    return run_command(args, ENV, check=check, timeout=timeout)


def train_cmd(data, log_dir, *extra, launcher=()):
    return [*launcher, sys.executable, *toy_train_argv(data, log_dir, *extra)]


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("toy"), num_train=8, num_test=5)


@pytest.fixture(scope="session")
def trained(toy, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("run")
    run(train_cmd(toy, log_dir, "--max_steps", 2, "--save_interval", 1, "--drop_rate", 0.2))
    return log_dir


def test_single_process_training_writes_complete_checkpoints(trained):
    names = sorted(p.name for p in trained.iterdir())
    for step in (1, 2):
        assert {f"model{step:06d}.pt", f"ema_0.9999_{step:06d}.pt", f"opt{step:06d}.pt"} <= set(names)
    assert not [n for n in names if n.endswith(".tmp")]
    header = (trained / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "mse", "vb"} <= set(header) and any(c.startswith("loss_q") for c in header)
    state = torch.load(trained / "model000002.pt")
    assert "middle_block.0.in_norm.mlp_shared.0.weight" in state


@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_two_process_replicas_identical(toy, tmp_path, launcher):
    """Each rank writes its own weights at the save (tests/rank_dump.py): they are the same bits, and
    they are what rank 0 saved."""
    args = train_cmd(toy, tmp_path, "--max_steps", 2, "--save_interval", 2)[3:]  # the flags after `-m scdm.image_train`
    script = ROOT / "tests" / "rank_dump.py"
    run([*launch_argv(launcher), script, *args])
    ranks = [torch.load(tmp_path / f"rank{r}_2.pt") for r in (0, 1)]
    saved = torch.load(tmp_path / "model000002.pt")
    assert ranks[0].keys() == ranks[1].keys() == saved.keys()
    for name in saved:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.equal(ranks[0][name], saved[name]), name
    assert "replicas in sync at step 2 (world size 2)" in (tmp_path / "log.txt").read_text()


def test_sigterm_saves_and_resume_continues(toy, tmp_path):
    proc = subprocess.Popen([str(a) for a in train_cmd(toy, tmp_path, "--max_steps", 10000, "--save_interval", 10000)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (tmp_path / "progress.csv").exists(), proc, "the first logged step")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=SAFETY_LIMIT)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]  # the shell convention: stopped by SIGTERM
    assert "stopped by SIGTERM at step" in out
    models = sorted(tmp_path.glob("model*.pt"))
    assert len(models) == 1
    step = int(models[0].stem[5:])
    assert step >= 1
    opt_saved = torch.load(tmp_path / f"opt{step:06d}.pt")

    run(train_cmd(toy, tmp_path, "--max_steps", step + 1, "--save_interval", 1000,
                  "--resume_checkpoint", models[0]))
    assert (tmp_path / f"model{step + 1:06d}.pt").exists()
    opt_new = torch.load(tmp_path / f"opt{step + 1:06d}.pt")
    # AdamW's step counter continued from the saved state instead of restarting at 1.
    first = next(iter(opt_saved["state"]))
    assert float(opt_new["state"][first]["step"]) == float(opt_saved["state"][first]["step"]) + 1


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "model000001.pt"
    save_atomic({"w": torch.ones(3)}, target)
    real_save = torch.save

    def crash(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"w": torch.zeros(3)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(target)["w"], torch.ones(3))  # the old complete file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["model000001.pt"]


def sample_cmd(toy, model, results, *extra, launcher=()):
    return [*launcher, sys.executable, "-m", "scdm.image_sample", *TOY_ARCH, "--data_dir", toy, "--model_path", model,
            "--results_path", results, "--timestep_respacing", "ddim4", "--s", 1.5, "--extrapolation", 0.8,
            "--dynamic_threshold", 0.95, *extra]


def test_outputs_honour_the_umask(toy, trained, tmp_path):
    """Checkpoints, logs, args.json, samples and pictures get 0666 & ~umask (0644 under 022), not the
    0600 of a temporary file; the released --gpus_per_node is accepted with one note."""
    old = os.umask(0o022)
    try:
        log_dir = tmp_path / "run"
        run(train_cmd(toy, log_dir, "--max_steps", 1, "--save_interval", 1))
        p = run(sample_cmd(toy, log_dir / "model000001.pt", tmp_path / "res", "--batch_size", 5,
                           "--timestep_respacing", "ddim2", "--gpus_per_node", 8))
    finally:
        os.umask(old)
    assert p.stderr.count("--gpus_per_node 8 is ignored") == 1
    files = [f for f in [*log_dir.iterdir(), *(tmp_path / "res").rglob("*")] if f.is_file()]
    assert {"model000001.pt", "opt000001.pt", "args.json", "log.txt", "progress.csv", "overview.png"} <= {
        f.name for f in files}
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_user_errors_exit_2_with_one_message(toy, trained, tmp_path):
    p = run(sample_cmd(toy, trained / "model000002.pt", tmp_path / "r", "--num_classes", 12), check=False)
    assert p.returncode == 2
    assert "checkpoint has 9 label channels, flags give num_classes=12, no_instance=False (13 channels)" in p.stderr
    assert "Traceback" not in p.stderr
    p = run(sample_cmd(toy, trained / "opt000002.pt", tmp_path / "r"), check=False)
    assert p.returncode == 2 and "is an optimizer state" in p.stderr
    p = run(sample_cmd(toy, trained / "model000002.pt", tmp_path / "r", "--cond_opt", "discrete_zero_classwise"),
            check=False)
    assert p.returncode == 2 and "--class_schedule" in p.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = run(sample_cmd(toy, trained / "model000002.pt", blocker / "sub"), check=False)
    assert p.returncode == 2 and "--results_path" in p.stderr and "not writable" in p.stderr
    # a resume that does not fit the flags names the flag and writes nothing
    before = sorted(trained.iterdir())
    p = run(train_cmd(toy, trained, "--max_steps", 3, "--learn_sigma", "False",
                      "--resume_checkpoint", trained / "model000002.pt"), check=False)
    assert p.returncode == 2 and "learn_sigma=False" in p.stderr and "Traceback" not in p.stderr
    assert sorted(trained.iterdir()) == before


@pytest.mark.parametrize("script", ["train.sh", "sample.sh"])
def test_presets_help_and_unknown(script):
    ok = run(["sh", ROOT / "scripts" / script, "--help"])
    assert "ade20k" in ok.stdout and "toy" in ok.stdout
    bad = run(["sh", ROOT / "scripts" / script, "imagenet"], check=False)
    assert bad.returncode == 2 and "unknown preset 'imagenet'" in bad.stderr
    assert "ade20k coco celeba cityscapes toy" in bad.stderr


def test_sample_script_takes_relative_paths_from_the_callers_folder(toy, trained, tmp_path):
    """sample.sh run from another folder: MODEL, DATA_DIR and RESULTS are relative to that folder, and the
    checkpoint alone (its args.json) gives the architecture."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "run").symlink_to(trained)
    (work / "data").symlink_to(toy)
    env = dict(ENV, MODEL="run/model000002.pt", DATA_DIR="data", RESULTS="out", NUM_SAMPLES="1",
               PYTHON=sys.executable, NUM_GPUS="1")
    p = subprocess.run(["sh", str(ROOT / "scripts" / "sample.sh"), "toy", "--timestep_respacing", "ddim2"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(list((work / "out" / "samples").glob("*.png"))) == 1
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    assert manifest["model_flags_from"] != "preset" and manifest["labels"]["data_dir"] == str((work / "data").resolve())
