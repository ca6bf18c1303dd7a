"""Speed of the noisy-label generators: vectorized vs a plain per-pixel Python loop, and the
time to build a 2000-map benchmark tree with the image_process CLIs. Prints JSON.

    python benchmarks/bench_corruptions.py [--maps 20] [--slow_maps 3] [--num 2000] [--num_workers 2]

The targets and the measured figures are in docs/noisy-benchmarks.md (they depend on the machine).
The loops implement the same algorithms (same random draws), and the run checks that both paths give
identical maps.
"""
from __future__ import annotations

import argparse
import json
import os
import random as stdlib_random
import tempfile
import time
from collections import deque
from importlib import metadata
from pathlib import Path

import numpy as np

from image_process.common import build_tree
from image_process.synthetic import scene, write_tree
from scdm.data import corruptions as C
from scdm.runtime.cli import HelpFormatter, add_deprecated_alias, nonnegative_int, positive_int
from scdm.runtime.errors import run_cli
from scdm.fast.performance import describe_machine

PARAMS = {"downsample": {"size": 64}, "edge": {"radius": 2}, "random": {"p": 0.1},
          "painter": {"max_shift": 3, "small_area": 64, "drop_prob": 0.5}}
FOUR = ((0, 1), (0, -1), (1, 0), (-1, 0))


# ----------------------------------------------------------------------------- plain loops

def loop_downsample(lab, size):
    h, w = len(lab), len(lab[0])
    return [[lab[int((y + 0.5) * h / size)][int((x + 0.5) * w / size)] for x in range(size)] for y in range(size)]


def _loop_boundary(ids):
    h, w = len(ids), len(ids[0])
    return [[any(0 <= y + dy < h and 0 <= x + dx < w and ids[y + dy][x + dx] != ids[y][x] for dy, dx in FOUR)
             for x in range(w)] for y in range(h)]


def _diamond(r):
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if abs(dy) + abs(dx) <= r]


def loop_edge(lab, radius, fill=0):
    h, w = len(lab), len(lab[0])
    edge = _loop_boundary(lab)
    out = [row[:] for row in lab]
    for y in range(h):
        for x in range(w):
            if edge[y][x]:
                for dy, dx in _diamond(radius):
                    if 0 <= y + dy < h and 0 <= x + dx < w:
                        out[y + dy][x + dx] = fill
    return out


def loop_random(lab, p, rng, fill=0):
    return [[fill if rng.random() < p else v for v in row] for row in lab]


def loop_painter(lab, max_shift, small_area, drop_prob, rng, fill=0):
    h, w = len(lab), len(lab[0])
    region = [[-1] * w for _ in range(h)]
    first, area = [], []
    for y0 in range(h):  # flood fill in raster order
        for x0 in range(w):
            if region[y0][x0] >= 0:
                continue
            k = len(first)
            first.append((y0, x0))
            region[y0][x0], queue, count = k, deque([(y0, x0)]), 0
            while queue:
                y, x = queue.popleft()
                count += 1
                for dy, dx in FOUR:
                    v, u = y + dy, x + dx
                    if 0 <= v < h and 0 <= u < w and region[v][u] < 0 and lab[v][u] == lab[y][x]:
                        region[v][u] = k
                        queue.append((v, u))
            area.append(count)
    n = len(first)
    offsets = rng.integers(-max_shift, max_shift + 1, size=n).tolist()
    order = rng.permutation(n).tolist()
    drop = rng.random(n).tolist()
    painted = [lab[y][x] != fill and not (area[k] < small_area and drop[k] < drop_prob)
               for k, (y, x) in enumerate(first)]
    border = _loop_boundary(region)
    depth = [[0 if border[y][x] else max_shift for x in range(w)] for y in range(h)]
    queue = deque((y, x) for y in range(h) for x in range(w) if border[y][x])
    while queue:  # BFS distance to the nearest border pixel, capped
        y, x = queue.popleft()
        for dy, dx in FOUR:
            v, u = y + dy, x + dx
            if 0 <= v < h and 0 <= u < w and depth[v][u] > depth[y][x] + 1:
                depth[v][u] = depth[y][x] + 1
                queue.append((v, u))
    out = [row[:] for row in lab]
    near = _diamond(max_shift)
    for y in range(h):
        for x in range(w):
            k = region[y][x]
            best = order[k] if painted[k] and depth[y][x] >= -offsets[k] else -1
            for dy, dx in near:
                v, u = y + dy, x + dx
                if 0 <= v < h and 0 <= u < w:
                    j = region[v][u]
                    if painted[j] and offsets[j] >= abs(dy) + abs(dx) and order[j] > best:
                        best = order[j]
            if best < 0:
                out[y][x] = fill
            else:
                fy, fx = first[order.index(best)]
                out[y][x] = lab[fy][fx]
    return out


# ----------------------------------------------------------------------------- timing

def fast(noise, lab, seed):
    if noise == "downsample":
        return C.downsample(lab, **PARAMS[noise])
    if noise == "edge":
        return C.edge_noise(lab, **PARAMS[noise])
    if noise == "random":
        return C.random_noise(lab, rng=np.random.default_rng(seed), **PARAMS[noise])
    return C.painter_noise(lab, rng=np.random.default_rng(seed), **PARAMS[noise])


def slow(noise, lab, seed):
    rng, rows = np.random.default_rng(seed), lab.tolist()
    if noise == "downsample":
        return loop_downsample(rows, **PARAMS[noise])
    if noise == "edge":
        return loop_edge(rows, **PARAMS[noise])
    if noise == "random":
        return loop_random(rows, rng=rng, **PARAMS[noise])
    return loop_painter(rows, rng=rng, **PARAMS[noise])


def per_map(fn, maps, repeats=1):
    """Best (least disturbed) of `repeats` passes, in seconds per map."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for i, lab in enumerate(maps):
            fn(lab, i)
        best = min(best, (time.perf_counter() - t) / len(maps))
    return best


def bench_maps(size, n_fast, n_slow):
    rng = np.random.default_rng(0)
    maps = [scene(size, size, rng, num_objects=30)[0].astype(np.uint8) for _ in range(n_fast)]
    results = {}
    for noise in PARAMS:
        t_fast = per_map(lambda lab, i: fast(noise, lab, i), maps, repeats=5)
        t_slow = per_map(lambda lab, i: slow(noise, lab, i), maps[:n_slow], repeats=3)
        equal = all(np.array_equal(fast(noise, lab, i), np.array(slow(noise, lab, i), dtype=np.uint8))
                    for i, lab in enumerate(maps[:n_slow]))
        results[noise] = {"vectorized_ms": round(t_fast * 1e3, 3), "loop_ms": round(t_slow * 1e3, 1),
                          "speedup": round(t_slow / t_fast, 1), "identical": equal}
    # The Random loop above draws numpy scalars (so both paths see the same numbers); a loop on
    # Python's own `random` module is the cheapest plain loop there is, reported for honesty.
    t_stdlib = per_map(lambda lab, i: loop_random(lab.tolist(), 0.1, stdlib_random.Random(i)), maps[:n_slow], 3)
    results["random"]["loop_stdlib_random_ms"] = round(t_stdlib * 1e3, 1)
    results["random"]["speedup_vs_stdlib_loop"] = round(t_stdlib / (results["random"]["vectorized_ms"] / 1e3), 1)
    return results


def bench_tree(num, num_workers, height, width, tmp, distinct=100):
    """A fake ADE20K validation split of ``num`` samples (``distinct`` synthetic maps under
    ``num`` names, each name seeding its own noise), then each CLI's tree, timed."""
    t = time.perf_counter()
    stage = write_tree(Path(tmp) / "stage", "ade20k", num=min(num, distinct), height=height, width=width, seed=0)
    data = Path(tmp) / "ADEChallengeData2016"
    for sub, ext in (("images/validation", "jpg"), ("annotations/validation", "png")):
        (data / sub).mkdir(parents=True)
        sources = sorted((stage / sub).iterdir())
        for i in range(num):
            os.link(sources[i % len(sources)], data / sub / f"ADE_val_{i + 1:08d}.{ext}")
    made = time.perf_counter() - t
    out = {"source_maps": num, "distinct_maps": min(num, distinct), "source_size_hw": [height, width],
           "generate_source_s": round(made, 1)}
    for noise, params in PARAMS.items():
        t = time.perf_counter()
        build_tree(noise, data, Path(tmp) / noise, params, num=num, num_workers=num_workers, image_size=256,
                   progress=False)
        out[f"{noise}_s"] = round(time.perf_counter() - t, 2)
    return out


def machine():
    """The project's machine description plus the versions this benchmark depends on."""
    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None
    return dict(describe_machine(), **{pkg: version(pkg) for pkg in ("numpy", "scipy", "Pillow")})


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--size", type=positive_int, default=256, help="side of the timed maps")
    p.add_argument("--maps", type=positive_int, default=20, help="maps timed with the vectorized code")
    p.add_argument("--slow_maps", type=positive_int, default=3, help="maps timed with the Python loops")
    p.add_argument("--num", type=nonnegative_int, default=2000, help="maps in the benchmark tree (0: skip)")
    p.add_argument("--num_workers", type=positive_int, default=2, help="worker processes building the tree")
    add_deprecated_alias(p, "--workers", "--num_workers", dest="num_workers", type=positive_int)
    p.add_argument("--source_hw", type=positive_int, nargs=2, default=[384, 512],
                   help="size of the synthetic source maps/images (ADE20K val is ~512 on the short side)")
    args = p.parse_args(argv)
    report = {"machine": machine(), "config": {**vars(args), "params": PARAMS},
              "per_map": bench_maps(args.size, args.maps, args.slow_maps)}
    if args.num:
        with tempfile.TemporaryDirectory() as tmp:
            report["tree"] = bench_tree(args.num, args.num_workers, *args.source_hw, tmp)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_cli(main)
