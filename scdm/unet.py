"""SPADE-conditioned diffusion UNet with the parameter layout of the released SDM/SCDM checkpoints.

The encoder sees only the noisy image; the label map enters through SPADE group norms in the middle
and decoder blocks (DESIGN.md §3). Module and attribute names are load-bearing: they are the
state-dict keys of the released checkpoints.
"""
from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    convert_module_to_f16,
    convert_module_to_f32,
    normalization,
    timestep_embedding,
    zero_module,
)

# Switches for exact fast paths (all on by default; the benchmarks turn them off for the plain path).
# Each one keeps the released computation up to floating-point rounding; `scdm.performance.set_fast_paths`
# flips them all. With every switch off the model runs the plain (released) computation.
FAST_PATHS = {
    "sdpa_attention": True,     # F.scaled_dot_product_attention instead of einsum + softmax
    "spade_gather": True,       # one-hot label maps: mlp_shared as a table gather instead of a dense conv
    "spade_unique_patches": True,  # gamma/beta evaluated once per distinct 3x3 label patch, then gathered
    "fused_gamma_beta": True,   # mlp_gamma and mlp_beta as one conv (weights concatenated on the fly)
    "null_label_cache": True,   # all-zero map (guidance, dropped labels): closed form, cached under no_grad
    "shared_encoder": True,     # guidance: the label-free encoder runs once for the cond and uncond halves
    "channels_last": True,      # NHWC activations in the torso
}

# Use unique-patch evaluation only when it saves work: distinct patches / pixels at most this.
UNIQUE_PATCH_MAX_RATIO = 0.5


def _spade_fast_enabled():
    return any(FAST_PATHS[k] for k in ("spade_gather", "fused_gamma_beta", "null_label_cache"))


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


class SPADEGroupNorm(nn.Module):
    """Parameter-free GroupNorm on x, modulated by gamma/beta computed from the label map.

    gamma and beta depend on the label map only (not on x or t), which is what makes them cacheable.
    Given a tensor the norm runs the released computation; given `SpadeLabels` (prepared once per
    forward by the UNet when SPADE fast paths are on) it runs the exact fast paths below.
    """

    def __init__(self, norm_nc, label_nc, eps=1e-5, nhidden=128):
        super().__init__()
        self.norm = nn.GroupNorm(32, norm_nc, affine=False, eps=eps)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, kernel_size=3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(nhidden, norm_nc, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(nhidden, norm_nc, kernel_size=3, padding=1)
        self._null_cache = {}  # (size, device, autocast) -> (weight stamp, gamma, beta); not state

    def modulation(self, segmap, size):
        segmap = F.interpolate(segmap, size=size, mode="nearest")
        actv = self.mlp_shared(segmap)
        return self.mlp_gamma(actv), self.mlp_beta(actv)

    def forward(self, x, segmap):
        normed = self.norm(x.float()).type(x.dtype)
        if isinstance(segmap, SpadeLabels):
            return self._modulate_fast(normed, segmap)
        gamma, beta = self.modulation(segmap.type(self.mlp_gamma.weight.dtype), x.shape[2:])
        return normed * (1 + gamma) + beta

    # ----- exact fast paths --------------------------------------------------------------------
    # They compute scale = 1 + gamma (the 1 folded into the conv bias) and shift = beta, and apply
    # them in one pass: addcmul(shift, normed, scale).
    def _modulate_fast(self, normed, labels):
        """Cond rows and all-zero (null) rows are modulated separately (null rows by the closed form)."""
        size = tuple(normed.shape[2:])
        if labels.all_null:
            return _modulate(normed, *self.null_scale_shift(size))
        if labels.null_rows is None:
            return _modulate(normed, *self._cond_scale_shift(labels, size))
        n = labels.num_cond
        if labels.restore is None:  # null rows are a suffix (the guidance layout): slices, no copies
            cond_part, null_part = normed[:n], normed[n:]
        else:
            cond_part, null_part = normed.index_select(0, labels.cond_rows), normed.index_select(0, labels.null_rows)
        out = torch.cat([_modulate(cond_part, *self._cond_scale_shift(labels, size)),
                         _modulate(null_part, *self.null_scale_shift(size))])
        return out if labels.restore is None else out.index_select(0, labels.restore)

    def _scale_shift_parts(self):
        """[(weight, bias)] giving (1 + gamma, beta): one concatenated pair (one conv) or two."""
        g, b = self.mlp_gamma, self.mlp_beta
        if FAST_PATHS["fused_gamma_beta"]:
            return [(torch.cat([g.weight, b.weight]), torch.cat([g.bias + 1, b.bias]))]
        return [(g.weight, g.bias + 1), (b.weight, b.bias)]

    @staticmethod
    def _split(outs):
        return outs[0].chunk(2, dim=1) if len(outs) == 1 else tuple(outs)

    def _shared_table(self):
        """(9 * 2L, nhidden) table; row tap * 2L + code is the sum of the mlp_shared weight columns
        that a pixel with this code switches on (see SpadeLabels), so that mlp_shared at a pixel is
        its bias plus the sum of 9 rows picked by the codes of its 3x3 neighbourhood."""
        w = self.mlp_shared[0].weight
        num_labels = w.shape[1]
        taps = w.permute(2, 3, 1, 0).reshape(9, num_labels, w.shape[0])
        classes = torch.cat([taps[:, :-1], taps.new_zeros(9, 1, w.shape[0])], dim=1)
        return torch.cat([classes, classes + taps[:, -1:]], dim=1).reshape(9 * 2 * num_labels, w.shape[0])

    def _cond_scale_shift(self, labels, size):
        """(1 + gamma, beta) for the cond rows of `labels` at `size`."""
        plan = labels.patch_plan(size)
        if plan is None:  # not a one-hot map (or the gather is off): the convs on the dense map
            actv = self.mlp_shared(labels.dense_at(size, self.mlp_gamma.weight.dtype))
            return self._split([F.conv2d(actv, w, b, padding=1) for w, b in self._scale_shift_parts()])
        bsz, (h, w) = labels.num_cond, size
        table, bias = self._shared_table(), self.mlp_shared[0].bias
        if plan.unique_taps is None:
            actv = F.relu(gather_sum(table, plan.pixel_taps) + bias)  # (N, hidden)
            actv = actv.view(bsz, h, w, -1).permute(0, 3, 1, 2)  # NCHW shape, NHWC memory
            return self._split([F.conv2d(actv, w, b, padding=1) for w, b in self._scale_shift_parts()])
        # mlp_shared once per distinct 3x3 label patch (U of them, plus a zero row standing for the
        # conv's zero padding); all 9 gamma/beta taps in one matmul on those activations, giving a
        # table whose row u * 9 + tap is W_tap @ actv_u; per pixel a gather sums its 9 rows.
        actv = F.relu(gather_sum(table, plan.unique_taps) + bias)
        actv = torch.cat([actv, actv.new_zeros(1, actv.shape[1])])  # (U + 1, hidden)
        outs = []
        for weight, b in self._scale_shift_parts():
            per_tap = actv @ weight.permute(1, 2, 3, 0).reshape(weight.shape[1], -1)  # (U + 1, 9 * out)
            out = gather_sum(per_tap.view(-1, weight.shape[0]), plan.pixel_taps)
            out = out + b.to(out.dtype)
            outs.append(out.view(bsz, h, w, -1).permute(0, 3, 1, 2))
        return self._split(outs)

    def _weight_stamp(self):
        params = (self.mlp_shared[0].weight, self.mlp_shared[0].bias, self.mlp_gamma.weight,
                  self.mlp_gamma.bias, self.mlp_beta.weight, self.mlp_beta.bias)
        return tuple((p._version, p.data_ptr(), p.dtype) for p in params)

    def null_scale_shift(self, size):
        """(1 + gamma, beta), each (1, C, h, w), for the all-zero label map (the guidance input).

        mlp_shared of zeros is relu(bias) at every pixel, so gamma/beta are their bias plus the sum,
        over the taps that fall inside the image, of W_tap @ relu(bias): a (h*w, 9) @ (9, C) product.
        Under no_grad the result is cached per size; the cache is keyed on the parameters' version
        counters and storage, so optimizer steps and load_state_dict invalidate it (in-place edits
        through `.data` do not: call `clear_spade_caches` after those)."""
        weight0 = self.mlp_shared[0].weight
        device = weight0.device
        key = None
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():  # compiled: recomputed (cheap)
            amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
            key, stamp = (tuple(size), device, amp), self._weight_stamp()
            hit = self._null_cache.get(key)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        actv = F.relu(self.mlp_shared[0].bias)
        if torch.is_grad_enabled() and weight0.requires_grad:
            # The released conv of a zero map gives mlp_shared.weight a zero gradient (not None):
            # keep it in the graph so optimizers (weight decay) and DDP see the same thing.
            actv = actv + 0 * weight0.sum()
        # inside[p, tap] = 1 where the tap of pixel p falls inside the image (tap order as the conv's).
        inside = F.unfold(torch.ones(1, 1, *size, dtype=weight0.dtype, device=device), 3, padding=1)[0].t()
        outs = []
        for w, b in self._scale_shift_parts():
            per_tap = torch.einsum("oihw,i->hwo", w, actv).reshape(9, -1)  # (9, out): W_tap @ relu(bias)
            out = torch.addmm(b.to(per_tap.dtype), inside.to(per_tap.dtype), per_tap)  # (h*w, out)
            outs.append(out.view(1, *size, -1).permute(0, 3, 1, 2))  # NHWC memory, like the torso
        result = self._split(outs)
        if key is not None:
            self._null_cache[key] = (stamp, result)
        return result


class _GatherSum(torch.autograd.Function):
    """out[n] = sum_j table[index[n, j]]. Forward is embedding_bag; backward scatters with index_add,
    because embedding_bag's CPU backward sorts all indices, which costs more than the layer itself."""

    @staticmethod
    def forward(ctx, table, index):
        ctx.save_for_backward(index)
        ctx.num_rows = table.shape[0]
        return F.embedding_bag(index, table, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        grad = grad.contiguous()
        grad_table = grad.new_zeros(ctx.num_rows, grad.shape[1])
        for j in range(index.shape[1]):
            grad_table.index_add_(0, index[:, j], grad)
        return grad_table, None


def gather_sum(table, index):
    """(R, D) table, (N, K) row indices -> (N, D): the sum of the K rows picked per n."""
    if torch.is_grad_enabled() and table.requires_grad:
        return _GatherSum.apply(table, index)
    return F.embedding_bag(index, table, mode="sum")


def _modulate(normed, scale, shift):
    """normed * scale + shift in one pass (scale = 1 + gamma)."""
    return torch.addcmul(shift, normed, scale)


def clear_spade_caches(model):
    """Drop every cached all-zero-map modulation (needed only after editing weights via `.data`)."""
    for m in model.modules():
        if isinstance(m, SPADEGroupNorm):
            m._null_cache.clear()


class _PatchPlan:
    """Gather indices for one resolution: `pixel_taps` (N, 9) and, when distinct 3x3 label patches are
    few, `unique_taps` (U, 9) (pixel_taps then index the per-patch results instead of the codes)."""

    def __init__(self, pixel_taps, unique_taps=None):
        self.pixel_taps, self.unique_taps = pixel_taps, unique_taps


class SpadeLabels:
    """The label map prepared once per forward for the SPADE fast paths, shared by all norms.

    A pixel whose first L-1 channels are one-hot or all zero and whose last channel is 0 or 1 gets
    the integer code `class + L * last`, class in [0, L-1] (L-1: none set). The last channel is the
    instance edge, or the last class when there is no edge channel: either way it adds its own
    weight column, so the code is exact for both. Zero padding of the conv is the code L-1.
    Rows that are all zero (the guidance input, dropped labels) are split off to the cached
    closed form when `null_label_cache` is on.
    """

    def __init__(self, y, dtype):
        bsz, num_labels = y.shape[:2]
        self.num_labels = num_labels
        self._dense = y
        self._dtype = dtype
        self._cache = {}
        null = ~(y.reshape(bsz, -1) != 0).any(dim=1) if FAST_PATHS["null_label_cache"] else None
        null_list = null.tolist() if null is not None else [False] * bsz
        self.all_null = all(null_list)
        self.null_rows = self.cond_rows = self.restore = None
        self.num_cond = bsz
        if any(null_list) and not self.all_null:
            order = [i for i, n in enumerate(null_list) if not n] + [i for i, n in enumerate(null_list) if n]
            self.num_cond = null_list.count(False)
            self.cond_rows = torch.tensor(order[: self.num_cond], device=y.device)
            self.null_rows = torch.tensor(order[self.num_cond:], device=y.device)
            if order != list(range(bsz)):
                self.restore = torch.argsort(torch.tensor(order, device=y.device))
            self._dense = y.index_select(0, self.cond_rows)
        self.codes = None
        if FAST_PATHS["spade_gather"] and not self.all_null:
            self.codes = _label_codes(self._dense)

    def dense_at(self, size, dtype):
        """Cond rows of the map in the model's dtype, nearest-resized to `size` (released resize)."""
        key = ("dense", size, dtype)
        if key not in self._cache:
            dense = F.interpolate(self._dense.type(self._dtype).type(dtype), size=size, mode="nearest")
            if FAST_PATHS["channels_last"]:
                dense = dense.contiguous(memory_format=torch.channels_last)
            self._cache[key] = dense
        return self._cache[key]

    def patch_plan(self, size):
        """Gather indices at `size`, or None when the map is not one-hot (dense path)."""
        if self.codes is None:
            return None
        key = ("plan", size)
        if key not in self._cache:
            self._cache[key] = self._make_plan(size)
        return self._cache[key]

    def _make_plan(self, size):
        codes = F.interpolate(self.codes[:, None].float(), size=size, mode="nearest")[:, 0].long()
        rows = 2 * self.num_labels
        patches = _neighbourhoods(codes, pad_value=self.num_labels - 1)  # (N, 9) codes
        offsets = torch.arange(9, device=codes.device) * rows
        if not FAST_PATHS["spade_unique_patches"]:
            return _PatchPlan(patches + offsets)
        unique, inverse = _unique_rows(patches)
        if unique.shape[0] > UNIQUE_PATCH_MAX_RATIO * patches.shape[0]:
            return _PatchPlan(patches + offsets)
        num_unique = unique.shape[0]
        pixel_taps = _neighbourhoods(inverse.view(codes.shape), pad_value=num_unique)  # U: outside the image
        return _PatchPlan(pixel_taps * 9 + torch.arange(9, device=codes.device), unique + offsets)


def _label_codes(y):
    """(B, H, W) integer codes of a one-hot (+ binary last channel) map, or None if it is not one."""
    num_labels = y.shape[1]
    head, last = y[:, :-1], y[:, -1]
    if not bool(((y == 0) | (y == 1)).all()):
        return None
    if num_labels == 1:
        return (num_labels - 1) + num_labels * last.long()
    count = head.sum(dim=1)
    if not bool((count <= 1).all()):
        return None
    cls = torch.where(count > 0, head.argmax(dim=1), torch.full_like(count, num_labels - 1, dtype=torch.long))
    return cls + num_labels * last.long()


def _neighbourhoods(grid, pad_value):
    """(B, H, W) ints -> (B*H*W, 9): each pixel's 3x3 neighbourhood in conv tap order (row-major),
    positions outside the image set to pad_value."""
    bsz, h, w = grid.shape
    padded = F.pad(grid, (1, 1, 1, 1), value=pad_value)
    taps = [padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]
    return torch.stack(taps, dim=-1).reshape(bsz * h * w, 9)


def _unique_rows(rows):
    """torch.unique(rows, dim=0, return_inverse=True), through one int64 key per row when the values
    present fit in 7 bits (a 1-D unique is much faster than the row-wise one)."""
    values = torch.unique(rows)
    if values.numel() > 128:
        return torch.unique(rows, dim=0, return_inverse=True)
    ranks = torch.searchsorted(values, rows)
    key = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    for j in range(rows.shape[1]):
        key = key * 128 + ranks[:, j]
    unique_keys, inverse = torch.unique(key, return_inverse=True)
    shifts = 128 ** torch.arange(rows.shape[1] - 1, -1, -1, device=rows.device)
    return values[(unique_keys[:, None] // shifts) % 128], inverse


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
                 use_new_attention_order=False):
        super().__init__()
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
        b, c, *spatial = x.shape
        if FAST_PATHS["channels_last"] and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            # Keep the torso in NHWC: otherwise every conv after an attention block runs NCHW.
            h = self.proj_out(qkv_attention(self.qkv(self.norm(x.reshape(b, c, -1))), self.num_heads,
                                            self.legacy_order))
            return (x + h.view(b, c, *spatial)).contiguous(memory_format=torch.channels_last)
        x = x.reshape(b, c, -1)
        h = self.proj_out(qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.legacy_order))
        return (x + h).reshape(b, c, *spatial)


def qkv_attention(qkv, num_heads, legacy_order=True):
    """(B, 3*H*C, T) -> (B, H*C, T). Softmax(q k^T / sqrt(C)) v per head, softmax in fp32."""
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if legacy_order:
        q, k, v = qkv.reshape(bs * num_heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(bs * num_heads, ch, length) for t in qkv.chunk(3, dim=1))
    if FAST_PATHS["sdpa_attention"]:
        # Contiguous 4-D (batch, heads, tokens, ch): the fused (flash) kernels need a unit-stride last
        # dimension; otherwise SDPA silently falls back to its slower math path.
        q, k, v = (t.view(bs, num_heads, ch, length).transpose(2, 3).contiguous() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(2, 3).reshape(bs, -1, length)
    scale = ch ** -0.25
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


class UNetModel(nn.Module):
    """The SDM/SCDM UNet. Call as `model(x, t, y=label_map)` with y of shape (B, num_classes, H, W)
    where num_classes here is the number of label channels (classes, plus one edge channel)."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True,
                 dims=2, num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=1,
                 num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False,
                 resblock_updown=False, use_new_attention_order=False):
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

    def forward(self, x, timesteps, y=None, with_unconditional=False):
        """Model output for (x, timesteps, label map y). With `with_unconditional`, the output for the
        all-zero map at the same x and timesteps is appended: cat[out(x, t, y), out(x, t, 0)] (2B rows),
        as classifier-free guidance needs. The encoder does not see the label map, so with the
        `shared_encoder` fast path it runs once for both halves."""
        self.check_inputs(x, y)
        share = with_unconditional and FAST_PATHS["shared_encoder"]
        if with_unconditional:
            y = torch.cat([y, torch.zeros_like(y)])
            if not share:
                x, timesteps = torch.cat([x, x]), torch.cat([timesteps, timesteps])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        cond = SpadeLabels(y, self.dtype) if _spade_fast_enabled() else y.type(self.dtype)
        h = x.type(self.dtype)
        channels_last = FAST_PATHS["channels_last"] and h.dim() == 4
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
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
        return out.contiguous() if channels_last else out
