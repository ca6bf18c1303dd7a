"""What the noisy-benchmark CLIs share: dataset layouts, input checks, worker pool, atomic writes.

Each CLI (downsample, edge, random, painter) only declares its own flags; ``build_tree`` turns
a dataset's validation split into a complete dataset tree with noisy annotations that the
loader reads as it is (same layout, images hard-linked, annotations as PNG of raw ids).

Layouts: ade20k, coco, cityscapes (their validation splits) and ``folder`` (the generic layout of
``scdm.datasets``: ``<root>/{train,test}/{images,labels[,instances]}/``, split ``test``; the
unlabeled id written into the noisy maps comes from ``<root>/dataset.json``, which is copied into
the output tree so that ``--dataset_mode folder`` reads it as it is, e.g. the built-in toy data).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from scdm.corruptions import corrupt, derive_rng, resize_nearest

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")
MANIFEST = "corruption.json"


class InputError(Exception):
    """A problem the user can fix (path, flag, file); printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- layouts

@dataclass(frozen=True)
class Item:
    """One sample: its key (file stem, seeds its noise) and source files."""
    key: str
    image: Path
    label: Path
    instance: Optional[Path] = None


def _need_dir(path: Path, what: str, layout: str) -> None:
    if not path.is_dir():
        raise InputError(f"{what} folder {path} not found: --data_dir is not laid out like "
                         f"{layout} (see --dataset_mode, --split)")


def _images(folder: Path, pattern: str = "*") -> List[Path]:
    return sorted((p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_EXTS), key=lambda p: p.name)


def _find_ade20k(root: Path, split: str) -> List[Item]:
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    _need_dir(img_dir, "images", "ADEChallengeData2016")
    _need_dir(ann_dir, "annotations", "ADEChallengeData2016")
    return [Item(p.stem, p, ann_dir / f"{p.stem}.png") for p in _images(img_dir)]


def _find_coco(root: Path, split: str) -> List[Item]:
    dirs = {k: root / f"{split}_{k}" for k in ("img", "label", "inst")}
    for kind, path in dirs.items():
        _need_dir(path, kind, "COCO-Stuff")
    return [Item(p.stem, p, dirs["label"] / f"{p.stem}.png", dirs["inst"] / f"{p.stem}.png")
            for p in _images(dirs["img"])]


def _find_cityscapes(root: Path, split: str) -> List[Item]:
    img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    _need_dir(img_dir, "leftImg8bit", "Cityscapes")
    _need_dir(gt_dir, "gtFine", "Cityscapes")
    items = []
    for p in _images(img_dir, "*/*_leftImg8bit.png"):
        stem = p.name[: -len("_leftImg8bit.png")]
        gt = gt_dir / p.parent.name
        items.append(Item(stem, p, gt / f"{stem}_gtFine_labelIds.png", gt / f"{stem}_gtFine_instanceIds.png"))
    return items


def _find_folder(root: Path, split: str) -> List[Item]:
    img_dir, lbl_dir, inst_dir = (root / split / k for k in ("images", "labels", "instances"))
    _need_dir(img_dir, "images", "the folder layout (<root>/{train,test}/{images,labels[,instances]}/)")
    _need_dir(lbl_dir, "labels", "the folder layout (<root>/{train,test}/{images,labels[,instances]}/)")
    has_inst = inst_dir.is_dir()
    return [Item(p.stem, p, lbl_dir / f"{p.stem}.png", inst_dir / f"{p.stem}.png" if has_inst else None)
            for p in _images(img_dir)]


DATASET_JSON = "dataset.json"


def _folder_fill(root: Path) -> int:
    """The unlabeled id of a folder-layout dataset, from ``<root>/dataset.json``."""
    path = root / DATASET_JSON
    if not path.is_file():
        raise InputError(f"--dataset_mode folder: {path} not found, so the unlabeled id is unknown; "
                         f"pass --fill ID (the id written for unlabeled pixels)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not readable JSON ({e})") from None
    fill = meta.get("unlabeled_id") if isinstance(meta, dict) else None
    if isinstance(fill, bool) or not isinstance(fill, int) or fill < 0:
        raise InputError(f"{path} has no unlabeled_id (got {fill!r}); pass --fill ID "
                         f"(the id written for unlabeled pixels)")
    return fill


@dataclass(frozen=True)
class Layout:
    find: Callable[[Path, str], List[Item]]
    split: str  # default split
    fill: Optional[int]  # raw id of unlabeled pixels; None: ask `default_fill`
    default_fill: Optional[Callable[[Path], int]] = None  # fill from the dataset root
    copy_files: tuple = ()  # files at the dataset root copied into the output tree when present


LAYOUTS: Dict[str, Layout] = {
    "ade20k": Layout(_find_ade20k, "validation", 0),
    "coco": Layout(_find_coco, "val", 255),
    "cityscapes": Layout(_find_cityscapes, "val", 0),
    "folder": Layout(_find_folder, "test", None, _folder_fill, (DATASET_JSON,)),
}


# ----------------------------------------------------------------------------- files

def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def _atomic(path: Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, otherwise it is removed,
    so readers never see a half-written file."""
    tmp = _tmp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (copy across file systems), replacing ``dst`` atomically."""
    with _atomic(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` (a real copy: the output tree must not change with the source)."""
    with _atomic(dst) as tmp:
        shutil.copyfile(src, tmp)


def read_map(path: Path) -> tuple:
    """(raw id array, palette or None) of a single-channel label/instance PNG."""
    try:
        with Image.open(path) as img:
            palette = img.getpalette() if img.mode == "P" else None
            return np.asarray(img), palette
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the map ({e})") from None


def write_map(arr: np.ndarray, path: Path, palette: Optional[list] = None) -> None:
    """PNG of raw ids (8 or 16 bit, palette kept), written to a temporary file then renamed."""
    if arr.dtype != np.uint8:
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise InputError(f"{path}: ids outside 0..65535 cannot be written as PNG")
        arr = arr.astype(np.uint16)
    img = Image.fromarray(arr)
    if palette is not None and arr.dtype == np.uint8:
        img.putpalette(palette)
    with _atomic(path) as tmp:
        img.save(tmp, format="PNG")


def write_json(obj: dict, path: Path) -> None:
    with _atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- checks

def check_dirs(data_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if not data_dir.is_dir():
        raise InputError(f"--data_dir {data_dir} is not a folder")
    data, out = data_dir.resolve(), out_dir.resolve()
    if out == data or data in out.parents:
        raise InputError(f"--out_dir {out_dir} is inside --data_dir {data_dir}; write the noisy "
                         f"copy outside the source dataset")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out_dir {out_dir} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out_dir {out_dir} is not empty; pass --overwrite to write into it")


def check_item(item: Item, fill: int) -> None:
    """Header-only checks (cheap): maps exist, are single-channel and as large as the image."""
    try:
        with Image.open(item.image) as img:
            size = img.size
    except OSError as e:
        raise InputError(f"{item.image}: cannot read the image ({e})") from None
    for path in (item.label, item.instance):
        if path is None:
            continue
        if not path.is_file():
            raise InputError(f"{path}: annotation missing for image {item.image}")
        try:
            with Image.open(path) as m:
                mode, msize = m.mode, m.size
        except OSError as e:
            raise InputError(f"{path}: cannot read the map ({e})") from None
        if mode not in LABEL_MODES:
            raise InputError(f"{path}: image mode {mode}; expected a single-channel map of raw ids "
                             f"(8/16-bit grayscale or palette PNG), not a colourised label map")
        if msize != size:
            raise InputError(f"{path}: map is {msize[0]}x{msize[1]} but image {item.image} is "
                             f"{size[0]}x{size[1]}")
        top = 255 if mode in ("L", "P") else 65535
        if not 0 <= fill <= top:
            raise InputError(f"--fill {fill} does not fit the {mode} map {path} (0..{top})")


# ----------------------------------------------------------------------------- the work

@dataclass(frozen=True)
class Job:
    noise: str
    params: dict
    data_dir: Path
    out_dir: Path
    seed: int
    fill: int
    image_size: Optional[int]  # labels resized to this (nearest) before the noise; None: as is


def process(job: Job, item: Item) -> List[Path]:
    """Write one sample of the noisy tree; returns the paths written."""
    out = [job.out_dir / p.relative_to(job.data_dir) for p in (item.image, item.label, item.instance) if p]
    link_or_copy(item.image, out[0])
    label, palette = read_map(item.label)
    inst, inst_palette = read_map(item.instance) if item.instance else (None, None)
    if job.image_size:
        label = resize_nearest(label, job.image_size)
        inst = None if inst is None else resize_nearest(inst, job.image_size)
    label, inst = corrupt(job.noise, label, inst, fill=job.fill, rng=derive_rng(job.seed, item.key),
                          **job.params)
    write_map(label, out[1], palette)
    if inst is not None:
        write_map(inst, out[2], inst_palette)
    return out


_JOB: Optional[Job] = None


def _init_worker(job: Job) -> None:
    global _JOB
    _JOB = job
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def _process_in_worker(item: Item) -> tuple:
    return item.key, process(_JOB, item)


def _sweep_tmp(folders) -> None:
    for d in folders:
        for f in d.glob(".*.tmp"):
            f.unlink(missing_ok=True)


def remove_stale(written: Dict[Path, str]) -> int:
    """Delete files an earlier run left in the folders just written, if they look like this
    run's (same name ending, e.g. ``_gtFine_labelIds.png``): the loader would pair them up.
    ``written`` maps each path written to its sample key."""
    endings: Dict[Path, set] = {}
    for path, key in written.items():
        endings.setdefault(path.parent, set()).add(path.name[len(key):])
    removed = 0
    for folder, ends in endings.items():
        for f in folder.iterdir():
            if f.is_file() and f not in written and not f.name.startswith(".") and f.name.endswith(tuple(ends)):
                f.unlink()
                removed += 1
    return removed


def build_tree(noise: str, data_dir, out_dir, params: Optional[dict] = None, *,
               dataset_mode: str = "ade20k", split: Optional[str] = None, num: int = 2000,
               seed: int = 0, image_size: Optional[int] = 256, fill: Optional[int] = None,
               workers: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the noisy dataset tree; returns the manifest (also saved as out_dir/corruption.json).

    The first ``num`` samples in sorted file-name order are used. Each file's noise is seeded
    by (seed, file stem), so results do not depend on ``workers``.
    """
    from tqdm import tqdm

    layout = LAYOUTS[dataset_mode]
    split = split or layout.split
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if num < 1:
        raise InputError(f"--num must be >= 1, got {num}")
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}")
    if image_size is not None and image_size < 1:
        raise InputError(f"--image_size must be >= 1, got {image_size}")
    check_dirs(data_dir, out_dir, overwrite)
    if fill is None:
        fill = layout.fill if layout.fill is not None else layout.default_fill(data_dir)
    found = layout.find(data_dir, split)
    if not found:
        raise InputError(f"no images found for --dataset_mode {dataset_mode} --split {split} in {data_dir}")
    items = found[:num]
    for item in items:
        check_item(item, fill)
    if len(items) < num and progress:
        print(f"note: only {len(items)} samples in {data_dir} (--num {num})", file=sys.stderr)

    job = Job(noise, dict(params or {}), data_dir, out_dir, seed, fill, image_size)
    folders = {out_dir / p.parent.relative_to(data_dir) for it in items
               for p in (it.image, it.label, it.instance) if p}
    for d in folders:
        d.mkdir(parents=True, exist_ok=True)

    start, written = time.perf_counter(), {}
    bar = tqdm(total=len(items), desc=f"{noise} {dataset_mode}", unit="map", disable=not progress)
    try:
        if workers == 1:
            for item in items:
                written.update(dict.fromkeys(process(job, item), item.key))
                bar.update()
        else:
            import multiprocessing as mp

            chunk = max(1, min(16, len(items) // (4 * workers)))
            with mp.get_context().Pool(workers, _init_worker, (job,)) as pool:
                for key, paths in pool.imap_unordered(_process_in_worker, items, chunksize=chunk):
                    written.update(dict.fromkeys(paths, key))
                    bar.update()
    except BaseException:
        # Ctrl-C, or a bad file in one worker: the pool is terminated (and joined) by now, and a
        # killed worker may have left a half-written temporary file behind.
        _sweep_tmp(folders)
        raise
    finally:
        bar.close()

    for name in layout.copy_files:
        if (data_dir / name).is_file():
            copy_file(data_dir / name, out_dir / name)
    if overwrite:
        stale = remove_stale(written)
        if stale and progress:
            print(f"note: removed {stale} maps/images of an earlier run from {out_dir}", file=sys.stderr)
    manifest = {
        "noise": noise, "params": job.params, "seed": seed, "fill": fill, "image_size": image_size,
        "dataset_mode": dataset_mode, "split": split, "num": len(items),
        "data_dir": str(data_dir.resolve()), "seconds": round(time.perf_counter() - start, 3),
    }
    write_json({k: v for k, v in manifest.items() if k != "seconds"}, out_dir / MANIFEST)
    return manifest


# ----------------------------------------------------------------------------- CLI

@dataclass(frozen=True)
class Noise:
    """What one CLI adds: its flags, how they become ``corrupt`` parameters, whether labels are
    first resized to --image_size (Edge, Random, Painter are defined at 256x256; DS is not)."""
    name: str
    description: str
    add_args: Callable[[argparse.ArgumentParser], None]
    params: Callable[[argparse.Namespace], dict]
    resize: bool = True
    epilog: str = field(default="")


def parser(noise: Noise) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m image_process.{noise.name}", description=noise.description,
                                epilog=noise.epilog)
    p.add_argument("--data_dir", required=True, type=Path,
                   help="dataset root (e.g. ADEChallengeData2016, or a folder-layout root such as the toy data)")
    p.add_argument("--out_dir", required=True, type=Path,
                   help="root of the noisy copy (same layout; must be empty unless --overwrite)")
    p.add_argument("--dataset_mode", choices=sorted(LAYOUTS), default="ade20k")
    p.add_argument("--split", default=None,
                   help="default: validation (ade20k), val (coco, cityscapes), test (folder)")
    p.add_argument("--num", type=int, default=2000, help="first N samples in sorted name order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=256,
                   help="labels are resized to this (nearest) before the noise"
                   + ("" if noise.resize else " (not used by this noise)"))
    p.add_argument("--fill", type=int, default=None,
                   help="raw id written for unlabeled pixels (label and instance maps); "
                        "default the layout's: ade20k 0, coco 255, cityscapes 0, folder the "
                        "unlabeled_id of <data_dir>/dataset.json")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out_dir, replacing an earlier tree there")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    noise.add_args(p)
    return p


def main(noise: Noise, argv: Optional[Sequence[str]] = None) -> int:
    """Run one CLI; returns the exit code (2 with one line on stderr for bad input)."""
    args = parser(noise).parse_args(argv)
    try:
        params = noise.params(args)
        manifest = build_tree(noise.name, args.data_dir, args.out_dir, params,
                              dataset_mode=args.dataset_mode, split=args.split, num=args.num,
                              seed=args.seed, image_size=args.image_size if noise.resize else None,
                              fill=args.fill, workers=args.workers, overwrite=args.overwrite,
                              progress=not args.quiet)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; files written so far are complete", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"wrote {manifest['num']} noisy maps ({noise.name}, {params}) to {args.out_dir} "
              f"in {manifest['seconds']:.1f} s", file=sys.stderr)
    return 0


def require(ok: bool, message: str) -> None:
    """Flag validation for the CLIs' ``params`` functions."""
    if not ok:
        raise InputError(message)
