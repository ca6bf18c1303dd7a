"""python -m evaluations.miou --pred PRED_DIR --gt GT_DIR --dataset_mode ade20k [--num_classes N] [--ignore_index I]
                              [--out metrics.json]
   python -m evaluations.miou --segmenter toy --samples DIR --gt GT_DIR [--save_pred_dir DIR]   (toy data)
   python -m evaluations.miou --results RESULTS_DIR [--miou_gt clean|noisy|DIR] ...   (a sampler results folder:
       its samples, its pred/ or the toy segmenter, against the clean annotations by default)"""
import argparse

from evaluations.common import EvalError
from evaluations.miou import DATASETS, dataset_preset, ground_truth, miou_of_folders, miou_of_toy_samples
from scdm.runtime.cli import HelpFormatter, add_deprecated_alias, nonnegative_int, positive_int
from scdm.runtime.errors import run_cli
from scdm.runtime.fileio import check_writable, check_writable_file, write_json


def _presets() -> str:
    parts = []
    for d in DATASETS:
        n, ignore, shift = dataset_preset(d)
        notes = [f"raw {ignore} ignored"] if ignore is not None else []
        notes += [f"raw k -> class k-{shift}"] if shift else []
        if n is not None:
            parts.append(f"{d} {n}" + (f" ({', '.join(notes)})" if notes else ""))
    return ", ".join(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m evaluations.miou", formatter_class=HelpFormatter,
                                description=(
        "mIoU of segmenter predictions on samples against the ground-truth label maps "
        "(raw dataset ids; --dataset_mode picks the id mapping and the ignored id)."))
    p.add_argument("--pred", default=None, metavar="PRED_DIR", help="predicted class ids 0..N-1, <name>.png")
    p.add_argument("--gt", default=None, metavar="GT_DIR", help="ground-truth label ids, <name>.png (required "
                   "without --results)")
    p.add_argument("--results", default=None, metavar="RESULTS_DIR",
                   help="a sampler results folder: scores its samples (pred/ when present, else --segmenter toy) "
                        "against --miou_gt")
    p.add_argument("--miou_gt", "--miou-gt", default="clean", metavar="clean|noisy|DIR",
                   help="with --results: clean (the clean annotations; for a noisy tree's samples, those of its "
                        "source dataset), noisy (the maps the model was given), or a label folder")
    p.add_argument("--num_classes", "--num-classes", type=positive_int, default=None,
                   help=f"scored classes; default the dataset's: {_presets()}")
    p.add_argument("--ignore_index", "--ignore-index", type=nonnegative_int, default=None,
                   help="raw ground-truth id that is not scored; None: the dataset's raw unlabeled id")
    p.add_argument("--dataset_mode", "--dataset-mode", default="folder", choices=DATASETS,
                   help="dataset of the ground truth (its id mapping, ignored id and class count)")
    add_deprecated_alias(p, "--dataset", "--dataset_mode", dest="dataset_mode")
    p.add_argument("--segmenter", default=None, choices=["toy"],
                   help="segment --samples with the exact toy segmenter instead of reading --pred")
    p.add_argument("--samples", default=None, metavar="DIR", help="images to segment (with --segmenter toy)")
    p.add_argument("--save_pred_dir", "--save-pred-dir", default=None, metavar="DIR",
                   help="with --segmenter toy: also write the predictions here")
    for old in ("--save_pred", "--save-pred"):
        add_deprecated_alias(p, old, "--save_pred_dir", dest="save_pred_dir")
    p.add_argument("--out", default=None, metavar="metrics.json", help="also write the result as JSON")
    args = p.parse_args(argv)
    if args.dataset_mode not in DATASETS:  # the deprecated alias bypasses `choices`
        p.error(f"--dataset_mode {args.dataset_mode!r}: choose one of {', '.join(DATASETS)}")
    return args


def _from_results(args):
    """--results: the samples, predictions and ground truth of a sampler results folder."""
    from pathlib import Path

    from evaluations.report import sample_dir
    from scdm.results_folder import MANIFEST, read_manifest
    if args.gt is not None:
        raise EvalError("--results finds the ground truth itself: use --miou_gt clean|noisy|DIR instead of --gt")
    results = Path(args.results)
    if not results.is_dir():
        raise EvalError(f"--results {results}: results folder not found")
    manifest = read_manifest(results / MANIFEST) if (results / MANIFEST).is_file() else None
    gt = ground_truth(results, args.miou_gt, manifest)
    print(f"mIoU against {gt.description}")
    if (results / "pred").is_dir() and args.segmenter is None and args.pred is None:
        args.pred = str(results / "pred")
    if args.pred is None and args.samples is None:
        args.samples = str(sample_dir(results))
    if args.dataset_mode == "toy" and args.pred is None:
        args.segmenter, args.dataset_mode = "toy", "folder"
    return gt


def check_outputs_spare_inputs(args, gt):
    """--save_pred_dir and --out never write into the folders being scored (a prediction saved over a
    sample, a JSON over a label map): refused before any work."""
    from pathlib import Path
    inputs = {flag: Path(str(where)).resolve() for flag, where in
              (("--samples", args.samples), ("--pred", args.pred), ("--gt", getattr(gt, "where", gt))) if where}
    if args.save_pred_dir:
        if args.pred is not None:
            raise EvalError("--save_pred_dir saves the toy segmenter's predictions; with --pred they exist already")
        out = Path(args.save_pred_dir).resolve()
        for flag, where in inputs.items():
            if out == where or where in out.parents or out in where.parents:
                raise EvalError(f"--save_pred_dir {args.save_pred_dir} overlaps the {flag} folder {where}, whose files "
                                "it would replace; choose another folder")
    if args.out:
        out = Path(args.out).resolve()
        for flag, where in inputs.items():
            if where in out.parents:
                raise EvalError(f"--out {args.out} lies in the {flag} folder {where}; choose a path outside it")
        if out.is_file() and out.suffix.lower() != ".json":
            raise EvalError(f"--out {args.out} exists and is not a .json file; expected the path of the metrics JSON")


def main(argv=None):
    args = parse_args(argv)
    gt = _from_results(args) if args.results else args.gt
    if gt is None:
        raise EvalError("give --gt GT_DIR (the ground-truth label maps), or --results RESULTS_DIR")
    check_outputs_spare_inputs(args, gt)
    if args.out:
        check_writable_file(args.out, "--out")
    if args.save_pred_dir:
        check_writable(args.save_pred_dir, "--save_pred_dir")
    if args.segmenter == "toy":
        if args.samples is None or args.pred is not None:
            raise EvalError("--segmenter toy takes --samples DIR (the images to segment), not --pred")
        if args.dataset_mode not in ("toy", "folder") or args.num_classes is not None or args.ignore_index is not None:
            raise EvalError("--segmenter toy scores toy labels: leave out --dataset_mode/--num_classes/--ignore_index")
        res = miou_of_toy_samples(args.samples, gt, save_pred=args.save_pred_dir)
    else:
        if args.pred is None:
            raise EvalError("give --pred PRED_DIR (segmenter output), or --segmenter toy --samples DIR")
        res = miou_of_folders(args.pred, gt, args.num_classes, args.dataset_mode, args.ignore_index)
    miou = "n/a" if res["miou"] is None else f"{res['miou']:.6f}"
    print(f"mIoU: {miou}  pixel accuracy: {res['pixel_accuracy']:.6f}  ({res['num_images']} images, "
          f"{len(res['classes_present'])} of {res['num_classes']} classes present)")
    if args.results:
        res = dict(res, gt=gt.kind, gt_labels=str(gt.where), gt_description=gt.description)
    if args.out:
        write_json(res, args.out)
    return res


if __name__ == "__main__":
    run_cli(main)
