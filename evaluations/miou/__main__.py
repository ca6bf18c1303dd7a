"""python -m evaluations.miou --pred PRED_DIR --gt GT_DIR --num_classes N [--ignore_index I] [--dataset ...] [--out metrics.json]
   python -m evaluations.miou --segmenter toy --samples DIR --gt GT_DIR   (built-in toy data)"""
import argparse
import json

from evaluations.common import EvalError, atomic_write, run_cli
from evaluations.miou import DATASETS, miou_of_folders, miou_of_toy_samples


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m evaluations.miou", description=(
        "mIoU of segmenter predictions on samples against the ground-truth label maps "
        "(raw dataset ids; --dataset picks the id mapping and the ignored id)."))
    p.add_argument("--pred", default=None, metavar="PRED_DIR", help="predicted class ids 0..N-1, <name>.png")
    p.add_argument("--gt", required=True, metavar="GT_DIR", help="ground-truth label ids, <name>.png")
    p.add_argument("--num_classes", "--num-classes", type=int, default=None,
                   help="default: the dataset's (ade20k 150, coco 182, celeba 19, toy)")
    p.add_argument("--ignore_index", "--ignore-index", type=int, default=None,
                   help="raw ground-truth id that is not scored (default: the dataset's)")
    p.add_argument("--dataset", default="folder", choices=DATASETS)
    p.add_argument("--segmenter", default=None, choices=["toy"],
                   help="segment --samples with the exact toy segmenter instead of reading --pred")
    p.add_argument("--samples", default=None, metavar="DIR", help="images to segment (with --segmenter toy)")
    p.add_argument("--save_pred", "--save-pred", default=None, metavar="DIR",
                   help="with --segmenter toy: also write the predictions here")
    p.add_argument("--out", default=None, metavar="metrics.json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.segmenter == "toy":
        if args.samples is None or args.pred is not None:
            raise EvalError("--segmenter toy takes --samples DIR (the images to segment), not --pred")
        if args.dataset not in ("toy", "folder") or args.num_classes is not None or args.ignore_index is not None:
            raise EvalError("--segmenter toy scores toy labels: leave out --dataset/--num_classes/--ignore_index")
        res = miou_of_toy_samples(args.samples, args.gt, save_pred=args.save_pred)
    else:
        if args.pred is None:
            raise EvalError("give --pred PRED_DIR (segmenter output), or --segmenter toy --samples DIR")
        res = miou_of_folders(args.pred, args.gt, args.num_classes, args.dataset, args.ignore_index)
    miou = "n/a" if res["miou"] is None else f"{res['miou']:.6f}"
    print(f"mIoU: {miou}  pixel accuracy: {res['pixel_accuracy']:.6f}  ({res['num_images']} images, "
          f"{len(res['classes_present'])} of {res['num_classes']} classes present)")
    if args.out:
        atomic_write(args.out, json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    run_cli(main)
