"""Synthetic scene-like label maps and fake dataset trees (ade20k, coco, cityscapes layouts).

The corruption figure, the benchmark and the tests need realistic-looking maps (large stuff
regions, objects, small things, unlabeled bits) without any real dataset on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image

LAYOUT_FILL = {"ade20k": 0, "coco": 255, "cityscapes": 0}


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


def write_tree(root: Path, layout: str = "ade20k", num: int = 4, height: int = 48, width: int = 64,
               seed: int = 0, split: str = "") -> Path:
    """Write a fake dataset tree in ``layout`` with ``num`` maps; returns ``root``.

    ade20k: images/<split>/*.jpg + annotations/<split>/*.png (0 unlabeled);
    coco: <split>_img/*.jpg, <split>_label/*.png (255 unlabeled), <split>_inst/*.png;
    cityscapes: leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine labelIds/instanceIds.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(num):
        label, objects = scene(height, width, rng)
        photo = _photo(label, rng)
        if layout == "ade20k":
            split = split or "validation"
            name = f"ADE_val_{i + 1:08d}"
            files = {f"images/{split}/{name}.jpg": photo,
                     f"annotations/{split}/{name}.png": Image.fromarray(label.astype(np.uint8))}
        elif layout == "coco":
            split = split or "val"
            name = f"{i + 1:012d}"
            raw = np.where(label == 0, 255, label - 1).astype(np.uint8)
            files = {f"{split}_img/{name}.jpg": photo,
                     f"{split}_label/{name}.png": Image.fromarray(raw),
                     f"{split}_inst/{name}.png": Image.fromarray(objects.astype(np.uint8))}
        elif layout == "cityscapes":
            split = split or "val"
            city = ("frankfurt", "lindau")[i % 2]
            name = f"{city}_{i:06d}_000019"
            ids = (label % 34).astype(np.uint8)
            inst = np.where(objects > 0, ids.astype(np.int32) * 1000 + objects, ids).astype(np.uint16)
            files = {f"leftImg8bit/{split}/{city}/{name}_leftImg8bit.png": photo,
                     f"gtFine/{split}/{city}/{name}_gtFine_labelIds.png": Image.fromarray(ids),
                     f"gtFine/{split}/{city}/{name}_gtFine_instanceIds.png": Image.fromarray(inst)}
        else:
            raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUT_FILL)}")
        for rel, img in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
    return root
