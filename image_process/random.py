"""Random benchmark: at --image_size, each pixel independently set to unlabeled with probability --p.

Run it as ``python -m image_process.random`` (as a module it does not shadow Python's ``random``).

    python -m image_process.random --data_dir ADEChallengeData2016 --out_dir ade_random [--p 0.1]
"""
import sys

from image_process.common import Noise, run_noise_cli
from scdm.runtime.cli import probability


def _add_args(p):
    p.add_argument("--p", type=probability, default=0.1, help="probability per pixel (paper: 0.1)")


def _params(args):
    return {"p": args.p}


NOISE = Noise("random", __doc__.splitlines()[0], _add_args, _params)


def main(argv=None) -> int:
    return run_noise_cli(NOISE, argv)


if __name__ == "__main__":
    sys.exit(main())
