"""mIoU: how well samples follow their label maps, via a segmenter's predictions on the samples.

Ground-truth files hold raw dataset ids (as the sampler writes them to `labels/`); the dataset
table (`scdm.data.dataset_layouts`) maps them to the segmenter's classes 0..N-1 and names the id that is
not scored: N = the dataset's classes without its unlabeled class, the raw unlabeled id ignored,
other raw ids shifted as the loader shifts them:
  ade20k: raw 0 ignored, raw k -> class k-1, N = 150     coco: raw 255 ignored, N = 182
  cityscapes: raw 0 (unlabeled) ignored, N = 35          celeba: nothing ignored, N = 19
  toy:    the built-in dataset (scdm.toy)                folder: --num_classes N [--ignore_index I]
The confusion matrix is accumulated over all pixels of all images; IoU_c = TP / (TP + FP + FN);
mIoU is the mean over the classes present in the ground truth (a class only predicted, never in
the ground truth, is not averaged). Predictions are resized to the label size with nearest.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from evaluations.common import (
    EvalError, image_size, list_images, load_label, load_rgb, match_names, note_resized,
)
from scdm.data.dataset_layouts import LAYOUTS, DatasetError, list_records
from scdm.runtime.fileio import save_image

DATASETS = tuple(sorted(LAYOUTS)) + ("toy",)
GT_CHOICES = ("clean", "noisy")  # or a folder of label maps


@dataclass(frozen=True)
class GroundTruth:
    """The label maps mIoU is scored against: name -> file, and what they are (for the report)."""
    files: Dict[str, Path]
    where: Path          # the folder (or source tree) they come from
    kind: str            # "clean", "noisy" or "folder"
    description: str


def ground_truth(results, choice: str = "clean", manifest: Optional[dict] = None) -> GroundTruth:
    """Which labels the samples of a results folder are scored against.

    The benchmark asks whether an image follows the true scene, so by default ("clean") samples made
    from a noisy tree (its manifest carries the tree's `corruption.json`) are scored against the clean
    annotations of the source dataset the tree was made from, matched by name; samples of a clean
    tree against the maps they were made from (`labels/`). "noisy": always `labels/`, the maps the
    model was given. Any other value is a folder of label maps."""
    results = Path(results)
    labels = results / "labels"
    corruption = ((manifest or {}).get("labels") or {}).get("corruption")
    if choice not in GT_CHOICES:
        folder = Path(choice)
        if not folder.is_dir():
            raise EvalError(f"--miou_gt {choice}: not a folder of label maps (or use clean / noisy)")
        return GroundTruth(list_images(folder, "--miou_gt label folder"), folder, "folder",
                           f"the label maps in {folder} (--miou_gt)")
    if not labels.is_dir():
        raise EvalError(f"no label maps at {labels} (is {results} a sampler results folder?)")
    given = list_images(labels, "ground-truth label folder")
    if choice == "noisy":
        what = "the noisy input maps" if corruption else "the input maps"
        return GroundTruth(given, labels, "noisy", f"{what} the samples were made from ({labels})")
    if not corruption:
        return GroundTruth(given, labels, "clean", f"the input maps ({labels}), which are the clean annotations: "
                                                   "they were not made by a noise (no corruption.json)")
    source, mode, split = corruption.get("data_dir"), corruption.get("dataset_mode"), corruption.get("split")
    noise = corruption.get("noise", "a noise")
    if not source or not mode:
        raise EvalError(f"the noisy tree's corruption.json ({noise}) does not name its clean source (data_dir, "
                        "dataset_mode); pass --miou_gt DIR (the clean label maps) or --miou_gt noisy")
    try:
        records = list_records(mode, source, is_train=False, split=split)
    except DatasetError as e:
        raise EvalError(f"mIoU against the clean annotations: the {noise} tree was made from {source} "
                        f"({mode}, split {split}), which cannot be read: {e}; pass --miou_gt DIR (the clean "
                        "label maps) or --miou_gt noisy") from None
    clean = {Path(r.image).stem: Path(r.label) for r in records}
    missing = sorted(set(given) - set(clean))
    if missing:
        raise EvalError(f"mIoU against the clean annotations: {len(missing)} sampled map(s) have no clean label in "
                        f"{source} (split {split}), e.g. {missing[0]}; pass --miou_gt DIR or --miou_gt noisy")
    return GroundTruth({n: clean[n] for n in given}, Path(source), "clean",
                       f"the clean annotations of {source} ({mode}, split {split}), the source of the {noise} "
                       f"tree the samples were made from")


@dataclass(frozen=True)
class LabelSpec:
    """How raw ground-truth ids become classes: `ignore_index` (raw) is not scored, then `shift` is subtracted."""
    num_classes: int
    ignore_index: Optional[int] = None
    shift: int = 0


def dataset_preset(dataset: str) -> Tuple[Optional[int], Optional[int], int]:
    """(N scored classes, ignored raw id, shift) of `dataset`, from the dataset table (toy: scdm.toy)."""
    if dataset == "toy":
        from scdm.toy import TOY_NUM_CLASSES, TOY_UNLABELED_ID
        return TOY_NUM_CLASSES, TOY_UNLABELED_ID, 0
    if dataset not in LAYOUTS:
        raise EvalError(f"--dataset_mode {dataset}: choose one of {', '.join(DATASETS)}")
    layout = LAYOUTS[dataset]
    n = layout.num_classes
    if n is not None and layout.unlabeled_class is not None:
        n -= 1  # the class the unlabeled pixels become is not scored
    return n, layout.raw_unlabeled_id, layout.id_shift


def label_spec(dataset: str = "folder", num_classes: Optional[int] = None,
               ignore_index: Optional[int] = None) -> LabelSpec:
    """The preset of `dataset`; explicit num_classes / ignore_index override it."""
    n, ignore, shift = dataset_preset(dataset)
    n = num_classes if num_classes is not None else n
    if n is None or n < 1:
        raise EvalError(f"--num_classes is required (and >= 1) for --dataset_mode {dataset}")
    return LabelSpec(n, ignore_index if ignore_index is not None else ignore, shift)


def class_names_of(dataset: str) -> Optional[List[str]]:
    """Names of the scored classes 0..N-1 where the table knows them, else None."""
    if dataset == "toy":
        from scdm.toy import TOY_CLASSES
        return [c.name for c in TOY_CLASSES]
    names = LAYOUTS[dataset].class_names if dataset in LAYOUTS else None
    n = dataset_preset(dataset)[0]
    return list(names[:n]) if names else None


def gt_to_classes(raw: np.ndarray, spec: LabelSpec, path="ground truth") -> np.ndarray:
    """Class ids of a raw ground-truth map, -1 where not scored; ids outside the classes are an error."""
    gt = raw - spec.shift
    if spec.ignore_index is not None:
        gt = np.where(raw == spec.ignore_index, -1, gt)
    _check_range(gt[gt != -1], spec.num_classes, path, "ground-truth label", raw_offset=spec.shift)
    return gt


def _check_range(ids: np.ndarray, n: int, path, what: str, raw_offset: int = 0) -> None:
    bad = np.unique(ids[(ids < 0) | (ids >= n)])
    if bad.size:
        shown = ", ".join(str(int(v) + raw_offset) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raw = f" (raw; class = id - {raw_offset})" if raw_offset else ""
        raise EvalError(f"{path}: {what} ids {shown}{raw} are outside the class range 0..{n - 1} "
                        f"(check --num_classes / --dataset_mode / --ignore_index)")


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_index: Optional[int] = None) -> np.ndarray:
    """(N, N) int64 counts, rows = ground-truth class, columns = predicted class, by one bincount.
    Pixels whose ground truth is `ignore_index` or negative are skipped."""
    pred, gt = np.asarray(pred, np.int64).ravel(), np.asarray(gt, np.int64).ravel()
    if pred.shape != gt.shape:
        raise EvalError(f"prediction and ground truth differ in size: {pred.size} vs {gt.size} pixels")
    keep = gt >= 0 if ignore_index is None else (gt >= 0) & (gt != ignore_index)
    pred, gt = pred[keep], gt[keep]
    _check_range(gt, num_classes, "ground truth", "label")
    _check_range(pred, num_classes, "prediction", "predicted")
    return np.bincount(gt * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(cm: np.ndarray) -> dict:
    """Per-class IoU (None for classes absent from the ground truth), mIoU over present classes,
    pixel accuracy."""
    cm = np.asarray(cm, dtype=np.float64)
    tp, gt_count, pred_count = np.diag(cm), cm.sum(1), cm.sum(0)
    union = gt_count + pred_count - tp
    present = gt_count > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)
    total = cm.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else None,
        "pixel_accuracy": float(tp.sum() / total) if total else None,
        "num_classes": int(cm.shape[0]),
        "classes_present": [int(c) for c in np.flatnonzero(present)],
        "per_class_iou": [float(v) if p else None for v, p in zip(iou, present)],
        "num_pixels": int(total),
    }


def _score(pairs: Iterable[Tuple[str, np.ndarray, Path]], spec: LabelSpec, num: int) -> dict:
    """Accumulate the confusion matrix of (pred_source, pred classes, gt path) triples."""
    from tqdm import tqdm
    n = spec.num_classes
    cm = np.zeros(n * n, np.int64)
    for source, pred, gt_path in tqdm(pairs, total=num, desc="miou", leave=False, file=sys.stderr,
                                      disable=not sys.stderr.isatty()):
        raw, _ = load_label(gt_path)
        gt = gt_to_classes(raw, spec, gt_path)
        if pred.shape != gt.shape:
            raise EvalError(f"{source}: prediction is {pred.shape[1]}x{pred.shape[0]}, "
                            f"ground truth {gt_path} is {gt.shape[1]}x{gt.shape[0]}")
        _check_range(pred, n, source, "predicted")
        keep = gt >= 0
        cm += np.bincount(gt[keep] * n + pred[keep], minlength=n * n)
    out = scores(cm.reshape(n, n))
    out.update(num_images=num, ignore_index=spec.ignore_index, gt_shift=spec.shift)
    return out


def _gt_listing(gt) -> Tuple[Path, Dict[str, Path]]:
    """(where, name -> label file) of a ground-truth folder or of a `GroundTruth`."""
    if isinstance(gt, GroundTruth):
        return gt.where, dict(gt.files)
    return Path(gt), list_images(gt, "ground-truth label folder")


def miou_of_folders(pred_dir, gt_dir, num_classes: Optional[int] = None, dataset: str = "folder",
                    ignore_index: Optional[int] = None) -> dict:
    """mIoU of the segmenter predictions in `pred_dir` (class ids 0..N-1, one PNG per name)
    against the raw ground-truth labels in `gt_dir` (a folder or a `GroundTruth`; see the module
    doc for the presets)."""
    spec = label_spec(dataset, num_classes, ignore_index)
    preds = list_images(pred_dir, "prediction folder")
    gt_where, gts = _gt_listing(gt_dir)
    names = match_names([(Path(pred_dir), preds), (gt_where, gts)])
    resized = [0]

    def pairs() -> Iterator:
        for name in names:
            pred, r = load_label(preds[name], image_size(gts[name]))
            resized[0] += r
            yield preds[name], pred, gts[name]
    out = _score(pairs(), spec, len(names))
    note_resized(resized[0], len(names), "predictions")
    names_known = class_names_of(dataset) if num_classes is None else None
    return dict(out, dataset=dataset, segmenter="external", class_names=names_known)


def segment_toy_folder(samples_dir, gt_dir=None, save_pred=None) -> Iterator[Tuple[str, np.ndarray, Path]]:
    """Run the exact toy segmenter (scdm.toy) on each image; yields (name, classes, image path).
    With `gt_dir`, images are first brought to the label size (bicubic, the size policy)."""
    from scdm.toy import segment_toy_image
    images = list_images(samples_dir, "sample folder")
    gt_where, gts = _gt_listing(gt_dir) if gt_dir is not None else (None, None)
    names = match_names([(Path(samples_dir), images), (gt_where, gts)]) if gts else sorted(images)
    for name in names:
        size = image_size(gts[name]) if gts else None
        img, _ = load_rgb(images[name], size)
        pred = np.asarray(segment_toy_image((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)),
                          dtype=np.int64)
        if save_pred is not None:
            save_label(Path(save_pred) / f"{name}.png", pred)
        yield name, pred, images[name]


def miou_of_toy_samples(samples_dir, gt_dir, save_pred=None) -> dict:
    """Segment toy samples with the exact toy segmenter and score them against the toy labels."""
    spec = label_spec("toy")
    _, gts = _gt_listing(gt_dir)
    pairs = ((path, pred, gts[name]) for name, pred, path in segment_toy_folder(samples_dir, gt_dir, save_pred))
    return dict(_score(pairs, spec, len(gts)), dataset="toy", segmenter="toy (exact, scdm.toy)",
                class_names=class_names_of("toy"))


def save_label(path: Path, ids: np.ndarray) -> None:
    """An id map as a PNG: 8-bit when ids fit, else 16-bit."""
    ids = np.asarray(ids)
    save_image(ids.astype(np.uint8) if ids.max(initial=0) < 256 else ids.astype(np.uint16), path, format="PNG")
