"""Colours of label maps, in one place: the sampler's labels_color/ and overview.png use them.

The toy data keeps its own class colours (`scdm.toy.TOY_COLORS`), so a coloured map can be held
against a toy photo. Other datasets get colours spread around the hue circle by the golden ratio,
so neighbouring ids differ and every class stays bright enough to tell from black. Black means
"unlabeled" and nothing else; mid-grey means [MASK] (a hole SCDM fills freely).
"""
import colorsys

import numpy as np

from .dataset_layouts import read_metadata
from ..toy import GENERATOR as TOY_GENERATOR, TOY_COLORS, TOY_UNLABELED_ID

GOLDEN_RATIO = 0.6180339887498949
TOY = "toy"
# [MASK] pixels (SCDM's absorbing state) in pictures: a grey no palette colour is (they are all bright).
MASK_COLOR = (128, 128, 128)


def spread_colors(n):
    """`n` distinct, bright colours (uint8); the same for the same id in every run."""
    colors = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        hue = (i * GOLDEN_RATIO) % 1.0
        saturation = (0.95, 0.65, 0.8)[i % 3]
        value = (1.0, 0.8)[(i // 3) % 2]
        colors[i] = np.round(np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255)
    return colors


def palette(dataset_mode, num_classes, unlabeled_id=None):
    """(num_classes, 3) uint8 colours by class id; `unlabeled_id` (if any) is black.

    `dataset_mode` "toy" gives the toy data's class colours (with its unlabeled class black)."""
    n = max(int(num_classes), 1)
    colors = spread_colors(n)
    if dataset_mode == TOY:
        k = min(n, len(TOY_COLORS))
        colors[:k] = TOY_COLORS[:k]
        if unlabeled_id is None and n == len(TOY_COLORS):
            unlabeled_id = TOY_UNLABELED_ID
    if unlabeled_id is not None and 0 <= unlabeled_id < n:
        colors[unlabeled_id] = 0
    return colors


def palette_name(dataset_mode, data_dir=None):
    """"toy" for a folder tree written by `scdm.toy` (or a noisy copy of one), else `dataset_mode`."""
    meta = read_metadata(dataset_mode, data_dir) if dataset_mode and data_dir else {}
    return TOY if meta.get("generator") == TOY_GENERATOR else dataset_mode


def colorize(ids, colors):
    """(H, W) class ids -> (H, W, 3) uint8; ids outside the palette are black."""
    ids = np.asarray(ids).astype(np.int64)
    out = np.zeros(ids.shape + (3,), dtype=np.uint8)
    ok = (ids >= 0) & (ids < len(colors))
    out[ok] = colors[ids[ok]]
    return out


def to_hex(colors):
    """'#rrggbb' strings by class id, for web pages and legends."""
    return ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in np.asarray(colors)]


def ids_from_colors(rgb, colors, what="label map"):
    """(H, W, 3) colours -> (H, W) class ids by exact match with `colors` (a map drawn in the
    dataset's palette). A colour shared by two classes takes the lower id; a colour outside the
    palette is a ValueError naming it, since guessing the nearest class would invent labels."""
    rgb = np.asarray(rgb)[..., :3].astype(np.int64)
    colors = np.asarray(colors).astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    table = (colors[:, 0] << 16) | (colors[:, 1] << 8) | colors[:, 2]
    uniq, first = np.unique(table[::-1], return_index=True)  # reversed: the lowest id wins a shared colour
    ids_of = len(table) - 1 - first
    pos = np.clip(np.searchsorted(uniq, codes), 0, len(uniq) - 1)
    ok = uniq[pos] == codes
    if not ok.all():
        bad = np.unique(codes[~ok])[:5]
        listed = ", ".join("#%06x" % int(c) for c in bad)
        raise ValueError(f"{what}: {int((~ok).sum())} pixels have colours outside the palette ({listed}); "
                         "expected a map of class ids, or colours of this model's palette only")
    return ids_of[pos]
