"""python -m evaluations.lpips --results RESULTS_DIR [--num_sets K] [-b 50] [--device] [--net alex] [--weights PATH]"""
import argparse

from evaluations.lpips import NETS, backbone_file, find_sample_sets, lpips_diversity
from scdm.runtime.cli import HelpFormatter, device_name, int_at_least, nonnegative_int, positive_int
from scdm.runtime.errors import run_cli
from scdm.runtime.fileio import check_writable_file, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m evaluations.lpips", formatter_class=HelpFormatter,
                                description=(
        "Diversity: LPIPS averaged over all pairs of the K samples of each label map, then over "
        "label maps. Sets: RESULTS_DIR/samples_0 .. samples_{K-1} (set 0 may be samples/)."))
    p.add_argument("--results", required=True, metavar="RESULTS_DIR", help="a sampler results folder")
    p.add_argument("--num_sets", "--num-sets", type=int_at_least(2), default=None,
                   help="K; None: every consecutive samples_<k> folder")
    p.add_argument("-b", "--batch-size", "--batch_size", type=positive_int, default=50,
                   help="image pairs per network call")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1; None: cuda when available")
    p.add_argument("--net", default="alex", choices=NETS, help="LPIPS backbone (the released protocol: alex)")
    p.add_argument("--weights", default=None, help=(
        f"torchvision backbone state dict (alex: '{backbone_file('alex')}'; None: from "
        "$TORCH_HOME/hub/checkpoints/); 'random' = random backbone, for tests only"))
    p.add_argument("--num-workers", "--num_workers", type=nonnegative_int, default=0, help="data-loading processes")
    p.add_argument("--out", default=None, metavar="JSON", help="also write the result (with per-name values)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.out:
        check_writable_file(args.out, "--out")
    sets = find_sample_sets(args.results, args.num_sets)
    res = lpips_diversity(sets, weights=args.weights, net=args.net, batch_size=args.batch_size,
                          device=args.device, num_workers=args.num_workers)
    print(f"LPIPS diversity: {res['lpips']:.6f} ({res['num_sets']} sets, {res['num_names']} label maps, "
          f"{res['num_pairs']} pairs each)")
    if args.out:
        write_json(dict(res, net=args.net), args.out)
    return res


if __name__ == "__main__":
    run_cli(main)
