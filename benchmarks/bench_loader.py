"""Loader throughput: training batches per second through `scdm.data.datasets.load_data`, with the
plain in-process path (0 workers) and worker processes (2 by default), in the same run.

Runs on a toy tree it generates (stored at --source_size, loaded at --image_size with the train
transform, so resizing and cropping are part of the cost) unless --data_dir points at a dataset.

    python benchmarks/bench_loader.py                       # toy, 512 px -> 256 px, 0 and 2 workers
    python benchmarks/bench_loader.py --dataset_mode ade20k --data_dir /data/ADEChallengeData2016
Prints one JSON object; never used by the tests.
"""
import argparse
import json
import os
import tempfile
import time

import torch

from scdm.runtime.cli import HelpFormatter, add_deprecated_alias, positive_int
from scdm.runtime.errors import run_cli
from scdm.fast.performance import describe_machine
from scdm.data.datasets import load_data
from scdm.toy import make_toy_dataset


def worker_counts(v):
    """argparse `type=`: comma-separated loader worker counts >= 0, e.g. 0,2."""
    parts = [w.strip() for w in str(v).split(",")]
    if not parts or not all(w.isdigit() for w in parts):
        raise argparse.ArgumentTypeError(f"comma-separated worker counts >= 0 expected, got {v!r}")
    return [int(w) for w in parts]


def machine():
    return describe_machine()


def measure(args, data_dir, num_workers):
    it = load_data(dataset_mode=args.dataset_mode, data_dir=data_dir, batch_size=args.batch_size,
                   image_size=args.image_size, num_workers=num_workers)
    next(it)  # start-up (worker spawn, first decode) is not throughput
    start = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    seconds = time.perf_counter() - start
    images = args.batches * args.batch_size
    return {"num_workers": num_workers, "images": images, "seconds": round(seconds, 4),
            "images_per_s": round(images / seconds, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--dataset_mode", default="folder", help="layout of --data_dir")
    p.add_argument("--data_dir", default="", help="an existing dataset; default: a generated toy tree")
    p.add_argument("--image_size", type=positive_int, default=256, help="side of the loaded images")
    p.add_argument("--source_size", type=positive_int, default=512, help="toy image side on disk")
    p.add_argument("--num_images", type=positive_int, default=32, help="toy training images to generate")
    p.add_argument("--batch_size", type=positive_int, default=8, help="images per batch")
    p.add_argument("--batches", type=positive_int, default=8, help="timed batches per setting")
    p.add_argument("--num_workers", type=worker_counts, default="0,2",
                   help="comma-separated loader worker counts, each timed")
    add_deprecated_alias(p, "--workers", "--num_workers", dest="num_workers", type=worker_counts)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads in the main process")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if not data_dir:
            data_dir = make_toy_dataset(os.path.join(tmp, "toy"), num_train=args.num_images, num_test=0,
                                        size=args.source_size, seed=0)
        results = [measure(args, data_dir, w) for w in args.num_workers]
    config = {k: v for k, v in vars(args).items()}
    config["data_dir"] = args.data_dir or f"<generated toy tree, {args.source_size} px>"
    print(json.dumps({"benchmark": "loader_throughput", "machine": machine(), "config": config,
                      "results": results}, indent=2))


if __name__ == "__main__":
    run_cli(main)
