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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    pass
