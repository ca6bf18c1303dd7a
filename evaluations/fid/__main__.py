"""python -m evaluations.fid --path SAMPLES GT [-b 50] [--device cpu|cuda] [--weights PATH] ..."""
import argparse
import os

from evaluations.fid import DIMS, INCEPTION_FILE, compute_fid
from scdm.runtime.cli import HelpFormatter, add_bool_argument, device_name, nonnegative_int, positive_int
from scdm.runtime.errors import run_cli
from scdm.runtime.fileio import check_writable_file


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m evaluations.fid", formatter_class=HelpFormatter,
                                description=(
        "FID between a folder of samples and the ground truth (pytorch-fid Inception, pool3). "
        "Either path may be an .npz of statistics (mu, sigma)."))
    p.add_argument("--path", nargs=2, required=True, metavar=("SAMPLES", "GT"),
                   help="the samples and the ground truth: image folders or .npz statistics")
    p.add_argument("-b", "--batch-size", "--batch_size", type=positive_int, default=50, help="images per network call")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1; None: cuda when available")
    p.add_argument("--weights", default=None, help=(
        f"the pytorch-fid Inception state dict '{INCEPTION_FILE}' (None: from $TORCH_HOME/hub/checkpoints/); "
        "'random' = random network, for tests only"))
    p.add_argument("--save-stats", "--save_stats", metavar="GT.npz", default=None,
                   help="cache of the ground-truth statistics; reused while the folder and weights are unchanged")
    p.add_argument("--dims", type=int, default=2048, choices=DIMS,
                   help="Inception features (2048: pool3, the standard)")
    p.add_argument("--num-workers", "--num_workers", type=nonnegative_int, default=None,
                   help="data-loading processes; None: min(8, CPUs)")
    add_bool_argument(p, "--unpaired", default=False,
                      help="allow different file names in the two folders (not the released protocol)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.save_stats is not None:
        check_writable_file(args.save_stats, "--save-stats")
    workers = args.num_workers if args.num_workers is not None else min(8, len(os.sched_getaffinity(0)))
    fid = compute_fid(args.path[0], args.path[1], weights=args.weights, dims=args.dims,
                      batch_size=args.batch_size, device=args.device, num_workers=workers,
                      save_stats_path=args.save_stats, paired=not args.unpaired)
    print(f"FID: {fid:.6f}")
    return fid


if __name__ == "__main__":
    run_cli(main)
