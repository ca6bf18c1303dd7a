"""One command that scores a results folder written by the sampler and writes a JSON + markdown report.

    python -m evaluations.report --results RESULTS_DIR [--gt GT_DIR] [--dataset_mode ade20k] ...

Layout read: <results>/{images,labels,samples}/<name>.png, optional samples_0..samples_{K-1}/
and pred/ (segmenter predictions). Each metric runs when it applies and is otherwise reported as
"skipped: <why>"; a metric whose input is broken is reported as "failed: <why>" and the command
exits with code 2 after writing the report.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from evaluations.common import EvalError, list_images
from evaluations.miou import DATASETS as MIOU_DATASETS
from scdm.runtime.cli import HelpFormatter, add_deprecated_alias, device_name, nonnegative_int, positive_int
from scdm.runtime.errors import UserError, run_cli
from scdm.runtime.fileio import atomic_write, check_writable_file, write_json
from scdm.results_folder import MANIFEST, main_settings, read_manifest

SIZE_POLICY = ("the ground truth defines the size: differing images are resized to it "
               "(images bicubic, label maps nearest)")


def _status(fn):
    """Run one metric: (result dict, 'ok') or (None, 'failed: ...') for any user error (a bad
    file, a dataset that does not match its flags)."""
    try:
        return fn(), "ok"
    except UserError as e:
        return None, f"failed: {e}"


def sample_dir(results: Path) -> Path:
    """The set scored by FID: samples/ (or samples_0/ when there is no samples/)."""
    for name in ("samples", "samples_0"):
        if (results / name).is_dir():
            return results / name
    raise EvalError(f"{results} has neither samples/ nor samples_0/ (is it a sampler results folder?)")


def evaluate(results, gt=None, dataset: Optional[str] = None, num_classes: Optional[int] = None,
             ignore_index: Optional[int] = None, fid_weights: Optional[str] = None,
             lpips_weights: Optional[str] = None, num_sets: Optional[int] = None, batch_size: int = 50,
             device=None, dims: int = 2048, num_workers: int = 0, miou_gt: str = "clean") -> dict:
    """Every applicable metric of a results folder, as one JSON-ready dict. mIoU is scored against
    `miou_gt` (`evaluations.miou.ground_truth`): by default the clean annotations, also for samples
    of a noisy tree; FID against the real images."""
    from evaluations import fid as fid_mod, lpips as lpips_mod, miou as miou_mod
    results = Path(results)
    if not results.is_dir():
        raise EvalError(f"results folder not found: {results}")
    samples = sample_dir(results)
    gt_images = Path(gt) if gt is not None else results / "images"
    report = {"results": str(results.resolve()), "num_images": len(list_images(samples, "sample folder")),
              "settings": {"samples": str(samples), "gt_images": str(gt_images), "device": str(device or "auto"),
                           "batch_size": batch_size, "fid_dims": dims, "num_sets": num_sets or "auto",
                           "dataset": dataset, "num_classes": num_classes, "ignore_index": ignore_index,
                           "size_policy": SIZE_POLICY}}
    # What made the samples (the sampler's manifest), so that a score can be traced to its settings.
    report["manifest"], report["manifest_status"] = None, f"no {MANIFEST} (settings unknown)"
    if (results / MANIFEST).is_file():
        try:
            report["manifest"], report["manifest_status"] = read_manifest(results / MANIFEST), "ok"
        except UserError as e:
            report["manifest_status"] = f"unreadable: {e}"

    # FID: needs the Inception weights; the ground-truth statistics are cached in the results folder.
    entry = {"value": None, "dims": dims}
    try:
        weights = fid_mod.inception_weights(fid_weights, flag="--fid-weights")
    except UserError as e:
        entry["status"] = f"skipped: {e}"
    else:
        entry["weights"] = weights
        value, entry["status"] = _status(lambda: fid_mod.compute_fid(
            samples, gt_images, weights=weights, dims=dims, batch_size=batch_size, device=device,
            num_workers=num_workers, save_stats_path=results / "fid_gt_stats.npz"))
        entry["value"] = value
    report["fid"] = entry

    # LPIPS diversity: needs at least two sample sets.
    entry = {"value": None, "net": "alex"}
    try:
        sets = lpips_mod.find_sample_sets(results, num_sets)
    except UserError as e:
        sets, entry["status"] = [], f"failed: {e}"
    if "status" not in entry and len(sets) < 2:
        entry["status"] = f"skipped: needs at least 2 sample sets (samples_0..samples_K-1), found {len(sets)}"
    elif "status" not in entry:
        try:
            w = lpips_mod.backbone_weights(lpips_weights, flag="--lpips-weights")
        except UserError as e:
            entry["status"] = f"skipped: {e}"
        else:
            entry["weights"] = w
            res, entry["status"] = _status(lambda: lpips_mod.lpips_diversity(
                sets, weights=w, batch_size=batch_size, device=device, num_workers=num_workers))
            if res:
                entry.update(value=res["lpips"], num_sets=res["num_sets"], num_names=res["num_names"])
    report["lpips"] = entry

    # mIoU: segmenter predictions in pred/, or the exact toy segmenter for the toy dataset, against
    # the clean annotations (a noisy tree's source) unless --miou_gt says otherwise.
    pred = results / "pred"
    entry = {"value": None, "dataset": dataset, "gt": miou_gt}
    try:
        if miou_gt == "clean" and report["manifest"] is None and (results / MANIFEST).is_file():
            # Only the manifest says whether labels/ came from a noisy tree: never guess "clean".
            raise EvalError(f"{results / MANIFEST} is {report['manifest_status']}, so whether {results / 'labels'} "
                            "holds the clean annotations is unknown; pass --miou_gt noisy or --miou_gt DIR")
        gt_labels = miou_mod.ground_truth(results, miou_gt, report["manifest"])
    except UserError as e:
        gt_labels = None
        entry["status"] = f"skipped: {e}" if not (results / "labels").is_dir() and miou_gt in miou_mod.GT_CHOICES \
            else f"failed: {e}"
    if gt_labels is not None:
        entry.update(gt=gt_labels.kind, gt_labels=str(gt_labels.where), gt_description=gt_labels.description)
        if pred.is_dir():
            if dataset is None and num_classes is None:
                entry["status"] = (f"skipped: predictions found at {pred}, but neither --dataset_mode nor "
                                   "--num_classes was given")
            else:
                res, entry["status"] = _status(lambda: miou_mod.miou_of_folders(
                    pred, gt_labels, num_classes, dataset or "folder", ignore_index))
                entry["segmenter"] = "external (pred/)"
        elif dataset == "toy":
            res, entry["status"] = _status(lambda: miou_mod.miou_of_toy_samples(samples, gt_labels))
            entry["segmenter"] = "toy (exact)"
        else:
            entry["status"] = (f"skipped: no predictions at {pred} (run a segmenter, see evaluations/README.md; "
                               "--dataset_mode toy uses the built-in toy segmenter)")
    if entry["status"] == "ok":
        entry.update(value=res["miou"], pixel_accuracy=res["pixel_accuracy"], num_classes=res["num_classes"],
                     ignore_index=res["ignore_index"], classes_present=len(res["classes_present"]),
                     per_class_iou=res["per_class_iou"], class_names=res.get("class_names"))
    report["miou"] = entry
    return report


def markdown(report: dict) -> str:
    """The report as a markdown table."""
    def cell(entry, fmt):
        return fmt(entry["value"]) if entry["status"] == "ok" and entry["value"] is not None else entry["status"]

    def notes(entry, text):
        return text if entry["status"] == "ok" else ""

    f, l, m = report["fid"], report["lpips"], report["miou"]
    rows = [
        ("FID (lower is better)", cell(f, lambda v: f"{v:.4f}"),
         notes(f, f"Inception, {f['dims']} features, weights {f.get('weights')}")),
        ("LPIPS diversity (higher is better)", cell(l, lambda v: f"{v:.4f}"),
         notes(l, f"AlexNet, {l.get('num_sets')} sets x {l.get('num_names')} label maps")),
        ("mIoU % (higher is better)", cell(m, lambda v: f"{100 * v:.2f}"),
         notes(m, f"{m.get('segmenter')}, {m.get('num_classes')} classes, "
                  f"{m.get('classes_present')} present, dataset {m.get('dataset') or 'folder'}; "
                  f"against {m.get('gt_description')}")),
        ("images", str(report["num_images"]), report["settings"]["samples"]),
    ]
    lines = [f"# Evaluation of {report['results']}", "", "| metric | value | notes |", "|---|---|---|"]
    lines += [f"| {a} | {b.replace('|', '/')} | {c} |" for a, b, c in rows]
    lines += ["", "Settings:", ""] + [f"- {k}: {v}" for k, v in report["settings"].items()]
    lines += ["", "Samples made with:", ""]
    if report.get("manifest"):
        lines += [f"- {k}: {v}" for k, v in main_settings(report["manifest"])]
    else:
        lines.append(f"- {report.get('manifest_status')}")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m evaluations.report", formatter_class=HelpFormatter,
                                description=(
        "Score a sampler results folder (FID, LPIPS diversity, mIoU, whatever applies) and write "
        "<prefix>.json and <prefix>.md"))
    p.add_argument("--results", required=True, metavar="RESULTS_DIR", help="a sampler results folder")
    p.add_argument("--gt", default=None, metavar="GT_DIR", help="ground-truth images for FID; None: RESULTS_DIR/images")
    p.add_argument("--dataset_mode", "--dataset-mode", default=None, choices=MIOU_DATASETS,
                   help="dataset of the labels (mIoU's id mapping, ignored id and class count; toy: the toy segmenter)")
    add_deprecated_alias(p, "--dataset", "--dataset_mode", dest="dataset_mode")
    p.add_argument("--num_classes", "--num-classes", type=positive_int, default=None,
                   help="mIoU classes; None: the dataset's")
    p.add_argument("--ignore_index", "--ignore-index", type=nonnegative_int, default=None,
                   help="raw label id not scored by mIoU; None: the dataset's raw unlabeled id")
    p.add_argument("--miou_gt", "--miou-gt", default="clean", metavar="clean|noisy|DIR",
                   help="labels mIoU is scored against: clean (the clean annotations; for samples of a noisy tree, "
                        "those of the source dataset named in its corruption.json), noisy (the maps the model was "
                        "given), or a folder of label maps")
    p.add_argument("--num_sets", "--num-sets", type=positive_int, default=None,
                   help="LPIPS sample sets K; None: every consecutive samples_<k> folder")
    p.add_argument("--fid-weights", "--fid_weights", default=None,
                   help="pytorch-fid Inception weights ('random': tests)")
    p.add_argument("--lpips-weights", "--lpips_weights", default=None,
                   help="torchvision AlexNet weights ('random': tests)")
    p.add_argument("--dims", type=int, default=2048, choices=(64, 192, 768, 2048), help="FID Inception features")
    p.add_argument("-b", "--batch-size", "--batch_size", type=positive_int, default=50, help="images per network call")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1; None: cuda when available")
    p.add_argument("--num-workers", "--num_workers", type=nonnegative_int, default=0, help="data-loading processes")
    p.add_argument("--out-prefix", "--out_prefix", default="report",
                   help="output path prefix; a relative one is inside RESULTS_DIR")
    args = p.parse_args(argv)
    if args.dataset_mode is not None and args.dataset_mode not in MIOU_DATASETS:  # the alias skips `choices`
        p.error(f"--dataset_mode {args.dataset_mode!r}: choose one of {', '.join(MIOU_DATASETS)}")
    return args


def check_inputs(args):
    """The paths the flags name, before any work: a mistyped one would otherwise replace a good report
    with a failed one."""
    from evaluations.miou import GT_CHOICES
    if not args.out_prefix or Path(args.out_prefix).name in ("", ".", ".."):
        raise EvalError(f"--out-prefix {args.out_prefix!r}: expected a file name prefix such as report")
    if args.gt is not None and not Path(args.gt).is_dir():
        raise EvalError(f"--gt {args.gt}: not a folder of real images")
    if args.miou_gt not in GT_CHOICES and not Path(args.miou_gt).is_dir():
        raise EvalError(f"--miou_gt {args.miou_gt}: expected {' or '.join(GT_CHOICES)}, or a folder of label maps")
    for flag, path in (("--fid-weights", args.fid_weights), ("--lpips-weights", args.lpips_weights)):
        if path not in (None, "random") and not Path(path).is_file():
            raise EvalError(f"{flag} {path}: {'a folder' if Path(path).is_dir() else 'file not found'}; expected "
                            "the weights file")


def main(argv=None):
    args = parse_args(argv)
    check_inputs(args)
    prefix = Path(args.out_prefix)
    if not prefix.is_absolute():
        prefix = Path(args.results) / prefix
    if not Path(args.results).is_dir():
        raise EvalError(f"results folder not found: {args.results}")
    outputs = [prefix.with_name(prefix.name + ext) for ext in (".json", ".md")]
    for out in outputs:
        check_writable_file(out, "--out-prefix")
    report = evaluate(args.results, args.gt, args.dataset_mode, args.num_classes, args.ignore_index,
                      args.fid_weights, args.lpips_weights, args.num_sets, args.batch_size, args.device,
                      args.dims, args.num_workers, args.miou_gt)
    md = markdown(report)
    write_json(report, outputs[0])
    atomic_write(outputs[1], md)
    print(md, end="")
    print(f"wrote {prefix}.json and {prefix}.md", file=sys.stderr)
    failed = [k for k in ("fid", "lpips", "miou") if report[k]["status"].startswith("failed")]
    if failed:
        for k in failed:
            print(f"error: {k} {report[k]['status']}", file=sys.stderr)
        sys.exit(2)
    return report


if __name__ == "__main__":
    run_cli(main)
