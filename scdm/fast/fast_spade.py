"""The exact fast paths of the SPADE norm (scdm/models/spade.py): the same gamma and beta, computed faster.

gamma and beta depend on the label map only, never on x or t, so their label-dependent part can be
prepared once per forward (`SpadeLabels`), shared by every norm, and for the all-zero map (the
guidance input, dropped labels) computed in closed form and cached. For one-hot maps the first conv
is a sum of weight columns, i.e. a table gather, and a map has few distinct 3x3 patches, so gamma/beta
can be evaluated once per patch. Which of these run is the model's `FastPaths` config; where a
switch is "auto", the model's `Autotuner` times the candidates (dense conv, gather, unique patches)
once per (device, dtype, grad mode, shapes) and keeps the fastest.

The one way in: the UNet builds `SpadeLabels` from its label map when a SPADE switch is on
(`FastPaths.spade_enabled`) and hands it to every norm instead of the map; the norm's forward calls
`SpadeLabels.modulate(norm, normed)`, which reads the norm's convs and returns its output.
"""
import torch
import torch.nn.functional as F

from .fast_paths import AUTO, UNIQUE_PATCH_MAX_RATIO, Autotuner, timed_call, unwrap


class SpadeLabels:
    """The label map prepared once per forward for the SPADE fast paths, shared by all norms.

    A pixel whose first L-1 channels are one-hot or all zero and whose last channel is 0 or 1 gets
    the integer code `class + L * last`, class in [0, L-1] (L-1: none set). The last channel is the
    instance edge, or the last class when there is no edge channel: either way it adds its own
    weight column, so the code is exact for both. Zero padding of the conv is the code L-1.
    Rows that are all zero (the guidance input, dropped labels) are split off to the cached
    closed form when `null_label_cache` is on. `null_cache`: the model's cache of those (a dict
    that outlives the forward, see `null_scale_shift`); None: one for this map only.
    """

    def __init__(self, y, dtype, fast_paths, tuner=None, null_cache=None):
        bsz, num_labels = y.shape[:2]
        self.fast_paths = fast_paths
        self.tuner = tuner if tuner is not None else Autotuner()
        self.null_cache = null_cache if null_cache is not None else {}
        self.num_labels = num_labels
        self._dense = y
        self._dtype = dtype
        self._cache = {}
        null = ~(y.reshape(bsz, -1) != 0).any(dim=1) if fast_paths.null_label_cache else None
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
        self._codes = False  # computed on first use: its one-hot check syncs with the device

    def modulate(self, norm, normed):
        """The SPADEGroupNorm `norm`'s output for its normalised input `normed` and this map.

        Cond rows and all-zero (null) rows are modulated separately (null rows by the closed form).
        Both compute scale = 1 + gamma (the 1 folded into the conv bias) and shift = beta, applied in
        one pass: addcmul(shift, normed, scale)."""
        size = tuple(normed.shape[2:])
        fused = self.fast_paths.fused_gamma_beta
        if self.all_null:
            return _modulate(normed, *null_scale_shift(norm, size, fused, self.null_cache))
        if self.null_rows is None:
            return _modulate(normed, *cond_scale_shift(norm, self, size))
        n = self.num_cond
        if self.restore is None:  # null rows are a suffix (the guidance layout): slices, no copies
            cond_part, null_part = normed[:n], normed[n:]
        else:
            cond_part, null_part = normed.index_select(0, self.cond_rows), normed.index_select(0, self.null_rows)
        out = torch.cat([_modulate(cond_part, *cond_scale_shift(norm, self, size)),
                         _modulate(null_part, *null_scale_shift(norm, size, fused, self.null_cache))])
        return out if self.restore is None else out.index_select(0, self.restore)

    @property
    def codes(self):
        """(B, H, W) integer codes of the cond rows, or None (not one-hot, or the gather is off)."""
        if self._codes is False:
            gather = self.fast_paths.spade_gather is not False and not self.all_null
            self._codes = _label_codes(self._dense) if gather else None
        return self._codes

    def forget(self, size):
        """Drop what was prepared at `size` (the autotuner times a path with its preparation)."""
        for key in [k for k in self._cache if k[1] == size]:
            del self._cache[key]

    def dense_at(self, size, dtype):
        """Cond rows of the map in the model's dtype, nearest-resized to `size` (released resize)."""
        key = ("dense", size, dtype)
        if key not in self._cache:
            dense = F.interpolate(self._dense.type(self._dtype).type(dtype), size=size, mode="nearest")
            if self.fast_paths.channels_last:
                dense = dense.contiguous(memory_format=torch.channels_last)
            self._cache[key] = dense
        return self._cache[key]

    def patch_plan(self, size, unique=None):
        """Gather indices at `size`, or None when the map is not one-hot (dense path). `unique`: try
        the per-patch plan (it falls back to per pixel where distinct patches are too many);
        None: as the config says."""
        if self.codes is None:
            return None
        if unique is None:
            unique = self.fast_paths.spade_unique_patches is not False
        key = ("plan", size, bool(unique))
        if key not in self._cache:
            self._cache[key] = self._make_plan(size, bool(unique))
        return self._cache[key]

    def _make_plan(self, size, unique):
        codes = F.interpolate(self.codes[:, None].float(), size=size, mode="nearest")[:, 0].long()
        rows = 2 * self.num_labels
        patches = _neighbourhoods(codes, pad_value=self.num_labels - 1)  # (N, 9) codes
        offsets = torch.arange(9, device=codes.device) * rows
        if not unique:
            return _PatchPlan(patches + offsets)
        unique, inverse = _unique_rows(patches)
        if unique.shape[0] > UNIQUE_PATCH_MAX_RATIO * patches.shape[0]:
            return _PatchPlan(patches + offsets)
        num_unique = unique.shape[0]
        pixel_taps = _neighbourhoods(inverse.view(codes.shape), pad_value=num_unique)  # U: outside the image
        return _PatchPlan(pixel_taps * 9 + torch.arange(9, device=codes.device), unique + offsets)


# ----- the labelled (cond) rows ------------------------------------------------------------------
def cond_strategies(labels):
    """The allowed ways to compute the cond rows, static default first: "unique" (per distinct
    patch), "gather" (per pixel), "conv" (the dense convs)."""
    fast = labels.fast_paths
    if fast.spade_gather is False or labels.codes is None:  # not one-hot: only the convs are exact
        return ["conv"]
    names = []
    if fast.spade_unique_patches is not False:
        names.append("unique")
    if fast.spade_unique_patches is not True:
        names.append("gather")
    if fast.spade_gather == AUTO:
        names.append("conv")
    return names


def cond_scale_shift(norm, labels, size):
    """(1 + gamma, beta) of `norm` for the cond rows of `labels` at `size` (timed choice where several)."""
    names = cond_strategies(labels)
    if len(names) > 1:
        weight = norm.mlp_gamma.weight
        key = (weight.device, _compute_dtype(weight), "train" if torch.is_grad_enabled() else "eval",
               f"{_rows_bucket(labels.num_cond)}x{labels.num_labels}x{size[0]}x{size[1]}",
               f"C={norm.mlp_gamma.out_channels}",
               "fused" if labels.fast_paths.fused_gamma_beta else "split",
               "nhwc" if labels.fast_paths.channels_last else "nchw")
        candidates = {n: timed_call(lambda n=n: cond_scale_shift_by(norm, n, labels, size, fresh=True),
                                    norm.parameters()) for n in names}
        return cond_scale_shift_by(norm, labels.tuner.choose("spade", key, candidates, weight.device), labels, size)
    return cond_scale_shift_by(norm, names[0], labels, size)


def cond_scale_shift_by(norm, strategy, labels, size, fresh=False):
    """(1 + gamma, beta) by one of `cond_strategies`. `fresh`: rebuild the prepared label data at
    `size`, so that a timing pays for it."""
    if fresh:
        labels.forget(size)
    fused = labels.fast_paths.fused_gamma_beta
    plan = None
    if strategy != "conv":
        plan = labels.patch_plan(size, unique=strategy == "unique")
    if plan is None:  # the convs on the dense map
        actv = norm.mlp_shared(labels.dense_at(size, norm.mlp_gamma.weight.dtype))
        return _split([F.conv2d(actv, w, b, padding=1) for w, b in scale_shift_parts(norm, fused)])
    bsz, (h, w) = labels.num_cond, size
    table, bias = shared_table(norm), norm.mlp_shared[0].bias
    if plan.unique_taps is None:
        actv = F.relu(gather_sum(table, plan.pixel_taps) + bias)  # (N, hidden)
        actv = actv.view(bsz, h, w, -1).permute(0, 3, 1, 2)  # NCHW shape, NHWC memory
        return _split([F.conv2d(actv, w, b, padding=1) for w, b in scale_shift_parts(norm, fused)])
    # mlp_shared once per distinct 3x3 label patch (U of them, plus a zero row standing for the
    # conv's zero padding); all 9 gamma/beta taps in one matmul on those activations, giving a
    # table whose row u * 9 + tap is W_tap @ actv_u; per pixel a gather sums its 9 rows.
    actv = F.relu(gather_sum(table, plan.unique_taps) + bias)
    actv = torch.cat([actv, actv.new_zeros(1, actv.shape[1])])  # (U + 1, hidden)
    outs = []
    for weight, b in scale_shift_parts(norm, fused):
        per_tap = actv @ weight.permute(1, 2, 3, 0).reshape(weight.shape[1], -1)  # (U + 1, 9 * out)
        by_row = plan.pixel_taps_by_row() if per_tap.requires_grad else None
        out = gather_sum(per_tap.view(-1, weight.shape[0]), plan.pixel_taps, by_row)
        out = out + b.to(out.dtype)
        outs.append(out.view(bsz, h, w, -1).permute(0, 3, 1, 2))
    return _split(outs)


def scale_shift_parts(norm, fused):
    """[(weight, bias)] giving (1 + gamma, beta): one concatenated pair (one conv, `fused_gamma_beta`) or two."""
    g, b = norm.mlp_gamma, norm.mlp_beta
    if fused:
        return [(torch.cat([g.weight, b.weight]), torch.cat([g.bias + 1, b.bias]))]
    return [(g.weight, g.bias + 1), (b.weight, b.bias)]


def _split(outs):
    return outs[0].chunk(2, dim=1) if len(outs) == 1 else tuple(outs)


def shared_table(norm):
    """(9 * 2L, nhidden) table; row tap * 2L + code is the sum of the mlp_shared weight columns
    that a pixel with this code switches on (see SpadeLabels), so that mlp_shared at a pixel is
    its bias plus the sum of 9 rows picked by the codes of its 3x3 neighbourhood."""
    w = norm.mlp_shared[0].weight
    num_labels = w.shape[1]
    taps = w.permute(2, 3, 1, 0).reshape(9, num_labels, w.shape[0])
    classes = torch.cat([taps[:, :-1], taps.new_zeros(9, 1, w.shape[0])], dim=1)
    return torch.cat([classes, classes + taps[:, -1:]], dim=1).reshape(9 * 2 * num_labels, w.shape[0])


# ----- the all-zero (null) rows ------------------------------------------------------------------
def null_scale_shift(norm, size, fused, cache):
    """(1 + gamma, beta), each (1, C, h, w), of `norm` for the all-zero label map (the guidance input).

    mlp_shared of zeros is relu(bias) at every pixel, so gamma/beta are their bias plus the sum,
    over the taps that fall inside the image, of W_tap @ relu(bias): a (h*w, 9) @ (9, C) product.
    Under no_grad the result is kept in `cache` (a dict) per norm and size; an entry is keyed on the
    parameters' version counters and storage, so optimizer steps and load_state_dict invalidate it
    (in-place edits through `.data` do not: call `clear_spade_caches` after those)."""
    weight0 = norm.mlp_shared[0].weight
    device = weight0.device
    key = None
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():  # compiled: recomputed (cheap)
        amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        key, stamp = (norm, tuple(size), device, amp, fused), _weight_stamp(norm)
        hit = cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    actv = F.relu(norm.mlp_shared[0].bias)
    if torch.is_grad_enabled() and weight0.requires_grad:
        # The released conv of a zero map gives mlp_shared.weight a zero gradient (not None):
        # keep it in the graph so optimizers (weight decay) and DDP see the same thing.
        actv = actv + 0 * weight0.sum()
    # inside[p, tap] = 1 where the tap of pixel p falls inside the image (tap order as the conv's).
    inside = F.unfold(torch.ones(1, 1, *size, dtype=weight0.dtype, device=device), 3, padding=1)[0].t()
    outs = []
    for w, b in scale_shift_parts(norm, fused):
        per_tap = torch.einsum("oihw,i->hwo", w, actv).reshape(9, -1)  # (9, out): W_tap @ relu(bias)
        out = torch.addmm(b.to(per_tap.dtype), inside.to(per_tap.dtype), per_tap)  # (h*w, out)
        outs.append(out.view(1, *size, -1).permute(0, 3, 1, 2))  # NHWC memory, like the torso
    result = _split(outs)
    if key is not None:
        cache[key] = (stamp, result)
    return result


def _weight_stamp(norm):
    params = (norm.mlp_shared[0].weight, norm.mlp_shared[0].bias, norm.mlp_gamma.weight,
              norm.mlp_gamma.bias, norm.mlp_beta.weight, norm.mlp_beta.bias)
    return tuple((p._version, p.data_ptr(), p.dtype) for p in params)


def clear_spade_caches(model):
    """Drop every cached all-zero-map modulation of `model` (needed only after editing weights via `.data`)."""
    unwrap(model).spade_cache.clear()


# ----- the gather-sum and its backward -----------------------------------------------------------
class _GatherSum(torch.autograd.Function):
    """out[n] = sum_j table[index[n, j]]. Forward is embedding_bag. The backward, grad_table[r] = sum of
    grad[n] over the (n, j) with index[n, j] = r, is an embedding_bag too when the caller passes the
    index sorted by row (`rows_of`, built once per plan and shared by every norm at that size): it
    writes each row once. Without it, index_add per column into a zero table; never embedding_bag's own
    CPU backward, which sorts all indices on every call and costs more than the layer itself."""

    @staticmethod
    def forward(ctx, table, index, by_row):
        ctx.save_for_backward(index, *(by_row or ()))
        ctx.num_rows = table.shape[0]
        return F.embedding_bag(index, table, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        index, *by_row = ctx.saved_tensors
        grad = grad.contiguous()
        if by_row:
            sources, offsets = by_row
            return F.embedding_bag(sources, grad, offsets, mode="sum"), None, None
        grad_table = grad.new_zeros(ctx.num_rows, grad.shape[1])
        for j in range(index.shape[1]):
            grad_table.index_add_(0, index[:, j], grad)
        return grad_table, None, None


def gather_sum(table, index, by_row=None):
    """(R, D) table, (N, K) row indices -> (N, D): the sum of the K rows picked per n. `by_row`:
    `rows_of(index, R)`, which makes the backward a gather as well."""
    if torch.is_grad_enabled() and table.requires_grad:
        return _GatherSum.apply(table, index, by_row)
    return F.embedding_bag(index, table, mode="sum")


def rows_of(index, num_rows):
    """(sources, offsets): for each table row r, the n with index[n, j] = r are
    sources[offsets[r]:offsets[r + 1]] (the index transposed, as embedding_bag bags). No host sync."""
    flat = index.reshape(-1)
    ordered, order = torch.sort(flat, stable=True)
    offsets = torch.searchsorted(ordered, torch.arange(num_rows, device=flat.device))
    return order // index.shape[1], offsets


def _rows_bucket(rows):
    """The labelled-row count as the autotuner keys it: "<=2^k". Under classifier-free dropout the count
    changes from batch to batch; one choice per power of two keeps the timings (and their log lines) few."""
    return f"<={1 << max(rows - 1, 0).bit_length()}"


def _compute_dtype(weight):
    """The dtype the norm computes in: autocast's where it is on, else the weights'."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _modulate(normed, scale, shift):
    """normed * scale + shift in one pass (scale = 1 + gamma)."""
    return torch.addcmul(shift, normed, scale)


# ----- patch plans -------------------------------------------------------------------------------
class _PatchPlan:
    """Gather indices for one resolution: `pixel_taps` (N, 9) and, when distinct 3x3 label patches are
    few, `unique_taps` (U, 9) (pixel_taps then index the per-patch results instead of the codes)."""

    def __init__(self, pixel_taps, unique_taps=None):
        self.pixel_taps, self.unique_taps = pixel_taps, unique_taps
        self._by_row = None

    def pixel_taps_by_row(self):
        """`rows_of` the per-patch table's pixel_taps, for the backward; built once, shared by the norms."""
        if self._by_row is None:
            self._by_row = rows_of(self.pixel_taps, 9 * (self.unique_taps.shape[0] + 1))
        return self._by_row


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
