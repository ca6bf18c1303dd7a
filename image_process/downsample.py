"""DS benchmark: annotations resized to 64x64 with nearest; the loader brings them back up.

    python -m image_process.downsample --data_dir ADEChallengeData2016 --out_dir ade_ds [--size 64]
"""
import sys

from image_process.common import Noise, run_noise_cli
from scdm.runtime.cli import positive_int


def _add_args(p):
    p.add_argument("--size", type=positive_int, default=64, help="side of the downsampled map (paper: 64)")


def _params(args):
    return {"size": args.size}


NOISE = Noise("downsample", __doc__.splitlines()[0], _add_args, _params, resize=False)


def main(argv=None) -> int:
    return run_noise_cli(NOISE, argv)


if __name__ == "__main__":
    sys.exit(main())
