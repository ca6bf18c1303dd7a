"""Released training features, each checked against what it promises: microbatch accumulation gives
the full-batch gradient, the loss-second-moment sampler draws timesteps as its formula says, and
--lr_anneal_steps reaches zero at the step it names (unit checks, then one toy run of the CLI)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scdm.data.conditioning import Conditioning
from scdm.presets import PRESETS, as_argv
from scdm.diffusion.resample import LossSecondMomentResampler, ScheduleSampler, create_named_schedule_sampler
from scdm.script_util import create_model_and_diffusion
from scdm.training.train_util import TrainLoop

from conftest import TINY_FLAGS

ROOT = Path(__file__).resolve().parents[1]


class FixedSteps(ScheduleSampler):
    """Hands out preset timesteps in order, with weight 1, however the batch is split."""

    def __init__(self, t):
        self.t, self.used = t, 0

    def sample(self, batch_size, device):
        t = self.t[self.used:self.used + batch_size]
        self.used += batch_size
        return t.to(device), torch.ones(batch_size, device=device)


def gradient(microbatch, images, cond, t, noise, tmp_path):
    """Parameter gradients of one TrainLoop step (the optimizer step itself is skipped)."""
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**dict(TINY_FLAGS, dropout=0.0, cond_diffuse=False))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a zero output conv would make most gradients zero
    loop = TrainLoop(model=model, diffusion=diffusion, data=None, conditioning=Conditioning(4, False),
                     batch_size=len(images), microbatch=microbatch, lr=1e-4, log_dir=tmp_path,
                     schedule_sampler=FixedSteps(t))
    fed = []
    real = diffusion.training_losses

    def with_fixed_noise(model, x_start, t, model_kwargs=None, **kwargs):
        start = sum(fed)
        fed.append(len(x_start))
        return real(model, x_start, t, model_kwargs, noise=noise[start:start + len(x_start)])

    diffusion.training_losses = with_fixed_noise
    captured = []
    loop._optimize = lambda: captured.append({n: p.grad.clone() for n, p in model.named_parameters()})
    loop.run_step(images, cond)
    size = microbatch if microbatch > 0 else len(images)
    assert fed == [size] * (len(images) // size)  # the batch really was split
    return captured[0], model, diffusion


def test_microbatch_accumulation_gives_the_full_batch_gradient(tmp_path):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    cond = {"label": torch.randint(0, 4, (4, 1, 16, 16), generator=g),
            "instance": torch.randint(0, 3, (4, 1, 16, 16), generator=g)}
    t = torch.tensor([3, 40, 77, 99])
    noise = torch.randn(4, 3, 16, 16, generator=g)
    full, model, diffusion = gradient(-1, images, cond, t, noise, tmp_path / "full")
    # independent: autograd of the batch-mean loss, written out here
    model.zero_grad()
    y = Conditioning(4, False).model_input(cond)
    type(diffusion).training_losses(diffusion, model, images, t, {"y": y}, noise=noise)["loss"].mean().backward()
    direct = {n: p.grad for n, p in model.named_parameters()}
    for microbatch in (1, 2):
        split, _, _ = gradient(microbatch, images, cond, t, noise, tmp_path / f"mb{microbatch}")
        for name, value in full.items():
            torch.testing.assert_close(split[name], value, rtol=1e-4, atol=1e-6, msg=name)
    nonzero = 0
    for name, value in full.items():
        torch.testing.assert_close(value, direct[name], rtol=1e-4, atol=1e-6, msg=name)
        nonzero += bool(value.abs().sum() > 0)
    assert nonzero > len(full) * 0.9


class _Diffusion:
    num_timesteps = 6


def test_loss_second_moment_weights_follow_the_formula():
    sampler = create_named_schedule_sampler("loss-second-moment", _Diffusion())
    assert isinstance(sampler, LossSecondMomentResampler)
    assert (sampler.weights() == 1).all()  # uniform until every timestep has a full history
    rng = np.random.default_rng(0)
    history = rng.uniform(0.1, 2.0, size=(6, 12)) * np.arange(1, 7)[:, None]
    for k in range(12):  # 12 losses per timestep: only the last 10 count
        sampler.update_with_local_losses(torch.arange(6), torch.tensor(history[:, k]))
    kept = history[:, 2:]
    second_moment = np.sqrt((kept ** 2).mean(axis=1))
    want = (1 - 0.001) * second_moment / second_moment.sum() + 0.001 / 6
    np.testing.assert_allclose(sampler.weights(), want, rtol=1e-6)
    # draws follow p, and the importance weights 1 / (N p_t) keep the loss unbiased
    np.random.seed(0)
    t, w = sampler.sample(200_000, "cpu")
    freq = np.bincount(t.numpy(), minlength=6) / len(t)
    np.testing.assert_allclose(freq, want, atol=4 * np.sqrt(want * (1 - want) / len(t)).max())
    np.testing.assert_allclose(w.numpy(), 1 / (6 * want[t.numpy()]), rtol=1e-5)
    assert abs(float((w * torch.ones(len(t))).mean()) - 1) < 0.01  # E[w] = 1


def test_lr_anneal_formula_reaches_zero_at_its_step(tmp_path):
    model, diffusion = create_model_and_diffusion(**TINY_FLAGS)
    loop = TrainLoop(model=model, diffusion=diffusion, data=None, conditioning=Conditioning(4, False),
                     batch_size=2, lr=1e-3, log_dir=tmp_path, lr_anneal_steps=4)
    seen = []
    for step in range(5):
        loop.step = step
        loop._anneal_lr()
        seen.append(loop.opt.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])


def test_the_released_training_flags_run_end_to_end(tmp_path):
    """One toy run with --microbatch 1, --schedule_sampler loss-second-moment and --lr_anneal_steps 3:
    it stops at step 3, its logged lr is 2e-4 (1 - step / 3) and every microbatch's loss is in the log."""
    data = tmp_path / "toy"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([str(a) for a in [sys.executable, "-m", "scdm.toy", "--out_dir", data, "--num_train", 4,
                                     "--num_test", 1, "--size", 32]], check=True, capture_output=True, env=env,
                                     cwd=ROOT)
    arch = as_argv(dict(PRESETS["toy"].model, cond_opt="discrete_zero_uniform"))
    log_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "scdm.image_train", *arch, "--data_dir", data, "--log_dir", log_dir,
           "--batch_size", 2, "--microbatch", 1, "--schedule_sampler", "loss-second-moment", "--lr", 2e-4,
           "--lr_anneal_steps", 3, "--log_interval", 1, "--save_interval", 100, "--num_workers", 0]
    p = subprocess.run([str(a) for a in cmd], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(f.name for f in log_dir.glob("model*.pt")) == ["model000003.pt"]  # the run ends at the anneal step
    rows = list(csv.DictReader((log_dir / "progress.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]  # a row is logged after its update
    assert [float(r["lr"]) for r in rows] == pytest.approx([2e-4, 2e-4 * 2 / 3, 2e-4 / 3])
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert "choices" in json.loads((log_dir / "fast_paths.json").read_text())  # the run records its kernels
