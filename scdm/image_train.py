"""Train an SCDM/SDM model: `python -m scdm.image_train --data_dir ... --dataset_mode ... [flags]`.

Runs as one process, under `mpiexec -n N` or under `torchrun --nproc_per_node N` (one code path).
"""
import argparse
import os
import random

import numpy as np
import torch

from . import dist_util
from .cli import HelpFormatter, accept_gpus_per_node, note_gpus_per_node, resolve_dataset_flags
from .conditioning import Conditioning
from .errors import run_cli
from .fileio import check_writable, write_json
from .datasets import load_data
from .fast_paths import from_disable_spec
from .performance import maybe_compile, resolve_precision
from .resample import create_named_schedule_sampler
from .script_util import add_dict_to_argparser, args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults
from .train_util import TrainingDiverged, TrainLoop

def create_argparser():
    defaults = dict(
        data_dir="",
        dataset_mode="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,
        ema_rate="0.9999",
        drop_rate=0.0,
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        fp16_scale_growth=1e-3,
        is_train=True,
        # additions to the released flags
        log_dir="",
        num_workers=2,
        max_steps=0,
        precision="",
        max_bad_steps=50,
        seed=0,
        compile=False,
        disable_fast_paths="",   # "all" or comma-separated names of scdm.fast_paths.FastPaths (debugging)
    )
    defaults.update(model_and_diffusion_defaults())
    defaults["num_classes"] = -1  # -1: from the dataset layout (or <root>/dataset.json)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_dict_to_argparser(parser, defaults)
    accept_gpus_per_node(parser)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    precision = resolve_precision(args.precision, args.use_fp16)
    fast_paths = from_disable_spec(args.disable_fast_paths)
    note_gpus_per_node(args)
    info = resolve_dataset_flags(args)
    conditioning = Conditioning(args.num_classes, args.no_instance, info.unlabeled_id, drop_rate=args.drop_rate)
    log_dir = args.log_dir or os.environ.get("OPENAI_LOGDIR") or os.path.join("logs", "scdm")
    check_writable(log_dir, "--log_dir")

    dist_util.setup_dist()
    rank = dist_util.get_rank()
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)

    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    # fp16 is done with autocast + a grad scaler on fp32 master weights (same checkpoint layout).
    model, diffusion = create_model_and_diffusion(**dict(flags, use_fp16=False))
    model.fast_paths = fast_paths
    if dist_util.is_main():
        write_json(vars(args), os.path.join(log_dir, "args.json"))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"scdm: {n_params / 1e6:.2f}M parameters, {dist_util.get_world_size()} process(es) on "
              f"{dist_util.dev()}, precision {precision}, log dir {log_dir}", flush=True)

    data = load_data(dataset_mode=args.dataset_mode, data_dir=args.data_dir, batch_size=args.batch_size,
                     image_size=args.image_size, class_cond=args.class_cond, is_train=args.is_train,
                     info=info, num_workers=args.num_workers)
    loop = TrainLoop(
        model=model, diffusion=diffusion, data=data, conditioning=conditioning,
        batch_size=args.batch_size, microbatch=args.microbatch, lr=args.lr, ema_rate=args.ema_rate,
        log_interval=args.log_interval, save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint, precision=precision, fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        weight_decay=args.weight_decay, lr_anneal_steps=args.lr_anneal_steps, max_steps=args.max_steps,
        max_bad_steps=args.max_bad_steps, log_dir=log_dir, flags=flags,
    )
    if args.compile:
        loop.ddp = maybe_compile(loop.ddp, True)
    try:
        loop.run_loop()
    except TrainingDiverged as e:
        print(f"error: {e}", flush=True)
        raise SystemExit(1)
    finally:
        dist_util.cleanup()


if __name__ == "__main__":
    run_cli(main)
