"""The stochastic forward process on label maps: the heart of SCDM.

A pixel keeps its one-hot vector with probability gamma and otherwise falls into the absorbing
all-zero state ([MASK]). Only the one-hot channels diffuse; the caller splits off the edge channel.
"""
from typing import NamedTuple, Tuple

import numpy as np
import torch

DISCRETE_UNIFORM = "discrete_zero_uniform"
DISCRETE_CLASSWISE = "discrete_zero_classwise"
GAUSSIAN = ""  # released flag value: cond_diffuse with an empty cond_opt means Gaussian diffusion
COND_OPTS = (DISCRETE_UNIFORM, DISCRETE_CLASSWISE, GAUSSIAN)

UNLABELED_LAMBDA = 0.5  # the unlabeled class always diffuses uniformly (released rule)


class LabelNoise(NamedTuple):
    """What `q_sample` takes as noise, per item: "uniform" u in [0, 1) or "gaussian" N(0, 1)."""
    shape: Tuple[int, ...]
    kind: str


def load_class_schedule(path, num_classes, unlabeled_id=None):
    """Per-class lambda from a `.npy` file, with the unlabeled class forced to 0.5."""
    if not path:
        raise ValueError(
            "cond_opt=discrete_zero_classwise needs a per-class lambda file: pass --class_schedule PATH.npy "
            "(the file released with the model, or one made by `python -m scdm.class_schedule`)"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"\x93NUMPY"):
            lambdas = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"--class_schedule {path}: file not found") from None
    except Exception as e:  # a folder, unreadable, truncated
        raise ValueError(f"--class_schedule {path}: not a readable .npy array ({e})") from None
    if not head.startswith(b"\x93NUMPY"):
        raise ValueError(f"--class_schedule {path}: {_not_npy(head)}; expected one array of per-class "
                         "lambdas saved with numpy.save (or made by `python -m scdm.class_schedule`)")
    if not (np.issubdtype(lambdas.dtype, np.integer) or np.issubdtype(lambdas.dtype, np.floating)):
        raise ValueError(f"--class_schedule {path}: holds {lambdas.dtype} values; expected numbers (one lambda "
                         "per class)")
    if sum(n > 1 for n in lambdas.shape) > 1:
        raise ValueError(f"--class_schedule {path}: an array of shape {lambdas.shape}; expected one value per "
                         f"class, shape ({num_classes},)")
    lambdas = np.asarray(lambdas, dtype=np.float64).reshape(-1)
    if lambdas.shape[0] != num_classes:
        raise ValueError(
            f"--class_schedule {path} has {lambdas.shape[0]} values; expected one per class, "
            f"num_classes={num_classes}"
        )
    if not np.all(np.isfinite(lambdas)) or np.any(lambdas < 0):
        raise ValueError(f"--class_schedule {path}: lambdas must be finite and >= 0")
    lambdas = lambdas.copy()
    if unlabeled_id is not None:
        if not 0 <= unlabeled_id < num_classes:
            raise ValueError(f"unlabeled_id={unlabeled_id} is outside 0..{num_classes - 1}")
        lambdas[unlabeled_id] = UNLABELED_LAMBDA
    return lambdas


def _not_npy(head):
    """What a file that lacks the .npy magic is (from its first bytes), for the error."""
    if head.startswith(b"PK"):
        return "a zip archive (.npz?), not a single .npy array"
    if not head:
        return "an empty file"
    try:
        head.decode("utf-8")
        return "text, not a .npy file"
    except UnicodeDecodeError:
        return "not a .npy file (no .npy header)"


def classwise_keep_prob(lambdas, tau):
    """gamma_c(tau) = 1 - min(tau, (lambda_c^tau - 1) / (lambda_c - 1 + 1e-7)), shape (B, C).

    lambda <= 1 gives uniform diffusion (gamma = 1 - tau); this is what the formula yields for
    lambda < 1 and its limit at lambda = 1, where the +1e-7 alone would freeze the class.
    """
    lam = lambdas[None, :]
    tau = tau[:, None]
    slow = (torch.pow(lam, tau) - 1) / (lam - 1 + 1e-7)
    return 1 - torch.where(lam <= 1, tau, torch.minimum(tau, slow))


class LabelDiffusion:
    """q(y_t | y_0) for the label map, on the same timestep indices as the image diffusion.

    `num_steps` is the diffusion's own number of steps (after respacing), `timestep_map` maps its
    indices back to the original 0..original_num_steps-1 timesteps.
    """

    def __init__(self, cond_diffuse, cond_opt, num_steps, timestep_map, original_num_steps,
                 alphas_cumprod=None, class_lambdas=None):
        if cond_opt not in COND_OPTS:
            raise ValueError(f"unknown cond_opt {cond_opt!r}; expected one of {COND_OPTS}")
        self.enabled = bool(cond_diffuse)
        self.mode = cond_opt
        self.num_steps = num_steps
        self.timestep_map = torch.as_tensor(np.asarray(timestep_map), dtype=torch.float64)
        self.original_num_steps = original_num_steps
        self.alphas_cumprod = None if alphas_cumprod is None else torch.as_tensor(alphas_cumprod)
        self.class_lambdas = None
        if self.enabled and cond_opt == DISCRETE_CLASSWISE:
            if class_lambdas is None:
                raise ValueError("cond_opt=discrete_zero_classwise needs class lambdas (--class_schedule)")
            self.class_lambdas = torch.as_tensor(np.asarray(class_lambdas), dtype=torch.float64)

    def noise_spec(self, y_shape):
        """The noise `q_sample` takes for one-hot maps of shape (B, C, H, W), or None when it takes
        none, so that a sampler can draw it (e.g. per image from its own generator)."""
        if not self.enabled:
            return None
        _, c, h, w = y_shape
        if self.mode == GAUSSIAN:
            return LabelNoise((c, h, w), "gaussian")
        return LabelNoise((1, h, w), "uniform")

    def keep_prob(self, y, t):
        """Per-pixel probability gamma of keeping the label, shape (B, 1, H, W), float64."""
        t = t.long().cpu()
        if self.mode == DISCRETE_UNIFORM:
            gamma = 1 - (t.double() + 1) / self.num_steps
            return gamma.view(-1, 1, 1, 1).to(y.device)
        tau = self.timestep_map[t] / self.original_num_steps
        if y.shape[1] != self.class_lambdas.shape[0]:
            raise ValueError(
                f"label map has {y.shape[1]} one-hot channels; the class schedule has "
                f"{self.class_lambdas.shape[0]} classes"
            )
        gamma_c = classwise_keep_prob(self.class_lambdas, tau).to(y.device)  # (B, C)
        # One-hot input: the pixel's gamma is its class's gamma; all-zero pixels get 0 and stay zero.
        return torch.einsum("bc,bchw->bhw", gamma_c, y.double()).unsqueeze(1)

    def q_sample(self, y, t, noise=None):
        """Draw y_t. `noise`: uniform u of shape (B,1,H,W) for the discrete modes, a Gaussian of
        y's shape for the Gaussian mode, or None to draw it."""
        if not self.enabled:
            return y
        if self.mode == GAUSSIAN:
            if noise is None:
                noise = torch.randn_like(y)
            abar = self.alphas_cumprod.to(y.device)[t.long()].view(-1, 1, 1, 1).to(y.dtype)
            return abar.sqrt() * y + (1 - abar).sqrt() * noise
        b, _, h, w = y.shape
        if noise is None:
            noise = torch.rand(b, 1, h, w, device=y.device)
        elif noise.shape != (b, 1, h, w):
            raise ValueError(f"label noise u has shape {tuple(noise.shape)}; expected {(b, 1, h, w)}")
        mask = torch.floor(self.keep_prob(y, t) + noise.double())
        return y * mask.to(y.dtype)
