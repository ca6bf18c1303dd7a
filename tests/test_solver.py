"""DPM-Solver++(2M): exactness on Gaussian data, its first-order case is DDIM, an independent
recomputation of the multistep update, and the sampler contract (label noise, learned sigma, batches)."""
import numpy as np
import pytest
import torch

from scdm.diffusion.sampling import (SAMPLERS, SolverState, StepOutput, ddim_update, dpm_solver_update, resolve_sampler,
                           reverse_step, sample_loop)
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
