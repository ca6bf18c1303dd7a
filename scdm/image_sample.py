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

from . import dist_util, rank_faults, script_util
from .checkpoint import CheckpointError
from .cli import (HelpFormatter, accept_gpus_per_node, add_bool_argument, float_in, minus_one_or_positive,
                  nonnegative_int, note_gpus_per_node, one_of, positive_int, probability, rate_list)
from .conditioning import Conditioning
from .dataset_layouts import CORRUPTION_FILE, display_names
from .datasets import build_dataset, iter_user_errors_clean
from .errors import UserError, run_cli
from .fast_paths import from_disable_spec, route_details, summary_line
from .fileio import note_removed_temp_files, save_image
from .loading import resolve_checkpoint
from .palettes import colorize, palette, palette_name
from .figures import write_overview
from .performance import PRECISIONS, maybe_compile, precision_context, resolve_precision
from .presets import PRESETS
from .results_folder import (
    OUTPUT_DIRS, OUTPUT_FILES, build_manifest, check_results_path, plan_results, prepare_results, read_corruption,
    unlabeled_handling,
    sample_dirs,
)
from .run_config import given_flags
from .sampling import (MAX_EXTRAPOLATION, MAX_GUIDANCE, SAMPLERS, SamplerSettings, image_generators, resolve_sampler,
                       sample_batch, to_uint8)
from .tuning_cache import reuse_record, write_record
from .script_util import add_dict_to_argparser, model_and_diffusion_defaults
from .stop_signals import worker_options

# Formats the default as nothing: help lines that say their default in words get no "(default: ...)".
NO_DEFAULT_LINE = "%(default).0s"
SAMPLER_HELP = dict(
    data_dir="(required) dataset root, or a noisy tree made by image_process (its corruption.json turns on "
             "--label_resize)",
    dataset_mode="dataset layout: ade20k, coco, celeba, cityscapes or folder (default: the run's, from args.json "
                 "beside --model_path, or --preset's)",
    clip_denoised="clip the x0 estimate to [-1, 1] at every step (released; not used with --dynamic_threshold)",
    num_samples="label maps to sample, in name order; -1: the whole split",
    batch_size="label maps per model call; samples do not depend on it (per-image seeds)",
    model_path="(required) model*.pt or ema_*.pt, or a run folder (its newest checkpoint, EMA when saved); its "
               "args.json gives the model flags (released checkpoints: --preset)",
    results_path="(required) output folder; it gets manifest.json, and a rerun into it must use the same settings",
    is_train="sample the training split, with its random crop and flip (released); False: the test split",
    s="classifier-free guidance scale: eps(x, 0) + s (eps(x, y) - eps(x, 0)); 1: no guidance (released 1.5)",
    extrapolation="x0 extrapolation e: x0 + e (x0 - previous x0); 0: off (released 25-step setting 0.8)",
    dynamic_threshold="percentile p of the dynamic thresholding of x0; 0: plain clipping (released 25-step "
                      "setting 0.95)",
    seed="seed of the per-image noise (each label map and set has its own stream)",
    unlabeled_to_zero="the unlabeled class becomes the all-zero [MASK] vector (as in training with it)",
    label_resize="accept label maps of another size than their images, nearest-resized (the DS benchmark); "
                 "on by itself for a tree with corruption.json",
    use_ddim="DDIM updates instead of ancestral ones (use with a respacing such as ddim25)",
    eta="DDIM noise: 0 deterministic, 1 as ancestral",
    num_sets="sample sets K per label map: samples_0..samples_{K-1} (samples/ is set 0), for LPIPS diversity",
    use_ema="with a model*.pt path, sample the EMA file of the same step (ema_<--ema_rate>_<step>.pt)",
    ema_rate="the EMA rate whose file --use_ema picks",
    num_workers="data-loading processes",
    precision="fp32, fp16 or bf16 (autocast); empty: fp16 with --use_fp16 True, else fp32",
    compile="torch.compile the model (falls back to eager where it cannot)",
    disable_fast_paths="'all' or comma-separated names of scdm.fast_paths.FastPaths to turn off (debugging)",
    verbose="print each fast-path choice (by default one summary line)",
    batch_invariant="run the network one image at a time, so each file is byte-identical whatever --batch_size, "
                    "the process count or the resume point (on one machine; slower by what batching saves, see docs/sampling.md); "
                    "False: batches, which may change a sample by a rounding step",
)


SAMPLING_TIME_DEFAULTS = dict(
    timestep_respacing="(default: %(default)r: all steps)",
    class_schedule="(default: the run's, e.g. class_schedule.npy beside --model_path; may point elsewhere)"
                   + NO_DEFAULT_LINE,
    use_fp16="(default: the run's, else %(default)r; --precision wins)",
    use_checkpoint="(not used when sampling; default: %(default)r)",
)


def model_flag_help(name):
    text = getattr(script_util, "MODEL_FLAG_HELP", {}).get(name, "model/diffusion flag")
    if "%(" not in text:
        text = text.replace("%", "%%")
    if name in SAMPLING_TIME_DEFAULTS:
        return f"{text} {SAMPLING_TIME_DEFAULTS[name]}"
    return f"{text} (default: from args.json beside --model_path, or --preset; else %(default)r)"


def sampler_help(defaults):
    """Help lines with their defaults; required flags say so instead."""
    helps = {}
    for k, v in defaults.items():
        text = SAMPLER_HELP[k]
        if "(default:" in text or text.startswith("(required)"):
            text += NO_DEFAULT_LINE
        else:
            text += " (default: %(default)r)"
        helps[k] = text
    return helps


SAMPLE_FLAG_TYPES = dict(
    num_samples=minus_one_or_positive, batch_size=positive_int, s=float_in(0.0, MAX_GUIDANCE),
    extrapolation=float_in(0.0, MAX_EXTRAPOLATION),
    dynamic_threshold=float_in(0.0, 1.0, hi_open=True), seed=nonnegative_int, eta=probability, num_sets=positive_int,
    ema_rate=rate_list, num_workers=nonnegative_int, precision=one_of("", *PRECISIONS),
)


def create_argparser():
    defaults = dict(
        data_dir="",
        dataset_mode="",
        clip_denoised=True,
        num_samples=-1,
        batch_size=1,
        model_path="",
        results_path="",
        is_train=False,
        s=1.0,
        extrapolation=0.0,
        dynamic_threshold=0.0,
        seed=0,
        unlabeled_to_zero=False,
        label_resize=False,
        # additions
        use_ddim=False,
        eta=0.0,
        num_sets=1,
        use_ema=False,
        ema_rate="0.9999",
        num_workers=0,
        precision="",
        compile=False,
        disable_fast_paths="",
        verbose=False,
        batch_invariant=False,
    )
    model_defaults = model_and_diffusion_defaults()
    model_defaults["num_classes"] = -1
    model_defaults.pop("dataset_mode")
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=HelpFormatter)
    add_dict_to_argparser(parser, defaults, helps=sampler_help(defaults), types=SAMPLE_FLAG_TYPES)
    parser.add_argument("--sampler", default="", choices=["", *SAMPLERS], metavar="NAME",
                        help=f"reverse-process update, one of {', '.join(SAMPLERS)}: ancestral (released), ddim, or "
                             "dpm++2m (DPM-Solver++(2M), a second-order multistep ODE solver for few steps, with "
                             "--timestep_respacing logsnrN, e.g. logsnr10), dpm++2m-sde (its stochastic variant); "
                             "one model call per respaced step for each (default: "
                             "ddim with --use_ddim True, else ancestral)" + NO_DEFAULT_LINE)
    parser.add_argument("--preset", default="", choices=["", *PRESETS], metavar="NAME",
                        help=f"model flags of a released checkpoint (no args.json beside it): {', '.join(PRESETS)}; "
                             "a run config beside the checkpoint wins (default: none)" + NO_DEFAULT_LINE)
    add_bool_argument(parser, "--overwrite", default=False,
                      help=f"start over in a --results_path written with other settings: removes what the sampler "
                           f"wrote there ({', '.join(OUTPUT_DIRS)}, samples_*, {', '.join(OUTPUT_FILES)}) and nothing else (default: %(default)s)")
    add_dict_to_argparser(parser, model_defaults, helps={k: model_flag_help(k) for k in model_defaults})
    accept_gpus_per_node(parser)
    add_bool_argument(parser, "--seed_align", default=True,
                      help="released flag: the same random draws for a map in clean and noisy runs; here always so, "
                           "since every image draws from its own seeded stream (False is refused) (default: %(default)s)")
    return parser


def save_png(array, path):
    """Atomic (`scdm.fileio`): a run killed mid-write leaves no broken PNG that a rerun would skip."""
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
    model_keys = set(model_and_diffusion_defaults())
    spec = resolve_checkpoint(parsed.model_path, preset=parsed.preset, use_ema=parsed.use_ema,
                              ema_rate=parsed.ema_rate, flags={k: getattr(parsed, k) for k in model_keys},
                              given=given & model_keys, data_dir=parsed.data_dir)
    root = check_results_path(parsed.results_path)
    for folder in [root, *(d for d in root.iterdir() if d.is_dir())] if root.is_dir() else []:
        note_removed_temp_files(folder)  # left by a killed earlier run into this folder
    corruption = read_corruption(parsed.data_dir)
    resized_by_tree = corruption is not None and not parsed.label_resize and "label_resize" not in given
    # The run's settings, resolved once: the checkpoint's model flags, what the sampler runs, and label
    # resizing for a noisy tree (the parsed flags stay as given).
    args = argparse.Namespace(**{**vars(parsed), **spec.flags, "sampler": settings.sampler,
                                 "label_resize": parsed.label_resize or resized_by_tree})
    precision = resolve_precision(args.precision, args.use_fp16 if "use_fp16" in given or not args.precision
                                  else False)

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
            with precision_context(device, precision):
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
