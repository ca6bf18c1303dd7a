"""Shared pieces of the evaluation tools: folder listing, name matching, the size policy, errors.

Extensions and the id-map reader are scdm's (`scdm.data.dataset_layouts`), so a dataset the loader
reads is one the evaluations read; errors are `UserError`s, reported by `scdm.runtime.errors.run_cli`.

Size policy (one rule for every tool): the ground truth defines the size. An image whose size
differs from its reference is resized to it before scoring -- RGB images with PIL bicubic,
label maps with nearest -- and the tool prints one note saying how many files were resized.
References: FID -- the first ground-truth image (sorted by name) or the size stored in a GT
statistics file; LPIPS -- the same-name image of set 0; mIoU -- the same-name ground-truth label.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from scdm.data.dataset_layouts import IMAGE_EXTENSIONS, read_ids, resize_ids
from scdm.runtime.errors import UserError

MAX_LISTED = 10  # how many offending names an error message shows


class EvalError(UserError):
    """A problem the user can fix (path, flag, file content): reported as one line, exit code 2."""


def default_device(device: Optional[str] = None) -> torch.device:
    """`device` if given (checking that CUDA exists when asked), else cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device} was asked for but CUDA is not available; use --device cpu")
    return dev


def _preview(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def list_images(folder, what: str = "image folder") -> Dict[str, Path]:
    """Map file stem -> path for the images of `folder` (not recursive). Matching is by stem so
    that `x.jpg` (ground truth) pairs with `x.png` (sample). Empty or missing folders are errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"{what} not found: {folder}")
    files: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in files:
                raise EvalError(f"two files with the name '{p.stem}' in {folder}: {files[p.stem].name}, {p.name}")
            files[p.stem] = p
    if not files:
        raise EvalError(f"{what} {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def match_names(listings: Sequence[Tuple[Path, Dict[str, Path]]]) -> List[str]:
    """The sorted common names of several listings; any name missing from a folder is an error
    that lists, per folder, the names it lacks."""
    all_names = set().union(*(set(files) for _, files in listings))
    problems = []
    for folder, files in listings:
        missing = all_names - set(files)
        if missing:
            problems.append(f"{folder} lacks {len(missing)}: {_preview(missing)}")
    if problems:
        raise EvalError("file names do not match between folders; " + "; ".join(problems))
    return sorted(all_names)


def folder_fingerprint(paths: Iterable[Path]) -> str:
    """sha256 of (name, byte size, mtime) of each file: cheap, and changes when any file does."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except Exception as e:  # PIL raises many types for corrupt or truncated files
        raise EvalError(f"cannot read image {path}: {e}") from None


def image_size(path: Path) -> Tuple[int, int]:
    """(width, height) from the header only."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as e:
        raise EvalError(f"cannot read image {path}: {e}") from None


def load_rgb(path: Path, size: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, bool]:
    """Float tensor (3, H, W) in [0, 1], resized to `size` = (W, H) with bicubic when it differs.
    Returns (tensor, resized?)."""
    img = _open(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale to 8 bit first
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    img = img.convert("RGB")
    resized = size is not None and img.size != tuple(size)
    if resized:
        img = img.resize(tuple(size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0), resized


def load_label(path: Path, size: Optional[Tuple[int, int]] = None,
               what: str = "label map") -> Tuple[np.ndarray, bool]:
    """int64 id map (H, W) read by scdm's id-map reader (8/16-bit grayscale, palette, gray RGB);
    resized with nearest to `size` = (W, H) when it differs. Returns (ids, resized?)."""
    ids = read_ids(path, what)
    resized = size is not None and ids.shape[::-1] != tuple(size)
    return (resize_ids(ids, size) if resized else ids), resized


def note_resized(count: int, total: int, what: str) -> None:
    """The one message of the size policy."""
    if count:
        print(f"note: {count} of {total} {what} resized to the reference size ({_policy_words(what)})",
              file=sys.stderr)


def _policy_words(what: str) -> str:
    return "nearest" if "label" in what or "prediction" in what else "bicubic"


def hub_checkpoint(filename: str) -> Path:
    """Where torch.hub would cache `filename` ($TORCH_HOME/hub/checkpoints/)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def resolve_weights(weights: Optional[str], filename: str, what: str, flag: str, url: str) -> str:
    """A local weights path, or 'random' (tests only). Never downloads: when the file is absent the
    error names the file, the folder to put it in, and the flag that points elsewhere."""
    if weights == "random":
        return "random"
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise EvalError(f"{flag} {weights}: file not found (expected the {what} weights '{filename}')")
        return str(p)
    p = hub_checkpoint(filename)
    if p.is_file():
        return str(p)
    raise EvalError(
        f"missing {what} weights: put '{filename}' in {p.parent}/ (download it elsewhere from {url}) "
        f"or pass {flag} PATH"
    )
