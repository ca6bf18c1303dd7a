"""Guidance, extrapolation, dynamic thresholding, one reverse step, and whole sampling runs."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import scdm
from scdm.diffusion import sampling
from scdm.diffusion.sampling import (dynamic_threshold, guided_model_output, process_xstart, reverse_step,
                           sample_loop)
from scdm.script_util import create_model_and_diffusion

from conftest import random_label_map


class LinearToyModel(torch.nn.Module):
    """A model whose output is a known function of (x, t, y): out = a*x + b*sum(y) + c*t."""

    def __init__(self, out_channels=6):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.3, -0.7, 0.01]))
        self.out_channels = out_channels

    def forward(self, x, t, y=None):
        ysum = y.sum(1, keepdim=True)
        base = self.w[0] * x + self.w[1] * ysum + self.w[2] * t.float().view(-1, 1, 1, 1)
        return torch.cat([base, base * 0.5 + ysum][: 1 + (self.out_channels > 3)], dim=1)[:, : self.out_channels]


def test_guidance_formula_and_batching(tiny_flags):
    _, diff = create_model_and_diffusion(**tiny_flags)
    model = LinearToyModel()
    x = torch.randn(2, 3, 8, 8)
    y = random_label_map(2, 4, 8, 8)
    t = torch.tensor([3, 9])
    s = 1.5
    out = guided_model_output(model, diff, x, t, y, guidance_scale=s)
    tt = diff.model_timesteps(t)
    cond, uncond = model(x, tt, y=y), model(x, tt, y=torch.zeros_like(y))
    assert torch.allclose(out[:, :3], uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3]), atol=1e-6)
    assert torch.equal(out[:, 3:], cond[:, 3:])
    assert torch.allclose(out, guided_model_output(model, diff, x, t, y, s, batched=False), atol=1e-6)
    assert torch.equal(guided_model_output(model, diff, x, t, y, 1.0), cond)


class CfgToyModel(LinearToyModel):
    """Offers guided batching itself: the sampler must use it (and only with batched guidance)."""

    def __init__(self):
        super().__init__()
        self.cfg_calls = 0

    def forward_with_cfg(self, x, t, y):
        self.cfg_calls += 1
        return torch.cat([self(x, t, y=y), self(x, t, y=torch.zeros_like(y))])


def test_guidance_uses_the_models_forward_with_cfg(tiny_flags):
    _, diff = create_model_and_diffusion(**tiny_flags)
    model = CfgToyModel()
    wrapped = torch.nn.Module()
    wrapped.module = model  # DDP-like wrapper: found through `.module`
    x, y, t = torch.randn(2, 3, 8, 8), random_label_map(2, 4, 8, 8), torch.tensor([3, 9])
    two_passes = guided_model_output(model, diff, x, t, y, 1.5, batched=False)
    assert model.cfg_calls == 0
    assert torch.allclose(guided_model_output(model, diff, x, t, y, 1.5), two_passes, atol=1e-6)
    assert model.cfg_calls == 1
    assert torch.allclose(guided_model_output(wrapped, diff, x, t, y, 1.5), two_passes, atol=1e-6)
    assert model.cfg_calls == 2


def _imports(path):
    """(module, names) for every import in a source file; relative imports resolved within scdm."""
    out = []
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = ("scdm." * bool(node.level)) + (node.module or "")
            out.append((module.rstrip("."), [a.name for a in node.names]))
    return out


def test_sampler_does_not_import_the_network():
    for module, names in _imports(sampling.__file__):
        assert module != "scdm.models.unet" and not (module == "scdm" and "unet" in names), module


def test_no_module_imports_private_names_of_another():
    package = Path(scdm.__file__).parent
    for path in sorted(package.glob("*.py")):
        for module, names in _imports(path):
            if module.startswith("scdm"):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.name} imports {private} from {module}"


def test_extrapolation_then_dynamic_threshold_against_numpy():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 3, 8, 8, generator=g) * 1.5
    prev = torch.randn(3, 3, 8, 8, generator=g)
    e, p = 0.8, 0.95
    out, state = process_xstart(x0, prev, extrapolation=e, threshold_percentile=p)
    ex = x0.numpy() + e * (x0.numpy() - prev.numpy())
    expected = np.empty_like(ex)
    for i in range(3):
        q = max(1.0, np.quantile(np.abs(ex[i]), p))
        expected[i] = np.clip(ex[i], -q, q) / q
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(state.numpy(), ex, atol=1e-6)
    assert out.abs().max() <= 1 + 1e-6
    # first step: nothing to extrapolate; no threshold: plain clip
    out, state = process_xstart(x0, None, extrapolation=e, threshold_percentile=None)
    assert torch.equal(out, x0.clamp(-1, 1)) and torch.equal(state, x0)
    # a sample already inside [-1, 1] is left alone by the threshold (q = 1)
    small = torch.rand(1, 3, 4, 4) * 0.5
    assert torch.equal(dynamic_threshold(small, p), small)


def test_reverse_step_composition(tiny_flags):
    model, diff = create_model_and_diffusion(**dict(tiny_flags, cond_diffuse=True, cond_opt="discrete_zero_uniform",
                                                    timestep_respacing="ddim10"))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, y = torch.randn(2, 3, 16, 16), random_label_map(2, 4, 16, 16)
    t, u = torch.tensor([7, 7]), torch.rand(2, 1, 16, 16)
    prev = torch.randn(2, 3, 16, 16) * 0.3
    with torch.no_grad():
        step = reverse_step(model, diff, x, t, y, label_noise=u, guidance_scale=2.0, extrapolation=0.8,
                            prev_xstart=prev, threshold_percentile=0.95)
        y_t = diff.diffuse_cond(y, t, noise=u)
        out = guided_model_output(model, diff, x, t, y_t, 2.0)
        x0 = diff.xstart_from_eps(x, t, out[:, :3])
        x0, state = process_xstart(x0, prev, 0.8, 0.95)
        mean, _, _ = diff.q_posterior_mean_variance(x0, x, t)
    assert torch.allclose(step.mean, mean, atol=1e-6)
    assert torch.allclose(step.pred_xstart, x0, atol=1e-6) and torch.allclose(step.prev_xstart, state, atol=1e-6)
    frac = (out[:, 3:] + 1) / 2
    lo = torch.tensor(diff.posterior_log_variance_clipped[7]).float()
    hi = torch.tensor(np.log(diff.betas[7])).float()
    assert torch.allclose(step.log_variance, frac * hi + (1 - frac) * lo, atol=1e-6)


@pytest.mark.parametrize("use_ddim", [False, True])
def test_tiny_sampling_run(tiny_flags, use_ddim):
    flags = dict(tiny_flags, cond_diffuse=True, cond_opt="discrete_zero_uniform", timestep_respacing="ddim5")
    model, diff = create_model_and_diffusion(**flags)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    y = random_label_map(2, 4, 16, 16)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x = sample_loop(model, diff, (2, 3, 16, 16), y, guidance_scale=1.5, extrapolation=0.8, threshold_percentile=0.95,
                    sampler="ddim" if use_ddim else None, generators=gens)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1
    # Per-image generators: the second image alone gives the same result as inside the batch.
    alone = sample_loop(model, diff, (1, 3, 16, 16), y[1:], guidance_scale=1.5, extrapolation=0.8,
                        threshold_percentile=0.95, sampler="ddim" if use_ddim else None,
                        generators=[torch.Generator().manual_seed(1)])
    assert torch.allclose(alone[0], x[1], atol=1e-5)


@pytest.mark.parametrize("cond_opt,kind", [("discrete_zero_uniform", "uniform"), ("", "gaussian")])
def test_sampling_draws_the_label_noise_the_diffusion_asks_for(tiny_flags, cond_opt, kind, monkeypatch):
    flags = dict(tiny_flags, cond_diffuse=True, cond_opt=cond_opt, timestep_respacing="ddim5")
    model, diff = create_model_and_diffusion(**flags)
    y = random_label_map(2, 4, 16, 16)
    seen = []
    diffuse = diff.diffuse_cond
    monkeypatch.setattr(diff, "diffuse_cond", lambda y, t, noise=None: seen.append(noise) or diffuse(y, t, noise=noise))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x = sample_loop(model, diff, (2, 3, 16, 16), y, guidance_scale=1.5, generators=gens)
    assert torch.isfinite(x).all() and len(seen) == diff.num_timesteps
    shape = (2, 1, 16, 16) if kind == "uniform" else (2, 4, 16, 16)  # one-hot channels only, not the edge
    assert all(u.shape == shape for u in seen)
    if kind == "uniform":
        assert all(u.min() >= 0 and u.max() < 1 for u in seen)
    else:
        assert any(u.min() < 0 for u in seen)
