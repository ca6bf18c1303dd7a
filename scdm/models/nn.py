"""Small building blocks shared by the UNet (kept separate so the UNet file reads as architecture)."""
import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


def norm_in_fp32(norm, x):
    """`norm(x)` with fp32 statistics, in x's dtype: fp16 statistics over large maps are unstable.
    bf16 goes to the kernel as it is: its bf16 kernels compute in fp32 and round once, so the result is
    the upcast one's without two copies of the activation (the released code has no bf16)."""
    if x.dtype == torch.bfloat16:
        return norm(x).type(x.dtype)
    return norm(x.float()).type(x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back (`norm_in_fp32`)."""

    def forward(self, x):
        return norm_in_fp32(super().forward, x)


def conv_parameters(modules):
    """The weights and biases of the convolutions in `modules`: what the released `use_fp16` holds in fp16."""
    return [p for part in modules for m in part.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            for p in m.parameters(recurse=False)]


def normalization(channels):
    return GroupNorm32(32, channels)


def conv_nd(dims, *args, **kwargs):
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def avg_pool_nd(dims, *args, **kwargs):
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)


def zero_module(module):
    """Zero-initialise a layer that closes a residual branch, so every block starts as identity."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding cat[cos, sin] of (possibly fractional) timesteps, shape (N, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def checkpoint(fn, inputs, enabled):
    """Gradient checkpointing (recompute in backward) when enabled and gradients are needed."""
    if enabled and torch.is_grad_enabled():
        return _torch_checkpoint(fn, *inputs, use_reentrant=False)
    return fn(*inputs)


def convert_module_to_f16(module):
    """Released `use_fp16` semantics: conv weights of the torso in half precision."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module):
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()
