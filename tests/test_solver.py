"""DPM-Solver++(2M): exactness on Gaussian data, its first-order case is DDIM, an independent
recomputation of the multistep update, and the sampler contract (label noise, learned sigma, batches)."""
import numpy as np
import pytest
import torch

from scdm.diffusion.sampling import (SAMPLERS, SamplerSettings, SolverState, StepOutput, ddim_update, dpm_solver_update,
                                    resolve_sampler, restart_jump, restart_schedule, reverse_step, sample_loop)
from scdm.script_util import create_gaussian_diffusion, create_model_and_diffusion

from conftest import random_label_map

MU, STD = 0.3, 0.5  # the data: every pixel N(MU, STD^2), independent


class GaussianDenoiser(torch.nn.Module):
    """The optimal eps-predictor for N(MU, STD^2) data, at the original timesteps it is fed:
    E[x0 | x_t] = MU + a STD^2 / (a^2 STD^2 + s^2) (x_t - a MU), eps = (x_t - a E[x0 | x_t]) / s.
    With `learn_sigma`, three variance channels of noise follow (a solver must not read them)."""

    def __init__(self, base_alphas_cumprod, learn_sigma=False, var_seed=None):
        super().__init__()
        self.abar = torch.from_numpy(base_alphas_cumprod)
        self.learn_sigma = learn_sigma
        self.var_gen = None if var_seed is None else torch.Generator().manual_seed(var_seed)
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append((t.clone(), None if y is None else y.clone()))
        abar = self.abar[t.long()].view(-1, 1, 1, 1)
        a, s2 = abar.sqrt(), 1 - abar
        x0 = MU + a * STD ** 2 / (abar * STD ** 2 + s2) * (x.double() - a * MU)
        eps = ((x.double() - a * x0) / s2.sqrt()).to(x.dtype)
        if not self.learn_sigma:
            return eps
        var = torch.zeros_like(eps) if self.var_gen is None else torch.rand(eps.shape, generator=self.var_gen) * 2 - 1
        return torch.cat([eps, var], dim=1)


def gaussian_setup(respacing, learn_sigma=False, var_seed=None):
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=learn_sigma, timestep_respacing=str(respacing))
    base = create_gaussian_diffusion(steps=1000)
    return GaussianDenoiser(base.alphas_cumprod, learn_sigma, var_seed), diffusion


def exact_ode_endpoint(x_T, diffusion):
    """The probability-flow ODE keeps (x_t - a_t MU) / sqrt(a_t^2 STD^2 + s_t^2) fixed for Gaussian data,
    so its end point from x_T at the first sampled step is known in closed form."""
    abar = float(diffusion.alphas_cumprod[-1])
    z = (x_T.double() - np.sqrt(abar) * MU) / np.sqrt(abar * STD ** 2 + 1 - abar)
    return MU + STD * z


def run(sampler, respacing, x_T, **kw):
    model, diffusion = gaussian_setup(respacing, **kw)
    y = torch.zeros(x_T.shape[0], 1, *x_T.shape[2:])
    out = sample_loop(model, diffusion, x_T.shape, y, noise=x_T, clip_denoised=False, sampler=sampler, device="cpu")
    return out, diffusion


def ode_errors(sampler, grid, ns, x_T):
    errors = []
    for n in ns:
        out, diffusion = run(sampler, f"{grid}{n}", x_T)
        errors.append((out.double() - exact_ode_endpoint(x_T, diffusion)).abs().max().item())
    return errors


def test_solver_is_in_the_sampler_list():
    assert {"dpm++2m", "dpm++2m-sde"} <= set(SAMPLERS) and resolve_sampler("dpm++2m", use_ddim=True) == "dpm++2m"
    with pytest.raises(ValueError, match="--sampler 'dpm'"):
        resolve_sampler("dpm")


X_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1.3, 1.3)  # |x0| < 1: no clamp


def test_converges_to_the_exact_ode_solution_with_second_order_error():
    """On Gaussian data with the optimal denoiser, on the log-SNR grid, the solver's end point approaches
    the exact ODE end point as the steps grow, about 4x closer per doubling (second order), and is
    several times closer than DDIM's, which gains only 2x per doubling (first order)."""
    ns = (10, 20, 40, 80)
    dpm, ddim = ode_errors("dpm++2m", "logsnr", ns, X_T), ode_errors("ddim", "logsnr", ns, X_T)
    assert all(a < b / 5 for a, b in zip(dpm, ddim)), (dpm, ddim)
    assert all(a > b for a, b in zip(dpm, dpm[1:])), dpm
    assert dpm[2] / dpm[3] > 3, dpm                          # second order
    assert 1.7 < ddim[2] / ddim[3] < 2.3, ddim               # first order
    assert dpm[3] < 1e-3, dpm


def test_uniform_time_grid_is_second_order_only_with_many_steps():
    """Why the solver's documented grid is logsnrN: on the uniform-in-t grid ("N") the last step before
    t = 0 is a huge log-SNR step (h = 3.6 at 10 steps), and 2M's extrapolation of the data prediction
    across it is worse than DDIM at 10 steps; its second order shows only from about 80 steps."""
    dpm_uniform, ddim_uniform = ode_errors("dpm++2m", "", (10, 80, 160), X_T), ode_errors("ddim", "", (10,), X_T)
    dpm_logsnr = ode_errors("dpm++2m", "logsnr", (10,), X_T)
    assert dpm_uniform[0] > ddim_uniform[0] > 5 * dpm_logsnr[0], (dpm_uniform, ddim_uniform, dpm_logsnr)
    assert dpm_uniform[1] / dpm_uniform[2] > 3, dpm_uniform


def test_samples_follow_the_data_distribution():
    x_T = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    coarse, _ = run("dpm++2m", "logsnr3", x_T)
    fine, diffusion = run("dpm++2m", "logsnr15", x_T)
    # Moments against the data's (clamped to [-1, 1], as samples are), within the sampling error of
    # 12288 values (about 0.005).
    data = (MU + STD * torch.randn(10 ** 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).clamp(-1,
                                                                                                                    1)
    assert abs(fine.mean().item() - data.mean().item()) < 0.015 and abs(fine.std().item() - data.std().item()) < 0.015
    # Few steps: further from the exact flow (and its distribution) than more steps.
    exact = exact_ode_endpoint(x_T, diffusion)
    assert (fine.double() - exact).abs().mean() < (coarse.double() - exact).abs().mean() / 5


def test_first_order_update_is_ddim():
    """order=1 (and the first step of 2M, with no history) is DDIM with eta=0, at every step."""
    _, diffusion = gaussian_setup(10, learn_sigma=True)
    g = torch.Generator().manual_seed(3)
    for i in range(diffusion.num_timesteps):
        t = torch.full((2,), i, dtype=torch.long)
        x, x0 = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g).clamp(-1, 1)
        step = StepOutput(None, None, None, x0, x0)
        ddim = ddim_update(diffusion, x, t, step, torch.randn(2, 3, 4, 4, generator=g), eta=0.0)
        first, _ = dpm_solver_update(diffusion, x, t, step)
        state = SolverState(torch.full((2,), -3.0, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g))
        order1, _ = dpm_solver_update(diffusion, x, t, step, state, order=1)
        assert torch.allclose(first, ddim, atol=1e-5) and torch.allclose(order1, ddim, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_has_float64_coefficients(eta):
    """Against the DDIM step done wholly in float64 from the same float32 inputs: the float32 result is
    within a few float32 roundings at every step, t = 0 and 1 included (float32 alpha-bar coefficients
    cost about 1e-4 there)."""
    diffusion = create_gaussian_diffusion(steps=1000)
    g = torch.Generator().manual_seed(5)
    for i in (0, 1, 2, 10, 500, 999):
        t = torch.full((2,), i, dtype=torch.long)
        x, x0, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
        got = ddim_update(diffusion, x, t, StepOutput(None, None, None, x0, x0), z, eta=eta)
        abar, prev = float(diffusion.alphas_cumprod[i]), float(diffusion.alphas_cumprod_prev[i])
        xd, x0d, zd = x.double(), x0.double(), z.double()
        eps = (xd - abar ** 0.5 * x0d) / (1 - abar) ** 0.5
        sigma = eta * ((1 - prev) / (1 - abar)) ** 0.5 * (1 - abar / prev) ** 0.5 if i else 0.0
        want = prev ** 0.5 * x0d + max(1 - prev - sigma ** 2, 0.0) ** 0.5 * eps + sigma * zd
        rel = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert rel < 2e-6, (i, rel)


def test_whole_first_order_loop_equals_the_ddim_sampler(tiny_flags):
    """A real SPADE UNet with guidance and dynamic thresholding: reverse_step + the first-order update over
    every step gives sample_loop's DDIM output."""
    model, diffusion = create_model_and_diffusion(**dict(tiny_flags, timestep_respacing="6"))
    torch.nn.init.normal_(model.out[-1].weight, std=0.05)  # zero-initialised: eps = 0 would make x0 trivial
    model.eval()
    y = random_label_map(2, 4, 16, 16)
    x_T = torch.randn(2, 3, 16, 16)
    kw = dict(guidance_scale=1.5, threshold_percentile=0.9)
    ddim = sample_loop(model, diffusion, x_T.shape, y, noise=x_T, sampler="ddim", device="cpu", **kw)
    x, state = x_T, None
    with torch.no_grad():
        for i in reversed(range(diffusion.num_timesteps)):
            t = torch.full((2,), i, dtype=torch.long)
            x, state = dpm_solver_update(diffusion, x, t, reverse_step(model, diffusion, x, t, y, **kw), state,
                                         order=1)
    assert torch.allclose(x.clamp(-1, 1), ddim, atol=1e-5)
    assert not torch.allclose(sample_loop(model, diffusion, x_T.shape, y, noise=x_T, sampler="dpm++2m",
                                          device="cpu", **kw), ddim, atol=1e-3)


def dynamic_threshold_np(x0, p):
    q = max(1.0, float(np.quantile(np.abs(x0), p)))
    return np.clip(x0, -q, q) / q


def test_matches_an_independent_recomputation_with_thresholding():
    """Lu et al.'s Algorithm 2 in log-SNR form, in float64 numpy, per image, with the data prediction
    dynamically thresholded; the grid is the respaced original timesteps, ending at alpha-bar = 1."""
    steps, p = 7, 0.9
    model, diffusion = gaussian_setup(f"logsnr{steps}", learn_sigma=True, var_seed=0)
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 1.5
    y = torch.zeros(3, 1, 8, 8)
    out = sample_loop(model, diffusion, x_T.shape, y, noise=x_T, threshold_percentile=p, sampler="dpm++2m",
                      device="cpu")

    base = create_gaussian_diffusion(steps=1000)
    ts = sorted(diffusion.timestep_map.tolist(), reverse=True)
    abar = [base.alphas_cumprod[t] for t in ts] + [1.0]
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - np.array(abar))
    lam = np.log(alpha / np.where(sigma > 0, sigma, np.nan))
    for b in range(3):
        x = x_T[b].double().numpy()
        prev = None
        for i, t in enumerate(ts):
            a = alpha[i]
            x0 = MU + a * STD ** 2 / (abar[i] * STD ** 2 + sigma[i] ** 2) * (x - a * MU)
            x0 = dynamic_threshold_np(x0, p)
            if i == len(ts) - 1:      # to sigma = 0: the first-order step lands on the data prediction
                x = x0
                break
            h = lam[i + 1] - lam[i]
            d = x0 if prev is None else x0 + (x0 - prev) * h / (2 * (lam[i] - lam[i - 1]))
            x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * np.expm1(-h) * d
            prev = x0
        assert np.allclose(out[b].double().numpy(), np.clip(x, -1, 1), atol=2e-5)


def test_ignores_learned_variance_channels():
    x_T = torch.randn(2, 3, 8, 8)
    a, _ = run("dpm++2m", 6, x_T, learn_sigma=True)
    b, _ = run("dpm++2m", 6, x_T, learn_sigma=True, var_seed=5)
    assert torch.equal(a, b)


def label_run(sampler, tiny_flags, gens_seeds, y):
    flags = dict(tiny_flags, timestep_respacing="5", cond_diffuse=True, cond_opt="discrete_zero_uniform")
    torch.manual_seed(0)  # the same weights in every run
    model, diffusion = create_model_and_diffusion(**flags)
    model.eval()
    calls = []
    inner = model.forward

    def recording(x, t, y=None):
        calls.append((t.clone(), y.clone()))
        return inner(x, t, y=y)
    model.forward = recording
    gens = [torch.Generator().manual_seed(s) for s in gens_seeds]
    out = sample_loop(model, diffusion, (len(gens_seeds), 3, 16, 16), y, generators=gens, sampler=sampler,
                      guidance_scale=1.0, threshold_percentile=0.95)
    return out, calls, diffusion


def test_label_map_rediffused_at_each_evaluation_as_the_other_samplers(tiny_flags):
    """Each model call sees y diffused to its own timestep with fresh label noise, the same draws as
    the ancestral and DDIM samplers make from the same per-image generators."""
    y = random_label_map(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    _, calls, diffusion = label_run("dpm++2m", tiny_flags, [10, 11], y)
    _, anc, _ = label_run("ancestral", tiny_flags, [10, 11], y)
    assert len(calls) == diffusion.num_timesteps == len(anc)
    for (t, y_t), (t2, y2) in zip(calls, anc):
        assert torch.equal(t, t2) and torch.equal(y_t, y2)
    assert [int(t[0]) for t, _ in calls] == sorted(diffusion.timestep_map.tolist(), reverse=True)
    onehot = [y_t[:, :4] for _, y_t in calls]
    masked = [float((o.sum(1) == 0).float().mean()) for o in onehot]
    assert masked[0] > masked[-1]                                # more [MASK] early (high t)
    assert not torch.equal(onehot[1], onehot[2])                  # fresh noise per call
    assert all(torch.equal(y_t[:, 4:], y[:, 4:]) for _, y_t in calls)  # the edge channel never diffuses


def test_samples_do_not_depend_on_the_batch(tiny_flags):
    y = random_label_map(3, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    together, _, _ = label_run("dpm++2m", tiny_flags, [1, 2, 3], y)
    alone, _, _ = label_run("dpm++2m", tiny_flags, [2], y[1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-5)


def test_logsnr_respacing():
    """logsnrN: N distinct steps from T-1 down to 0, nearly evenly spaced in log-SNR."""
    base = create_gaussian_diffusion(steps=1000)
    logsnr = np.log(base.alphas_cumprod) - np.log1p(-base.alphas_cumprod)
    for n in (5, 10, 50, 1000):
        steps = create_gaussian_diffusion(steps=1000, timestep_respacing=f"logsnr{n}").timestep_map.tolist()
        assert len(steps) == n and steps[0] == 0 and steps[-1] == 999 and steps == sorted(set(steps))
    steps = create_gaussian_diffusion(steps=1000, timestep_respacing="logsnr10").timestep_map
    gaps = -np.diff(logsnr[steps])
    assert np.allclose(gaps, (logsnr[0] - logsnr[-1]) / 9, rtol=0.25), gaps
    for bad in ("logsnr1", "logsnrX", "logsnr1001"):
        with pytest.raises(ValueError, match="logsnr"):
            create_gaussian_diffusion(steps=1000, timestep_respacing=bad)


def test_bench_steps_smoke(tmp_path):
    """The benchmark end to end on an untrained tiny model: every setting scored on every set, the
    JSON written, and the plot drawn (or, without matplotlib, the one-line error naming the fix)."""
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_steps.py"
    spec = importlib.util.spec_from_file_location("bench_steps", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, png = tmp_path / "steps.json", tmp_path / "steps.png"
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    if has_mpl:
        assert bench.main(["--smoke", "--out", str(out), "--plot", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        with pytest.raises(ValueError, match="matplotlib"):
            bench.main(["--smoke", "--out", str(out), "--plot", str(png)])
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"dpm++2m 2", "ddim 2", "dpm++2m-sde 2", "dpm++2m uniform-t 2",
                                          "ancestral 25 (released)"}
    for name, per_set in result["results"].items():
        assert set(per_set) == {"clean", "same"}
        for entry in per_set.values():
            assert len(entry["miou_per_seed"]) == 2 and all(0 <= m <= 1 for m in entry["miou_per_seed"])
            assert entry["fd"] > 0 and entry["seconds_per_image"] > 0  # clipped at 0: "> 0" is the real check
    released = result["results"]["ancestral 25 (released)"]["clean"]
    assert (released["respacing"], released["extrapolation"], released["model_evaluations"]) == ("ddim25", 0.8, 25)
    assert result["results"]["dpm++2m 2"]["clean"]["respacing"] == "logsnr2"
    # The noisy set is the clean tree itself here: the same maps and seeds give the same samples.
    dpm = result["results"]["dpm++2m 2"]
    assert dpm["same"]["miou_per_seed"] == dpm["clean"]["miou_per_seed"]


def test_image_sample_sampler_flag(tmp_path):
    """--sampler dpm++2m runs through image_sample and its manifest records it; --use_ddim keeps meaning
    ddim; a contradiction or an unknown name is a one-line error."""
    import json
    from scdm import image_sample
    from scdm.runtime.fileio import save_torch, write_json
    from scdm.presets import PRESETS
    from scdm.toy import make_toy_dataset
    make_toy_dataset(tmp_path / "toy", num_train=2, num_test=2, size=8, seed=0)
    flags = dict(PRESETS["toy"].model, image_size=8, attention_resolutions="4", no_instance=True,
                 cond_opt="discrete_zero_uniform", num_classes=8)
    model, _ = create_model_and_diffusion(**flags)
    (tmp_path / "run").mkdir()
    save_torch(model.state_dict(), tmp_path / "run" / "model000001.pt")
    write_json(flags, tmp_path / "run" / "args.json")
    base = ["--model_path", tmp_path / "run" / "model000001.pt", "--data_dir", tmp_path / "toy",
            "--batch_size", 2, "--timestep_respacing", "logsnr3"]
    image_sample.main([*base, "--results_path", tmp_path / "dpm", "--sampler", "dpm++2m"])
    image_sample.main([*base, "--results_path", tmp_path / "ddim", "--use_ddim", "True"])
    dpm = json.loads((tmp_path / "dpm" / "manifest.json").read_text())["sampling"]
    ddim = json.loads((tmp_path / "ddim" / "manifest.json").read_text())["sampling"]
    assert (dpm["sampler"], dpm["timestep_respacing"], ddim["sampler"]) == ("dpm++2m", "logsnr3", "ddim")
    from scdm.results_folder import main_settings
    settings = dict(main_settings(json.loads((tmp_path / "dpm" / "manifest.json").read_text())))
    assert settings["sampler"] == "dpm++2m" and settings["respacing"] == "logsnr3"
    assert dict(main_settings({"sampling": {"use_ddim": True}}))["sampler"] == "ddim"  # an older manifest
    assert sorted(p.name for p in (tmp_path / "dpm" / "samples").iterdir()) == ["00000.png", "00001.png"]
    with pytest.raises(ValueError, match="--sampler ancestral with --use_ddim True"):
        image_sample.main([*base, "--results_path", tmp_path / "x", "--sampler", "ancestral", "--use_ddim", "True"])
    with pytest.raises(SystemExit):
        image_sample.main([*base, "--results_path", tmp_path / "x", "--sampler", "dpm"])


def test_sde_variant_first_order_is_ddim_eta_1_and_samples_the_data():
    """dpm++2m-sde: order 1 with the same noise is DDIM with eta=1 at every step; its samples on Gaussian
    data have the data's moments."""
    _, diffusion = gaussian_setup("logsnr10", learn_sigma=True)
    g = torch.Generator().manual_seed(8)
    for i in range(diffusion.num_timesteps):
        t = torch.full((2,), i, dtype=torch.long)
        x, x0, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
        step = StepOutput(None, None, None, x0.clamp(-1, 1), x0)
        ddim = ddim_update(diffusion, x, t, step, z, eta=1.0)
        order1, _ = dpm_solver_update(diffusion, x, t, step, None, order=1, noise=z)
        assert torch.allclose(order1, ddim, atol=1e-3)  # DDIM: float32 sqrt(1 - abar - sigma^2), cancelling
    model, diffusion = gaussian_setup("logsnr20")
    gens = [torch.Generator().manual_seed(100 + i) for i in range(16)]
    out = sample_loop(model, diffusion, (16, 3, 16, 16), torch.zeros(16, 1, 16, 16), clip_denoised=False,
                      sampler="dpm++2m-sde", generators=gens, device="cpu")
    data = (MU + STD * torch.randn(10 ** 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).clamp(-1,
                                                                                                                    1)
    assert abs(out.mean().item() - data.mean().item()) < 0.015 and abs(out.std().item() - data.std().item()) < 0.015


def lam_grid(diffusion):
    """alpha, sigma and lambda = log(alpha / sigma) of a respaced Gaussian diffusion's grid points, from
    the first sampled step down to alpha-bar 1, in float64 (the independent computations below)."""
    base = create_gaussian_diffusion(steps=1000)
    abar = np.array([base.alphas_cumprod[t] for t in sorted(diffusion.timestep_map.tolist(), reverse=True)] + [1.0])
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    return alpha, sigma, np.log(alpha / np.where(sigma > 0, sigma, np.nan))


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.7, 1.0])
def test_stochastic_solver_step_is_ddim_eta_in_log_snr_form(eta):
    """dpm++2m with eta, one step against DDIM's eta family written from scratch in float64: with
    c = eta sigma_t sqrt(1 - e^-2h), x_t = alpha_t D + sqrt(sigma_t^2 - c^2) (x_s - alpha_s D) / sigma_s + c z
    (D the 2M data prediction); eta = 0 is the ODE update, eta = 1 the dpm++2m-sde update, and with no
    history it is ddim_update(eta) at every step."""
    _, diffusion = gaussian_setup("logsnr10")
    alpha, sigma, lam = lam_grid(diffusion)
    g = torch.Generator().manual_seed(9)
    n = diffusion.num_timesteps
    for i in range(n - 1, -1, -1):
        k = n - 1 - i                                    # position in alpha/sigma/lam: k = step, k + 1 = next
        t = torch.full((2,), i, dtype=torch.long)
        x, x0, old, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(4))
        step = StepOutput(None, None, None, x0, x0)
        lam_prev = torch.full((2,), lam[k] - 0.7, dtype=torch.float64)
        got, _ = dpm_solver_update(diffusion, x, t, step, SolverState(lam_prev, old), noise=z, eta=eta)
        h = lam[k + 1] - lam[k]
        xd, x0d, zd = x.double(), x0.double(), z.double()
        d = x0d if i == 0 else x0d + (x0d - old.double()) * h / (2 * 0.7)
        c = eta * sigma[k + 1] * np.sqrt(1 - np.exp(-2 * h)) if i else 0.0
        carried = np.sqrt(max(sigma[k + 1] ** 2 - c ** 2, 0.0))
        want = alpha[k + 1] * d + carried * (xd - alpha[k] * d) / sigma[k] + c * zd
        assert torch.allclose(got.double(), want, atol=2e-5), (i, (got.double() - want).abs().max())
        if eta == 0.0:
            ode, _ = dpm_solver_update(diffusion, x, t, step, SolverState(lam_prev, old))
            assert torch.allclose(got, ode, atol=1e-6)
        first, _ = dpm_solver_update(diffusion, x, t, step, None, noise=z, eta=eta)
        assert torch.allclose(first, ddim_update(diffusion, x, t, step, z, eta=eta), atol=1e-3)  # DDIM's float32
    if eta == 1.0:  # and the SDE update of "dpm++2m-sde" is the eta = 1 case, to float64 rounding
        x, x0, old, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(4))
        t, step = torch.full((2,), 4, dtype=torch.long), StepOutput(None, None, None, x0, x0)
        state = SolverState(torch.full((2,), lam[5] - 0.7, dtype=torch.float64), old)
        h = lam[6] - lam[5]
        d = x0.double() + (x0.double() - old.double()) * h / 1.4
        sde = (sigma[6] / sigma[5] * np.exp(-h) * x.double() + alpha[6] * -np.expm1(-2 * h) * d
               + sigma[6] * np.sqrt(-np.expm1(-2 * h)) * z.double())
        assert torch.allclose(dpm_solver_update(diffusion, x, t, step, state, noise=z)[0].double(), sde, atol=2e-5)


def draws(seeds, shape, count):
    """What sample_loop draws from per-image generators on an unlabeled Gaussian model: x_T, then one z
    per step (and per restart jump, before its step's z)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return [torch.stack([torch.randn(*shape, generator=g) for g in gens]).double().numpy() for _ in range(count)]


def gaussian_x0(x, a, s):
    return MU + a * STD ** 2 / (a ** 2 * STD ** 2 + s ** 2) * (x - a * MU)


def test_stochastic_solver_loop_matches_a_float64_recomputation():
    """sample_loop(dpm++2m, eta=0.6) against the multistep update with eta done in numpy float64 from the
    same per-image draws, the data prediction dynamically thresholded."""
    eta, p, seeds = 0.6, 0.9, [21, 22]
    model, diffusion = gaussian_setup("logsnr6", learn_sigma=True, var_seed=1)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = sample_loop(model, diffusion, (2, 3, 8, 8), torch.zeros(2, 1, 8, 8), threshold_percentile=p,
                      sampler="dpm++2m", eta=eta, generators=gens, device="cpu")
    alpha, sigma, lam = lam_grid(diffusion)
    n = diffusion.num_timesteps
    z = draws(seeds, (3, 8, 8), n + 1)
    for b in range(2):
        x, prev = z[0][b].astype(np.float32).astype(np.float64), None
        for k in range(n):
            x0 = dynamic_threshold_np(gaussian_x0(x, alpha[k], sigma[k]), p)
            if k == n - 1:
                x = x0
                break
            h = lam[k + 1] - lam[k]
            d = x0 if prev is None else x0 + (x0 - prev) * h / (2 * (lam[k] - lam[k - 1]))
            c = eta * sigma[k + 1] * np.sqrt(-np.expm1(-2 * h))
            x = (alpha[k + 1] * d + np.sqrt(sigma[k + 1] ** 2 - c ** 2) * (x - alpha[k] * d) / sigma[k]
                 + c * z[k + 1][b])
            prev = x0
        assert np.allclose(out[b].double().numpy(), np.clip(x, -1, 1), atol=5e-5)


@pytest.mark.parametrize("sampler,eta", [("dpm++2m", 0.5), ("dpm++2m", 0.0)])
def test_restart_keeps_the_data_distribution(sampler, eta):
    """Restart on Gaussian data with the optimal denoiser: the forward jump from lo to hi followed by the
    reverse steps back to lo keeps x on the exact marginals, so the samples have the data's moments, with
    the ODE (eta 0) as well as with the stochastic solver; and the jump is the forward process's."""
    model, diffusion = gaussian_setup("logsnr20")
    gens = [torch.Generator().manual_seed(200 + i) for i in range(16)]
    out = sample_loop(model, diffusion, (16, 3, 16, 16), torch.zeros(16, 1, 16, 16), clip_denoised=False,
                      sampler=sampler, eta=eta, restart=(4, 12, 2), generators=gens, device="cpu")
    assert len(model.seen) == 20 + 2 * 8
    data = (MU + STD * torch.randn(10 ** 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).clamp(-1,
                                                                                                                    1)
    assert abs(out.mean().item() - data.mean().item()) < 0.015 and abs(out.std().item() - data.std().item()) < 0.015


def test_restart_schedule_and_jump():
    """restart (lo, hi, times): after the step that reaches grid point lo, x jumps to hi and steps hi..lo+1
    run again, `times` times; the model evaluations and the jump are exact."""
    assert [i for i, _ in restart_schedule(6, (1, 3, 2))] == [5, 4, 3, 2, 3, 2, 3, 2, 1, 0]
    assert [j for _, j in restart_schedule(6, (1, 3, 2)) if j] == [(1, 3), (1, 3)]
    assert restart_schedule(4) == restart_schedule(4, (0, 2, 0)) == [(3, None), (2, None), (1, None), (0, None)]
    for bad in ((1, 6, 1), (3, 3, 1)):
        with pytest.raises(ValueError, match="restart"):
            restart_schedule(6, bad)
    _, diffusion = gaussian_setup("logsnr6")
    x, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    r = float(diffusion.alphas_cumprod[4] / diffusion.alphas_cumprod[1])
    assert torch.allclose(restart_jump(diffusion, x, 1, 4, z).double(),
                          np.sqrt(r) * x.double() + np.sqrt(1 - r) * z.double(), atol=1e-6)


def test_restart_loop_matches_a_float64_recomputation():
    """sample_loop(ddim, restart) against DDIM (eta 0) with the jump, in numpy float64 from the same draws:
    x_T, a z per step, and the jump's z before the z of its step; the extrapolation state restarts too."""
    seeds, e = [31, 32], 0.5
    model, diffusion = gaussian_setup("logsnr6")
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = sample_loop(model, diffusion, (2, 3, 8, 8), torch.zeros(2, 1, 8, 8), clip_denoised=False,
                      extrapolation=e, sampler="ddim", restart=(1, 3, 1), generators=gens, device="cpu")
    alpha, sigma, _ = lam_grid(diffusion)
    order = restart_schedule(6, (1, 3, 1))
    z = draws(seeds, (3, 8, 8), 1 + len(order) + 1)
    for b in range(2):
        x, prev, used = z[0][b], None, 1
        for i, jump in order:
            k = 5 - i
            if jump:
                lo, hi = jump
                r = alpha[5 - hi] ** 2 / alpha[5 - lo] ** 2
                x, prev, used = np.sqrt(r) * x + np.sqrt(1 - r) * z[used][b], None, used + 1
            x0 = gaussian_x0(x, alpha[k], sigma[k])
            x0 = x0 if prev is None else x0 + e * (x0 - prev)
            prev = x0
            x = alpha[k + 1] * x0 + sigma[k + 1] * (x - alpha[k] * x0) / sigma[k]
            used += 1
        assert np.allclose(out[b].double().numpy(), np.clip(x, -1, 1), atol=5e-5)


def test_fixed_label_noise_is_one_forward_path(tiny_flags):
    """label_noise="fixed": one u per image, drawn from its generator after x_T, so every y_t the model sees
    is diffuse_cond(y, t, u) with that u, and a pixel masked at a step stays masked at every higher step;
    "fresh" (the default) draws anew at each evaluation."""
    y = random_label_map(2, 4, 16, 16, generator=torch.Generator().manual_seed(12))
    flags = dict(tiny_flags, timestep_respacing="5", cond_diffuse=True, cond_opt="discrete_zero_uniform")
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**flags)
    model.eval()
    calls = []
    inner = model.forward
    model.forward = lambda x, t, y=None: (calls.append((t.clone(), y.clone())), inner(x, t, y=y))[1]
    gens = [torch.Generator().manual_seed(s) for s in (40, 41)]
    sample_loop(model, diffusion, (2, 3, 16, 16), y, generators=gens, label_noise="fixed")
    fresh = [torch.Generator().manual_seed(s) for s in (40, 41)]
    u = torch.stack([(torch.randn(3, 16, 16, generator=g), torch.rand(1, 16, 16, generator=g))[1] for g in fresh])
    assert len(calls) == 5
    masks = []
    for i, (_, y_t) in zip(range(4, -1, -1), calls):
        assert torch.equal(y_t, diffusion.diffuse_cond(y, torch.full((2,), i), noise=u))
        masks.append(y_t[:, :4].sum(1) == 0)
    assert all(bool((low & ~high).sum() == 0) for high, low in zip(masks, masks[1:]))  # masked sets shrink with t
    assert masks[0].sum() > masks[-1].sum()
    with pytest.raises(ValueError, match="label_noise"):
        sample_loop(model, diffusion, (2, 3, 16, 16), y, label_noise="once")


def test_sampler_settings_check_the_new_options():
    assert SamplerSettings(sampler="dpm++2m", eta=0.5).loop_options()["eta"] == 0.5
    assert SamplerSettings(restart=[1, 3, 2]).loop_options()["restart"] == (1, 3, 2)
    for bad, match in ((dict(eta=0.5), "eta is for ddim and dpm"), (dict(sampler="dpm++2m-sde", eta=0.5), "eta"),
                       (dict(restart=(3, 1, 1)), "restart"), (dict(restart=(1, 3)), "restart"),
                       (dict(restart=(1.0, 3, 1)), "restart"), (dict(label_noise="once"), "label_noise")):
        with pytest.raises(ValueError, match=match):
            SamplerSettings(**bad)


@pytest.mark.parametrize("content, says", [
    (None, "No such file or directory"),
    ("not json", "not JSON; expected the --out file"),
    ('{"a": 1}', "no 'results' of settings by label set"),
])
def test_bench_steps_plot_from_names_a_file_that_is_not_an_earlier_run(tmp_path, content, says):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_steps.py"
    spec = importlib.util.spec_from_file_location("bench_steps", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    earlier = tmp_path / "earlier.json"
    if content is not None:
        earlier.write_text(content)
    with pytest.raises(ValueError, match=f"^--plot_from {earlier}: {says}"):
        bench.main(["--plot_from", str(earlier), "--plot", str(tmp_path / "p.png")])
    assert not (tmp_path / "p.png").exists()
