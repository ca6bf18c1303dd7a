"""How the UNet (scdm/models/unet.py) runs: its fast-path plumbing, which changes speed, never what it computes.

- `FastPathOwner`, mixed into the model: its `fast_paths` config (handed to every block that reads
  one), its `autotuner`, the SPADE norms' cache of the all-zero map, the label map prepared once per
  forward for the SPADE fast paths (`spade_labels`, scdm/fast/fast_spade.py) and the choice of the torso's
  memory layout where `channels_last` is "auto" (`resolve_fast_paths`).
- `sdpa`, `sdpa_choice`: attention by F.scaled_dot_product_attention instead of the released einsum +
  softmax (`sdpa_attention`).
- `to_torso_layout`, `is_nhwc_torso`, `nhwc_residual`: NHWC activations in the torso (`channels_last`;
  the model's output is made contiguous NCHW again in its forward, inline: under torch.compile a call
  there would add a graph).

Nothing here knows the architecture's classes: the blocks reach it through these functions.
"""
import torch
import torch.nn.functional as F

from .fast_paths import AUTO, MACHINE_CACHE, Autotuner, FastPaths, timed_call
from .fast_spade import SpadeLabels


class FastPathOwner:
    """The model's side of the fast paths (a mixin of the nn.Module model; none of it is state).

    `fast_paths` is the model's config; setting it hands it to every submodule that has a
    `fast_paths` attribute (the attention blocks), and `autotuner` likewise, so that no block reads
    a global. The SPADE norms get both per forward, inside `SpadeLabels`."""

    def init_fast_paths(self, config):
        """Called by the model's __init__ once its blocks exist."""
        self.fast_paths = config
        self.autotuner = Autotuner(cache=MACHINE_CACHE)  # choices of the "auto" fast paths, per key
        self.spade_cache = {}  # the norms' all-zero-map modulations (fast_spade.null_scale_shift)

    @property
    def fast_paths(self) -> FastPaths:
        return self._fast_paths

    @fast_paths.setter
    def fast_paths(self, config: FastPaths):
        if not isinstance(config, FastPaths):
            raise TypeError(f"fast_paths must be a FastPaths, got {type(config).__name__}")
        self._fast_paths = config
        for m in self.modules():
            if m is not self and hasattr(m, "fast_paths"):
                m.fast_paths = config

    @property
    def autotuner(self) -> Autotuner:
        """Timings and choices of the "auto" fast paths (one per model, shared by its blocks)."""
        return self._autotuner

    @autotuner.setter
    def autotuner(self, tuner: Autotuner):
        self._autotuner = tuner
        for m in self.modules():
            if m is not self and hasattr(m, "autotuner"):
                m.autotuner = tuner

    def resolve_fast_paths(self, run, x, y, with_unconditional):
        """The config one forward runs with: `channels_last` decided where it is "auto" (NCHW for
        input that is not 4-D). `run(config)`: that forward under a config, for the timing."""
        fast = self.fast_paths
        if fast.channels_last == AUTO:
            nhwc = x.dim() == 4 and self._channels_last_choice(run, x, y, with_unconditional)
            fast = fast.replace(channels_last=nhwc)
        return fast

    def _channels_last_choice(self, run, x, y, with_unconditional):
        """Whether NHWC is faster here: timed once per (device, dtype, grad mode, shapes), forward and,
        when training, backward."""
        device = x.device
        amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.dtype
        key = (device, amp, "train" if torch.is_grad_enabled() else "eval", "x".join(map(str, x.shape)),
               f"labels={y.shape[1]}", "cfg" if with_unconditional else "single")
        candidates = {
            choice: timed_call(lambda c=choice: run(self.fast_paths.replace(channels_last=c == "nhwc")),
                               self.parameters())
            for choice in ("nhwc", "nchw")
        }
        return self.autotuner.choose("channels_last", key, candidates, device) == "nhwc"

    def spade_labels(self, y, fast):
        """The label map prepared once for every SPADE norm of this forward (`fast.spade_enabled`)."""
        return SpadeLabels(y, self.dtype, fast, self.autotuner, self.spade_cache)


# ----- attention -------------------------------------------------------------------------------
def sdpa(q, k, v, batch):
    """Attention of (B*H, C, T) q, k, v -> (B, H*C, T) by F.scaled_dot_product_attention."""
    bh, ch, length = q.shape
    # Contiguous 4-D (batch, heads, tokens, ch): the fused (flash) kernels need a unit-stride last
    # dimension; otherwise SDPA silently falls back to its slower math path.
    q, k, v = (t.view(batch, bh // batch, ch, length).transpose(2, 3).contiguous() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(2, 3).reshape(batch, -1, length)


def sdpa_choice(block, qkv, attention):
    """Whether `block` (with `fast_paths`, `autotuner`, `num_heads`) runs `attention(qkv, use_sdpa)`
    by SDPA: its `sdpa_attention` switch, or where that is "auto", whether SDPA beats einsum + softmax
    at this shape (timed; on CPU its backward can be the slower one at few tokens)."""
    switch = block.fast_paths.sdpa_attention
    if switch != AUTO:
        return switch
    tuner = block.autotuner if block.autotuner is not None else Autotuner()
    leaf = qkv.detach().requires_grad_(torch.is_grad_enabled() and qkv.requires_grad)
    key = (qkv.device, qkv.dtype, "train" if leaf.requires_grad else "eval", "x".join(map(str, qkv.shape)),
           f"heads={block.num_heads}")
    candidates = {name: timed_call(lambda s=name == "sdpa": attention(leaf, use_sdpa=s), [leaf])
                  for name in ("sdpa", "einsum")}
    return tuner.choose("sdpa_attention", key, candidates, qkv.device) == "sdpa"


# ----- the torso's memory layout ---------------------------------------------------------------
def to_torso_layout(h, fast):
    """The torso's input in its memory layout: NHWC where `channels_last` is on (4-D input only)."""
    return h.contiguous(memory_format=torch.channels_last) if fast.channels_last is True and h.dim() == 4 else h


def is_nhwc_torso(x, fast):
    """Whether `x` is an activation of an NHWC torso."""
    return bool(fast.channels_last) and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def nhwc_residual(x, attend):
    """x + attend(x as (B, C, T)), as the attention block computes it, for an NHWC `x`: the sum is
    kept NHWC, otherwise every conv after an attention block runs NCHW."""
    b, c, *spatial = x.shape
    h = attend(x.reshape(b, c, -1))
    return (x + h.view(b, c, *spatial)).contiguous(memory_format=torch.channels_last)
