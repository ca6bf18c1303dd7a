"""SPADE-conditioned diffusion UNet with the parameter layout of the released SDM/SCDM checkpoints.

The encoder sees only the noisy image; the label map enters through SPADE group norms (spade.py) in
the middle and decoder blocks. Module and attribute names are load-bearing: they are the state-dict
keys of the released checkpoints. How the network runs (the model's own `fast_paths` config: SDPA,
NHWC, the label map prepared once for the SPADE fast paths) is in fast_unet.py; the blocks call it
where noted, and every fast path computes what the code here says.
"""
import contextlib
import functools
from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fast.fast_paths import FastPaths
from ..fast.fast_unet import FastPathOwner, is_nhwc_torso, nhwc_residual, sdpa, sdpa_choice, to_torso_layout
from .nn import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    conv_parameters,
    convert_module_to_f16,
    convert_module_to_f32,
    normalization,
    timestep_embedding,
    zero_module,
)
from .spade import SPADEGroupNorm


class TimestepBlock(nn.Module):
    """A block that takes the timestep embedding but not the label map (encoder ResBlock)."""

    @abstractmethod
    def forward(self, x, emb):
        ...


class CondTimestepBlock(nn.Module):
    """A block that takes both the label map and the timestep embedding (SPADE ResBlock)."""

    @abstractmethod
    def forward(self, x, cond, emb):
        ...


class CondTimestepSequential(nn.Sequential):
    """Sequential that hands each child the inputs it needs."""

    def forward(self, x, cond, emb):
        for layer in self:
            if isinstance(layer, CondTimestepBlock):
                x = layer(x, cond, emb)
            elif isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        return self.op(x)


def _resamplers(channels, up, down, dims):
    """(h_upd, x_upd) of a residual block: parameter-free up/down-sampling of the hidden and skip paths."""
    if up:
        return Upsample(channels, False, dims), Upsample(channels, False, dims)
    if down:
        return Downsample(channels, False, dims), Downsample(channels, False, dims)
    return nn.Identity(), nn.Identity()


def _emb_projection(emb_channels, out_channels, use_scale_shift_norm):
    """Timestep embedding -> per-channel shift (or scale and shift)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))


def _skip_connection(channels, out_channels, use_conv, dims):
    if out_channels == channels:
        return nn.Identity()
    if use_conv:
        return conv_nd(dims, channels, out_channels, 3, padding=1)
    return conv_nd(dims, channels, out_channels, 1)


def _per_channel(emb_out, h):
    """(B, C) -> (B, C, 1, 1, ...) broadcasting over h's spatial dims."""
    return emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - emb_out.dim())))


class ResBlock(TimestepBlock):
    """Encoder residual block (no label map), optionally changing resolution."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        self.h_upd, self.x_upd = _resamplers(channels, up, down, dims)
        self.emb_layers = _emb_projection(emb_channels, self.out_channels, use_scale_shift_norm)
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        self.skip_connection = _skip_connection(channels, self.out_channels, use_conv, dims)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = _per_channel(self.emb_layers(emb).type(h.dtype), h)
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class SDMResBlock(CondTimestepBlock):
    """Decoder residual block whose two norms are SPADE group norms driven by the label map."""

    def __init__(self, channels, emb_channels, dropout, c_channels, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = SPADEGroupNorm(channels, c_channels)
        self.in_layers = nn.Sequential(nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        self.h_upd, self.x_upd = _resamplers(channels, up, down, dims)
        self.emb_layers = _emb_projection(emb_channels, self.out_channels, use_scale_shift_norm)
        self.out_norm = SPADEGroupNorm(self.out_channels, c_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        self.skip_connection = _skip_connection(channels, self.out_channels, use_conv, dims)

    def forward(self, x, cond, emb):
        return checkpoint(self._forward, (x, cond, emb), self.use_checkpoint)

    def _forward(self, x, cond, emb):
        h = self.in_norm(x, cond)
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(h)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(h)
        emb_out = _per_channel(self.emb_layers(emb).type(h.dtype), h)
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_norm(h, cond) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out, cond)
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Spatial self-attention; `legacy` order splits heads before q/k/v (released default)."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False,
                 use_new_attention_order=False, fast_paths=FastPaths()):
        super().__init__()
        self.fast_paths = fast_paths  # the owning UNet's (SDPA, NHWC: fast_unet.py); not state
        self.autotuner = None  # the owning UNet's; not state
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.legacy_order = not use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.use_checkpoint)

    def _forward(self, x):
        if is_nhwc_torso(x, self.fast_paths):
            return nhwc_residual(x, self._attend)  # the same sum, kept in the torso's NHWC layout
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        return (x + self._attend(x)).reshape(b, c, *spatial)

    def _attend(self, x):
        """(B, C, T) -> (B, C, T): the residual branch."""
        qkv = self.qkv(self.norm(x))
        attention = functools.partial(qkv_attention, num_heads=self.num_heads, legacy_order=self.legacy_order)
        return self.proj_out(attention(qkv, use_sdpa=sdpa_choice(self, qkv, attention)))


def qkv_attention(qkv, num_heads, legacy_order=True, use_sdpa=True):
    """(B, 3*H*C, T) -> (B, H*C, T). Softmax(q k^T / sqrt(C)) v per head, softmax in fp32;
    `use_sdpa`: the same through F.scaled_dot_product_attention (fast_unet.sdpa)."""
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if legacy_order:
        q, k, v = qkv.reshape(bs * num_heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(bs * num_heads, ch, length) for t in qkv.chunk(3, dim=1))
    if use_sdpa:
        return sdpa(q, k, v, bs)
    scale = ch ** -0.25
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    if weight.dtype == torch.bfloat16:  # its kernel computes in fp32 and rounds once: the same, without copies
        weight = torch.softmax(weight, dim=-1).type(weight.dtype)
    else:
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


class UNetModel(FastPathOwner, nn.Module):
    """The SDM/SCDM UNet. Call as `model(x, t, y=label_map)` with y of shape (B, num_classes, H, W)
    where num_classes here is the number of label channels (classes, plus one edge channel).
    `fast_paths`, `autotuner`: how it runs (FastPathOwner, fast_unet.py)."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True,
                 dims=2, num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=1,
                 num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False,
                 resblock_updown=False, use_new_attention_order=False, fast_paths: FastPaths = FastPaths()):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.channel_mult = channel_mult
        self.label_nc = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        res_kw = dict(dropout=dropout, dims=dims, use_checkpoint=use_checkpoint,
                      use_scale_shift_norm=use_scale_shift_norm)
        attn_kw = dict(use_checkpoint=use_checkpoint, num_head_channels=num_head_channels,
                       use_new_attention_order=use_new_attention_order)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([CondTimestepSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, time_embed_dim, out_channels=int(mult * model_channels), **res_kw)]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads, **attn_kw))
                self.input_blocks.append(CondTimestepSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (ResBlock(ch, time_embed_dim, out_channels=ch, down=True, **res_kw) if resblock_updown
                        else Downsample(ch, conv_resample, dims=dims, out_channels=ch))
                self.input_blocks.append(CondTimestepSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = CondTimestepSequential(
            SDMResBlock(ch, time_embed_dim, c_channels=num_classes, **res_kw),
            AttentionBlock(ch, num_heads=num_heads, **attn_kw),
            SDMResBlock(ch, time_embed_dim, c_channels=num_classes, **res_kw),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [SDMResBlock(ch + ich, time_embed_dim, c_channels=num_classes,
                                      out_channels=int(model_channels * mult), **res_kw)]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads_upsample, **attn_kw))
                if level and i == num_res_blocks:
                    layers.append(
                        SDMResBlock(ch, time_embed_dim, c_channels=num_classes, out_channels=ch, up=True, **res_kw)
                        if resblock_updown else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(CondTimestepSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1))
        )
        self.init_fast_paths(fast_paths)
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self):
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f16)
        self.dtype = torch.float16

    def convert_to_fp32(self):
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f32)
        self.dtype = torch.float32

    @contextlib.contextmanager
    def torso_held_in(self, dtype):
        """Within the block the torso's convolutions hold `dtype` copies of their fp32 weights: the released
        `use_fp16` layout (norms, embeddings and the output layer stay fp32) for sampling, where autocast
        would cast every weight again at every call. The copies are kept on the model and remade when a
        weight changes (training, EMA loading); the fp32 weights come back after the block, also on an error."""
        if self.dtype != torch.float32 or torch.is_grad_enabled():
            raise RuntimeError("torso_held_in is for sampling an fp32 model: call it under torch.no_grad()")
        params = conv_parameters((self.input_blocks, self.middle_block, self.output_blocks))
        held = self.__dict__.setdefault("_held_torso", {})
        originals = [p.data for p in params]
        for p, full in zip(params, originals):
            key = (id(p), dtype)
            stamp = (p._version, full.data_ptr())
            if key not in held or held[key][0] != stamp:
                held[key] = (stamp, full.to(dtype))
            p.data = held[key][1]
        self.dtype = dtype
        try:
            yield self
        finally:
            for p, full in zip(params, originals):
                p.data = full
            self.dtype = torch.float32

    def check_inputs(self, x, y):
        if y is None:
            raise ValueError(f"the model needs a label map y with {self.label_nc} channels")
        if y.dim() != 4 or y.shape[1] != self.label_nc:
            raise ValueError(
                f"label map has shape {tuple(y.shape)}; the model expects (B, {self.label_nc}, H, W): "
                f"{self.label_nc} label channels (num_classes, plus 1 edge channel unless no_instance)"
            )
        if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"label map of shape {tuple(y.shape)} does not match the image batch {tuple(x.shape)}: "
                "expected the same batch size and spatial size"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"image size {tuple(x.shape[2:])} must be divisible by {factor}")

    def forward_with_cfg(self, x, timesteps, y):
        """cat[out(x, t, y), out(x, t, 0)] (2B rows): both halves classifier-free guidance needs, in one
        call. Goes through `self(...)` so that a compiled forward is used."""
        return self(x, timesteps, y=y, with_unconditional=True)

    def forward(self, x, timesteps, y=None, with_unconditional=False):
        """Model output for (x, timesteps, label map y). With `with_unconditional`, the output for the
        all-zero map at the same x and timesteps is appended (see `forward_with_cfg`). The encoder does
        not see the label map, so with the `shared_encoder` fast path it runs once for both halves."""
        self.check_inputs(x, y)
        run = functools.partial(self._forward, x, timesteps, y, with_unconditional)
        return run(self.resolve_fast_paths(run, x, y, with_unconditional))

    def _forward(self, x, timesteps, y, with_unconditional, fast):
        """The forward pass; `fast` (the model's config, "auto" layout decided) says only how it runs."""
        share = with_unconditional and fast.shared_encoder
        if with_unconditional:  # the all-zero map as a second half of the batch
            y = torch.cat([y, torch.zeros_like(y)])
            if not share:
                x, timesteps = torch.cat([x, x]), torch.cat([timesteps, timesteps])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        cond = self.spade_labels(y, fast) if fast.spade_enabled else y.type(self.dtype)
        h = to_torso_layout(x.type(self.dtype), fast)
        hs = []
        for module in self.input_blocks:
            h = module(h, cond, emb)
            hs.append(h)
        if share:
            h, emb = torch.cat([h, h]), torch.cat([emb, emb])
        h = self.middle_block(h, cond, emb)
        for module in self.output_blocks:
            skip = hs.pop()
            h = module(torch.cat([h, torch.cat([skip, skip]) if share else skip], dim=1), cond, emb)
        out = self.out(h.type(x.dtype))
        return out.contiguous() if fast.channels_last is True and out.dim() == 4 else out  # NCHW after an NHWC torso
