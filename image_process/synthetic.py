"""Synthetic scene-like label maps and fake dataset trees in every layout of scdm.data.dataset_layouts.

The corruption figure, the benchmark and the tests need realistic-looking maps (large stuff
regions, objects, small things, unlabeled bits) without any real dataset on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image

from scdm.data.dataset_layouts import get_layout
from scdm.runtime.fileio import save_image, write_json


def scene(height: int, width: int, rng: np.random.Generator, num_classes: int = 150,
          num_objects: int = 14) -> Tuple[np.ndarray, np.ndarray]:
    """A street/room-like map: (label raw ids in 0..num_classes with 0 unlabeled, object ids).

    Sky over ground split at a random horizon, boxes standing on it (buildings, furniture),
    ellipses (trees, people, things) of all sizes, and a thin unlabeled strip now and then.
    Object ids number every shape drawn (0 for sky/ground), like an instance map.
    """
    yy, xx = np.mgrid[0:height, 0:width]
    horizon = int(height * rng.uniform(0.3, 0.6))
    label = np.where(yy < horizon, 3, 4).astype(np.int32)
    objects = np.zeros((height, width), dtype=np.int32)
    for k in range(1, num_objects + 1):
        cls = int(rng.integers(5, num_classes + 1))
        scale = rng.choice([0.03, 0.08, 0.2, 0.35])  # a few small things among big ones
        rh, rw = (np.array([height, width]) * scale * rng.uniform(0.5, 1.5, 2)).astype(int) + 1
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        if rng.random() < 0.5:  # box standing on the horizon
            cy = min(max(cy, horizon - rh), height - 1)
            shape = (np.abs(yy - cy) <= rh) & (np.abs(xx - cx) <= rw)
        else:
            shape = ((yy - cy) / rh) ** 2 + ((xx - cx) / rw) ** 2 <= 1.0
        label[shape] = cls
        objects[shape] = k
    if rng.random() < 0.5:  # an annotator's gap
        y0 = int(rng.integers(0, height - 2))
        label[y0:y0 + max(1, height // 64)] = 0
    return label, objects


def colorize(label: np.ndarray, fill: int = 0) -> np.ndarray:
    """RGB picture of a raw-id map: a fixed bright colour per id, black for ``fill``."""
    ids = np.arange(int(max(label.max(), fill)) + 1, dtype=np.uint32)
    h = (ids * 2654435761) & 0xFFFFFF  # Knuth hash: neighbouring ids get unrelated colours
    palette = np.stack([(h >> 16) & 255, (h >> 8) & 255, h & 255], 1).astype(np.uint8) // 2 + 100
    palette[fill] = 0
    return palette[label]


def _photo(label: np.ndarray, rng: np.random.Generator) -> Image.Image:
    rgb = colorize(label).astype(np.int16) + rng.integers(-20, 21, label.shape + (3,))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


# File key of sample i per layout (the real datasets' naming, so that tests see realistic names).
SAMPLE_KEYS = {
    "ade20k": lambda i: f"ADE_val_{i + 1:08d}",
    "coco": lambda i: f"{i + 1:012d}",
    "celeba": lambda i: str(i),
    "cityscapes": lambda i: f"{('frankfurt', 'lindau')[i % 2]}_{i:06d}_000019",
    "folder": lambda i: f"{i:05d}",
}
FOLDER_META = {"num_classes": 151, "unlabeled_id": 0}  # folder trees keep the scene's ids as they are


def stored_ids(layout: str, label: np.ndarray) -> np.ndarray:
    """A scene map (0 unlabeled, 1.. things) as ``layout`` stores it: unlabeled pixels get the
    dataset's raw unlabeled id (class 0 where it has none), the others wrap into its classes."""
    lay = get_layout(layout)
    if lay.metadata_file:
        return label
    count = lay.num_classes - (lay.unlabeled_class is not None)
    unlabeled = 0 if lay.raw_unlabeled_id is None else lay.raw_unlabeled_id
    return np.where(label == 0, unlabeled, (label - 1) % count + lay.id_shift)


def write_tree(root: Path, layout: str = "ade20k", num: int = 4, height: int = 48, width: int = 64,
               seed: int = 0, split: str = "") -> Path:
    """Write a fake dataset tree in ``layout`` (any of scdm's layouts) with ``num`` samples in
    ``split`` (default the layout's test split); returns ``root``.

    Instance maps where the layout has them: coco and folder number the objects, cityscapes
    encodes class * 1000 + object as its instanceIds do; folder also gets a dataset.json.
    """
    root = Path(root)
    lay = get_layout(layout)
    split = split or lay.test_split
    rng = np.random.default_rng(seed)
    for i in range(num):
        label, objects = scene(height, width, rng)
        photo = _photo(label, rng)
        key = SAMPLE_KEYS[layout](i)
        sub = key.split("_")[0] + "/" if layout == "cityscapes" else ""
        ids = stored_ids(layout, label)
        ids = ids.astype(np.uint8 if ids.max() < 256 else np.uint16)
        ext = ".png" if layout == "cityscapes" else ".jpg"
        files = {f"{lay.image_dir.format(split=split)}/{sub}{key}{lay.image_suffix}{ext}": photo,
                 f"{lay.label_dir.format(split=split)}/{sub}{key}{lay.label_suffix}.png": ids}
        if lay.instance_dir is not None:
            inst = objects.astype(np.uint8)
            if layout == "cityscapes":
                inst = np.where(objects > 0, ids.astype(np.int32) * 1000 + objects, ids).astype(np.uint16)
            files[f"{lay.instance_dir.format(split=split)}/{sub}{key}{lay.instance_suffix}.png"] = inst
        for rel, arr in files.items():
            save_image(arr, root / rel)
    if lay.metadata_file:
        write_json(FOLDER_META, root / lay.metadata_file)
    return root
