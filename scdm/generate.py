"""Photos for your own label maps, no dataset tree needed:
`python -m scdm.generate --model_path RUN_FOLDER_OR_CHECKPOINT --labels maps/ --out generated/`.

Each label map (a PNG of class ids, of raw dataset ids with --raw_ids, or a picture in the model's
palette; a folder means every image in it) gets <out>/samples/<name>_<k>.png for k < --num_samples,
its colourised map <out>/labels_color/<name>.png and <out>/side_by_side/<name>.png (map | samples).
Seeds are per map name and sample (as in scdm.image_sample): the same seed gives the same files,
whatever else is in the folder. A map of another size than the model's is nearest-resized (a note says so).
"""
import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

from .runtime.cli import HelpFormatter
from .data.dataset_layouts import IMAGE_EXTENSIONS
from .runtime.errors import UserError, run_cli, warnings_as_lines
from .runtime.fileio import check_writable, save_image
from .figures import legend_entries, side_by_side
from .pipeline import SCDMPipeline
from .flags import GENERATE_FLAGS, LOAD_FLAGS, PIPELINE_FLAGS, add_flags, config_class

GenerateRun = config_class("GenerateRun", LOAD_FLAGS, PIPELINE_FLAGS, GENERATE_FLAGS,
                           doc="A parsed `scdm.generate` command line, frozen.")


def create_argparser():
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m scdm.generate", description=__doc__,
                                formatter_class=HelpFormatter)
    add_flags(p, LOAD_FLAGS + GENERATE_FLAGS + PIPELINE_FLAGS)
    return p


def list_label_maps(paths):
    """(name stem, path) of every label map named, folders expanded (sorted); stems must be unique."""
    found = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not f.name.startswith("."))
            if not files:
                raise UserError(f"--labels {path}: no label maps ({'/'.join(IMAGE_EXTENSIONS)}) in this folder")
            found += files
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"--labels {path} does not exist (expected label map files or folders)")
    stems = {}
    for f in found:
        if f.stem in stems and stems[f.stem] != f:
            raise UserError(f"--labels: {stems[f.stem]} and {f} share the name {f.stem!r}; outputs are named by it")
        stems[f.stem] = f
    return list(stems.items())


def main(argv=None):
    args = GenerateRun.from_namespace(create_argparser().parse_args(argv))
    maps = list_label_maps(args.labels)
    out = Path(args.out)
    check_writable(out, "--out")
    with warnings_as_lines():
        pipe = SCDMPipeline.from_checkpoint(args.model_path, device=args.device or None,
                                            precision=args.precision, preset=args.preset,
                                            class_schedule=args.class_schedule or None, use_ema=args.use_ema)
    print(f"note: {pipe.precision_note}", file=sys.stderr, flush=True)
    unlabeled_to_zero = pipe.is_scdm if args.unlabeled_to_zero is None else args.unlabeled_to_zero
    if pipe.unlabeled_id is not None:
        print(f"unlabeled pixels (id {pipe.unlabeled_id}) reach the model "
              f"{'as the [MASK] state' if unlabeled_to_zero else 'as the unlabeled class'} (--unlabeled_to_zero "
              f"{unlabeled_to_zero}{'' if args.unlabeled_to_zero is not None else ', the default for this model'})",
              file=sys.stderr, flush=True)
    for name, path in maps:
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always")
            ids = pipe.read_label_map(path, raw_ids=args.raw_ids, what=str(path))
            images = pipe(ids, num_samples=args.num_samples, steps=args.steps, guidance_scale=args.s, seed=args.seed,
                          sampler=args.sampler, eta=args.eta, extrapolation=args.extrapolation,
                          dynamic_threshold=args.dynamic_threshold, unlabeled_to_zero=unlabeled_to_zero,
                          batch_size=args.batch_size, names=[name], batch_invariant=args.batch_invariant)
        for n in notes:
            print(f"note: {n.message}", file=sys.stderr, flush=True)
        colour = pipe.colorize(ids)
        for k, img in enumerate(images):
            save_image(img, out / "samples" / f"{name}_{k}.png", format="PNG")
        save_image(colour, out / "labels_color" / f"{name}.png", format="PNG")
        titles = ["label map"] + [f"sample {k}" for k in range(len(images))]
        legend = legend_entries([np.asarray(colour)], pipe.colors, pipe.class_names)
        save_image(side_by_side([colour, *images], titles, legend=legend), out / "side_by_side" / f"{name}.png",
                   format="PNG")
        print(f"{name}: {len(images)} sample(s)", flush=True)
    print(f"wrote {len(maps) * args.num_samples} samples of {len(maps)} label map(s) to {out}", flush=True)


if __name__ == "__main__":
    run_cli(main)
