"""Sampling: one guided reverse step, and the ancestral / DDIM / DPM-Solver++(2M) loops built from it.

Each reverse step draws a fresh y_t from the given (possibly noisy) label map, runs the model with
classifier-free guidance, post-processes the x0 estimate (extrapolation, then dynamic thresholding
or clipping) and returns the posterior. All randomness can be injected or drawn per image from
per-image generators, so results do not depend on batch composition. The sampler knows any model
only through its call (and `forward_with_cfg` where it has one) and the diffusion through its
public methods.
"""
import zlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass
class StepOutput:
    mean: torch.Tensor            # posterior mean of x_{t-1}
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_xstart: torch.Tensor     # processed x0 estimate used for the posterior
    prev_xstart: torch.Tensor     # extrapolation state to pass to the next step (extrapolated x0)


def guided_model_output(model, diffusion, x, t, y_t, guidance_scale=1.0, batched=True, per_image=False):
    """Model output with classifier-free guidance on the mean (eps / x0) channels:
    out = out(x, 0) + s * (out(x, y_t) - out(x, 0)); variance channels come from the conditional pass.
    The unconditional input is the all-zero map. With batched=True both passes run in one call: the
    model's own `forward_with_cfg` where it has one (our UNet can share its label-free encoder), else
    one forward on the 2B concatenated inputs; batched=False runs two separate passes (the released
    computation). `per_image`: one network call per image (`sample_loop`'s batch_invariant)."""
    if per_image and x.shape[0] > 1:
        return torch.cat([guided_model_output(model, diffusion, x[i:i + 1], t[i:i + 1], y_t[i:i + 1], guidance_scale,
                                              batched) for i in range(x.shape[0])])
    tt = diffusion.model_timesteps(t)
    if guidance_scale == 1.0:
        return model(x, tt, y=y_t)
    forward_with_cfg = _find_forward_with_cfg(model) if batched else None
    if forward_with_cfg is not None:
        cond, uncond = forward_with_cfg(x, tt, y_t).chunk(2)
    elif batched:
        null = torch.zeros_like(y_t)
        out = model(torch.cat([x, x]), torch.cat([tt, tt]), y=torch.cat([y_t, null]))
        cond, uncond = out.chunk(2)
    else:
        cond, uncond = model(x, tt, y=y_t), model(x, tt, y=torch.zeros_like(y_t))
    c = x.shape[1]
    guided = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([guided, cond[:, c:]], dim=1)


def _find_forward_with_cfg(model):
    """The model's `forward_with_cfg`, looking through DDP (`.module`) and torch.compile (`._orig_mod`)."""
    for _ in range(4):
        if model is None:
            return None
        fn = getattr(model, "forward_with_cfg", None)
        if callable(fn):
            return fn
        inner = getattr(model, "_orig_mod", None)
        model = getattr(model, "module", None) if inner is None else inner
    return None


def dynamic_threshold(x0, percentile):
    """Per sample: q = max(1, quantile_p |x0|); clip to [-q, q] and divide by q."""
    q = torch.quantile(x0.abs().reshape(x0.shape[0], -1).float(), percentile, dim=1)
    q = torch.clamp(q, min=1.0).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, q), -q) / q


def process_xstart(x0, prev_xstart=None, extrapolation=0.0, threshold_percentile=None, clip_denoised=True):
    """Extrapolation x0 + e (x0 - prev), then dynamic thresholding (or plain clipping).
    Returns (processed x0, state): the state is the extrapolated x0, before thresholding."""
    if extrapolation and prev_xstart is not None:
        x0 = x0 + extrapolation * (x0 - prev_xstart)
    state = x0
    if threshold_percentile:
        x0 = dynamic_threshold(x0, threshold_percentile)
    elif clip_denoised:
        x0 = x0.clamp(-1, 1)
    return x0, state


def reverse_step(model, diffusion, x, t, y, *, label_noise=None, guidance_scale=1.0, extrapolation=0.0,
                 prev_xstart=None, threshold_percentile=None, clip_denoised=True, batched_guidance=True,
                 per_image=False):
    """One reverse step at this diffusion's step indices t (B,), for the label map y
    (one-hot channels + optional edge channel). `label_noise` is the noise used to draw y_t, as
    `diffusion.label_noise_spec` describes it (None: drawn). `prev_xstart` is the previous step's
    StepOutput.prev_xstart. `threshold_percentile` p turns on dynamic thresholding (None: clipping)."""
    y_t = diffusion.diffuse_cond(y, t, noise=label_noise)
    out = guided_model_output(model, diffusion, x, t, y_t, guidance_scale, batched=batched_guidance,
                              per_image=per_image)
    mean_values, var_values = diffusion.split_model_output(out, x)
    variance, log_variance = diffusion.variance_from_output(var_values, x, t)
    x0 = diffusion.pred_xstart_from_output(mean_values, x, t)
    x0, state = process_xstart(x0, prev_xstart, extrapolation, threshold_percentile, clip_denoised)
    mean, _, _ = diffusion.q_posterior_mean_variance(x0, x, t)
    return StepOutput(mean, variance, log_variance, x0, state)


def ddim_update(diffusion, x, t, step: StepOutput, noise, eta=0.0):
    """x_{t-1} by DDIM from the step's x0 estimate (eta=0: deterministic):
        x_{t-1} = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z,  eps = (x - sqrt(abar) x0) / sqrt(1 - abar),
    written as c_x0 x0 + c_x x + sigma z with the coefficients computed in float64 and cast once: near
    t = 0, 1 - abar in float32 alone costs about 1e-4 of relative error."""
    ts = t.detach().cpu().numpy()
    abar, abar_prev = diffusion.alphas_cumprod[ts], diffusion.alphas_cumprod_prev[ts]
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev) * (ts != 0)
    c_x = np.sqrt(np.clip(1 - abar_prev - sigma ** 2, 0.0, None)) / np.sqrt(1 - abar)
    c_x0 = np.sqrt(abar_prev) - c_x * np.sqrt(abar)

    def per_image(c):
        per_item = torch.from_numpy(np.ascontiguousarray(c)).to(device=x.device, dtype=x.dtype)
        return per_item.view(-1, *([1] * (x.dim() - 1)))

    return per_image(c_x0) * step.pred_xstart + per_image(c_x) * x + per_image(sigma) * noise


def ancestral_update(x, t, step: StepOutput, noise):
    nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
    return step.mean + nonzero * torch.exp(0.5 * step.log_variance) * noise


@dataclass
class SolverState:
    """What DPM-Solver++(2M) carries to its next step: the last data prediction and its log-SNR."""
    lam: torch.Tensor             # (B,) float64: lambda = log(alpha / sigma) where x0 was predicted
    pred_xstart: torch.Tensor


def dpm_solver_update(diffusion, x, t, step: StepOutput, state: Optional[SolverState] = None, order=2, noise=None,
                      eta=1.0):
    """x at the next grid point by DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction).

    The grid is this diffusion's steps: from step t (alpha_s, sigma_s) to the step before it (alpha_t,
    sigma_t; alpha-bar 1 after t = 0), with h = lambda_t - lambda_s and lambda = log(alpha / sigma):
        x_t = sigma_t / sigma_s * x_s - alpha_t * expm1(-h) * D,
        D = x0_s + (x0_s - x0_prev) / (2 r),  r = h_prev / h,
    where x0 is the step's processed (guided, thresholded) data prediction. The first step (no
    `state`), `order=1` and the last step (to sigma = 0: h is infinite, r = 0, the correction is
    undefined; DPM-Solver++ ends with a first-order step too) use D = x0_s, which is DDIM with eta = 0.
    Written here rather than behind diffusers' DPMSolverMultistepScheduler: the update is these two
    lines, while the model call (guidance, label re-diffusion, learned sigma), the respaced grid, the
    x0 post-processing and the per-image noise are ours either way. Coefficients in float64.
    With `noise` (z ~ N(0, I)): the SDE variant ("dpm++2m-sde", the same D), which re-injects noise as the
    ancestral sampler does: x_t = sigma_t / sigma_s e^-h x_s + alpha_t (1 - e^-2h) D + sigma_t sqrt(1 - e^-2h) z;
    its first-order case is DDIM with eta = 1 (the posterior of fixed small variance).
    `eta` in [0, 1] (with `noise`) moves between the two as DDIM's eta does: of the variance sigma_t^2 at
    the next point, the fraction eta^2 (1 - e^-2h) is fresh noise and the rest is carried by x_s,
        x_t = sigma_t / sigma_s k x_s + alpha_t (1 - k e^-h) D + eta sigma_t sqrt(1 - e^-2h) z,
        k = sqrt(1 - eta^2 (1 - e^-2h)),
    so eta = 0 is the ODE update above, eta = 1 the SDE one, and the first-order case is DDIM(eta).
    Returns (x_t, state for the next step)."""
    abar_s = torch.from_numpy(diffusion.alphas_cumprod).to(x.device)[t]
    abar_t = torch.from_numpy(diffusion.alphas_cumprod_prev).to(x.device)[t]
    lam_s = 0.5 * (torch.log(abar_s) - torch.log1p(-abar_s))
    lam_t = 0.5 * (torch.log(abar_t) - torch.log1p(-abar_t))  # +inf at alpha-bar 1
    h = lam_t - lam_s
    view = (-1, *([1] * (x.dim() - 1)))
    x0 = d = step.pred_xstart
    if order >= 2 and state is not None:
        second = torch.isfinite(h)
        r = (lam_s - state.lam) / torch.where(second, h, torch.ones_like(h))
        w = torch.where(second, 0.5 / r, torch.zeros_like(r)).to(x0.dtype).view(view)
        d = x0 + w * (x0 - state.pred_xstart)
    if noise is None:
        coef_x = torch.sqrt((1 - abar_t) / (1 - abar_s))
        coef_d = -torch.sqrt(abar_t) * torch.expm1(-h)
        return coef_x.to(x.dtype).view(view) * x + coef_d.to(x.dtype).view(view) * d, SolverState(lam_s, x0)
    if eta == 1.0:  # k = e^-h: the SDE update as written above
        fresh = -torch.expm1(-2 * h)
        coef_x, coef_d = torch.sqrt((1 - abar_t) / (1 - abar_s)) * torch.exp(-h), torch.sqrt(abar_t) * fresh
    else:
        fresh = -eta ** 2 * torch.expm1(-2 * h)                   # eta^2 (1 - e^-2h), in [0, 1]
        k = torch.sqrt(1 - fresh)
        coef_x, coef_d = torch.sqrt((1 - abar_t) / (1 - abar_s)) * k, torch.sqrt(abar_t) * (1 - k * torch.exp(-h))
    coef_z = torch.sqrt((1 - abar_t) * fresh)
    out = coef_x.to(x.dtype).view(view) * x + coef_d.to(x.dtype).view(view) * d
    return out + coef_z.to(x.dtype).view(view) * noise, SolverState(lam_s, x0)


_DRAW = {"gaussian": torch.randn, "uniform": torch.rand}

# Names accepted by `sample_loop(sampler=...)` and the `--sampler` flags.
SAMPLERS = ("ancestral", "ddim", "dpm++2m", "dpm++2m-sde")
# How the label noise of y_t is drawn along a sample's steps (`sample_loop`'s label_noise).
LABEL_NOISE = ("fresh", "fixed")


# The limits of the guidance scale and the x0 extrapolation, shared by every entry point.
MAX_GUIDANCE = 100.0
MAX_EXTRAPOLATION = 10.0


def resolve_sampler(sampler=None, use_ddim=False):
    """The sampler name; `use_ddim=True` (the released flag) means "ddim" when no name is given."""
    name = sampler or ("ddim" if use_ddim else "ancestral")
    if name not in SAMPLERS:
        raise ValueError(f"--sampler {name!r}: expected one of {', '.join(SAMPLERS)}")
    return name


@dataclass(frozen=True)
class SamplerSettings:
    """How label maps are sampled, checked once when made: every entry point (the sampler CLI, the
    pipeline, generate, the painter, the benchmarks) builds one and hands it to `sample_batch`, so
    a limit or a default cannot differ between them.

    `respacing` names the step grid the caller's diffusion is respaced to (`ddim25`, `logsnr10`,
    ...; recorded, not applied here); `unlabeled_to_zero` says how the caller built `y` (the
    unlabeled class as the all-zero [MASK] vector). `eta` is the fresh-noise amount of "ddim" and
    "dpm++2m" (0: deterministic, 1: "dpm++2m-sde"); the others have theirs fixed and refuse one.
    `label_noise` and `restart`: see `sample_loop` (defaults: the released loop)."""
    sampler: str = "ancestral"
    respacing: str = ""
    guidance_scale: float = 1.0
    extrapolation: float = 0.0
    dynamic_threshold: float = 0.0   # percentile of the dynamic thresholding of x0; 0: plain clipping
    clip_denoised: bool = True
    eta: float = 0.0
    unlabeled_to_zero: bool = False
    batch_invariant: bool = False
    batched_guidance: bool = True
    label_noise: str = "fresh"
    restart: tuple = ()              # (lo, hi, times): see restart_schedule

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if self.label_noise not in LABEL_NOISE:
            raise ValueError(f"label_noise={self.label_noise!r}: expected one of {', '.join(LABEL_NOISE)}")
        restart = tuple(self.restart)
        if restart and (len(restart) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                      for v in restart) or not restart[0] < restart[1]):
            raise ValueError(f"restart={self.restart!r}: expected (lo, hi, times), integers with 0 <= lo < hi, "
                             "times >= 0")
        object.__setattr__(self, "restart", restart)
        for name, lo, hi, hi_open in (("guidance_scale", 0.0, MAX_GUIDANCE, False),
                                      ("extrapolation", 0.0, MAX_EXTRAPOLATION, False),
                                      ("dynamic_threshold", 0.0, 1.0, True), ("eta", 0.0, 1.0, False)):
            value = getattr(self, name)
            try:
                ok = not isinstance(value, bool) and lo <= float(value) and (
                    float(value) < hi if hi_open else float(value) <= hi)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"{name}={value!r}: expected a number in [{lo:g}, {hi:g}{')' if hi_open else ']'}"
                                 + (" (0: plain clipping)" if name == "dynamic_threshold" else ""))
            object.__setattr__(self, name, float(value))
        if self.eta and self.sampler not in ("ddim", "dpm++2m"):
            raise ValueError(f"eta={self.eta:g} with sampler={self.sampler!r}: eta is for ddim and dpm++2m "
                             "(ancestral and dpm++2m-sde have their noise fixed)")

    def loop_options(self):
        """The keyword arguments of `sample_loop` these settings stand for."""
        return dict(sampler=self.sampler, guidance_scale=self.guidance_scale, extrapolation=self.extrapolation,
                    threshold_percentile=self.dynamic_threshold or None, clip_denoised=self.clip_denoised,
                    eta=self.eta, batch_invariant=self.batch_invariant, batched_guidance=self.batched_guidance,
                    label_noise=self.label_noise, restart=self.restart)


def image_seed(seed, name, k=0):
    """The seed of sample set `k` of the label map `name`: a sample depends on its map's name, not on
    its batch, rank or resume point."""
    return zlib.crc32(f"{seed}:{k}:{name}".encode()) & 0x7FFFFFFF


def image_generators(seed, names, k=0):
    """One seeded CPU generator per label map (see `image_seed`)."""
    return [torch.Generator().manual_seed(image_seed(seed, n, k)) for n in names]


def to_uint8(x):
    """(3,H,W) in [-1,1] -> HxWx3 uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _draw(shape_per_item, batch, device, generators, kind="gaussian"):
    """Random tensor of shape (batch, *shape_per_item); one generator per item when given."""
    fn = _DRAW[kind]
    if generators is None:
        return fn(batch, *shape_per_item, device=device)
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch}")
    return torch.stack([fn(*shape_per_item, generator=g, device=g.device) for g in generators]).to(device)


def restart_schedule(num_steps, restart=()):
    """The order of a loop's steps: (step index, jump) pairs from num_steps - 1 down to 0, where jump is
    None or (lo, hi): before this step, x is taken back up from grid point lo to grid point hi by the
    forward process. `restart` = (lo, hi, times) repeats steps hi..lo+1 `times` more times once x has
    reached grid point lo (Restart sampling, Xu et al. 2023): the fresh noise of the jump corrects the
    errors of the steps below hi, at hi - lo model evaluations per repeat. () or times 0: no restart."""
    order = [(i, None) for i in range(num_steps - 1, -1, -1)]
    if not restart or not restart[2]:
        return order
    lo, hi, times = restart
    if not 0 <= lo < hi <= num_steps - 1:
        raise ValueError(f"restart={restart!r}: expected 0 <= lo < hi <= {num_steps - 1} (grid points of this "
                         f"{num_steps}-step diffusion)")
    cut = num_steps - 1 - lo          # the steps hi..lo+1 are done: x is at grid point lo
    again = [(i, (lo, hi) if i == hi else None) for i in range(hi, lo, -1)]
    return order[:cut] + again * times + order[cut:]


def restart_jump(diffusion, x, lo, hi, z):
    """x at grid point lo taken to grid point hi (lo < hi) by the forward process:
    x_hi = sqrt(abar_hi / abar_lo) x_lo + sqrt(1 - abar_hi / abar_lo) z, coefficients in float64."""
    ratio = float(diffusion.alphas_cumprod[hi]) / float(diffusion.alphas_cumprod[lo])
    return np.sqrt(ratio) * x + np.sqrt(1 - ratio) * z



def sample_loop(model, diffusion, shape, y, *, noise=None, guidance_scale=1.0, extrapolation=0.0,
                threshold_percentile=None, clip_denoised=True, eta=0.0,
                generators: Optional[Sequence[torch.Generator]] = None, device=None, progress=False,
                batched_guidance=True, on_step: Optional[Callable[[], None]] = None, sampler=None,
                batch_invariant=False, label_noise="fresh", restart=()):
    """Full reverse process from x_T ~ N(0, I) (or `noise`) to x_0, over all of this diffusion's
    steps (respaced when the diffusion is respaced). Returns x_0 clamped to [-1, 1].
    `progress`: a bar of its own over the steps; `on_step`: called after each step, for a caller's
    bar that spans many batches. `sampler`: one of SAMPLERS (None: "ancestral"). Every sampler
    evaluates the model once per step at the diffusion's (respaced) steps
    ("ddimN", "N" or "logsnrN" respacing: N steps), drawing the same label noise, and they differ only
    in the update ("dpm++2m": `dpm_solver_update`, stochastic with `eta` > 0). For "dpm++2m" use
    "logsnrN": on grids uniform in t its last steps before t = 0 are huge log-SNR steps where the
    second-order correction overshoots (tests/test_solver.py measures both on Gaussian data).
    `label_noise`: "fresh" draws the label noise u of y_t anew at every evaluation (the released
    sampler); "fixed" draws one u per image and keeps it, so the y_t the model sees are one path of
    the forward label process (a pixel masked at t stays masked above t) rather than independent draws.
    `restart`: (lo, hi, times) of `restart_schedule`, extra evaluations after the grid's.
    `batch_invariant`: the network sees one image per call. Kernels pick their algorithm by batch
    size (oneDNN convs at batch 1, GEMM blocking, the unique-patch count of a batch), which moves the
    last bits; with per-image calls and `generators`, an image's result is the same bits in any batch."""
    sampler = resolve_sampler(sampler)
    if label_noise not in LABEL_NOISE:
        raise ValueError(f"label_noise={label_noise!r}: expected one of {', '.join(LABEL_NOISE)}")
    device = device or next(model.parameters()).device
    b = shape[0]
    if y.shape[0] != b:
        raise ValueError(f"label map batch {y.shape[0]} != sample batch {b}")
    y = y.to(device)
    x = noise.to(device) if noise is not None else _draw(shape[1:], b, device, generators)
    label_spec = diffusion.label_noise_spec(y.shape)
    fixed_u = None
    if label_spec is not None and label_noise == "fixed":
        fixed_u = _draw(label_spec.shape, b, device, generators, label_spec.kind)
    prev = solver_state = None
    steps = restart_schedule(diffusion.num_timesteps, restart)
    for i, jump in tqdm(steps, desc="sampling", disable=not progress, leave=False):
        if jump is not None:
            x = restart_jump(diffusion, x, *jump, _draw(shape[1:], b, device, generators))
            prev = solver_state = None    # the multistep history and the extrapolation start again
        t = torch.full((b,), i, device=device, dtype=torch.long)
        u = fixed_u
        if label_spec is not None and fixed_u is None:
            u = _draw(label_spec.shape, b, device, generators, label_spec.kind)
        with torch.no_grad():
            step = reverse_step(model, diffusion, x, t, y, label_noise=u, guidance_scale=guidance_scale,
                                extrapolation=extrapolation, prev_xstart=prev,
                                threshold_percentile=threshold_percentile, clip_denoised=clip_denoised,
                                batched_guidance=batched_guidance, per_image=batch_invariant)
            z = _draw(shape[1:], b, device, generators)  # drawn by every sampler: the same label noise
            if sampler in ("dpm++2m", "dpm++2m-sde"):
                sde_eta = 1.0 if sampler == "dpm++2m-sde" else eta
                x, solver_state = dpm_solver_update(diffusion, x, t, step, solver_state,
                                                    noise=z if sde_eta > 0 else None, eta=sde_eta)
            elif sampler == "ddim":
                x = ddim_update(diffusion, x, t, step, z, eta)
            else:
                x = ancestral_update(x, t, step, z)
        prev = step.prev_xstart
        if on_step is not None:
            on_step()
    return x.clamp(-1, 1)


def sample_batch(model, diffusion, y, settings: SamplerSettings, *, generators=None, noise=None, device=None,
                 on_step: Optional[Callable[[], None]] = None):
    """Samples for a batch of model inputs `y` (one image each) with `settings`, as (B, 3, S, S) in
    [-1, 1]; the image side is the model's, the step grid `diffusion`'s. Non-finite results are
    returned as they are: the caller names its checkpoint when it refuses them."""
    size = y.shape[-1]
    return sample_loop(model, diffusion, (y.shape[0], 3, size, size), y, noise=noise, generators=generators,
                       device=device, on_step=on_step, **settings.loop_options())
