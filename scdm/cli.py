"""What the entry points share: turning user errors into one clear line with exit code 2, and
resolving dataset-dependent flags (class count, unlabeled class)."""
import argparse
import sys

from .checkpoint import CheckpointError
from .datasets import DatasetError, dataset_info
from .dist_util import LaunchError

USER_ERRORS = (CheckpointError, DatasetError, LaunchError, ValueError, FileNotFoundError, PermissionError)


def run_cli(main, argv=None):
    """Run main(argv); a user error prints `error: ...` and exits with code 2, no traceback."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def resolve_dataset_flags(args):
    """Fill num_classes (-1: from the dataset) and unlabeled_id from the dataset layout."""
    if not args.dataset_mode:
        raise ValueError("--dataset_mode is required (ade20k, coco, celeba, cityscapes or folder)")
    info = dataset_info(args.dataset_mode, args.data_dir or None,
                        num_classes=args.num_classes if args.num_classes > 0 else None,
                        unlabeled_id=args.unlabeled_id if args.unlabeled_id >= 0 else None)
    args.num_classes = info.num_classes
    args.unlabeled_id = -1 if info.unlabeled_id is None else info.unlabeled_id
    return info


PRECISIONS = ("fp32", "fp16", "bf16")


def resolve_precision(args):
    """--precision, where the released --use_fp16 True means fp16 (autocast on fp32 weights)."""
    precision = args.precision or ("fp16" if args.use_fp16 else "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {PRECISIONS}")
    if args.use_fp16 and args.precision and args.precision != "fp16":
        raise ValueError(f"--use_fp16 True contradicts --precision {args.precision}")
    return precision


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    pass
