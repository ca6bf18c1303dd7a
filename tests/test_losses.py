"""The variational-bound helpers against closed forms and scipy: the Gaussian KL, the tanh CDF
approximation, and the 8-bit discretised likelihood (which sums to 1 over the 256 bins)."""
import numpy as np
import pytest
import torch
from scipy import stats

from scdm.diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl


def test_normal_kl_is_the_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    v1 = torch.rand(50, generator=g, dtype=torch.float64) + 0.1
    v2 = torch.rand(50, generator=g, dtype=torch.float64) + 0.1
    got = normal_kl(m1, v1.log(), m2, v2.log())
    # KL(p || q) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2, per element
    want = 0.5 * np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
    torch.testing.assert_close(got, want)
    assert torch.allclose(normal_kl(m1, v1.log(), m1, v1.log()), torch.zeros(50, dtype=torch.float64))
    # Monte Carlo: E_p[log p - log q] for one pair
    p, q = stats.norm(0.3, 0.7), stats.norm(-0.2, 1.3)
    x = p.rvs(size=400_000, random_state=1)
    mc = np.mean(p.logpdf(x) - q.logpdf(x))
    kl = normal_kl(torch.tensor(0.3), torch.tensor(2 * np.log(0.7)), torch.tensor(-0.2), 2 * np.log(1.3))
    assert float(kl) == pytest.approx(mc, abs=5e-3)
    # a float logvar is accepted (the released code passes 0.0 for the prior)
    zeros = torch.zeros(50, dtype=torch.float64)
    torch.testing.assert_close(normal_kl(m1, v1.log(), 0.0, 0.0), normal_kl(m1, v1.log(), zeros, zeros))


def test_the_cdf_approximation_is_close_to_the_normal_cdf():
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    err = (approx_standard_normal_cdf(x) - torch.from_numpy(stats.norm.cdf(x.numpy()))).abs().max()
    assert err < 2e-4


def test_discretized_likelihood_is_a_distribution_over_the_256_levels():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.1, np.log(0.05)), (-0.95, np.log(0.2)), (0.0, np.log(2.0))]:
        means = torch.full_like(levels, mean)
        log_p = discretized_gaussian_log_likelihood(levels, means=means, log_scales=torch.full_like(levels, log_scale))
        assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-6)
        # an interior bin: the normal mass over [x - 1/255, x + 1/255]
        k = 128
        edges = (levels[k] - mean + torch.tensor([-1, 1], dtype=torch.float64) / 255) / np.exp(log_scale)
        want = stats.norm.cdf(edges[1].item()) - stats.norm.cdf(edges[0].item())
        assert float(log_p[k].exp()) == pytest.approx(want, abs=4e-4)  # two CDF-approximation errors
        # the edge bins take the tails
        expected = stats.norm.cdf((-1 + 1 / 255 - mean) / np.exp(log_scale))
        assert float(log_p[0].exp()) == pytest.approx(expected, abs=3e-4)


def test_mean_flat_averages_all_but_the_batch():
    x = torch.arange(24.0).view(2, 3, 4)
    torch.testing.assert_close(mean_flat(x), torch.tensor([5.5, 17.5]))
