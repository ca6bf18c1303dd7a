"""Label map -> the model's input `y`, in one place for training and sampling.

`y` is the one-hot map of the class ids (B, num_classes, H, W), plus one instance-edge channel for
datasets with instance maps. Two choices change what the model sees, so they live here too:
- `unlabeled_to_zero`: the unlabeled class (and with it every hole of a noisy map) becomes the
  all-zero vector, the absorbing [MASK] state of SCDM's label diffusion, instead of a class of its own;
- `drop_rate`: classifier-free training zeroes the whole conditioning (labels and edges) of a sample
  with this probability; the all-zero map is then also the unconditional input of guidance.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from ..runtime.errors import UserError


def instance_edges(instance):
    """1 where the right/left/up/down neighbour has another instance id (both sides of a
    boundary are marked), else 0; same shape as `instance` (..., H, W), float."""
    dx = instance[..., :, 1:] != instance[..., :, :-1]
    dy = instance[..., 1:, :] != instance[..., :-1, :]
    edge = torch.zeros(instance.shape, dtype=torch.bool, device=instance.device)
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    return edge.float()


def _as_b1hw(tensor, name):
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.dim() != 4 or tensor.shape[1] != 1:
        raise UserError(f"cond[{name!r}] has shape {tuple(tensor.shape)}; expected (B, 1, H, W)")
    return tensor


def label_to_model_input(cond, num_classes, no_instance):
    """The model's `y` for a batch `cond` (with "label" class ids and, unless `no_instance`,
    "instance" ids): one-hot (B, num_classes, H, W) plus the instance-edge channel."""
    ids = _as_b1hw(cond["label"], "label").long()
    bad = (ids < 0) | (ids >= num_classes)
    if bad.any():
        value = ids[bad][0].item()
        raise UserError(f"label value {value} is outside 0..{num_classes - 1} (num_classes={num_classes}); "
                        "check --num_classes against the dataset")
    y = torch.zeros(ids.shape[0], num_classes, *ids.shape[2:], device=ids.device)
    y.scatter_(1, ids, 1.0)
    if no_instance:
        return y
    if "instance" not in cond:
        raise UserError("the batch has no instance map but the model takes an edge channel; "
                        "pass --no_instance True for layouts without instances (e.g. ade20k)")
    instance = _as_b1hw(cond["instance"], "instance")
    return torch.cat([y, instance_edges(instance.to(ids.device))], dim=1)


@dataclass(frozen=True)
class Conditioning:
    """How a dataset batch becomes `y` for one model (see the module docstring)."""
    num_classes: int
    no_instance: bool
    unlabeled_id: Optional[int] = None
    unlabeled_to_zero: bool = False
    drop_rate: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.drop_rate < 1.0:
            raise UserError(f"--drop_rate {self.drop_rate}: expected a probability in [0, 1)")
        if self.unlabeled_id is not None and not 0 <= self.unlabeled_id < self.num_classes:
            raise UserError(f"unlabeled_id={self.unlabeled_id} is outside 0..{self.num_classes - 1}")

    @property
    def channels(self):
        """Label channels of the model: classes, plus the edge channel unless no_instance."""
        return self.num_classes + (0 if self.no_instance else 1)

    def model_input(self, cond, device=None):
        """`y` for a batch: one-hot + edges, with unlabeled pixels as [MASK] when asked."""
        y = label_to_model_input(cond, self.num_classes, self.no_instance)
        if self.unlabeled_to_zero and self.unlabeled_id is not None:
            y[:, self.unlabeled_id] = 0
        return y if device is None else y.to(device)

    def drop(self, y, generator=None):
        """Classifier-free training: zero the whole conditioning of each sample with `drop_rate`."""
        if self.drop_rate <= 0:
            return y
        u = torch.rand(y.shape[0], generator=generator, device=y.device if generator is None else "cpu")
        keep = (u.to(y.device) >= self.drop_rate).to(y.dtype)
        return y * keep.view(-1, *([1] * (y.dim() - 1)))
