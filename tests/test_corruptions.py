"""scdm.data.corruptions against independent computations: PIL, brute-force loops, binomial bounds."""
import numpy as np
import pytest
from PIL import Image

from scdm.data import corruptions as C


def random_map(shape, values, seed, blocks=6):
    """Small map with blocky regions (so boundaries are not everywhere) and some noise pixels."""
    rng = np.random.default_rng(seed)
    out = np.full(shape, rng.integers(values), dtype=np.uint8)
    for _ in range(blocks):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        h, w = rng.integers(1, shape[0] // 2 + 2), rng.integers(1, shape[1] // 2 + 2)
        out[y:y + h, x:x + w] = rng.integers(values)
    speck = rng.random(shape) < 0.05
    out[speck] = rng.integers(values, size=speck.sum())
    return out


# ----------------------------------------------------------------------------- DS

@pytest.mark.parametrize("shape,size", [((256, 256), 64), ((37, 53), (7, 13)), ((30, 20), (70, 41)), ((5, 9), 5)])
def test_downsample_equals_pil_nearest(shape, size):
    label = random_map(shape, 151, seed=sum(shape))
    h, w = (size, size) if np.isscalar(size) else size
    expected = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    out = C.downsample(label, size)
    assert out.dtype == label.dtype and out.shape == (h, w)
    np.testing.assert_array_equal(out, expected)
    wide = label.astype(np.uint16) * 300  # 16-bit maps (Cityscapes instanceIds) resize the same way
    np.testing.assert_array_equal(C.downsample(wide, size),
                                  np.asarray(Image.fromarray(wide).resize((w, h), Image.NEAREST)))


def test_downsample_default_is_64_and_integer_factor_picks_block_centres():
    label = random_map((256, 256), 151, seed=1)
    np.testing.assert_array_equal(C.downsample(label), label[2::4, 2::4])


# ----------------------------------------------------------------------------- Edge

def brute_edge_mask(ids, radius):
    h, w = ids.shape

    def on_boundary(y, x):
        return any(0 <= y + dy < h and 0 <= x + dx < w and ids[y + dy, x + dx] != ids[y, x]
                   for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)))

    mask = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            mask[y, x] = any(on_boundary(y + dy, x + dx)
                             for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
                             if abs(dy) + abs(dx) <= radius and 0 <= y + dy < h and 0 <= x + dx < w)
    return mask


@pytest.mark.parametrize("radius", [0, 1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_edge_equals_brute_force(radius, seed):
    label = random_map((11, 14), 4, seed)
    expected = np.where(brute_edge_mask(label, radius), 7, label)
    np.testing.assert_array_equal(C.edge_noise(label, radius=radius, fill=7), expected)


@pytest.mark.parametrize("radius", [0, 2])
def test_edge_uses_instance_boundaries(radius):
    label = random_map((12, 10), 3, seed=5)
    instance = random_map((12, 10), 5, seed=6).astype(np.int32) * 1000
    expected = np.where(brute_edge_mask(instance, radius), 255, label)
    out = C.edge_noise(label, instance, radius=radius, fill=255)
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(brute_edge_mask(instance, radius), brute_edge_mask(label, radius))


def test_edge_uniform_map_is_untouched_and_rejects_bad_input():
    label = np.full((6, 6), 3, np.uint8)
    np.testing.assert_array_equal(C.edge_noise(label), label)
    with pytest.raises(ValueError, match="radius"):
        C.edge_noise(label, radius=-1)
    with pytest.raises(ValueError, match="2-D integer"):
        C.edge_noise(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="instance"):
        C.edge_noise(label, np.zeros((5, 6), np.int32))


# ----------------------------------------------------------------------------- Random

@pytest.mark.parametrize("p", [0.1, 0.35])
def test_random_rate_within_binomial_bounds(p):
    label = random_map((256, 256), 150, seed=3) + 1  # no pixel is 0 before the noise
    out = C.random_noise(label, p=p, fill=0, rng=11)
    changed = out != label
    assert np.all(out[changed] == 0)
    n = label.size
    assert abs(changed.sum() - n * p) < 5 * np.sqrt(n * p * (1 - p))


def test_random_matches_the_drawn_uniforms_and_is_reproducible():
    label = random_map((40, 50), 150, seed=4) + 1
    u = np.random.default_rng(7).random(label.shape)
    np.testing.assert_array_equal(C.random_noise(label, 0.2, 255, rng=7), np.where(u < 0.2, 255, label))
    np.testing.assert_array_equal(C.random_noise(label, 0.2, rng=np.random.default_rng(7)),
                                  C.random_noise(label, 0.2, rng=7))
    assert not np.array_equal(C.random_noise(label, 0.2, rng=7), C.random_noise(label, 0.2, rng=8))
    np.testing.assert_array_equal(C.random_noise(label, 0.0, rng=1), label)
    assert np.all(C.random_noise(label, 1.0, fill=9, rng=1) == 9)
    with pytest.raises(ValueError, match="p must be"):
        C.random_noise(label, 1.5)


def test_derive_rng_depends_on_seed_and_key_only():
    a = C.derive_rng(0, "ADE_val_00000001").random(4)
    np.testing.assert_array_equal(a, C.derive_rng(0, "ADE_val_00000001").random(4))
    assert not np.array_equal(a, C.derive_rng(1, "ADE_val_00000001").random(4))
    assert not np.array_equal(a, C.derive_rng(0, "ADE_val_00000002").random(4))


# ----------------------------------------------------------------------------- Painter

def brute_regions(label, instance=None):
    """Flood fill in raster order."""
    h, w = label.shape
    key = [[(label[y, x], None if instance is None else instance[y, x]) for x in range(w)] for y in range(h)]
    out = -np.ones((h, w), int)
    n = 0
    for y0 in range(h):
        for x0 in range(w):
            if out[y0, x0] >= 0:
                continue
            stack = [(y0, x0)]
            out[y0, x0] = n
            while stack:
                y, x = stack.pop()
                for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                    v, u = y + dy, x + dx
                    if 0 <= v < h and 0 <= u < w and out[v, u] < 0 and key[v][u] == key[y][x]:
                        out[v, u] = n
                        stack.append((v, u))
            n += 1
    return out


def brute_paint(region_map, offsets, order, painted):
    """Layered painting with explicit L1 distances: strokes in order, later on top."""
    h, w = region_map.shape
    pixels = [(y, x) for y in range(h) for x in range(w)]
    owner = -np.ones((h, w), int)
    for k in sorted(range(len(order)), key=lambda k: order[k]):
        if not painted[k]:
            continue
        inside = [(y, x) for y, x in pixels if region_map[y, x] == k]
        outside = [(y, x) for y, x in pixels if region_map[y, x] != k]
        for y, x in pixels:
            if offsets[k] >= 0:
                cover = min(abs(y - v) + abs(x - u) for v, u in inside) <= offsets[k]
            else:
                depth = min((abs(y - v) + abs(x - u) for v, u in outside), default=10 ** 9) - 1
                cover = region_map[y, x] == k and depth >= -offsets[k]
            if cover:
                owner[y, x] = k
    return owner


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regions_equal_flood_fill(seed):
    label = random_map((9, 13), 3, seed)
    instance = random_map((9, 13), 2, seed + 10)
    for inst in (None, instance):
        region_map, first = C.regions(label, inst)
        expected = brute_regions(label, inst)
        np.testing.assert_array_equal(region_map, expected)
        np.testing.assert_array_equal(first, [np.flatnonzero(expected.ravel() == k)[0] for k in range(first.size)])


@pytest.mark.parametrize("seed", range(4))
def test_paint_equals_brute_force_layers(seed):
    rng = np.random.default_rng(seed)
    label = random_map((9, 12), 4, seed, blocks=4)
    region_map, first = C.regions(label)
    n = first.size
    offsets = rng.integers(-3, 4, n)
    order = rng.permutation(n)
    painted = rng.random(n) < 0.85
    np.testing.assert_array_equal(C.paint(region_map, offsets, order, painted),
                                  brute_paint(region_map, offsets, order, painted))


def test_painter_identity_without_shift_or_drop():
    label = random_map((30, 40), 6, seed=3)
    np.testing.assert_array_equal(C.painter_noise(label, max_shift=0, drop_prob=0.0, rng=0), label)


@pytest.mark.parametrize("max_shift", [1, 2, 4])
def test_painter_changes_only_near_borders_and_only_to_known_ids(max_shift):
    label = random_map((48, 64), 6, seed=max_shift) + 1
    out = C.painter_noise(label, max_shift=max_shift, drop_prob=0.0, fill=0, rng=5)
    changed = out != label
    assert changed.any()
    assert set(np.unique(out)) <= set(np.unique(label)) | {0}
    assert not np.any(changed & ~brute_edge_mask(label, max_shift - 1))


def test_painter_drops_small_regions():
    label = np.full((20, 20), 1, np.uint8)
    label[2:4, 2:4] = 2       # 4 px
    label[10:13, 10:13] = 3   # 9 px
    label[5:15, 0:3] = 4      # 30 px
    out = C.painter_noise(label, max_shift=0, small_area=10, drop_prob=1.0, rng=0)
    expected = label.copy()
    expected[(label == 2) | (label == 3)] = 0
    np.testing.assert_array_equal(out, expected)


def test_painter_is_reproducible_and_keeps_unlabeled_unpainted():
    label = random_map((32, 32), 5, seed=9)  # id 0 = unlabeled regions, never painted
    a = C.painter_noise(label, rng=3)
    np.testing.assert_array_equal(a, C.painter_noise(label, rng=np.random.default_rng(3)))
    assert not np.array_equal(a, C.painter_noise(label, rng=4))
    interior = ~brute_edge_mask(label, 2)
    assert np.all(a[interior & (label == 0)] == 0)


# ----------------------------------------------------------------------------- pairs

def test_corrupt_treats_instance_like_label():
    label = random_map((24, 20), 4, seed=1)
    instance = random_map((24, 20), 6, seed=2).astype(np.uint16) + 100
    lab, inst = C.corrupt("edge", label, instance, fill=255, instance_fill=0, radius=1)
    blank = brute_edge_mask(instance, 1)
    np.testing.assert_array_equal(lab, np.where(blank, 255, label))
    np.testing.assert_array_equal(inst, np.where(blank, 0, instance))
    lab, inst = C.corrupt("random", label, instance, fill=255, rng=3, p=0.3)
    np.testing.assert_array_equal(lab == 255, inst == 255)
    lab, inst = C.corrupt("downsample", label, instance, size=8)
    np.testing.assert_array_equal(inst, C.downsample(instance, 8))
    lab, inst = C.corrupt("painter", label, instance, fill=255, rng=4, max_shift=2)
    np.testing.assert_array_equal(lab, C.painter_noise(label, instance, max_shift=2, fill=255, rng=4))
    moved = inst != instance
    assert moved.any() and np.all((inst[moved] == 255) == (lab[moved] == 255))
    with pytest.raises(ValueError, match="unknown noise"):
        C.corrupt("blur", label)
    with pytest.raises(TypeError, match="radius"):
        C.corrupt("random", label, radius=2)
