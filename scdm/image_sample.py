"""Sample images for the label maps of a dataset split:
`python -m scdm.image_sample --model_path LOG_DIR/ema_0.9999_050000.pt --data_dir ... --results_path ...`.

The model flags come from the run config (args.json) beside the checkpoint; a released checkpoint
needs `--preset ade20k|coco|celeba|cityscapes|toy` (or every model flag, the released way).

Writes <results_path>/{images,labels,samples}/<name>.png (ground truth, raw label ids, sample), coloured
labels in labels_color/, K sample sets in samples_0..samples_{K-1}/ with --num_sets K, overview.png, and
manifest.json (what made the folder). Seeds are per image and set, so the output does not depend on the
number of ranks or the batch size; a rerun with the same settings skips the images already written, one
with other settings is refused (or starts over with --overwrite). A noisy tree made by image_process
(<data_dir>/corruption.json) turns on --label_resize by itself.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .runtime import dist_util, rank_faults
from .checkpoint import CheckpointError
from .runtime.cli import HelpFormatter, note_gpus_per_node
from .data.conditioning import Conditioning
from .data.dataset_layouts import CORRUPTION_FILE, display_names
from .data.datasets import build_dataset, iter_user_errors_clean
from .runtime.errors import UserError, run_cli
from .fast.fast_paths import from_disable_spec, route_details, summary_line
from .figures import write_overview
from .runtime.fileio import note_removed_temp_files, save_image
from .flags import (DIFFUSION_FLAGS, LAUNCH_FLAGS, MODEL_FLAGS, SAMPLE_FLAGS, add_flags, as_sampling_flag,
                    config_class, for_command_line)
from .loading import resolve_checkpoint
from .data.palettes import colorize, palette, palette_name
from .fast.performance import maybe_compile, precision_context, precision_note, resolve_precision
from .results_folder import (build_manifest, check_results_path, plan_results, prepare_results, read_corruption,
                             sample_dirs, unlabeled_handling)
from .run_config import given_flags
from .diffusion.sampling import SamplerSettings, image_generators, resolve_sampler, sample_batch, to_uint8
from .script_util import model_and_diffusion_defaults
from .fast.tuning_cache import reuse_record, write_record
from .runtime.stop_signals import worker_options

def sampling_run_flags():
    """Every flag of a sampling run, in --help order: the model flags say that their value comes from
    the checkpoint's run."""
    model_flags = {f.name: as_sampling_flag(f) for f in for_command_line(MODEL_FLAGS + DIFFUSION_FLAGS)}
    return (SAMPLE_FLAGS[0], model_flags.pop("dataset_mode"), *SAMPLE_FLAGS[1:], *model_flags.values(), *LAUNCH_FLAGS)


SampleRun = config_class("SampleRun", sampling_run_flags(), doc="The flags of one sampling run, resolved and frozen.")


def create_argparser():
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=HelpFormatter)
    add_flags(parser, sampling_run_flags())
    return parser


def save_png(array, path):
    """Atomic (`scdm.runtime.fileio`): a run killed mid-write leaves no broken PNG that a rerun would skip."""
    save_image(array, path, format="PNG")


# ----------------------------------------------------------------------------------------- main
def sampler_settings(args):
    """The `SamplerSettings` of the sampling flags, checked once."""
    if args.use_ddim and args.sampler not in ("", "ddim"):
        raise ValueError(f"--sampler {args.sampler} with --use_ddim True: give one of them (--use_ddim means "
                         "--sampler ddim)")
    return SamplerSettings(sampler=resolve_sampler(args.sampler, args.use_ddim), guidance_scale=args.s,
                           extrapolation=args.extrapolation, dynamic_threshold=args.dynamic_threshold,
                           clip_denoised=args.clip_denoised, eta=args.eta, unlabeled_to_zero=args.unlabeled_to_zero,
                           batch_invariant=args.batch_invariant, respacing=args.timestep_respacing)


def info_line(rank, text, prefix="note"):
    if rank == 0:
        print(f"{prefix}: {text}", file=sys.stderr, flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parsed = create_argparser().parse_args(argv)
    given = given_flags(create_argparser, argv)
    note_gpus_per_node(parsed)
    if not parsed.seed_align:
        raise UserError("--seed_align False is not available: every image's noise comes from its own seeded stream, "
                        "so clean and noisy runs of the same maps always share their draws")
    fast_paths = from_disable_spec(parsed.disable_fast_paths)
    settings = sampler_settings(parsed)
    if not parsed.data_dir:
        raise UserError("--data_dir is required: the folder of label maps to sample (a dataset, or a noisy tree "
                        "made by image_process)")
    model_keys = set(model_and_diffusion_defaults())
    spec = resolve_checkpoint(parsed.model_path, preset=parsed.preset, use_ema=parsed.use_ema,
                              ema_rate=parsed.ema_rate, flags={k: getattr(parsed, k) for k in model_keys},
                              given=given & model_keys, data_dir=parsed.data_dir)
    root = check_results_path(parsed.results_path, parsed.data_dir)
    for folder in [root, *(d for d in root.iterdir() if d.is_dir())] if root.is_dir() else []:
        note_removed_temp_files(folder)  # left by a killed earlier run into this folder
    corruption = read_corruption(parsed.data_dir)
    resized_by_tree = corruption is not None and not parsed.label_resize and "label_resize" not in given
    # The run's settings, resolved once: the checkpoint's model flags, what the sampler runs, and label
    # resizing for a noisy tree (the parsed flags stay as given).
    args = SampleRun(**{**vars(parsed), **spec.flags, "sampler": settings.sampler,
                        "label_resize": parsed.label_resize or resized_by_tree})
    # auto and empty follow the model's --use_fp16 (the run's); an explicit precision only meets a given one.
    follows_model = args.precision in ("", "auto") or "use_fp16" in given
    precision = resolve_precision(args.precision, args.use_fp16 if follows_model else False, dist_util.dev())

    dist_util.setup_dist()
    try:
        with rank_faults.watched():
            run(args, spec, settings, root, corruption, resized_by_tree, precision, fast_paths)
    finally:
        dist_util.cleanup()


def run(args, spec, settings, root, corruption, resized_by_tree, precision, fast_paths):
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    info = spec.dataset
    if spec.preset_ignored:
        info_line(rank, f"--preset {args.preset} not used for {', '.join(spec.preset_ignored)}: the {spec.source} "
                        "gives the model flags")
    if resized_by_tree:
        info_line(rank, f"{Path(args.data_dir) / CORRUPTION_FILE}: a noisy tree ({corruption.get('noise')} "
                        f"{json.dumps(corruption.get('params'))}); label maps are resized to their images "
                        "(--label_resize True)")
    if args.cond_diffuse and corruption is None and info.unlabeled_id is not None:
        info_line(rank, f"unlabeled pixels (id {info.unlabeled_id}) reach the model {unlabeled_handling(args)} "
                        f"(--unlabeled_to_zero {args.unlabeled_to_zero}); "
                        + ("" if args.unlabeled_to_zero else "for the holes of a noisy tree made elsewhere pass "
                           "--unlabeled_to_zero True (the [MASK] state), or register the tree with "
                           "`python -m image_process.describe`"))
    conditioning = Conditioning(args.num_classes, args.no_instance, info.unlabeled_id,
                                unlabeled_to_zero=settings.unlabeled_to_zero)
    model = spec.build_model(fast_paths)
    diffusion = spec.diffusion()
    warning = spec.ema_warning()
    if warning:
        info_line(rank, warning, "warning")
    info_line(rank, precision_note(args.precision, precision, dist_util.dev(), use_fp16=args.use_fp16))
    model_path = spec.path

    dataset = build_dataset(args.dataset_mode, args.data_dir, args.image_size, is_train=args.is_train,
                            info=info, label_resize=args.label_resize, shard=0, num_shards=1)
    manifest = build_manifest(args, model_path, spec.model_flags, precision, corruption)
    plan, old = plan_results(root, manifest, args.overwrite)
    dist_util.barrier()
    if rank == 0:
        prepare_results(root, plan, old, manifest, args.num_sets)
    dist_util.barrier()

    device = dist_util.dev()
    model.to(device).eval()
    tuner = model.autotuner
    reuse_record(root, tuner, device)  # a resumed folder runs the kernels it ran with
    if args.compile:
        model = maybe_compile(model, True)
    total = len(dataset) if args.num_samples < 0 else min(args.num_samples, len(dataset))
    if len(dataset) < args.num_samples:
        info_line(rank, f"--num_samples {args.num_samples}: --data_dir {args.data_dir} has {len(dataset)} label "
                        f"map(s); sampling all {len(dataset)}")
    mine = list(range(rank, total, world))  # fixed order; shards never overlap, uneven counts are fine
    loader = DataLoader(Subset(dataset, mine), batch_size=args.batch_size, shuffle=False,
                        **worker_options(args.num_workers))
    colors = palette(palette_name(args.dataset_mode, args.data_dir), args.num_classes, info.unlabeled_id)
    out_dirs = sample_dirs(args.num_sets)
    steps = diffusion.num_timesteps
    # One bar over images x sets x steps; quiet on other ranks and when stderr is not a terminal.
    bar = tqdm(total=len(mine) * args.num_sets * steps, desc="sampling", unit="step", dynamic_ncols=True,
               disable=None if rank == 0 else True)
    new, said_fast_paths = 0, False
    route_details(*([lambda line: tqdm.write(line, file=sys.stderr)] if args.verbose and rank == 0 else []))
    for images, cond in iter_user_errors_clean(loader):
        batch_names = [Path(p).stem for p in cond["path"]]
        todo = [i for i, n in enumerate(batch_names)
                if not all((root / d / f"{n}.png").exists() for d in ["images", "labels", *out_dirs])]
        bar.update((len(batch_names) - len(todo)) * args.num_sets * steps)
        if not todo:
            continue
        y = conditioning.model_input(cond)[todo]
        for k in range(args.num_sets):
            gens = image_generators(args.seed, [batch_names[i] for i in todo], k)
            with torch.no_grad(), precision_context(device, precision, model=model):
                x = sample_batch(model, diffusion, y, settings, generators=gens, device=device,
                                 on_step=lambda: bar.update(len(todo)))
            if not torch.isfinite(x).all():
                raise CheckpointError(
                    f"--model_path {model_path} gave non-finite samples (NaN or Inf) for "
                    f"{', '.join(batch_names[i] for i in todo)}; nothing was written for them"
                    + ("; fp16 can overflow: try --precision bf16 or fp32" if precision == "fp16" else ""))
            if not said_fast_paths:  # the first batch timed the fast paths: one line about it
                said_fast_paths = True
                line = summary_line(tuner) if rank == 0 else None
                if line:
                    tqdm.write(line + ("" if args.verbose else " (each choice: --verbose)"), file=sys.stderr)
                if rank == 0:
                    write_record(root, tuner, device)
            for j, i in enumerate(todo):
                img = to_uint8(x[j].float())
                targets = [f"samples_{k}"] if args.num_sets > 1 else []
                if k == 0:
                    targets.append("samples")
                for d in targets:
                    save_png(img, root / d / f"{batch_names[i]}.png")
        for i in todo:
            n = batch_names[i]
            raw = cond["label_ori"][i, 0].numpy().astype(np.int64)
            ids = cond["label"][i, 0].numpy().astype(np.int64)
            save_png(raw.astype(np.uint8 if raw.max() < 256 else np.uint16), root / "labels" / f"{n}.png")
            save_png(colorize(ids, colors), root / "labels_color" / f"{n}.png")
            save_png(to_uint8(images[i]), root / "images" / f"{n}.png")
        new += len(todo)
    bar.close()
    dist_util.barrier()
    if rank == 0:
        write_record(root, tuner, device)
        all_names = sorted(p.stem for p in (root / "samples").glob("*.png"))
        write_overview(root, all_names, colors=colors,
                       class_names=display_names(args.dataset_mode, args.num_classes, args.data_dir, info.unlabeled_id))
        if world == 1:
            earlier = len(all_names) - new
            print(f"wrote {new} samples to {root}" + (f"; {earlier} more are from an earlier run with the same "
                                                      "settings" if earlier > 0 else ""), flush=True)
        else:
            print(f"{root} holds {len(all_names)} samples", flush=True)


if __name__ == "__main__":
    run_cli(main)
