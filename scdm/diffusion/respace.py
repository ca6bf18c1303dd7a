"""Timestep respacing: sample with a subset of the training timesteps ("ddim25", "250", "10,20,30")."""
import numpy as np

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts, alphas_cumprod=None):
    """The set of original timesteps to keep.

    `section_counts` is "ddimN" (stride chosen so that exactly N evenly strided steps remain),
    "logsnrN" (N steps from T-1 to 0 evenly spaced in log-SNR, which needs the process's
    `alphas_cumprod`: the grid of few-step ODE solvers), or a comma-separated list of counts, one
    per equal section of the original process.
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("logsnr"):
            return logsnr_timesteps(num_timesteps, spec, alphas_cumprod)
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"timestep_respacing {section_counts!r}: expected 'ddimN' with an integer N") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep_respacing {section_counts!r}: cannot take exactly {desired} strided steps "
                f"from {num_timesteps}"
            )
        try:
            section_counts = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"unknown timestep_respacing {section_counts!r}; expected '' (all steps), 'ddimN', "
                "or comma-separated section counts such as '250' or '10,20,30'"
            ) from None
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if section_count < 1 or size < section_count:
            raise ValueError(f"timestep_respacing: cannot divide a section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def logsnr_timesteps(num_timesteps, spec, alphas_cumprod):
    """N timesteps whose log-SNR log(abar / (1 - abar)) is evenly spaced from t = T-1 to t = 0, each the
    nearest integer step, moved up by one where two would coincide (near t = 0 the log-SNR of one
    integer step exceeds the spacing)."""
    try:
        desired = int(spec[len("logsnr"):])
    except ValueError:
        raise ValueError(f"timestep_respacing {spec!r}: expected 'logsnrN' with an integer N") from None
    if alphas_cumprod is None or len(alphas_cumprod) != num_timesteps:
        raise ValueError(f"timestep_respacing {spec!r} needs the {num_timesteps} alphas_cumprod of the process")
    if not 2 <= desired <= num_timesteps:
        raise ValueError(f"timestep_respacing {spec!r}: expected 2 <= N <= {num_timesteps}")
    logsnr = np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)  # decreasing in t
    targets = np.linspace(logsnr[0], logsnr[-1], desired)
    steps = []
    for i, target in enumerate(targets):  # from t = 0 upwards
        t = int(np.argmin(np.abs(logsnr - target)))
        t = max(t, steps[-1] + 1) if steps else t
        steps.append(min(t, num_timesteps - desired + i))
    return set(steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset of the base timesteps, with betas recomputed so that the kept
    steps have the same cumulative alphas as the base process."""

    def __init__(self, use_timesteps, **kwargs):
        base = GaussianDiffusion(**{**kwargs, "cond_diffuse": False})
        kept = sorted(set(use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= base.num_timesteps:
            raise ValueError(f"respaced timesteps must lie in 0..{base.num_timesteps - 1}")
        last_alpha_cumprod = 1.0
        new_betas = []
        for i in kept:
            new_betas.append(1 - base.alphas_cumprod[i] / last_alpha_cumprod)
            last_alpha_cumprod = base.alphas_cumprod[i]
        kwargs["betas"] = np.array(new_betas)
        super().__init__(timestep_map=np.array(kept), original_num_steps=base.num_timesteps, **kwargs)
