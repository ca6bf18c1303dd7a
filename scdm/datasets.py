"""Dataset layouts, transforms, label remapping, instance edges and sharding (DESIGN.md §4).

One `SemanticDataset` serves every layout: a layout only says where the images, label maps and
instance maps live, how stored ids map to class ids, and what the class count is. Files are
matched by name stem, never by sorted position, so one missing file cannot shift every pair.
Cheap checks (folders, pairing, batch size) run when the dataset is built; per-file checks
(decoding, sizes, id range, colour label maps) run when a file is loaded, so a bad file fails
with its own name instead of after hours of training in a deep torch traceback.
"""
import json
import math
import os
import random
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_LISTED = 5  # how many offending names an error message lists
DATASET_JSON = "dataset.json"
_ID_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_FLOAT_EXACT = 2 ** 24  # ids at or above this do not survive the float32 cond tensors


class DatasetError(ValueError):
    """A dataset on disk (or a flag describing it) is not what the chosen layout expects."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A folder or file that the layout requires does not exist."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about a dataset: its one-hot width and edge channel."""
    num_classes: int
    unlabeled_id: Optional[int]
    has_instance: bool


@dataclass(frozen=True)
class Layout:
    """Where one dataset keeps its files. Folder patterns take `{split}`; a suffix is stripped
    from file stems before matching (Cityscapes names its files `<key>_leftImg8bit.png`, ...)."""
    num_classes: Optional[int]
    unlabeled_id: Optional[int]
    splits: tuple  # (train split, test split)
    image_dir: str
    label_dir: str
    instance_dir: Optional[str] = None
    image_suffix: str = ""
    label_suffix: str = ""
    instance_suffix: str = ""
    label_is_instance: bool = False  # CelebAMask-HQ: the label map doubles as instance map
    instance_optional: bool = False  # folder: instances only where <split>/instances exists
    description: str = ""


LAYOUTS = {
    "ade20k": Layout(
        151, 150, ("training", "validation"), "images/{split}", "annotations/{split}",
        description="<root>/images/{training,validation}/*.jpg and <root>/annotations/{training,validation}/*.png"),
    "coco": Layout(
        183, 182, ("train", "val"), "{split}_img", "{split}_label", "{split}_inst",
        description="<root>/{train,val}_img/*.jpg, <root>/{train,val}_label/*.png and <root>/{train,val}_inst/*.png"),
    "celeba": Layout(
        19, None, ("train", "test"), "{split}/images", "{split}/labels", label_is_instance=True,
        description="<root>/{train,test}/images/*.jpg and <root>/{train,test}/labels/*.png"),
    "cityscapes": Layout(
        35, None, ("train", "val"), "leftImg8bit/{split}", "gtFine/{split}", "gtFine/{split}",
        "_leftImg8bit", "_gtFine_labelIds", "_gtFine_instanceIds",
        description="<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
                    "<root>/gtFine/{train,val}/<city>/*_gtFine_{labelIds,instanceIds}.png"),
    "folder": Layout(
        None, None, ("train", "test"), "{split}/images", "{split}/labels", "{split}/instances",
        instance_optional=True,
        description="<root>/{train,test}/{images,labels[,instances]}/ with --num_classes or <root>/dataset.json"),
}


def _layout(dataset_mode):
    if dataset_mode not in LAYOUTS:
        raise DatasetError(f"--dataset_mode {dataset_mode!r} is not a known layout; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[dataset_mode]


# ----------------------------------------------------------------------------------------------
# Dataset facts


def _read_dataset_json(data_dir):
    path = os.path.join(data_dir, DATASET_JSON)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path} must hold a JSON object like {{\"num_classes\": 8, \"unlabeled_id\": 7}}")
    return meta


def _check_int(value, what, lo=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DatasetError(f"{what} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise DatasetError(f"{what}={value} is outside {lo}..{hi}")
    return int(value)


def dataset_info(dataset_mode, data_dir=None, num_classes=None, unlabeled_id=None):
    """Class count, unlabeled class and instance availability of a layout.

    Flags win over the layout's defaults and over `<root>/dataset.json` (folder layout). A
    negative `num_classes` or `unlabeled_id` means "not given" (the flags' -1 defaults).
    """
    layout = _layout(dataset_mode)
    if num_classes is not None and num_classes < 0:
        num_classes = None
    if unlabeled_id is not None and unlabeled_id < 0:
        unlabeled_id = None
    nc, unl = layout.num_classes, layout.unlabeled_id
    source = f"--dataset_mode {dataset_mode}"
    has_instance = layout.instance_dir is not None or layout.label_is_instance
    if layout.instance_optional:
        meta = _read_dataset_json(data_dir) if data_dir else {}
        nc, unl = meta.get("num_classes"), meta.get("unlabeled_id")
        source = os.path.join(data_dir, DATASET_JSON) if meta else source
        has_instance = bool(data_dir) and any(
            os.path.isdir(os.path.join(data_dir, layout.instance_dir.format(split=s))) for s in layout.splits)
    if num_classes is not None:
        nc, source = num_classes, "--num_classes"
    if unlabeled_id is not None:
        unl = unlabeled_id
    if nc is None:
        where = os.path.join(data_dir, DATASET_JSON) if data_dir else "<root>/dataset.json"
        raise DatasetError(
            f"--dataset_mode {dataset_mode} needs the number of classes: pass --num_classes N "
            f"or write {where} containing {{\"num_classes\": N, \"unlabeled_id\": null}}")
    nc = _check_int(nc, f"num_classes ({source})", lo=1)
    if unl is not None:
        unl = _check_int(unl, "unlabeled_id", lo=0, hi=nc - 1)
    return DatasetInfo(num_classes=nc, unlabeled_id=unl, has_instance=has_instance)


# ----------------------------------------------------------------------------------------------
# Listing and matching


class Record(NamedTuple):
    key: str
    image: str
    label: str
    instance: Optional[str]


def _list_files(folder, suffix):
    """{name stem (suffix removed): path} for every image file below `folder`."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
                continue
            if suffix:
                if not stem.endswith(suffix):
                    continue
                stem = stem[: -len(suffix)]
            path = os.path.join(dirpath, name)
            if stem in files:
                raise DatasetError(f"two files in {folder} share the name stem {stem!r}: {files[stem]} and {path}; "
                                   "files are matched by stem, so stems must be unique")
            files[stem] = path
    return files


def _require_data_dir(dataset_mode, data_dir):
    if not data_dir or not os.path.isdir(data_dir):
        raise DatasetNotFoundError(f"--data_dir {data_dir!r} is not a folder; --dataset_mode {dataset_mode} "
                                   f"expects {_layout(dataset_mode).description}")


def _require_dir(path, dataset_mode, what):
    if not os.path.isdir(path):
        raise DatasetNotFoundError(f"{what} folder {path} does not exist; --dataset_mode {dataset_mode} "
                                   f"expects {_layout(dataset_mode).description}")


def _unmatched_error(have, have_dir, missing_what, other_dir, names):
    listed = ", ".join(names[:MAX_LISTED]) + (", ..." if len(names) > MAX_LISTED else "")
    return DatasetError(f"{len(names)} {have} in {have_dir} have no {missing_what} with the same name stem in "
                        f"{other_dir}: {listed}")


def _match(images, image_dir, others, other_dir, what):
    missing = sorted(set(images) - set(others))
    if missing:
        raise _unmatched_error("image(s)", image_dir, what, other_dir, missing)
    extra = sorted(set(others) - set(images))
    if extra:
        raise _unmatched_error(f"{what}(s)", other_dir, "image", image_dir, extra)


def list_records(dataset_mode, data_dir, is_train, info=None):
    """All (image, label, instance) triples of one split, matched by stem and sorted by stem."""
    layout = _layout(dataset_mode)
    _require_data_dir(dataset_mode, data_dir)
    info = info or dataset_info(dataset_mode, data_dir)
    split = layout.splits[0 if is_train else 1]
    image_dir = os.path.join(data_dir, layout.image_dir.format(split=split))
    label_dir = os.path.join(data_dir, layout.label_dir.format(split=split))
    _require_dir(image_dir, dataset_mode, "image")
    _require_dir(label_dir, dataset_mode, "label")
    images = _list_files(image_dir, layout.image_suffix)
    if not images:
        raise DatasetError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found in {image_dir}; "
                           f"--dataset_mode {dataset_mode} expects {layout.description}")
    labels = _list_files(label_dir, layout.label_suffix)
    _match(images, image_dir, labels, label_dir, "label map")
    instances = None
    if layout.instance_dir is not None and info.has_instance:
        instance_dir = os.path.join(data_dir, layout.instance_dir.format(split=split))
        if layout.instance_optional and not os.path.isdir(instance_dir):
            raise DatasetNotFoundError(
                f"instance folder {instance_dir} does not exist, but another split of {data_dir} has instance "
                "maps (so the model takes an edge channel); add it or remove the other split's instances/")
        _require_dir(instance_dir, dataset_mode, "instance")
        instances = _list_files(instance_dir, layout.instance_suffix)
        _match(images, image_dir, instances, instance_dir, "instance map")
    return [Record(k, images[k], labels[k], instances[k] if instances else None) for k in sorted(images)]


# ----------------------------------------------------------------------------------------------
# Decoding


def _open(path, what):
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{what} {path} does not exist (it was listed when the dataset was built)") from None
    except Exception as e:  # PIL raises many types for corrupt, truncated or unknown files
        raise DatasetError(f"cannot read {what} {path}: {e} (corrupt, truncated or not an image)") from None
    return img


def read_rgb(path):
    """An image as a PIL RGB image; grayscale, RGBA, palette, CMYK and 16-bit are converted."""
    img = _open(path, "image")
    if img.mode in _SIXTEEN_BIT_MODES:  # 16-bit grayscale: scale, do not clip, to 8 bits
        arr = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif img.mode in ("P", "PA", "LA"):
        img = img.convert("RGBA")  # keeps palette transparency warnings away; alpha is dropped below
    return img if img.mode == "RGB" else img.convert("RGB")


def read_ids(path, what="label map"):
    """A map of integer ids (H, W) int64 from an 8/16-bit grayscale or palette image.

    Palette images store ids as palette indices (the VOC convention). An RGB file is accepted
    only when it is gray (R == G == B): a colour-coded label map cannot be turned into ids here.
    """
    img = _open(path, what)
    if img.mode in _ID_MODES:
        arr = np.asarray(img)
    elif img.mode in ("LA", "PA"):
        arr = np.asarray(img.getchannel(0))
    elif img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"))
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
            raise DatasetError(
                f"{what} {path} is a colour (RGB) image; expected a single-channel map of integer ids "
                "(8/16-bit grayscale or palette PNG). Convert the colour coding to ids first.")
        arr = rgb[..., 0]
    else:
        raise DatasetError(f"{what} {path} has image mode {img.mode}; expected a single-channel map of integer "
                           "ids (8/16-bit grayscale or palette PNG)")
    return arr.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Label remapping


def remap_labels(raw, dataset_mode, unlabeled_id=None):
    """Stored ids -> class ids. ADE20K: 0 -> unlabeled (150), k -> k-1; COCO: 255 -> unlabeled (182)."""
    raw = np.asarray(raw)
    if dataset_mode == "ade20k":
        return np.where(raw == 0, unlabeled_id, raw - 1)
    if dataset_mode == "coco":
        return np.where(raw == 255, unlabeled_id, raw)
    return raw


def _present_ids(raw):
    if raw.size and raw.min() >= 0 and raw.max() < 65536:
        return np.flatnonzero(np.bincount(raw.ravel()))
    return np.unique(raw)


def check_label_ids(raw, dataset_mode, info, path):
    """Raise a DatasetError naming `path` when a stored id does not map to a class."""
    present = _present_ids(raw)
    mapped = remap_labels(present, dataset_mode, info.unlabeled_id)
    bad = (mapped < 0) | (mapped >= info.num_classes)
    if dataset_mode == "ade20k":  # raw 151 would silently land on the unlabeled class
        bad |= (present != 0) & (mapped == info.unlabeled_id)
    if bad.any():
        raw_bad, class_bad = int(present[bad][0]), int(mapped[bad][0])
        flag = "--num_classes or dataset.json" if dataset_mode == "folder" else f"--dataset_mode {dataset_mode}"
        after = "" if raw_bad == class_bad else f" (class {class_bad} after {dataset_mode} remapping)"
        raise DatasetError(
            f"label map {path} contains id {raw_bad}{after}; expected class ids 0..{info.num_classes - 1} "
            f"(num_classes={info.num_classes} from {flag}). Ids present: {present.tolist()[:20]}")


# ----------------------------------------------------------------------------------------------
# Transforms


def _resize_ids(arr, size):
    """Nearest-neighbour resize of an id map to PIL size (w, h), as PIL does it for `L` labels."""
    if arr.shape[::-1] == tuple(size):
        return arr
    return np.asarray(Image.fromarray(arr.astype(np.int32)).resize(size, resample=Image.NEAREST)).astype(np.int64)


def transform(image, maps, image_size, is_train, random_crop=True, random_flip=True, rng=random):
    """The DESIGN §4 geometry, shared by an image (PIL RGB) and its id maps (arrays (H, W)).

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
    maps = [_resize_ids(m, image.size) for m in maps]
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
        self.label_is_instance = _layout(dataset_mode).label_is_instance

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
            return arr if not self.is_train else _resize_ids(arr, size)
        raise DatasetError(f"{what} {path} is {arr.shape[1]}x{arr.shape[0]} but its image {record.image} is "
                           f"{size[0]}x{size[1]} (width x height); they must match (or pass --label_resize True to image_sample "
                           "for maps stored at another size on purpose, e.g. the DS benchmark)")

    def _read_instance(self, record, size):
        inst = self._fit(read_ids(record.instance, "instance map"), record.instance, "instance map", record, size)
        if inst.size and (inst.max() >= _FLOAT_EXACT or inst.min() <= -_FLOAT_EXACT):
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
    num_shards = _check_int(num_shards, "num_shards", lo=1)
    shard = _check_int(shard, "shard", lo=0, hi=num_shards - 1)
    return shard, num_shards


def build_dataset(dataset_mode, data_dir, image_size, is_train, *, num_classes=None, unlabeled_id=None,
                  random_crop=True, random_flip=True, label_resize=False, shard=0, num_shards=1):
    """The dataset of one split in fixed order (sorted by stem); shard `i` of `n` takes files
    i, i+n, i+2n, ... so shards partition the split without duplicates for any count.
    `random_crop` and `random_flip` act on the train transform only; the test one is fixed.
    `label_resize`: accept label/instance maps of another size than their image (nearest-resized)."""
    image_size = _check_int(image_size, "--image_size", lo=1)
    shard, num_shards = _check_shard(shard, num_shards)
    _require_data_dir(dataset_mode, data_dir)
    info = dataset_info(dataset_mode, data_dir, num_classes, unlabeled_id)
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
    """DataLoader re-raises a worker's error with the worker's traceback pasted into the
    message; keep only our own message so the user sees one clear line."""
    msg = str(err)
    marker = f"{type(err).__name__}: "
    if msg.startswith("Caught ") and marker in msg:
        return type(err)(msg.rsplit(marker, 1)[1].strip())
    return err


def _endless(loader, class_cond):
    while True:
        try:
            for images, cond in loader:
                if not class_cond:
                    cond = {"path": cond["path"]}
                yield images, cond
        except DatasetError as e:
            raise clean_worker_error(e) from None


def load_data(*, dataset_mode, data_dir, batch_size, image_size, class_cond=True, deterministic=False,
              random_crop=True, random_flip=True, is_train=True, num_classes=None, unlabeled_id=None,
              num_workers=0, shard=None, num_shards=None, label_resize=False):
    """An endless iterator of `(images (B,3,S,S) in [-1,1], cond)` batches for training.

    Shuffles unless `deterministic`; drops the last incomplete batch of each pass, so a shard
    smaller than one batch is an error here rather than a loader that never yields.
    """
    rank, world = default_shard()
    shard = rank if shard is None else shard
    num_shards = world if num_shards is None else num_shards
    batch_size = _check_int(batch_size, "--batch_size", lo=1)
    num_workers = _check_int(num_workers, "num_workers", lo=0)
    dataset = build_dataset(dataset_mode, data_dir, image_size, is_train, num_classes=num_classes,
                            unlabeled_id=unlabeled_id, random_crop=random_crop, random_flip=random_flip,
                            label_resize=label_resize, shard=shard, num_shards=num_shards)
    smallest = dataset.split_size // num_shards  # every rank checks the smallest shard: all fail alike
    if smallest < batch_size:
        raise DatasetError(
            f"--batch_size {batch_size} is larger than the {smallest} image(s) of the smallest of {num_shards} "
            f"shard(s) ({dataset.split_size} image(s) in --data_dir {data_dir}, split "
            f"{'train' if is_train else 'test'}); every rank needs at least one full batch. "
            "Use a smaller --batch_size or fewer processes.")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=not deterministic, num_workers=num_workers,
                        drop_last=True, persistent_workers=num_workers > 0)
    return _endless(loader, class_cond)


# ----------------------------------------------------------------------------------------------
# Model input


def instance_edges(instance):
    """1 where the right/left/up/down neighbour has another instance id (both sides of a
    boundary are marked), else 0; same shape as `instance` (..., H, W), float."""
    dx = instance[..., :, 1:] != instance[..., :, :-1]
    dy = instance[..., 1:, :] != instance[..., :-1, :]
    edge = torch.zeros(instance.shape, dtype=torch.bool, device=instance.device)
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    return edge.float()


def label_to_model_input(cond, num_classes, no_instance):
    """The model's `y`: one-hot of cond["label"] (B, num_classes, H, W), plus the instance-edge
    channel of cond["instance"] unless `no_instance`."""
    label = cond["label"]
    if label.dim() == 3:
        label = label.unsqueeze(1)
    if label.dim() != 4 or label.shape[1] != 1:
        raise ValueError(f"cond['label'] has shape {tuple(label.shape)}; expected (B, 1, H, W)")
    ids = label.long()
    bad = (ids < 0) | (ids >= num_classes)
    if bad.any():
        value = ids[bad][0].item()
        raise ValueError(f"label value {value} is outside 0..{num_classes - 1} (num_classes={num_classes}); "
                         "check --num_classes against the dataset")
    y = torch.zeros(ids.shape[0], num_classes, *ids.shape[2:], device=label.device)
    y.scatter_(1, ids, 1.0)
    if no_instance:
        return y
    if "instance" not in cond:
        raise ValueError("the batch has no instance map but the model takes an edge channel; "
                         "pass --no_instance True for layouts without instances (e.g. ade20k)")
    instance = cond["instance"]
    if instance.dim() == 3:
        instance = instance.unsqueeze(1)
    return torch.cat([y, instance_edges(instance.to(label.device))], dim=1)
