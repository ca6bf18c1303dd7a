"""The class ids of a dataset, for drawing your own label maps: `python -m scdm.classes ade20k [--json]`.

Each row is a class id as the model (and `scdm.generate`, the pipeline and the painter) takes it, the id
stored in the dataset's own label files (what `--raw_ids` reads; ADE20K stores 0 for unlabeled and k + 1
for class k), the name, and the colour the painter and the coloured maps use for it. A folder dataset
(`--data_dir` with its dataset.json) lists its own classes; `toy` is the built-in toy data.
"""
import argparse
import json
import sys

from .runtime.cli import HelpFormatter
from .data.dataset_layouts import LAYOUTS, dataset_info, display_names, get_layout
from .runtime.errors import UserError, run_cli
from .data.palettes import TOY, palette, palette_name, to_hex

DATASETS = tuple(sorted(set(LAYOUTS) - {"folder"})) + ("folder", TOY)


def class_table(dataset, data_dir=None):
    """[{id, raw_id, name, color}] by class id; the one table the own-maps doc and the painter show."""
    if dataset == TOY:
        from .toy import TOY_CLASSES, TOY_UNLABELED_ID
        names = [c.name for c in TOY_CLASSES]
        colors = to_hex(palette(TOY, len(names), TOY_UNLABELED_ID))
        return [{"id": k, "raw_id": k, "name": n, "color": colors[k]} for k, n in enumerate(names)]
    if dataset == "folder" and not data_dir:
        raise UserError("a folder dataset's classes are in its dataset.json: pass --data_dir DATASET_ROOT")
    info = dataset_info(dataset, data_dir)
    layout = get_layout(dataset)
    names = display_names(dataset, info.num_classes, data_dir, info.unlabeled_id)
    colors = to_hex(palette(palette_name(dataset, data_dir), info.num_classes, info.unlabeled_id))
    rows = []
    for k in range(info.num_classes):
        if layout.raw_unlabeled_id is not None and k == layout.unlabeled_class:
            raw = layout.raw_unlabeled_id
        else:
            raw = k + layout.id_shift
        rows.append({"id": k, "raw_id": raw, "name": names[k], "color": colors[k]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m scdm.classes", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("dataset", choices=DATASETS, help="dataset whose classes to list")
    p.add_argument("--data_dir", default=None, help="the dataset root (folder datasets: where dataset.json is)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = p.parse_args(argv)
    rows = class_table(args.dataset, args.data_dir)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'id':>4}  {'raw id':>6}  {'colour':7}  name")
    for r in rows:
        print(f"{r['id']:>4}  {r['raw_id']:>6}  {r['color']:7}  {r['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main) or 0)
