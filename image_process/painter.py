"""Painter noise (not in the paper): a careless human painter's map, at --image_size.

Every region's border is moved in (leaving an unlabeled rim) or out (spilling over its
neighbours) by a random 0..--max_shift pixels, regions are painted in random order, and regions
smaller than --small_area pixels are forgotten with probability --drop_prob.

    python -m image_process.painter --data_dir ADEChallengeData2016 --out_dir ade_painter
"""
import sys

from image_process.common import Noise, run_noise_cli
from scdm.runtime.cli import nonnegative_int, probability


def _add_args(p):
    p.add_argument("--max_shift", type=nonnegative_int, default=3, help="largest border move in pixels")
    p.add_argument("--small_area", type=nonnegative_int, default=64,
                   help="regions below this many pixels may be dropped")
    p.add_argument("--drop_prob", type=probability, default=0.5, help="probability a small region is dropped")


def _params(args):
    return {"max_shift": args.max_shift, "small_area": args.small_area, "drop_prob": args.drop_prob}


NOISE = Noise("painter", __doc__.splitlines()[0], _add_args, _params)


def main(argv=None) -> int:
    return run_noise_cli(NOISE, argv)


if __name__ == "__main__":
    sys.exit(main())
