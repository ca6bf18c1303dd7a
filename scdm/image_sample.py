"""Sample images for the label maps of a dataset split:
`python -m scdm.image_sample --model_path .../ema_0.9999_050000.pt --data_dir ... --results_path ...`.

Writes <results_path>/{images,labels,samples}/<name>.png (ground truth, raw label ids, sample), colourised
labels in labels_color/, K sample sets in samples_0..samples_{K-1}/ with --num_sets K, and overview.png.
Seeds are per image and set, so the output does not depend on the number of ranks or the batch size;
a rerun skips the images already written.
"""
import argparse
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import dist_util
from .checkpoint import CheckpointError, ema_name, load_into_model, parse_step
from .cli import HelpFormatter, accept_gpus_per_node, note_gpus_per_node, resolve_dataset_flags
from .conditioning import Conditioning
from .datasets import build_dataset
from .errors import run_cli
from .fast_paths import from_disable_spec
from .fileio import check_writable, save_image
from .performance import maybe_compile, precision_context, resolve_precision
from .sampling import sample_loop
from .script_util import add_dict_to_argparser, args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults


def create_argparser():
    defaults = dict(
        data_dir="",
        dataset_mode="",
        clip_denoised=True,
        num_samples=-1,          # -1: the whole split
        batch_size=1,
        model_path="",
        results_path="",
        is_train=False,
        s=1.0,                   # classifier-free guidance scale
        extrapolation=0.0,       # e; released 25-step setting 0.8
        dynamic_threshold=0.0,   # percentile p; 0 disables; released 25-step setting 0.95
        seed=0,
        unlabeled_to_zero=False,  # the unlabeled class becomes the all-zero [MASK] vector
        label_resize=False,       # accept label maps smaller than their images (the DS benchmark)
        # additions
        use_ddim=False,
        eta=0.0,
        num_sets=1,
        use_ema=False,
        ema_rate="0.9999",
        num_workers=0,
        precision="",            # fp32 | fp16 | bf16; empty: fp16 with --use_fp16 True, else fp32
        compile=False,
        disable_fast_paths="",   # "all" or comma-separated names of scdm.fast_paths.FastPaths (debugging)
    )
    defaults.update(model_and_diffusion_defaults())
    defaults["num_classes"] = -1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_dict_to_argparser(parser, defaults)
    accept_gpus_per_node(parser)
    return parser


def palette(num_classes):
    """A fixed, well-spread colour per class id (the same in every run)."""
    rng = np.random.default_rng(12345)
    colors = rng.integers(0, 256, size=(max(num_classes, 256), 3), dtype=np.uint8)
    colors[0] = 0
    return colors


def to_uint8(x):
    """(3,H,W) in [-1,1] -> HxWx3 uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def save_png(array, path):
    """Atomic (`scdm.fileio`): a run killed mid-write leaves no broken PNG that a rerun would skip."""
    save_image(array, path, format="PNG")


def sample_dirs(num_sets):
    return ["samples"] if num_sets == 1 else ["samples"] + [f"samples_{k}" for k in range(num_sets)]


def image_seed(seed, name, k):
    return zlib.crc32(f"{seed}:{k}:{name}".encode()) & 0x7FFFFFFF


def resolve_model_path(args):
    """--use_ema with a model*.pt path picks the EMA file of the same step beside it."""
    path = Path(args.model_path)
    if not args.model_path:
        raise ValueError("--model_path is required (a model*.pt or ema_*.pt file)")
    if args.use_ema and path.name.startswith("model"):
        path = path.parent / ema_name(args.ema_rate, parse_step(path))
        if not path.exists():
            raise CheckpointError(f"--use_ema True: {path} does not exist beside --model_path {args.model_path}")
    return path


def prepare_results(results_path, num_sets):
    if not results_path:
        raise ValueError("--results_path is required")
    root = Path(results_path)
    check_writable(root, "--results_path")
    for d in ["images", "labels", "labels_color", *sample_dirs(num_sets)]:
        (root / d).mkdir(parents=True, exist_ok=True)
    return root


def write_overview(root, names, num_classes, max_rows=8):
    """label | ground truth | samples, one row per label map."""
    rows = []
    sets = [d for d in sample_dirs(99) if (root / d).is_dir()][1:] or ["samples"]
    for name in names[:max_rows]:
        tiles = [root / "labels_color" / f"{name}.png", root / "images" / f"{name}.png"]
        tiles += [root / d / f"{name}.png" for d in sets[:4]]
        ims = [np.asarray(Image.open(p).convert("RGB")) for p in tiles if p.exists()]
        if ims:
            h = ims[0].shape[0]
            ims = [np.asarray(Image.fromarray(im).resize((h * im.shape[1] // im.shape[0], h))) for im in ims]
            rows.append(np.concatenate(ims, axis=1))
    if rows:
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
        save_png(np.concatenate(rows, axis=0), root / "overview.png")


def main(argv=None):
    args = create_argparser().parse_args(argv)
    note_gpus_per_node(args)
    info = resolve_dataset_flags(args)
    conditioning = Conditioning(args.num_classes, args.no_instance, info.unlabeled_id,
                                unlabeled_to_zero=args.unlabeled_to_zero)
    precision = resolve_precision(args.precision, args.use_fp16)
    fast_paths = from_disable_spec(args.disable_fast_paths)
    if args.num_sets < 1:
        raise ValueError(f"--num_sets {args.num_sets}: expected >= 1")
    if args.s < 0:
        raise ValueError(f"--s {args.s}: the guidance scale must be >= 0")
    if not 0 <= args.dynamic_threshold < 1:
        raise ValueError(f"--dynamic_threshold {args.dynamic_threshold}: expected a percentile in (0, 1), or 0 (off)")
    model_path = resolve_model_path(args)
    root = prepare_results(args.results_path, args.num_sets)
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    model, diffusion = create_model_and_diffusion(**dict(flags, use_fp16=False))
    model.fast_paths = fast_paths
    load_into_model(model, model_path, flags)

    dist_util.setup_dist()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    device = dist_util.dev()
    model.to(device).eval()
    if args.compile:
        model = maybe_compile(model, True)

    dataset = build_dataset(args.dataset_mode, args.data_dir, args.image_size, is_train=args.is_train,
                            info=info, label_resize=args.label_resize, shard=0, num_shards=1)
    total = len(dataset) if args.num_samples < 0 else min(args.num_samples, len(dataset))
    mine = list(range(rank, total, world))  # fixed order; shards never overlap, uneven counts are fine
    loader = DataLoader(Subset(dataset, mine), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers)
    colors = palette(args.num_classes + 1)
    out_dirs = sample_dirs(args.num_sets)
    bar = tqdm(total=len(mine), desc=f"sampling (rank {rank})", disable=rank != 0 and world > 1, dynamic_ncols=True)
    for images, cond in loader:
        batch_names = [Path(p).stem for p in cond["path"]]
        todo = [i for i, n in enumerate(batch_names)
                if not all((root / d / f"{n}.png").exists() for d in ["images", "labels", *out_dirs])]
        if not todo:
            bar.update(len(batch_names))
            continue
        y = conditioning.model_input(cond)[todo]
        for k in range(args.num_sets):
            gens = [torch.Generator().manual_seed(image_seed(args.seed, batch_names[i], k)) for i in todo]
            with precision_context(device, precision):
                x = sample_loop(model, diffusion, (len(todo), 3, args.image_size, args.image_size), y,
                                guidance_scale=args.s, extrapolation=args.extrapolation,
                                threshold_percentile=args.dynamic_threshold or None, clip_denoised=args.clip_denoised,
                                use_ddim=args.use_ddim, eta=args.eta, generators=gens, device=device)
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
            save_png(colors[np.clip(ids, 0, len(colors) - 1)], root / "labels_color" / f"{n}.png")
            save_png(to_uint8(images[i]), root / "images" / f"{n}.png")
        bar.update(len(batch_names))
    bar.close()
    dist_util.barrier()
    if rank == 0:
        all_names = sorted(p.stem for p in (root / "samples").glob("*.png"))
        write_overview(root, all_names, args.num_classes)
        print(f"wrote {len(all_names)} samples to {root}", flush=True)
    dist_util.cleanup()


if __name__ == "__main__":
    run_cli(main)
