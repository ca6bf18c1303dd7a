"""The training and sampling side of datasets: transforms, the torch Dataset, sharding, loaders.

What a layout is on disk (folders, stored ids, class counts, the id-map reader) lives in
`scdm.data.dataset_layouts`, shared with `image_process` and `evaluations` (import its names from
there). Files are matched by name stem, never by sorted position, so one missing file cannot shift
every pair. Cheap checks (folders, pairing, batch size) run when the dataset is built; per-file
checks (decoding, sizes, id range, colour label maps) run when a file is loaded, so a bad file
fails with its own name instead of after hours of training in a deep torch traceback.
"""
import math
import random

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .dataset_layouts import (DatasetError, check_int, check_label_ids, dataset_info, get_layout,
                              list_records, read_ids, read_rgb, remap_labels, require_data_dir, resize_ids)
from ..runtime.errors import UserError
from ..runtime.stop_signals import worker_options

FLOAT_EXACT = 2 ** 24  # ids at or above this do not survive the float32 cond tensors


# ----------------------------------------------------------------------------------------------
# Transforms


def transform(image, maps, image_size, is_train, random_crop=True, random_flip=True, rng=random):
    """The released geometry, shared by an image (PIL RGB) and its id maps (arrays (H, W)).

    Train: smaller side to a random size in [S, ceil(S/0.8)] (2x box pre-shrinks, then bicubic;
    maps nearest), random SxS crop (center crop when not `random_crop`), flip with p=0.5.
    Test: plain resize to SxS, aspect not kept. Returns (uint8 (S, S, 3), [int64 (S, S), ...]).
    """
    s = image_size
    if is_train:
        smaller = rng.randrange(s, math.ceil(s / 0.8) + 1) if random_crop else s
        while min(image.size) >= 2 * smaller:
            image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
        scale = smaller / min(image.size)
        image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    else:
        image = image.resize((s, s), resample=Image.BICUBIC)
    maps = [resize_ids(m, image.size) for m in maps]
    arr = np.array(image)  # a writable copy: torch refuses read-only buffers
    if is_train:
        h, w = arr.shape[:2]
        if random_crop:
            y0, x0 = rng.randrange(h - s + 1), rng.randrange(w - s + 1)
        else:
            y0, x0 = (h - s) // 2, (w - s) // 2
        arr = arr[y0:y0 + s, x0:x0 + s]
        maps = [m[y0:y0 + s, x0:x0 + s] for m in maps]
        if random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
            maps = [m[:, ::-1] for m in maps]
    return np.ascontiguousarray(arr), [np.ascontiguousarray(m) for m in maps]


# ----------------------------------------------------------------------------------------------
# Dataset


class SemanticDataset(Dataset):
    """Items `(image (3,S,S) in [-1,1], cond)`; cond holds `label`, `label_ori`, `instance`
    (when the layout has one), each (1,S,S) float, and `path`."""

    def __init__(self, records, dataset_mode, info, image_size, is_train, random_crop=True, random_flip=True,
                 label_resize=False):
        self.records = list(records)
        self.split_size = len(self.records)  # build_dataset sets the size before sharding
        self.label_resize = label_resize
        self.dataset_mode = dataset_mode
        self.info = info
        self.image_size = image_size
        self.is_train = is_train
        self.random_crop = random_crop
        self.random_flip = random_flip and is_train  # the test transform is deterministic
        self.label_is_instance = get_layout(dataset_mode).label_is_instance

    def __len__(self):
        return len(self.records)

    @property
    def paths(self):
        """Image paths in item order."""
        return [r.image for r in self.records]

    def read_label(self, index):
        """The stored label map of item `index`, checked, at full resolution: (raw, class ids)."""
        path = self.records[index].label
        raw = read_ids(path, "label map")
        check_label_ids(raw, self.dataset_mode, self.info, path)
        return raw, remap_labels(raw, self.dataset_mode, self.info.unlabeled_id)

    def _fit(self, arr, path, what, record, size):
        """An id map at its image's size: equal sizes are required unless `label_resize`, which
        nearest-resizes the map first, as the released loader did (DS benchmark maps are 64x64)."""
        if arr.shape[::-1] == size:
            return arr
        if self.label_resize:
            # Test transform: each map goes straight to SxS with nearest, so a 256x256 Edge/Random map
            # stays exact and a 64x64 DS map is upsampled once. Train: fit to the image before cropping.
            return arr if not self.is_train else resize_ids(arr, size)
        fix = ("for sampling maps stored at another size on purpose, e.g. the DS benchmark, image_sample takes "
               "--label_resize True; for training, resize the maps to their images")
        raise DatasetError(f"{what} {path} is {arr.shape[1]}x{arr.shape[0]} but its image {record.image} is "
                           f"{size[0]}x{size[1]} (width x height); they must match ({fix})")

    def _read_instance(self, record, size):
        inst = self._fit(read_ids(record.instance, "instance map"), record.instance, "instance map", record, size)
        if inst.size and (inst.max() >= FLOAT_EXACT or inst.min() <= -FLOAT_EXACT):
            inst = np.unique(inst, return_inverse=True)[1].reshape(inst.shape)  # edges only need distinct ids
        return inst

    def __getitem__(self, index):
        record = self.records[index]
        image = read_rgb(record.image)
        raw = read_ids(record.label, "label map")
        check_label_ids(raw, self.dataset_mode, self.info, record.label)
        raw = self._fit(raw, record.label, "label map", record, image.size)
        maps = [raw]
        if record.instance is not None:
            maps.append(self._read_instance(record, image.size))
        arr, maps = transform(image, maps, self.image_size, self.is_train, self.random_crop, self.random_flip)
        raw = maps[0]
        label = remap_labels(raw, self.dataset_mode, self.info.unlabeled_id)

        def as_map(a):
            return torch.from_numpy(np.asarray(a, dtype=np.float32))[None]

        cond = {"label": as_map(label), "label_ori": as_map(raw), "path": record.image}
        if record.instance is not None:
            cond["instance"] = as_map(maps[1])
        elif self.label_is_instance:
            cond["instance"] = cond["label_ori"].clone()
        image_t = torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return image_t, cond


def _check_shard(shard, num_shards):
    num_shards = check_int(num_shards, "num_shards", lo=1)
    shard = check_int(shard, "shard", lo=0, hi=num_shards - 1)
    return shard, num_shards


def build_dataset(dataset_mode, data_dir, image_size, is_train, *, num_classes=None, unlabeled_id=None,
                  random_crop=True, random_flip=True, label_resize=False, shard=0, num_shards=1, info=None):
    """The dataset of one split in fixed order (sorted by stem); shard `i` of `n` takes files
    i, i+n, i+2n, ... so shards partition the split without duplicates for any count.
    `random_crop` and `random_flip` act on the train transform only; the test one is fixed.
    `label_resize`: accept label/instance maps of another size than their image (nearest-resized).
    `info`: the `DatasetInfo` the caller already resolved (then num_classes/unlabeled_id are unused)."""
    image_size = check_int(image_size, "--image_size", lo=1)
    shard, num_shards = _check_shard(shard, num_shards)
    require_data_dir(dataset_mode, data_dir)
    info = info or dataset_info(dataset_mode, data_dir, num_classes, unlabeled_id)
    records = list_records(dataset_mode, data_dir, is_train, info)
    dataset = SemanticDataset(records[shard::num_shards], dataset_mode, info, image_size, is_train,
                              random_crop, random_flip, label_resize)
    dataset.split_size = len(records)  # before sharding
    return dataset


def default_shard():
    """(rank, world size) of torch.distributed when it is initialized, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def clean_worker_error(err):
    """DataLoader re-raises a worker's error as a new exception of its type whose message is
    "Caught X in DataLoader worker process N" plus the worker's traceback; give back the user
    error with only its own message, so the user sees the one line they would see without workers."""
    msg = str(err)
    marker = f"{type(err).__name__}: "
    if not (msg.startswith("Caught ") and marker in msg):
        return err
    text = msg.rsplit(marker, 1)[1].strip()
    try:
        return type(err)(text)
    except Exception:  # a subclass with another constructor: keep the family
        return UserError(text)


def iter_user_errors_clean(iterable):
    """Iterate a DataLoader (or anything wrapping one, e.g. tqdm); a `UserError` raised in a
    worker process comes out as itself, with its own one-line message."""
    try:
        yield from iterable
    except UserError as e:
        raise clean_worker_error(e) from None


def _endless(loader, class_cond):
    while True:
        for images, cond in iter_user_errors_clean(loader):
            if not class_cond:
                cond = {"path": cond["path"]}
            yield images, cond


def load_data(*, dataset_mode, data_dir, batch_size, image_size, class_cond=True, deterministic=False,
              random_crop=True, random_flip=True, is_train=True, num_classes=None, unlabeled_id=None,
              num_workers=0, shard=None, num_shards=None, label_resize=False, info=None):
    """An endless iterator of `(images (B,3,S,S) in [-1,1], cond)` batches for training.

    Shuffles unless `deterministic`; drops the last incomplete batch of each pass, so a shard
    smaller than one batch is an error here rather than a loader that never yields.
    """
    rank, world = default_shard()
    shard = rank if shard is None else shard
    num_shards = world if num_shards is None else num_shards
    batch_size = check_int(batch_size, "--batch_size", lo=1)
    num_workers = check_int(num_workers, "num_workers", lo=0)
    dataset = build_dataset(dataset_mode, data_dir, image_size, is_train, num_classes=num_classes,
                            unlabeled_id=unlabeled_id, random_crop=random_crop, random_flip=random_flip,
                            label_resize=label_resize, shard=shard, num_shards=num_shards, info=info)
    smallest = dataset.split_size // num_shards  # every rank checks the smallest shard: all fail alike
    if smallest < batch_size:
        raise DatasetError(
            f"--batch_size {batch_size} is larger than the {smallest} image(s) of the smallest of {num_shards} "
            f"shard(s) ({dataset.split_size} image(s) in --data_dir {data_dir}, split "
            f"{'train' if is_train else 'test'}); every rank needs at least one full batch. "
            "Use a smaller --batch_size or fewer processes.")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=not deterministic, drop_last=True,
                        persistent_workers=num_workers > 0, **worker_options(num_workers))
    return _endless(loader, class_cond)

