"""A built-in synthetic semantic dataset: label maps, instance maps and images made from them.

Why: tests, the CPU demo and the robustness benchmark need a dataset that exists everywhere,
that a tiny model can learn in minutes, and whose generated images can be scored exactly. Each
class gets a colour at a corner of the RGB cube (40 or 215 per channel) and a low-frequency
texture; texture plus shading move a pixel at most 35 levels per channel, far less than the 87
levels to the midpoint between two class colours, so the nearest class colour recovers every
pixel's label (`segment_toy_image`), and still does on model samples with moderate errors.

Label maps have large smooth regions (5 "scene" classes), an unlabeled blob in some images, a
small common class (flower) and a small rare class (gem), so class-wise label diffusion has
something to do. Instance ids are the connected components of each class.

    python -m scdm.toy --out_dir data/toy --num_train 512 --num_test 64 --size 64 --seed 0
"""
import argparse
import json
import os
import re
import shutil
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from .data.dataset_layouts import listed
from .runtime.cli import HelpFormatter, add_deprecated_alias, int_at_least, nonnegative_int, positive_int
from .runtime.errors import UserError, run_cli
from .runtime.fileio import TEMP_NAME, check_writable, save_image, write_json


class ToyClass(NamedTuple):
    name: str
    color: tuple  # RGB, uint8
    texture: str  # see _pattern


TOY_CLASSES = (
    ToyClass("sky", (40, 215, 215), "flat"),
    ToyClass("grass", (40, 215, 40), "vertical"),
    ToyClass("water", (40, 40, 215), "horizontal"),
    ToyClass("sand", (215, 215, 40), "diagonal"),
    ToyClass("rock", (215, 215, 215), "checker"),
    ToyClass("flower", (215, 40, 40), "dots"),         # small, in most images
    ToyClass("gem", (215, 40, 215), "antidiagonal"),   # small and rare
    ToyClass("unlabeled", (40, 40, 40), "flat"),
)
TOY_NUM_CLASSES = len(TOY_CLASSES)
TOY_UNLABELED_ID = 7
TOY_COLORS = np.array([c.color for c in TOY_CLASSES], dtype=np.uint8)

SCENE_CLASSES = 5          # classes 0..4 tile the image
SCENE_BIAS = (0.5, 0.3, 0.0, -0.1, -0.3)  # sky most common, rock least
TEXTURE_AMPLITUDE = 25.0   # levels; texture + shading must stay below 87 (half the colour gap)
SHADING_AMPLITUDE = 10.0
TEXTURE_CYCLES = 4         # stripes per image side: learnable at 32-64 px
FLOWER_COUNT = (0, 4)      # inclusive range of flowers per image
MAX_SIZE = 4096            # an image side (a toy dataset is for small models; larger would exhaust memory)
GEM_PROBABILITY = 0.2
UNLABELED_PROBABILITY = 0.4
GENERATOR = "scdm.toy"
_SPLIT_CODE = {"train": 0, "test": 1}


def _smooth_field(rng, size, grid, count=1):
    """`count` smooth random fields (count, size, size): a cubic-spline zoom of grid x grid noise,
    done separably (the spline zoom is a tensor product) so large sizes stay fast."""
    noise = rng.standard_normal((count, grid, grid))
    basis = ndimage.zoom(np.eye(grid), (size / grid, 1), order=3, mode="nearest")[:size]  # (size, grid)
    return np.einsum("yi,kij,xj->kyx", basis, noise, basis)


def _paint_disc(label, cls, cy, cx, r):
    yy, xx = np.ogrid[: label.shape[0], : label.shape[1]]
    label[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = cls


def toy_label_map(rng, size):
    """A (size, size) int64 label map: smooth scene regions, maybe an unlabeled blob, flowers, maybe a gem."""
    fields = _smooth_field(rng, size, grid=4, count=SCENE_CLASSES)
    vertical = np.linspace(1.0, -1.0, size)[:, None]
    fields += np.asarray(SCENE_BIAS)[:, None, None]
    fields[0] += 0.8 * vertical   # sky prefers the top,
    fields[1] -= 0.8 * vertical   # grass the bottom
    label = fields.argmax(0).astype(np.int64)
    if rng.random() < UNLABELED_PROBABILITY:
        blob = _smooth_field(rng, size, grid=3)[0]
        label[blob > np.quantile(blob, 0.92)] = TOY_UNLABELED_ID
    for _ in range(rng.integers(FLOWER_COUNT[0], FLOWER_COUNT[1] + 1)):
        r = rng.uniform(size / 24, size / 12)
        _paint_disc(label, 5, rng.uniform(0, size), rng.uniform(0, size), max(r, 1.5))
    if rng.random() < GEM_PROBABILITY:
        r = rng.uniform(size / 20, size / 12)
        _paint_disc(label, 6, rng.uniform(0, size), rng.uniform(0, size), max(r, 1.5))
    return label


def toy_instance_map(label):
    """Instance ids 1..n: each connected component (4-connectivity) of each class."""
    instance = np.zeros(label.shape, dtype=np.int64)
    next_id = 1
    for cls in np.unique(label):
        components, n = ndimage.label(label == cls)
        instance[components > 0] = components[components > 0] + next_id - 1
        next_id += n
    return instance


def _pattern(texture, u, v, phase):
    """Texture values in [-1, 1] on normalized coordinates u (x) and v (y)."""
    w = 2 * np.pi * TEXTURE_CYCLES
    if texture == "flat":
        return np.zeros(np.broadcast(u, v).shape)
    if texture == "vertical":
        return np.sin(w * u + phase) + 0 * v
    if texture == "horizontal":
        return np.sin(w * v + phase) + 0 * u
    if texture == "diagonal":
        return np.sin(w * (u + v) / np.sqrt(2) + phase)
    if texture == "antidiagonal":
        return np.sin(w * (u - v) / np.sqrt(2) + phase)
    if texture == "checker":
        return np.sin(w * u + phase) * np.sin(w * v + phase)
    if texture == "dots":
        return np.cos(2 * w * u + phase) * np.cos(2 * w * v + phase)
    raise ValueError(f"unknown toy texture {texture!r}")


def render_toy_image(label, rng):
    """An RGB uint8 image (H, W, 3) for a label map: class colour + texture (random phase per
    image) + a smooth brightness shading shared by all classes."""
    h, w = label.shape
    v, u = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    shading = SHADING_AMPLITUDE * np.clip(_smooth_field(rng, max(h, w), grid=2)[0][:h, :w], -1, 1)
    image = np.zeros((h, w, 3), dtype=np.float64)
    phases = rng.uniform(0, 2 * np.pi, TOY_NUM_CLASSES)
    for cls, spec in enumerate(TOY_CLASSES):
        mask = label == cls
        if not mask.any():
            continue
        offset = TEXTURE_AMPLITUDE * _pattern(spec.texture, u[mask], v[mask], phases[cls]) + shading[mask]
        image[mask] = np.asarray(spec.color, dtype=np.float64)[None] + offset[:, None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def make_toy_sample(size, seed, split="train", index=0):
    """(image uint8 (S,S,3), label int64 (S,S), instance int64 (S,S)) of one toy item.

    Each item has its own random stream (seed, split, index), so an item does not depend on how
    many others are generated."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    label = toy_label_map(rng, size)
    return render_toy_image(label, rng), label, toy_instance_map(label)


def segment_toy_image(image):
    """The exact toy segmenter: each pixel's nearest class colour. (H, W, 3) uint8 -> (H, W) int64."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
    pixels = image.reshape(-1, 1, 3).astype(np.float32)
    dist = ((pixels - TOY_COLORS[None].astype(np.float32)) ** 2).sum(-1)
    return dist.argmin(1).reshape(image.shape[:2]).astype(np.int64)


_TOY_FILE = re.compile(r"^\d{5}\.png$")


def _not_written_by_toy(out_dir):
    """Entries of the split folders that a rerun would delete but the generator never wrote."""
    found = []
    for split in _SPLIT_CODE:
        top = os.path.join(out_dir, split)
        if not os.path.isdir(top):
            continue
        for sub in sorted(os.listdir(top)):
            path = os.path.join(top, sub)
            if sub not in ("images", "labels", "instances") or not os.path.isdir(path) or os.path.islink(path):
                found.append(f"{split}/{sub}")
                continue
            found += [f"{split}/{sub}/{name}" for name in sorted(os.listdir(path))
                      if not (_TOY_FILE.match(name) or TEMP_NAME.match(name))
                      or not os.path.isfile(os.path.join(path, name))]
    return found


def _prepare_out_dir(out_dir):
    """Create `out_dir`; replace a previous toy dataset there, refuse anything else."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        meta_path = os.path.join(out_dir, "dataset.json")
        try:
            with open(meta_path) as f:
                is_toy = json.load(f).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            is_toy = False
        if not is_toy:
            raise UserError(f"--out_dir {out_dir} exists and is not a toy dataset made by {GENERATOR}; "
                            "choose an empty or new folder (nothing was changed)")
        foreign = _not_written_by_toy(out_dir)
        if foreign:
            raise UserError(f"--out_dir {out_dir} is a toy dataset, but it also holds {listed(foreign)}, which "
                            f"{GENERATOR} never writes; move them or choose another folder (nothing was changed)")
        for split in _SPLIT_CODE:
            shutil.rmtree(os.path.join(out_dir, split), ignore_errors=True)
    for split in _SPLIT_CODE:
        for sub in ("images", "labels", "instances"):
            os.makedirs(os.path.join(out_dir, split, sub), exist_ok=True)


def make_toy_dataset(out_dir, num_train=256, num_test=32, size=64, seed=0, progress=False):
    """Write the toy dataset in the `folder` layout plus `dataset.json`; returns `out_dir`.

    Images are RGB PNG, labels 8-bit PNG, instances 16-bit PNG, named `00000.png`, ... The same
    arguments give the same bytes."""
    for name, value, lo in (("num_train", num_train, 1), ("num_test", num_test, 0), ("size", size, 8)):
        if int(value) != value or value < lo:
            raise UserError(f"--{name} must be an integer >= {lo}, got {value}")
    _prepare_out_dir(out_dir)
    jobs = [("train", i) for i in range(num_train)] + [("test", i) for i in range(num_test)]
    if progress:
        from tqdm import tqdm
        jobs = tqdm(jobs, desc=f"toy dataset -> {out_dir}", unit="img")
    for split, i in jobs:
        image, label, instance = make_toy_sample(size, seed, split, i)
        name = f"{i:05d}.png"
        save_image(image, os.path.join(out_dir, split, "images", name))
        save_image(label.astype(np.uint8), os.path.join(out_dir, split, "labels", name))
        save_image(instance.astype(np.uint16), os.path.join(out_dir, split, "instances", name))
    meta = {
        "num_classes": TOY_NUM_CLASSES,
        "unlabeled_id": TOY_UNLABELED_ID,
        "classes": [c.name for c in TOY_CLASSES],
        "generator": GENERATOR,
        "seed": seed, "size": size, "num_train": num_train, "num_test": num_test,
    }
    write_json(meta, os.path.join(out_dir, "dataset.json"))
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m scdm.toy", formatter_class=HelpFormatter,
                                description="Write the synthetic toy dataset (folder layout + dataset.json).")
    p.add_argument("--out_dir", help="output folder (new, empty, or a previous toy dataset); required")
    add_deprecated_alias(p, "--out", "--out_dir", dest="out_dir")
    p.add_argument("--num_train", type=positive_int, default=256, help="training maps")
    p.add_argument("--num_test", type=nonnegative_int, default=32, help="held-out test maps")
    p.add_argument("--size", type=int_at_least(8, MAX_SIZE), default=64, help="image side in pixels")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="the same seed gives the same bytes")
    args = p.parse_args(argv)
    if not args.out_dir:
        p.error("the following argument is required: --out_dir")
    check_writable(args.out_dir, "--out_dir")
    make_toy_dataset(args.out_dir, args.num_train, args.num_test, args.size, args.seed, progress=True)
    print(f"wrote {args.num_train} train + {args.num_test} test images of {args.size}x{args.size} to "
          f"{args.out_dir}; use --dataset_mode folder --data_dir {args.out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
