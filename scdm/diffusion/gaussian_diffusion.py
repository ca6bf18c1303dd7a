"""Image diffusion: beta schedules, q(x_t|x_0), posterior, model output parsing, training losses.

Follows improved DDPM / guided-diffusion. The label map is diffused by a LabelDiffusion on the
same timesteps; the sampler loops live in sampling.py and use only the public methods here.
"""
import enum
import math

import numpy as np
import torch

from .label_diffusion import LabelDiffusion
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

NOISE_SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps  # keeps the schedule comparable for any T
        if scale * 0.02 >= 1:
            raise ValueError(
                f"noise_schedule linear needs diffusion_steps > 20 (got {num_diffusion_timesteps}): "
                "its last beta would reach 1"
            )
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(f"unknown noise_schedule {schedule_name!r}; expected one of {NOISE_SCHEDULES}")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


class ModelMeanType(enum.Enum):
    PREVIOUS_X = enum.auto()
    START_X = enum.auto()
    EPSILON = enum.auto()


class ModelVarType(enum.Enum):
    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()
    RESCALED_MSE = enum.auto()  # MSE + VLB rescaled to the MSE's weight (hybrid loss)
    KL = enum.auto()
    RESCALED_KL = enum.auto()

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


def _extract(arr, timesteps, broadcast_shape):
    """arr[timesteps] as a float tensor broadcastable to broadcast_shape."""
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps.long()].float()
    while res.dim() < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


class GaussianDiffusion:
    """Image diffusion plus the label diffusion that SCDM applies on the same timesteps.

    `num_classes` tells which channels of the label map are one-hot (the rest, the instance-edge
    channel, never diffuse). `timestep_map` maps this diffusion's indices to the original
    timesteps (identity unless respaced, see respace.py).
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False,
                 num_classes=None, cond_diffuse=False, cond_opt="", class_lambdas=None,
                 timestep_map=None, original_num_steps=None):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        self.num_classes = num_classes

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)
        self.original_num_steps = original_num_steps or self.num_timesteps

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0: clip the log to the next value.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        self.label_diffusion = LabelDiffusion(
            cond_diffuse, cond_opt, self.num_timesteps, self.timestep_map, self.original_num_steps,
            alphas_cumprod=self.alphas_cumprod, class_lambdas=class_lambdas,
        )

    # ----- forward processes -------------------------------------------------------------------
    def q_mean_variance(self, x_start, t):
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        if noise is None:
            noise = torch.randn_like(x_start)
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_sample_label(self, y, t, noise=None):
        """Diffuse the one-hot channels `y` to step t (this diffusion's own indices)."""
        return self.label_diffusion.q_sample(y, t, noise=noise)

    def diffuse_cond(self, y, t, noise=None):
        """Diffuse a full model label input: one-hot channels diffuse, extra (edge) channels do not."""
        if self.num_classes is None or not self.label_diffusion.enabled:
            return y
        if y.shape[1] < self.num_classes:
            raise ValueError(f"label map has {y.shape[1]} channels; expected at least num_classes={self.num_classes}")
        onehot, rest = y[:, : self.num_classes], y[:, self.num_classes:]
        return torch.cat([self.q_sample_label(onehot, t, noise=noise), rest], dim=1)

    def label_noise_spec(self, y_shape):
        """The noise `diffuse_cond` takes for a label input of shape (B, C, H, W), as a LabelNoise
        (per-item shape and kind), or None when the label map does not diffuse."""
        if self.num_classes is None or not self.label_diffusion.enabled:
            return None
        return self.label_diffusion.noise_spec((y_shape[0], self.num_classes, *y_shape[2:]))

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (_extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, _extract(self.posterior_variance, t, x_t.shape),
                _extract(self.posterior_log_variance_clipped, t, x_t.shape))

    # ----- model output -> distribution --------------------------------------------------------
    def model_timesteps(self, t):
        """What the network is fed: original timesteps, optionally rescaled to 0..1000."""
        mapped = torch.from_numpy(self.timestep_map).to(t.device)[t.long()]
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_num_steps)
        return mapped

    def split_model_output(self, model_output, x):
        """Mean part and variance part (None when the variance is fixed)."""
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            c = x.shape[1]
            if model_output.shape[1] != 2 * c:
                raise ValueError(f"model output has {model_output.shape[1]} channels; learn_sigma expects {2 * c}")
            return model_output[:, :c], model_output[:, c:]
        return model_output, None

    def variance_from_output(self, var_values, x, t):
        if self.model_var_type == ModelVarType.LEARNED:
            log_variance = var_values
            return torch.exp(log_variance), log_variance
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract(np.log(self.betas), t, x.shape)
            frac = (var_values + 1) / 2  # model predicts in [-1, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
            return torch.exp(log_variance), log_variance
        variance, log_variance = {
            ModelVarType.FIXED_LARGE: (np.append(self.posterior_variance[1], self.betas[1:]),
                                       np.log(np.append(self.posterior_variance[1], self.betas[1:]))),
            ModelVarType.FIXED_SMALL: (self.posterior_variance, self.posterior_log_variance_clipped),
        }[self.model_var_type]
        return _extract(variance, t, x.shape), _extract(log_variance, t, x.shape)

    def pred_xstart_from_output(self, mean_values, x, t):
        if self.model_mean_type == ModelMeanType.START_X:
            return mean_values
        if self.model_mean_type == ModelMeanType.EPSILON:
            return self.xstart_from_eps(x, t, mean_values)
        return self._predict_xstart_from_xprev(x, t, mean_values)

    def p_mean_variance(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        """Turn a raw model output at (x, t) into the reverse distribution and x0 estimate."""
        mean_values, var_values = self.split_model_output(model_output, x)
        variance, log_variance = self.variance_from_output(var_values, x, t)
        pred_xstart = self.pred_xstart_from_output(mean_values, x, t)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def alphas_cumprod_at(self, t, shape):
        """alpha-bar at this diffusion's steps t, broadcastable to `shape`."""
        return _extract(self.alphas_cumprod, t, shape)

    def alphas_cumprod_prev_at(self, t, shape):
        """alpha-bar at the step before t (1 at t = 0), broadcastable to `shape`."""
        return _extract(self.alphas_cumprod_prev, t, shape)

    def xstart_from_eps(self, x_t, t, eps):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        return (_extract(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
                - _extract(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape) * x_t)

    def eps_from_xstart(self, x_t, t, pred_xstart):
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    # ----- training ----------------------------------------------------------------------------
    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        """VLB term in bits per dim for one timestep (decoder NLL at t == 0)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / np.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / np.log(2.0)
        return torch.where(t == 0, nll, kl), out["pred_xstart"]

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, label_noise=None):
        """Per-sample losses at timesteps t. The label map model_kwargs["y"] is diffused to y_t here
        (one-hot channels only) at the same t as x_t, as SCDM trains."""
        model_kwargs = dict(model_kwargs or {})
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        if model_kwargs.get("y") is not None:
            model_kwargs["y"] = self.diffuse_cond(model_kwargs["y"], t, noise=label_noise)
        model_output = model(x_t, self.model_timesteps(t), **model_kwargs)
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"], _ = self._vb_terms_bpd(model_output, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        mean_values, var_values = self.split_model_output(model_output, x_t)
        if var_values is not None:
            # Learn the variance with the VLB only: the mean is frozen for this term.
            frozen = torch.cat([mean_values.detach(), var_values], dim=1)
            terms["vb"], _ = self._vb_terms_bpd(frozen, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * self.num_timesteps / 1000.0
        target = {
            ModelMeanType.PREVIOUS_X: self.q_posterior_mean_variance(x_start, x_t, t)[0],
            ModelMeanType.START_X: x_start,
            ModelMeanType.EPSILON: noise,
        }[self.model_mean_type]
        terms["mse"] = mean_flat((target - mean_values) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
