"""Edge benchmark: at --image_size, pixels within L1 distance --radius of a boundary set to unlabeled.

Boundaries come from the instance maps (coco, cityscapes, folder with instances/) or the label map
(ade20k; celeba, whose label map doubles as instance map).

    python -m image_process.edge --data_dir ADEChallengeData2016 --out_dir ade_edge [--radius 2]
"""
import sys

from image_process.common import Noise, run_noise_cli
from scdm.runtime.cli import nonnegative_int


def _add_args(p):
    p.add_argument("--radius", type=nonnegative_int, default=2, help="diamond radius |dx|+|dy| <= r (paper: 2)")


def _params(args):
    return {"radius": args.radius}


NOISE = Noise("edge", __doc__.splitlines()[0], _add_args, _params)


def main(argv=None) -> int:
    return run_noise_cli(NOISE, argv)


if __name__ == "__main__":
    sys.exit(main())
