"""Register a noisy tree made elsewhere (e.g. the released noisy ADE20K sets) so that it samples and
scores like one image_process made:

    python -m image_process.describe --data_dir ADE_edge --clean_dir ADEChallengeData2016 [--noise edge]

It pairs each noisy label map with the clean one of the same name, measures what changed, and writes
`corruption.json` at the root of --data_dir: the noise, the changed share of the pixels and the clean
source. From then on the sampler reads the tree's holes as the [MASK] state (scripts/sample.sh) and
resizes DS maps to their images, and `evaluations.report` scores its samples against the clean
annotations. Nothing else in the tree is touched.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from image_process.common import InputError, default_fill
from scdm.runtime.cli import HelpFormatter, add_bool_argument
from scdm.data.corruptions import boundary_mask, resize_nearest
from scdm.data.dataset_layouts import CORRUPTION_FILE, LAYOUTS, DatasetError, get_layout, list_records, read_ids
from scdm.runtime.errors import run_cli
from scdm.runtime.fileio import check_writable_file, write_json

NOISES = ("ds", "edge", "random")
# Edge holes lie along the clean map's class boundaries (within BOUNDARY_RADIUS); Random holes anywhere.
EDGE_NEAR_BOUNDARY = 0.9
BOUNDARY_RADIUS = 3


def compare(noisy_records, clean_records, fill: int) -> dict:
    """What the noise did, over every map of the noisy tree: changed share, size changes, holes."""
    clean = {Path(r.image).stem: Path(r.label) for r in clean_records}
    missing = [Path(r.image).stem for r in noisy_records if Path(r.image).stem not in clean]
    if missing:
        raise InputError(f"{len(missing)} map(s) of --data_dir have no clean map of the same name in --clean_dir, "
                         f"e.g. {missing[0]}: is --clean_dir the tree it was made from (and --split the same)?")
    changed = pixels = resized = holes = holes_near_edge = 0
    for r in noisy_records:
        noisy_ids = read_ids(r.label, "noisy label map")
        clean_ids = read_ids(clean[Path(r.image).stem], "clean label map")
        if noisy_ids.shape != clean_ids.shape:
            resized += 1
            noisy_ids = resize_nearest(noisy_ids, clean_ids.shape)
        diff = noisy_ids != clean_ids
        changed += int(diff.sum())
        pixels += diff.size
        hole = diff & (noisy_ids == fill)
        holes += int(hole.sum())
        holes_near_edge += int((hole & boundary_mask(clean_ids, BOUNDARY_RADIUS)).sum())
    return {"num": len(noisy_records), "changed_fraction": round(changed / max(pixels, 1), 6),
            "resized_maps": resized, "changed_to_unlabeled": round(holes / max(changed, 1), 6),
            "holes_near_boundaries": round(holes_near_edge / max(holes, 1), 6)}


def guess_noise(stats: dict) -> str:
    """DS moves class boundaries (few changed pixels become unlabeled); Edge and Random punch holes
    of the unlabeled id, Edge along the clean map's boundaries."""
    if stats["changed_to_unlabeled"] < 0.5:
        return "ds"
    if stats["holes_near_boundaries"] >= EDGE_NEAR_BOUNDARY:
        return "edge"
    return "random"


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m image_process.describe",
                                description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data_dir", required=True, help="the noisy tree (same layout as --clean_dir)")
    p.add_argument("--clean_dir", required=True, help="the clean dataset it was made from")
    p.add_argument("--dataset_mode", default="ade20k", choices=sorted(LAYOUTS), help="layout of both trees")
    p.add_argument("--split", default=None, help="split folder of both trees; default the layout's test split")
    p.add_argument("--noise", default=None, choices=NOISES,
                   help="the noise that made the tree; default: guessed from the maps (ds: boundaries moved, few "
                        "holes; edge: holes along class boundaries; random: holes anywhere)")
    add_bool_argument(p, "--overwrite", default=False,
                      help="replace an existing corruption.json (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    data_dir, clean_dir = Path(args.data_dir), Path(args.clean_dir)
    out = data_dir / CORRUPTION_FILE
    if not data_dir.is_dir():
        raise InputError(f"--data_dir {data_dir} is not a folder")
    if data_dir.resolve() == clean_dir.resolve():
        raise InputError(f"--data_dir and --clean_dir are the same folder ({data_dir})")
    if out.exists() and not args.overwrite:
        raise InputError(f"{out} already exists (the tree is registered); --overwrite True replaces it")
    check_writable_file(out, "--data_dir")
    split = args.split or get_layout(args.dataset_mode).splits[1]
    records = {}
    for flag, folder in (("--data_dir", data_dir), ("--clean_dir", clean_dir)):
        if not folder.is_dir():
            raise InputError(f"{flag} {folder} is not a folder")
        try:
            records[flag] = list_records(args.dataset_mode, folder, is_train=False, split=split)
        except DatasetError as e:
            raise InputError(f"{flag} {folder}: {e}") from None
    noisy_records, clean_records = records["--data_dir"], records["--clean_dir"]
    fill = default_fill(args.dataset_mode, clean_dir)
    stats = compare(noisy_records, clean_records, fill)
    noise = args.noise or guess_noise(stats)
    meta = {"noise": noise, "params": {}, "data_dir": str(clean_dir.resolve()), "dataset_mode": args.dataset_mode,
            "split": split, "fill": fill, **stats,
            "registered_by": "image_process.describe" + ("" if args.noise else " (noise guessed from the maps)")}
    write_json(meta, out, sort_keys=True)
    how = "given" if args.noise else "guessed; --noise sets it"
    print(f"wrote {out}: {noise} ({how}), {100 * stats['changed_fraction']:.2f}% of {stats['num']} maps' pixels "
          f"changed, clean source {clean_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main) or 0)
