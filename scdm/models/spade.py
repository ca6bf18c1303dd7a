"""The SPADE group norm of SDM/SCDM: a parameter-free GroupNorm whose scale and shift come from the label map.

    x_norm = GroupNorm(x)                                   (32 groups, no affine)
    a      = ReLU(conv3x3(resize(y, size of x)))            mlp_shared: label channels -> nhidden
    gamma  = conv3x3(a),  beta = conv3x3(a)                 mlp_gamma, mlp_beta: nhidden -> channels
    out    = x_norm * (1 + gamma) + beta

The module names are the released checkpoints' state-dict keys. The exact fast ways of computing gamma
and beta (a table gather for one-hot maps, once per distinct 3x3 label patch, the all-zero map in closed
form) are in scdm/fast/fast_spade.py: the UNet hands the norms its label map prepared as `SpadeLabels` when one
of them is on, and `forward` passes the normalised input to it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import norm_in_fp32


class SPADEGroupNorm(nn.Module):
    """Parameter-free GroupNorm on x, modulated by gamma/beta computed from the label map."""

    def __init__(self, norm_nc, label_nc, eps=1e-5, nhidden=128):
        super().__init__()
        self.norm = nn.GroupNorm(32, norm_nc, affine=False, eps=eps)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, kernel_size=3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(nhidden, norm_nc, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(nhidden, norm_nc, kernel_size=3, padding=1)

    def modulation(self, segmap, size):
        """(gamma, beta) at `size` from the label map."""
        segmap = F.interpolate(segmap, size=size, mode="nearest")
        actv = self.mlp_shared(segmap)
        return self.mlp_gamma(actv), self.mlp_beta(actv)

    def forward(self, x, segmap):
        normed = norm_in_fp32(self.norm, x)
        if not isinstance(segmap, torch.Tensor):  # SpadeLabels: the same, by an exact fast path
            return segmap.modulate(self, normed)
        gamma, beta = self.modulation(segmap.type(self.mlp_gamma.weight.dtype), x.shape[2:])
        return normed * (1 + gamma) + beta
