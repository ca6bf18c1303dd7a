"""Noisy label maps: the paper's benchmarks (DS, Edge, Random) and a careless-painter noise.

SCDM is judged on how well it copes with label maps a user might really hand it. These
functions make such maps from clean annotations. They work on 2-D integer arrays of *raw*
dataset ids (ADE20K: 0 = unlabeled; COCO-Stuff: 255; Cityscapes: 0) and are vectorized with
numpy (a few whole-array passes per map, never a Python loop over pixels), so the 2000-map
benchmark trees are cheap to rebuild. Randomness always comes from an explicit seed or
``np.random.Generator`` so every noisy map can be reproduced.

- ``downsample``: DS, nearest resize to 64x64 (exactly PIL's NEAREST).
- ``edge_noise``: Edge, boundary band of radius ``radius`` (L1 diamond) set to ``fill``.
- ``random_noise``: Random, each pixel set to ``fill`` with probability ``p``.
- ``painter_noise``: not in the paper; each region's border moved in or out by a random few
  pixels and small regions forgotten, as a hurried human painter would.
- ``corrupt``: any of them applied to a label map and its instance map consistently.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image

RngLike = Union[None, int, np.random.Generator, np.random.SeedSequence]

NOISES = ("downsample", "edge", "random", "painter")


# ----------------------------------------------------------------------------- seeding

def as_rng(rng: RngLike) -> np.random.Generator:
    """A Generator from a seed, a SeedSequence or a Generator (returned as is)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def derive_rng(seed: int, key: str) -> np.random.Generator:
    """Generator for one file: depends on (seed, key) only, not on worker count or order."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return np.random.default_rng(np.random.SeedSequence([int(seed), int.from_bytes(digest[:8], "little")]))


# ----------------------------------------------------------------------------- helpers

def _check_map(name: str, arr: np.ndarray, shape: Optional[tuple] = None) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise ValueError(f"{name} must be a 2-D integer array of raw ids, got dtype {arr.dtype} shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape} but the label map has shape {shape}")
    return arr


def _cross_max(a: np.ndarray) -> np.ndarray:
    """Max over each pixel and its 4 neighbours (pixels outside the map are ignored)."""
    out = a.copy()
    np.maximum(out[1:], a[:-1], out=out[1:])
    np.maximum(out[:-1], a[1:], out=out[:-1])
    np.maximum(out[:, 1:], a[:, :-1], out=out[:, 1:])
    np.maximum(out[:, :-1], a[:, 1:], out=out[:, :-1])
    return out


def diamond_max(a: np.ndarray, radius: int) -> np.ndarray:
    """Max over the diamond |dx|+|dy| <= radius (a dilation; on bool maps an OR).

    ``radius`` rounds of the 4-neighbour cross: the Minkowski sum of r crosses is the diamond.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    out = np.asarray(a)
    for _ in range(radius):
        out = _cross_max(out)
    return out.copy() if radius == 0 else out


def boundary_mask(ids: np.ndarray, radius: int = 0) -> np.ndarray:
    """Pixels whose right/left/up/down neighbour has another id (both sides), dilated by a
    diamond of ``radius``. ``radius=0`` is the instance-edge channel of the loader."""
    ids = _check_map("ids", ids)
    edge = np.zeros(ids.shape, dtype=bool)
    dh = ids[:, 1:] != ids[:, :-1]
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    dv = ids[1:] != ids[:-1]
    edge[1:] |= dv
    edge[:-1] |= dv
    return diamond_max(edge, radius)


def take(values: np.ndarray, source: np.ndarray, fill: int) -> np.ndarray:
    """``values`` gathered at flat indices ``source`` (shape of ``source``); ``fill`` where -1."""
    flat = np.asarray(values).ravel()
    out = flat[np.maximum(source, 0)]
    out[source < 0] = fill
    return out


# ----------------------------------------------------------------------------- DS

@lru_cache(maxsize=16)
def _nearest_index(height: int, width: int, out_h: int, out_w: int) -> np.ndarray:
    # PIL decides which source pixel each output pixel takes; resizing an image of flat indices
    # records that choice once, so any dtype (and the instance map) resizes identically.
    idx = np.arange(height * width, dtype=np.int32).reshape(height, width)
    src = np.asarray(Image.fromarray(idx).resize((out_w, out_h), Image.NEAREST)).astype(np.intp)
    src.setflags(write=False)
    return src


def resize_nearest(label: np.ndarray, size: Union[int, Tuple[int, int]]) -> np.ndarray:
    """Nearest resize to ``size`` (int or (height, width)), identical to PIL's NEAREST."""
    label = _check_map("label", label)
    out_h, out_w = (size, size) if np.isscalar(size) else size
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size}")
    if (out_h, out_w) == label.shape:
        return label.copy()
    return label.ravel()[_nearest_index(*label.shape, int(out_h), int(out_w))]


def downsample(label: np.ndarray, size: Union[int, Tuple[int, int]] = 64) -> np.ndarray:
    """DS benchmark: the annotation resized to 64x64 with nearest (the loader resizes it back)."""
    return resize_nearest(label, size)


# ----------------------------------------------------------------------------- Edge

def edge_noise(label: np.ndarray, instance: Optional[np.ndarray] = None, radius: int = 2,
               fill: int = 0) -> np.ndarray:
    """Edge benchmark: pixels within L1 distance ``radius`` of a boundary set to ``fill``.

    Boundaries are 4-neighbour differences of ``instance`` when given (COCO, Cityscapes),
    else of ``label`` (ADE20K has no instance maps). The paper uses radius 2 at 256x256.
    """
    label = _check_map("label", label)
    ids = label if instance is None else _check_map("instance", instance, label.shape)
    out = label.copy()
    np.putmask(out, boundary_mask(ids, radius), fill)
    return out


# ----------------------------------------------------------------------------- Random

def random_mask(shape: Tuple[int, int], p: float = 0.1, rng: RngLike = None) -> np.ndarray:
    """Independent Bernoulli(p) pixels; draws ``rng.random(shape)`` (one double per pixel)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return as_rng(rng).random(shape) < p


def random_noise(label: np.ndarray, p: float = 0.1, fill: int = 0, rng: RngLike = None) -> np.ndarray:
    """Random benchmark: each pixel independently set to ``fill`` with probability ``p``."""
    label = _check_map("label", label)
    out = label.copy()
    np.putmask(out, random_mask(label.shape, p, rng), fill)
    return out


# ----------------------------------------------------------------------------- Painter

def regions(label: np.ndarray, instance: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """4-connected regions of equal (label, instance), each one stroke of the painter.

    Returns an id map numbered 0..n-1 in raster order of each region's first pixel, and the
    flat index of those first pixels (length n).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    label = _check_map("label", label)
    h, w = label.shape
    diff_h = label[:, 1:] != label[:, :-1]
    same_v = label[1:] == label[:-1]
    if instance is not None:
        instance = _check_map("instance", instance, label.shape)
        diff_h |= instance[:, 1:] != instance[:, :-1]
        same_v &= instance[1:] == instance[:-1]
    # Horizontal runs of equal ids are the graph's nodes (numbered in raster order); two runs
    # in adjacent rows are linked where they overlap with equal ids. An overlap starts where
    # one of the two runs starts, so checking those columns finds every link.
    starts = np.ones((h, w), dtype=bool)
    starts[:, 1:] = diff_h
    run = np.cumsum(starts.ravel()).reshape(h, w) - 1
    num_runs = int(run[-1, -1]) + 1
    link = same_v & (starts[:-1] | starts[1:])
    graph = coo_matrix((np.ones(int(link.sum()), dtype=np.int8), (run[:-1][link], run[1:][link])),
                       shape=(num_runs, num_runs))
    n, run_region = connected_components(graph, directed=False)
    # Regions numbered by their first run (= first pixel in raster order); make sure.
    first_run = np.flatnonzero(np.diff(np.maximum.accumulate(run_region), prepend=-1))
    if not np.array_equal(run_region[first_run], np.arange(n)):
        _, first_run = np.unique(run_region, return_index=True)
        rank = np.empty(n, dtype=np.int64)
        rank[np.argsort(first_run)] = np.arange(n)
        run_region, first_run = rank[run_region], np.sort(first_run)
    return run_region.astype(np.intp)[run], np.flatnonzero(starts)[first_run]


def _top_stroke(region_map: np.ndarray, offsets: np.ndarray, order: np.ndarray,
                painted: np.ndarray) -> np.ndarray:
    """For each pixel the ``order`` of the top stroke covering it, -1 where none (see paint)."""
    reach = int(np.abs(offsets).max(initial=0))
    small = np.int16 if max(order.size, reach) < 2 ** 15 else np.int32  # less memory traffic per pass
    stroke = np.where(painted, order, -1).astype(small)[region_map]  # own stroke, -1: unpainted
    shift = offsets.astype(small)[region_map]

    # Own pixels: a region shrunk by e leaves blank the pixels at L1 distance < e from the
    # nearest border pixel (its own inner border; the image frame is no border).
    near = boundary_mask(region_map)
    for e in range(1, reach + 1):
        stroke[near & (shift <= -e)] = -1
        if e < reach:
            near = _cross_max(near)

    # Growing strokes: a region with offset o enters the wave at round o and spreads o times.
    wave = np.full(region_map.shape, -1, dtype=small)
    for t in range(reach, 0, -1):
        np.maximum(wave, np.where(shift == t, stroke, small(-1)), out=wave)
        wave = _cross_max(wave)
    return np.maximum(stroke, wave).astype(np.intp)


def _check_strokes(region_map, offsets, order, painted):
    region_map = _check_map("region_map", region_map).astype(np.intp, copy=False)
    offsets = np.asarray(offsets, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64)
    painted = np.asarray(painted, dtype=bool)
    n = offsets.size
    if order.shape != (n,) or painted.shape != (n,) or np.any(np.sort(order) != np.arange(n)):
        raise ValueError("offsets, order and painted must have one entry per region; order a permutation")
    if region_map.size and (region_map.min() < 0 or region_map.max() >= n):
        raise ValueError(f"region_map ids must be in 0..{n - 1}")
    return region_map, offsets, order, painted


def paint(region_map: np.ndarray, offsets: np.ndarray, order: np.ndarray,
          painted: np.ndarray) -> np.ndarray:
    """Repaint regions with moved borders, one stroke after another; return the owner map.

    Region k (if ``painted[k]``) covers its own pixels at L1 depth >= -offsets[k] from its
    border when the offset is negative (its outer rings left blank), or every pixel within L1
    distance offsets[k] of itself when positive (spilling over its neighbours). Strokes are
    laid in increasing ``order`` (a permutation), later ones on top. Returns for each pixel the
    region of the top stroke covering it, -1 where none does. The image frame is not a border.
    """
    region_map, offsets, order, painted = _check_strokes(region_map, offsets, order, painted)
    top = _top_stroke(region_map, offsets, order, painted)
    by_order = np.append(np.argsort(order), -1)  # index -1 (no stroke) -> -1
    return by_order[top]


def painter_source(label: np.ndarray, instance: Optional[np.ndarray] = None, max_shift: int = 3,
                   small_area: int = 64, drop_prob: float = 0.5, fill: int = 0,
                   rng: RngLike = None) -> np.ndarray:
    """Flat index of the pixel whose (label, instance) each pixel takes, -1 for ``fill``.

    Draws, per region: a border offset uniform in [-max_shift, max_shift], a random paint
    order, and whether a region smaller than ``small_area`` pixels is forgotten (probability
    ``drop_prob``). Regions already labelled ``fill`` are never painted.
    """
    if max_shift < 0 or small_area < 0 or not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"need max_shift >= 0, small_area >= 0, 0 <= drop_prob <= 1; got "
                         f"{max_shift}, {small_area}, {drop_prob}")
    label = _check_map("label", label)
    rng = as_rng(rng)
    region_map, first = regions(label, instance)
    n = first.size
    area = np.bincount(region_map.ravel(), minlength=n)
    offsets = rng.integers(-max_shift, max_shift + 1, size=n)
    order = rng.permutation(n)
    dropped = (area < small_area) & (rng.random(n) < drop_prob)
    painted = (label.ravel()[first] != fill) & ~dropped
    top = _top_stroke(region_map, offsets, order, painted)
    source_by_order = np.append(first[np.argsort(order)], -1)  # index -1 (no stroke) -> -1
    return source_by_order[top]


def painter_noise(label: np.ndarray, instance: Optional[np.ndarray] = None, max_shift: int = 3,
                  small_area: int = 64, drop_prob: float = 0.5, fill: int = 0,
                  rng: RngLike = None) -> np.ndarray:
    """Careless-painter noise: borders moved in/out by up to ``max_shift`` px, small regions
    dropped. Properties (tested): the output holds only input ids and ``fill``; with
    ``drop_prob=0`` only pixels within L1 distance ``max_shift - 1`` of a region border
    change; ``max_shift=0, drop_prob=0`` is the identity."""
    source = painter_source(label, instance, max_shift, small_area, drop_prob, fill, rng)
    return take(label, source, fill)


# ----------------------------------------------------------------------------- pairs

def corrupt(noise: str, label: np.ndarray, instance: Optional[np.ndarray] = None, *, fill: int = 0,
            instance_fill: Optional[int] = None, rng: RngLike = None,
            **params) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Apply ``noise`` (one of NOISES) to a label map and, consistently, its instance map.

    The instance map gets the same treatment (same resize, same blanked pixels set to
    ``instance_fill``, default ``fill``; same repainting), so the loader's edge channel does not
    leak the clean boundaries. ``params`` are the noise's keyword arguments.
    """
    label = _check_map("label", label)
    if instance is not None:
        instance = _check_map("instance", instance, label.shape)
    ifill = fill if instance_fill is None else instance_fill
    if noise == "downsample":
        size = params.pop("size", 64)
        _no_extra(noise, params)
        return downsample(label, size), None if instance is None else downsample(instance, size)
    if noise == "edge":
        mask = boundary_mask(label if instance is None else instance, params.pop("radius", 2))
        _no_extra(noise, params)
    elif noise == "random":
        mask = random_mask(label.shape, params.pop("p", 0.1), rng)
        _no_extra(noise, params)
    elif noise == "painter":
        source = painter_source(label, instance, fill=fill, rng=rng, **params)
        return take(label, source, fill), None if instance is None else take(instance, source, ifill)
    else:
        raise ValueError(f"unknown noise {noise!r}; expected one of {', '.join(NOISES)}")
    label = label.copy()
    label[mask] = fill
    if instance is not None:
        instance = instance.copy()
        instance[mask] = ifill
    return label, instance


def _no_extra(noise: str, params: dict) -> None:
    if params:
        raise TypeError(f"unexpected parameters for {noise}: {', '.join(sorted(params))}")
