"""What the noisy-benchmark CLIs share: input checks, the worker pool, the tree writer, the CLI.

Each CLI (downsample, edge, random, painter) only declares its own flags; ``build_tree`` turns
one split of a dataset (its test split by default) into a complete dataset tree with noisy
annotations that the loader reads as it is: same layout and relative paths, images hard-linked,
annotations as PNG of raw ids. Layouts, file pairing, the unlabeled id and the id-map reader are
those of ``scdm.data.dataset_layouts``, so every ``--dataset_mode`` the loader knows works here too, and
a folder-layout tree gets its ``dataset.json`` copied so that it stays readable as it is.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from scdm.runtime.cli import (
    HelpFormatter, add_bool_argument, add_deprecated_alias, nonnegative_int, positive_int,
)
from scdm.data.corruptions import corrupt, derive_rng, resize_nearest
from scdm.data.dataset_layouts import (
    CORRUPTION_FILE, EIGHT_BIT_MAP_MODES, LAYOUTS, SIXTEEN_BIT_MAP_MODES, DatasetError, Record, get_layout,
    list_records,
    raw_unlabeled_id, read_ids,
)
from scdm.runtime import stop_signals
from scdm.runtime.errors import UserError, run_cli
from scdm.runtime.fileio import (copy_file, default_dir_mode, folder_problem, link_or_copy, move_file, save_image,
                                  write_json)

MANIFEST = CORRUPTION_FILE
# Every file a builder wrote into its tree, relative to the tree's root: the only files a later
# --overwrite run removes, so that a user's own files in the tree survive it.
WRITTEN_LIST = "image_process_files.json"


class InputError(UserError):
    """A problem the user can fix (path, flag, file); printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Item:
    """One sample: its key (file stem, seeds its noise), its files, and the bits per id of each map
    (a map is written back with the bit depth it was read with)."""
    key: str
    image: Path
    label: Path
    instance: Optional[Path] = None
    label_bits: int = 8
    instance_bits: int = 8


def default_fill(dataset_mode: str, data_dir: Path) -> int:
    """The raw id of unlabeled pixels from the dataset table, or an error that asks for --fill."""
    fill = raw_unlabeled_id(dataset_mode, data_dir)
    if fill is not None:
        return fill
    meta = get_layout(dataset_mode).metadata_file
    if meta:
        path = data_dir / meta
        why = f"{path} has no unlabeled_id" if path.is_file() else f"{path} not found"
        raise InputError(f"--dataset_mode {dataset_mode}: {why}, so the unlabeled id is unknown; "
                         "pass --fill ID (the id written for unlabeled pixels)")
    raise InputError(f"--dataset_mode {dataset_mode} has no unlabeled id; pass --fill ID "
                     "(the raw id written for unlabeled pixels)")


def check_dirs(data_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """--out_dir is writable, is no link, and is neither --data_dir nor inside it (resolved)."""
    if not data_dir.is_dir():
        raise InputError(f"--data_dir {data_dir} is not a folder")
    data, out = data_dir.resolve(), out_dir.resolve()
    if out == data or data in out.parents:
        raise InputError(f"--out_dir {out_dir} is inside --data_dir {data_dir}"
                         + (f" (it resolves to {out})" if out_dir.absolute() != out else "")
                         + "; write the noisy copy outside the source dataset")
    if out_dir.is_symlink():
        raise InputError(f"--out_dir {out_dir} is a symbolic link (to {os.readlink(out_dir)}); image_process never "
                         "writes through a link: pass the folder it points to, or another --out_dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out_dir {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"--out_dir {out_dir} is not empty; pass --overwrite to write into it")
    for folder in (out_dir.parent, out_dir) if out_dir.is_dir() else (out_dir.parent,):
        why = folder_problem(folder)
        if why:
            raise InputError(f"--out_dir {out_dir} cannot be written: {why}")


def check_output_paths(out_dir: Path, data_dir: Path, rels) -> None:
    """No output path in the tree goes through a symbolic link (a link to the source labels would
    have the run rewrite the input annotations) or resolves into --data_dir."""
    data, out = data_dir.resolve(), out_dir.resolve()
    seen = set()
    for rel in rels:
        parts = Path(rel).parts
        for depth in range(1, len(parts) + 1):
            sub = Path(*parts[:depth])
            if sub in seen:
                continue
            seen.add(sub)
            path = out_dir / sub
            if path.is_symlink():
                raise InputError(f"{path} in --out_dir is a symbolic link (to {os.readlink(path)}); image_process "
                                 "never writes through a link: remove the link or choose another --out_dir")
            if (out / sub).is_relative_to(data):
                raise InputError(f"{path} would be written inside --data_dir {data_dir}")
            leaf = depth == len(parts)
            if leaf and path.is_dir():
                raise InputError(f"{path} in --out_dir is a folder where this run writes a file; move it away")
            if not leaf and path.exists() and not path.is_dir():
                raise InputError(f"{path} in --out_dir is a file where this run needs a folder; move it away")


def safe_recorded_path(out_dir: Path, rel: str) -> Optional[Path]:
    """The file an earlier run recorded at `rel`, when it is a plain file inside the tree reached
    without links (a record edited by hand or a link put there since is not followed)."""
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        return None
    for depth in range(1, len(parts) + 1):
        if (out_dir / Path(*parts[:depth])).is_symlink():
            return None
    path = out_dir / rel
    return path if path.is_file() else None


def read_written_list(out_dir: Path) -> Optional[List[str]]:
    """What an earlier run recorded it wrote into `out_dir`, or None when there is no record."""
    path = out_dir / WRITTEN_LIST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        files = json.loads(path.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        files = None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise InputError(f"{path} is not a list of written files (image_process's record of its tree); "
                         "remove it, or choose an empty --out_dir")
    return files


def _map_bits(path: Path, image: Path, size: tuple, fill: int) -> int:
    try:
        with Image.open(path) as m:
            mode, msize = m.mode, m.size
    except OSError as e:
        raise InputError(f"{path}: cannot read the map ({e})") from None
    if mode in ("RGB", "RGBA"):  # accepted only when gray: decode once to tell
        try:
            read_ids(path)
        except DatasetError:
            raise InputError(f"{path}: image mode {mode} with colours; expected a single-channel map of raw ids "
                             f"(8/16-bit grayscale or palette PNG), not a colourised label map") from None
    elif mode not in EIGHT_BIT_MAP_MODES + SIXTEEN_BIT_MAP_MODES:
        raise InputError(f"{path}: image mode {mode}; expected a single-channel map of raw ids "
                         f"(8/16-bit grayscale or palette PNG), not a colourised label map")
    if msize != size:
        raise InputError(f"{path}: map is {msize[0]}x{msize[1]} but image {image} is {size[0]}x{size[1]}")
    bits = 8 if mode in EIGHT_BIT_MAP_MODES else 16
    if not 0 <= fill < 2 ** bits:
        raise InputError(f"--fill {fill} does not fit the {mode} map {path} (0..{2 ** bits - 1})")
    return bits


def check_item(record: Record, fill: int) -> Item:
    """Header-only checks (cheap; colour maps are decoded): the maps are single-channel, as large
    as the image, and can hold ``fill``."""
    image = Path(record.image)
    try:
        with Image.open(image) as img:
            size = img.size
    except OSError as e:
        raise InputError(f"{image}: cannot read the image ({e})") from None
    label = Path(record.label)
    instance = Path(record.instance) if record.instance else None
    return Item(record.key, image, label, instance, _map_bits(label, image, size, fill),
                _map_bits(instance, image, size, fill) if instance else 8)


# ----------------------------------------------------------------------------- the work

# Below this share of changed label pixels a tree is not a noisy benchmark: say why and what to pass.
NO_OP_FRACTION = 0.001
NO_OP_HINTS: Dict[str, Callable[[dict, Optional[int], int], str]] = {
    "downsample": lambda params, image_size, side: (
        f"--size {params.get('size')} is not below the maps' {side} px; the paper stores DS maps at a quarter of "
        f"the model's size: pass --size {max(1, side // 4)}"),
    "edge": lambda params, image_size, side: (
        f"--image_size {image_size} is larger than the maps ({side} px), so the noise drawn there vanishes when the "
        f"model sees the map at its size: pass --image_size {side} (the model's size), or a larger --radius"),
    "painter": lambda params, image_size, side: (
        f"--image_size {image_size} is larger than the maps ({side} px): pass --image_size {side} (the model's "
        "size), or a larger --max_shift"),
    "random": lambda params, image_size, side: f"--p {params.get('p')} is (almost) zero",
}

@dataclass(frozen=True)
class Job:
    noise: str
    params: dict
    data_dir: Path
    out_dir: Path
    seed: int
    fill: int
    image_size: Optional[int]  # labels resized to this (nearest) before the noise; None: as is


def read_map(path: Path, bits: int, what: str = "label map") -> tuple:
    """(ids in the unsigned type of their bit depth, palette or None)."""
    ids, palette = read_ids(path, what, return_palette=True)
    if bits == 8:
        return ids.astype(np.uint8), palette
    if ids.size and (ids.min() < 0 or ids.max() > 65535):
        raise InputError(f"{path}: ids outside 0..65535 cannot be written as PNG")
    return ids.astype(np.uint16), palette


def write_map(arr: np.ndarray, path: Path, palette: Optional[list] = None) -> None:
    """PNG of raw ids (8 or 16 bit as ``arr``'s type; the palette of a palette map kept)."""
    img = Image.fromarray(arr)
    if palette is not None and arr.dtype == np.uint8:
        img.putpalette(palette)
    save_image(img, path, format="PNG")


def output_paths(job: Job, item: Item) -> List[Path]:
    """Where a sample's files go: the same relative paths; maps always as PNG."""
    rel = [p.relative_to(job.data_dir) for p in (item.image, item.label, item.instance) if p]
    return [job.out_dir / rel[0]] + [job.out_dir / r.with_suffix(".png") for r in rel[1:]]


def process(job: Job, item: Item) -> tuple:
    """Write one sample of the noisy tree; returns (paths written, label pixels the noise changed,
    pixels), counted at the stored size of the clean map: what a model at that size would see."""
    out = output_paths(job, item)
    link_or_copy(item.image, out[0])
    label, palette = read_map(item.label, item.label_bits)
    clean = label
    inst, inst_palette = read_map(item.instance, item.instance_bits, "instance map") if item.instance else (None, None)
    if job.image_size:
        label = resize_nearest(label, job.image_size)
        inst = None if inst is None else resize_nearest(inst, job.image_size)
    label, inst = corrupt(job.noise, label, inst, fill=job.fill, rng=derive_rng(job.seed, item.key),
                          **job.params)
    write_map(label, out[1], palette)
    if inst is not None:
        write_map(inst, out[2], inst_palette)
    changed = int((resize_nearest(label, clean.shape) != clean).sum())
    return out, changed, clean.size


_JOB: Optional[Job] = None


def _init_worker(job: Job) -> None:
    global _JOB
    _JOB = job
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool's terminate() ends the worker, not the parent's handler


def _process_in_worker(item: Item) -> tuple:
    return item.key, process(_JOB, item)


def _in_workers(job: Job, items: Sequence[Item], num_workers: int):
    """`process` of every item in `num_workers` processes. A worker that dies (the out-of-memory
    killer, a signal) ends the run with one line instead of a wait for results that never come, and
    on any error or Ctrl-C the workers are stopped before the caller removes the staging folder."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    chunk = max(1, min(16, len(items) // (4 * num_workers)))
    pool = ProcessPoolExecutor(num_workers, mp_context=mp.get_context(), initializer=_init_worker, initargs=(job,))
    finished = False
    try:
        yield from pool.map(_process_in_worker, items, chunksize=chunk)
        finished = True
    except BrokenProcessPool:
        raise InputError(f"a worker process died while making the tree (killed, e.g. out of memory at --image_size "
                         f"{job.image_size}: try fewer --num_workers or a smaller size); nothing was written to the "
                         "output folder") from None
    finally:
        if not finished:
            stop = getattr(pool, "terminate_workers", None)  # Python 3.14; before it, the pool's own processes
            if stop is not None:
                stop()
            else:
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def looks_like_earlier_run(out_dir: Path, written: Dict[str, str]) -> List[Path]:
    """Files in the folders just written that look like this run's (same name ending, e.g.
    ``_gtFine_labelIds.png``) but are not: an earlier run's, which the loader would pair up.
    ``written`` maps each path written (relative) to its sample key."""
    endings: Dict[Path, set] = {}
    for rel, key in written.items():
        endings.setdefault((out_dir / rel).parent, set()).add(Path(rel).name[len(key):])
    found = []
    for folder, ends in endings.items():
        if folder.is_dir():
            found += [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                      and f.name.endswith(tuple(ends)) and str(f.relative_to(out_dir)) not in written]
    return sorted(found)


def commit_tree(staging: Path, out_dir: Path, files: List[str]) -> int:
    """Put the tree built in `staging` at `out_dir`: a rename when `out_dir` is new or empty; else
    the files the earlier run recorded are removed and the new ones moved in, file by file, so
    anything else in the tree (a user's own files) stays. Returns how many earlier files were removed."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return 0
    earlier = read_written_list(out_dir) or []
    removed = 0
    for rel in sorted(set(earlier) - set(files)):
        path = safe_recorded_path(out_dir, rel)
        if path is not None:
            path.unlink()
            removed += 1
    for rel in files:
        move_file(staging / rel, out_dir / rel)
    shutil.rmtree(staging)
    return removed


def build_tree(noise: str, data_dir, out_dir, params: Optional[dict] = None, *,
               dataset_mode: str = "ade20k", split: Optional[str] = None, num: int = 2000,
               seed: int = 0, image_size: Optional[int] = 256, fill: Optional[int] = None,
               num_workers: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the noisy dataset tree; returns the manifest (also saved as out_dir/corruption.json).

    The first ``num`` samples in sorted name order are used. Each file's noise is seeded by
    (seed, file stem), so results do not depend on ``num_workers``. The tree is built in a hidden
    sibling of ``out_dir`` and moved into place only when complete, so a run stopped by a bad file
    or Ctrl-C leaves ``out_dir`` as it was; ``--overwrite`` removes only files that an earlier run
    recorded in ``image_process_files.json``, and nothing is written through a symbolic link.
    """
    from tqdm import tqdm

    layout = get_layout(dataset_mode)
    split = split or layout.test_split
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if num < 1:
        raise InputError(f"--num must be >= 1, got {num}")
    if num_workers < 1:
        raise InputError(f"--num_workers must be >= 1, got {num_workers}")
    if seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}")
    if image_size is not None and image_size < 1:
        raise InputError(f"--image_size must be >= 1, got {image_size}")
    check_dirs(data_dir, out_dir, overwrite)
    had_record = not out_dir.is_dir() or read_written_list(out_dir) is not None or not any(out_dir.iterdir())
    if fill is None:
        fill = default_fill(dataset_mode, data_dir)
    records = list_records(dataset_mode, data_dir, split=split)
    items = [check_item(r, fill) for r in records[:num]]
    if len(items) < num and progress:
        print(f"note: only {len(items)} samples in {data_dir} (--num {num})", file=sys.stderr)

    meta = layout.metadata_file if layout.metadata_file and (data_dir / layout.metadata_file).is_file() else None
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    os.chmod(staging, default_dir_mode())  # it becomes out_dir: shared as any folder the user makes
    job = Job(noise, dict(params or {}), data_dir, staging, seed, fill, image_size)
    rels = {str(p.relative_to(staging)): it.key for it in items for p in output_paths(job, it)}
    extra = [MANIFEST, WRITTEN_LIST] + ([meta] if meta else [])
    try:
        check_output_paths(out_dir, data_dir, [*rels, *extra])
        for d in {p.parent for it in items for p in output_paths(job, it)}:
            d.mkdir(parents=True, exist_ok=True)

        start, changed, pixels = time.perf_counter(), 0, 0
        bar = tqdm(total=len(items), desc=f"{noise} {dataset_mode}", unit="map", disable=not progress)
        try:
            if num_workers == 1:
                for item in items:
                    _, n_changed, n_pixels = process(job, item)
                    changed, pixels = changed + n_changed, pixels + n_pixels
                    bar.update()
            else:
                results = _in_workers(job, items, num_workers)
                try:
                    for _, (_, n_changed, n_pixels) in results:
                        changed, pixels = changed + n_changed, pixels + n_pixels
                        bar.update()
                finally:
                    results.close()  # stops the workers now, before the staging folder is removed
        finally:
            bar.close()

        if meta:
            copy_file(data_dir / meta, staging / meta)
        manifest = {
            "noise": noise, "params": job.params, "seed": seed, "fill": fill, "image_size": image_size,
            "dataset_mode": dataset_mode, "split": split, "num": len(items),
            "data_dir": str(data_dir.resolve()), "seconds": round(time.perf_counter() - start, 3),
            "changed_fraction": round(changed / max(pixels, 1), 6),
        }
        write_json({k: v for k, v in manifest.items() if k != "seconds"}, staging / MANIFEST, sort_keys=True)
        files = sorted([*rels, *extra])
        write_json({"files": files}, staging / WRITTEN_LIST)
        with stop_signals.deferred():  # Ctrl-C here would leave the earlier tree half replaced
            removed = commit_tree(staging, out_dir, files)
    except BaseException:
        # a bad file, Ctrl-C, a full disk: what this run wrote goes; the pool is terminated by now
        shutil.rmtree(staging, ignore_errors=True)
        raise

    if removed and progress:
        print(f"note: removed {removed} files an earlier run recorded in {out_dir / WRITTEN_LIST}", file=sys.stderr)
    if not had_record:
        others = looks_like_earlier_run(out_dir, rels)
        if others:
            print(f"warning: {len(others)} files in {out_dir} look like an earlier run's (e.g. {others[0]}) but no "
                  f"{WRITTEN_LIST} says image_process wrote them, so they were kept; the loader will read them "
                  "with this tree: remove them, or use an empty --out_dir", file=sys.stderr)
    if manifest["changed_fraction"] < NO_OP_FRACTION and noise in NO_OP_HINTS:
        with Image.open(items[0].label) as first:
            side = min(first.size)
        print(f"warning: {noise} changed {100 * manifest['changed_fraction']:.3f}% of the label pixels at their "
              f"stored size (e.g. {side}x{side}): at the model's size this noise is (almost) a no-op. "
              + NO_OP_HINTS[noise](job.params, image_size, side), file=sys.stderr)
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


def _fill_help() -> str:
    known = ", ".join(f"{m} {raw_unlabeled_id(m)}" for m, lay in LAYOUTS.items()
                      if not lay.metadata_file and lay.raw_unlabeled_id is not None)
    none = ", ".join(m for m, lay in LAYOUTS.items() if not lay.metadata_file and lay.raw_unlabeled_id is None)
    return (f"raw id written for unlabeled pixels (label and instance maps); default the dataset's: {known}, "
            f"folder the unlabeled_id of <data_dir>/dataset.json; {none} has none and needs --fill")


def parser(noise: Noise) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog=f"python -m image_process.{noise.name}",
                                description=noise.description,
                                epilog=noise.epilog, formatter_class=HelpFormatter)
    p.add_argument("--data_dir", required=True, type=Path,
                   help="dataset root (e.g. ADEChallengeData2016, or a folder-layout root such as the toy data)")
    p.add_argument("--out_dir", required=True, type=Path,
                   help="root of the noisy copy (same layout; must be empty unless --overwrite)")
    p.add_argument("--dataset_mode", choices=sorted(LAYOUTS), default="ade20k",
                   help="layout of --data_dir, as the loader's --dataset_mode")
    p.add_argument("--split", default=None,
                   help="split to read; default the dataset's test split: "
                        + ", ".join(f"{m} {lay.test_split}" for m, lay in LAYOUTS.items()))
    p.add_argument("--num", type=positive_int, default=2000, help="first N samples in sorted name order")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="noise seed (each file's noise depends on it and its name)")
    p.add_argument("--image_size", type=positive_int, default=256,
                   help="labels are resized to this (nearest) before the noise"
                   + ("" if noise.resize else " (not used by this noise)"))
    p.add_argument("--fill", type=nonnegative_int, default=None, help=_fill_help())
    p.add_argument("--num_workers", type=positive_int, default=min(8, os.cpu_count() or 1), help="worker processes")
    add_deprecated_alias(p, "--workers", "--num_workers", dest="num_workers", type=positive_int)
    add_bool_argument(p, "--overwrite", default=False,
                      help="write into a non-empty --out_dir, replacing an earlier tree there")
    add_bool_argument(p, "--quiet", default=False, help="no progress bar or summary")
    noise.add_args(p)
    return p


def _build_from_args(noise: Noise, argv: Optional[Sequence[str]]) -> int:
    args = parser(noise).parse_args(argv)
    params = noise.params(args)
    manifest = build_tree(noise.name, args.data_dir, args.out_dir, params,
                          dataset_mode=args.dataset_mode, split=args.split, num=args.num,
                          seed=args.seed, image_size=args.image_size if noise.resize else None,
                          fill=args.fill, num_workers=args.num_workers, overwrite=args.overwrite,
                          progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {manifest['num']} noisy maps ({noise.name}, {params}) to {args.out_dir} "
              f"in {manifest['seconds']:.1f} s", file=sys.stderr)
    return 0


def run_noise_cli(noise: Noise, argv: Optional[Sequence[str]] = None) -> int:
    """Run one CLI; returns 0, or ends with one `error: ...` line and exit code 2 on bad input."""
    return run_cli(lambda a: _build_from_args(noise, a), argv)
