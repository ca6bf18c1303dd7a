"""Image diffusion: schedules, respacing, losses, and a tiny model that overfits one batch."""
import math

import numpy as np
import pytest
import torch

from scdm.diffusion.gaussian_diffusion import get_named_beta_schedule
from scdm.diffusion.respace import space_timesteps
from scdm.script_util import create_gaussian_diffusion, create_model_and_diffusion

from conftest import random_label_map


def test_linear_and_cosine_betas():
    lin = get_named_beta_schedule("linear", 1000)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02) and len(lin) == 1000
    assert get_named_beta_schedule("linear", 250)[-1] == pytest.approx(0.08)
    cos = get_named_beta_schedule("cosine", 100)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    assert np.cumprod(1 - cos)[49] == pytest.approx(f(0.5) / f(0.0), rel=1e-9)
    with pytest.raises(ValueError, match="unknown noise_schedule 'quadratic'"):
        get_named_beta_schedule("quadratic", 10)


def test_space_timesteps():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(100, "10") == set(round(i * 11) for i in range(10))
    steps = sorted(space_timesteps(300, "10,1"))  # two sections of 150
    assert len(steps) == 11 and steps[0] == 0 and steps[9] == 149 and steps[10] == 150
    for bad in ["ddimx", "fast", "ddim7"]:
        with pytest.raises(ValueError, match="timestep_respacing"):
            space_timesteps(1000 if bad != "ddim7" else 10, bad)


def test_respaced_diffusion_matches_base_marginals():
    base = create_gaussian_diffusion(steps=1000)
    spaced = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim25")
    assert spaced.num_timesteps == 25
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-10)
    t = torch.tensor([0, 24])
    assert spaced.model_timesteps(t).tolist() == [0, 960]


def test_q_sample_and_posterior_against_closed_form():
    diff = create_gaussian_diffusion(steps=100)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 57])
    abar = torch.tensor(np.cumprod(1 - get_named_beta_schedule("linear", 100))[[0, 57]]).float().view(2, 1, 1, 1)
    x_t = diff.q_sample(x0, t, noise=eps)
    assert torch.allclose(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, atol=1e-6)
    # eps-prediction round trip: x0 recovered from the true noise, and the noise from x0
    assert torch.allclose(diff.xstart_from_eps(x_t, t, eps), x0, atol=1e-4)
    assert torch.allclose(diff.eps_from_xstart(x_t, t, x0), eps, atol=1e-4)
    # the accessors the DDIM update needs: alpha-bar at t and at the step before (1 before step 0)
    assert torch.allclose(diff.alphas_cumprod_at(t, x0.shape), abar.expand_as(x0))
    prev = torch.tensor([1.0, np.cumprod(1 - get_named_beta_schedule("linear", 100))[56]]).float()
    assert torch.allclose(diff.alphas_cumprod_prev_at(t, x0.shape), prev.view(2, 1, 1, 1).expand_as(x0))
    # posterior mean of x_{t-1} given x0, x_t equals the Bayes formula
    b = get_named_beta_schedule("linear", 100)
    ab = np.cumprod(1 - b)
    i = 57
    c1 = np.sqrt(ab[i - 1]) * b[i] / (1 - ab[i])
    c2 = np.sqrt(1 - b[i]) * (1 - ab[i - 1]) / (1 - ab[i])
    mean, var, _ = diff.q_posterior_mean_variance(x0, x_t, t)
    assert torch.allclose(mean[1], (c1 * x0[1] + c2 * x_t[1]).float(), atol=1e-6)
    assert var[1, 0, 0, 0].item() == pytest.approx(b[i] * (1 - ab[i - 1]) / (1 - ab[i]), rel=1e-6)


@pytest.mark.parametrize("flags,terms", [
    (dict(learn_sigma=True), {"loss", "mse", "vb"}),
    (dict(learn_sigma=False), {"loss", "mse"}),
    (dict(learn_sigma=True, use_kl=True), {"loss"}),
    (dict(learn_sigma=False, predict_xstart=True, rescale_learned_sigmas=True), {"loss", "mse"}),
])
def test_loss_variants_finite(tiny_flags, flags, terms):
    model, diff = create_model_and_diffusion(**dict(tiny_flags, **flags))
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    out = diff.training_losses(model, x0, torch.tensor([0, 60]), model_kwargs={"y": random_label_map(2, 4, 16, 16)})
    assert set(out) == terms
    assert all(torch.isfinite(v).all() and v.shape == (2,) for v in out.values())


def test_hybrid_loss_is_mse_plus_vb(tiny_flags):
    model, diff = create_model_and_diffusion(**tiny_flags)
    out = diff.training_losses(model, torch.randn(2, 3, 16, 16), torch.tensor([3, 30]),
                               model_kwargs={"y": random_label_map(2, 4, 16, 16)})
    assert torch.allclose(out["loss"], out["mse"] + out["vb"])
    # zero-initialised output: eps prediction is 0, so the MSE is the mean squared noise (~1)
    assert 0.5 < out["mse"].mean().item() < 1.5


def test_tiny_model_overfits_one_batch(tiny_flags):
    torch.manual_seed(0)
    flags = dict(tiny_flags, learn_sigma=False, cond_diffuse=True, cond_opt="discrete_zero_uniform")
    model, diff = create_model_and_diffusion(**flags)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    y = random_label_map(4, 4, 16, 16)
    t = torch.tensor([5, 20, 50, 80])
    noise = torch.randn_like(x0)
    u = torch.rand(4, 1, 16, 16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def loss():
        return diff.training_losses(model, x0, t, {"y": y}, noise=noise, label_noise=u)["loss"].mean()

    first = loss().item()
    for _ in range(20):  # it is far below first / 5 by then (about first / 100)
        opt.zero_grad()
        loss().backward()
        opt.step()
    last = loss().item()
    assert last < first / 5, (first, last)
