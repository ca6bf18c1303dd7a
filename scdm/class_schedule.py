"""Per-class lambda for `discrete_zero_classwise` label diffusion, from a dataset's label maps.

Under the class-wise schedule a class-c pixel is masked by time tau with probability
min(tau, (lambda_c^tau - 1) / (lambda_c - 1)): lambda <= 1 is uniform diffusion, and the larger
lambda, the later the class fades (about half of it is masked at tau ~ 1 - ln 2 / ln lambda for
large lambda). Small classes lose their few pixels quickly under uniform masking, and rare
classes are seen in few training maps, so both should fade slowly. The recipe, over the label
maps of the training split at their stored resolution (after remapping):

    f_c = n_c / N                  share of the N images that contain class c  (n_c images)
    a_c = mean over those n_c images of (pixels of class c / pixels of the image)
    lambda_c = clip(1 / (a_c * sqrt(f_c)), 1.001, 10000)

i.e. the inverse mean area when present, times the square-root inverse frequency (the smoothed
inverse frequency used for class-balanced sampling, e.g. LVIS repeat factors), so rarity counts
but does not dominate the area term. A class covering every pixel of every image gets 1 (it
would diffuse uniformly); the floor 1.001 keeps the `+1e-7` of the schedule from freezing classes
at lambda ~ 1, and the cap keeps single-pixel one-off classes from never diffusing. Classes
that never occur get 0.5 (uniform; what the released COCO file stores for its unused ids), and
the unlabeled class gets 0.5 like the released code. With these choices the values land in the
range of the released files (common classes a few units, small classes hundreds to thousands).

    python -m scdm.class_schedule --dataset_mode folder --data_dir data/toy --out schedule.npy
"""
import argparse
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .runtime.cli import HelpFormatter, float_in, int_at_least, nonnegative_float, nonnegative_int, positive_int
from .data.datasets import build_dataset, iter_user_errors_clean
from .runtime.errors import run_cli
from .data.dataset_layouts import LAYOUTS
from .runtime.fileio import check_writable_file, save_npy
from .runtime.stop_signals import worker_options

UNIFORM_LAMBDA = 0.5     # absent and unlabeled classes: diffuse uniformly
MIN_LAMBDA = 1.001
MAX_LAMBDA = 1e4
RARITY_EXPONENT = 0.5


@dataclass
class ClassStats:
    """Label statistics of one split: images containing each class and their mean area."""
    num_images: int
    images_with: np.ndarray   # (C,) int64, n_c
    mean_area: np.ndarray     # (C,) float64, a_c (0 where n_c = 0)

    @property
    def frequency(self):
        return self.images_with / max(self.num_images, 1)


def lambdas_from_stats(stats, unlabeled_id=None, rarity_exponent=RARITY_EXPONENT,
                       min_lambda=MIN_LAMBDA, max_lambda=MAX_LAMBDA):
    """The module docstring's recipe: clip(1 / (a_c * f_c^rarity_exponent)), 0.5 when absent/unlabeled."""
    present = stats.images_with > 0
    lam = np.full(stats.images_with.shape, UNIFORM_LAMBDA, dtype=np.float64)
    denom = stats.mean_area[present] * stats.frequency[present] ** rarity_exponent
    lam[present] = np.clip(1.0 / denom, min_lambda, max_lambda)
    if unlabeled_id is not None:
        lam[unlabeled_id] = UNIFORM_LAMBDA
    return lam


class _ClassFractions(Dataset):
    """Per label map: the fraction of its pixels in each class, (C,) float64."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        _, label = self.dataset.read_label(index)
        counts = np.bincount(label.ravel(), minlength=self.dataset.info.num_classes)
        return torch.from_numpy(counts / max(label.size, 1))


def collect_class_stats(dataset_mode, data_dir, num_classes=None, unlabeled_id=None, is_train=True,
                        num_workers=0, progress=False):
    """Read every label map of the split once (images are not decoded) and count."""
    dataset = build_dataset(dataset_mode, data_dir, image_size=1, is_train=is_train,
                            num_classes=num_classes, unlabeled_id=unlabeled_id)
    c = dataset.info.num_classes
    images_with = np.zeros(c, dtype=np.int64)
    area_sum = np.zeros(c, dtype=np.float64)
    loader = DataLoader(_ClassFractions(dataset), batch_size=None, **worker_options(num_workers))
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, total=len(dataset), desc="label statistics", unit="map")
    for fractions in iter_user_errors_clean(loader):
        fractions = fractions.numpy()
        images_with += fractions > 0
        area_sum += fractions
    mean_area = np.divide(area_sum, images_with, out=np.zeros(c), where=images_with > 0)
    return ClassStats(len(dataset), images_with, mean_area), dataset.info


def compute_class_schedule(dataset_mode, data_dir, num_classes=None, unlabeled_id=None, *, is_train=True,
                           num_workers=0, progress=False, rarity_exponent=RARITY_EXPONENT,
                           min_lambda=MIN_LAMBDA, max_lambda=MAX_LAMBDA):
    """lambda_c for every class (float64, (num_classes,)) from the split's label maps."""
    stats, info = collect_class_stats(dataset_mode, data_dir, num_classes, unlabeled_id, is_train,
                                      num_workers, progress)
    return lambdas_from_stats(stats, info.unlabeled_id, rarity_exponent, min_lambda, max_lambda)


def save_schedule(path, lambdas):
    """Write the .npy atomically (a crash never leaves a truncated schedule under the final name)."""
    save_npy(np.asarray(lambdas, dtype=np.float64), path)


def format_table(stats, lambdas, unlabeled_id=None, max_rows=24):
    """A short table: every class when few, else the extremes and percentiles."""
    def row(c):
        tag = " (unlabeled)" if c == unlabeled_id else (" (absent)" if stats.images_with[c] == 0 else "")
        return (f"{c:>5}  {100 * stats.frequency[c]:>8.2f}  {100 * stats.mean_area[c]:>9.3f}  "
                f"{lambdas[c]:>10.2f}{tag}")

    lines = [f"{stats.num_images} label maps, {len(lambdas)} classes",
             f"{'class':>5}  {'images%':>8}  {'area%':>9}  {'lambda':>10}"]
    order = np.arange(len(lambdas))
    if len(lambdas) <= max_rows:
        lines += [row(c) for c in order]
    else:
        by_lambda = np.argsort(lambdas, kind="stable")
        half = max_rows // 2
        lines += [row(c) for c in by_lambda[:half]] + ["  ..."] + [row(c) for c in by_lambda[-half:]]
    pct = np.percentile(lambdas, [0, 10, 50, 90, 100])
    lines.append("lambda percentiles 0/10/50/90/100: " + " / ".join(f"{v:.2f}" for v in pct))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m scdm.class_schedule", formatter_class=HelpFormatter,
                                description="Compute the per-class lambda file for discrete_zero_classwise.")
    p.add_argument("--dataset_mode", required=True, choices=sorted(LAYOUTS), help="layout of --data_dir")
    p.add_argument("--data_dir", required=True, help="dataset root")
    p.add_argument("--out", required=True, help="output .npy path (written atomically)")
    p.add_argument("--num_classes", type=positive_int, default=None, help="default: from the layout or dataset.json")
    p.add_argument("--unlabeled_id", type=int_at_least(-1), default=None,
                   help="default: from the layout; -1 also means that")
    p.add_argument("--num_workers", type=nonnegative_int, default=0, help="label-reading processes")
    p.add_argument("--split", choices=("train", "test"), default="train", help="which split's labels to count")
    p.add_argument("--rarity_exponent", type=nonnegative_float, default=RARITY_EXPONENT,
                   help="exponent of the frequency term")
    p.add_argument("--max_lambda", type=float_in(MIN_LAMBDA, None), default=MAX_LAMBDA,
                   help=f"upper clip of lambda (at least the floor {MIN_LAMBDA})")
    args = p.parse_args(argv)
    check_writable_file(args.out, "--out")
    stats, info = collect_class_stats(args.dataset_mode, args.data_dir, args.num_classes, args.unlabeled_id,
                                      args.split == "train", args.num_workers, progress=True)
    lambdas = lambdas_from_stats(stats, info.unlabeled_id, args.rarity_exponent, MIN_LAMBDA, args.max_lambda)
    save_schedule(args.out, lambdas)
    print(format_table(stats, lambdas, info.unlabeled_id))
    print(f"wrote {args.out}; use --cond_opt discrete_zero_classwise --class_schedule {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
