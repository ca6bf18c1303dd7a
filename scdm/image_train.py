"""Train an SCDM/SDM model: `python -m scdm.image_train --data_dir ... --dataset_mode ... [flags]`.

Runs as one process, under `mpiexec -n N` or under `torchrun --nproc_per_node N` (one code path).
A log dir holds one run: starting again in it needs `--resume_checkpoint auto` (or another --log_dir).
The run's config is LOG_DIR/args.json (every flag, resolved), with its class schedule copied beside it.
"""
import argparse
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from . import dist_util, rank_faults
from .checkpoint import CLASS_SCHEDULE_COPY, RUN_CONFIG, CheckpointError
from .cli import (HelpFormatter, accept_gpus_per_node, minus_one_or_positive, nonnegative_float, nonnegative_int,
                  note_gpus_per_node, one_of, positive_float, positive_int, probability, rate_list,
                  resolve_dataset_flags, respacing)
from .conditioning import Conditioning
from .errors import run_cli
from .fileio import check_writable, copy_file, write_json
from .datasets import load_data
from .fast_paths import from_disable_spec
from .label_diffusion import DISCRETE_CLASSWISE
from .performance import PRECISIONS, maybe_compile, resolve_precision
from .resample import create_named_schedule_sampler
from .run_config import given_flags, read_run_config
from .stop_signals import exit_code
from .script_util import (MODEL_FLAG_HELP, add_dict_to_argparser, architecture_conflicts, args_to_dict,
                          create_model_and_diffusion, model_and_diffusion_defaults)
from .train_monitor import TrainMonitor
from .train_samples import DEFAULT_MAPS, DEFAULT_RESPACING, TrainSamples, check_sample_respacing
from .train_util import TrainingDiverged, TrainLoop, check_resume_members, parse_ema_rates, resolve_resume

TRAIN_FLAG_HELP = dict(
    data_dir="required: the dataset root, in the layout of --dataset_mode",
    dataset_mode="required: ade20k, coco, celeba, cityscapes or folder",
    schedule_sampler="how training timesteps are drawn: uniform or loss-second-moment (released)",
    lr="AdamW learning rate",
    weight_decay="AdamW weight decay",
    lr_anneal_steps="released: decay the learning rate linearly to 0 over this many steps and stop there; "
                    "0: constant",
    batch_size="images per process and step (the global batch is this times the number of processes)",
    microbatch="released: split each batch into chunks of this size and accumulate their gradients (same "
               "update, less memory); -1: no split",
    ema_rate="comma-separated EMA decay rates; each writes ema_RATE_STEP.pt",
    ema_warmup="EMA decay min(rate, (1 + step) / (10 + step)), so that short runs get a usable EMA (the "
               "released models were trained without it)",
    drop_rate="classifier-free guidance training: probability of replacing a label map by the all-zero map "
              "(released fine-tuning: 0.2)",
    log_interval="steps between lines of log.txt and progress.csv",
    save_interval="steps between checkpoint sets (model, EMA per rate, optimizer)",
    resume_checkpoint="auto: continue from the newest complete checkpoint set in --log_dir (a fresh run when "
                      "it holds none); a model*.pt path: continue from it; empty: a fresh run, refused when "
                      "--log_dir already holds one",
    fp16_scale_growth="released: loss-scale growth rate of its fp16 trainer; here the grad scaler doubles "
                      "its scale after round(1/this) good steps (0: 2000)",
    is_train="released: read the training split with training augmentation (keep True)",
    log_dir="where checkpoints, log.txt, progress.csv and args.json go; empty: $OPENAI_LOGDIR, else logs/scdm",
    num_workers="data loader processes per rank",
    max_steps="stop at this step (a resumed run counts from its checkpoint's step); 0: no limit",
    precision="fp32, fp16 or bf16 (autocast on fp32 weights); empty: fp16 with --use_fp16 True, else fp32",
    max_bad_steps="stop (exit 1, keeping the last good checkpoint) after this many consecutive steps with a "
                  "non-finite loss or gradient",
    seed="random seed (each rank adds its rank)",
    compile="torch.compile the model (falls back to eager with a warning where it cannot)",
    disable_fast_paths="debugging: 'all' or comma-separated names of scdm.fast_paths.FastPaths to turn off",
    num_classes="label classes, the unlabeled one included; -1: from the dataset layout (or "
                "<data_dir>/dataset.json)",
    allow_partial_resume="resume from a checkpoint set that lacks its optimizer or an EMA file (for an --ema_rate "
                         "the run did not have): the missing state restarts (EMA from the model weights, optimizer "
                         "from scratch); without it such a resume is refused",
    dry_run="check the flags, the data, the resume and --log_dir, then exit without training (scripts run this "
            "before long preparations)",
    verbose="also print each fast-path choice (always in LOG_DIR/log.txt; the console gets one summary line)",
    use_fp16="released: train in fp16; here autocast fp16 with a grad scaler on fp32 master weights (same "
             "checkpoint layout)",
    sample_interval="steps between sample grids LOG_DIR/samples/step_NNNNNN.png (fixed maps, clean and with DS, "
                    "Edge and Random noise, EMA and raw weights, fixed seeds; also at every save), drawn by rank 0; "
                    "0: none",
    sample_maps="label maps in each sample grid (the first of the test split, else of the training split)",
    sample_respacing="the few steps of the sample grids: a DDIM respacing such as ddim10 (see --timestep_respacing)",
    tensorboard="write TensorBoard event files into --log_dir (when tensorboard is installed; a note says so when "
                "it is not)",
    wandb="also log to Weights & Biases under this project (when wandb is installed; WANDB_MODE=offline is "
          "honoured); empty: off",
)


TRAIN_FLAG_TYPES = dict(
    schedule_sampler=one_of("uniform", "loss-second-moment"), lr=positive_float, weight_decay=nonnegative_float,
    lr_anneal_steps=nonnegative_int, batch_size=positive_int, microbatch=minus_one_or_positive, ema_rate=rate_list,
    drop_rate=probability, log_interval=positive_int, save_interval=positive_int,
    fp16_scale_growth=nonnegative_float, num_workers=nonnegative_int, max_steps=nonnegative_int,
    precision=one_of("", *PRECISIONS), max_bad_steps=positive_int, seed=nonnegative_int,
    sample_interval=nonnegative_int, sample_maps=positive_int, sample_respacing=respacing,
)


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
        disable_fast_paths="",
        ema_warmup=False,
        allow_partial_resume=False,
        dry_run=False,
        verbose=False,
        sample_interval=0,
        sample_maps=DEFAULT_MAPS,
        sample_respacing=DEFAULT_RESPACING,
        tensorboard=True,
        wandb="",
    )
    defaults.update(model_and_diffusion_defaults())
    defaults["num_classes"] = -1
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=HelpFormatter)
    add_dict_to_argparser(parser, defaults, {**MODEL_FLAG_HELP, **TRAIN_FLAG_HELP}, TRAIN_FLAG_TYPES)
    accept_gpus_per_node(parser)
    return parser


# What to do about an unreadable args.json of the run being resumed.
RESUME_CONFIG_FIX = "restore it, or resume with every model and diffusion flag of the run"


def check_same_architecture(resume_checkpoint, flags):
    """A resume must build the network its checkpoint's run built (as recorded in its args.json)."""
    config = read_run_config(Path(resume_checkpoint).parent, RESUME_CONFIG_FIX)
    if config is None:
        return
    conflicts = architecture_conflicts(config.flags, flags)
    if conflicts:
        raise CheckpointError(f"--resume_checkpoint {resume_checkpoint}: flags contradict the run in {config.path}: "
                              f"{', '.join(conflicts)}; resume with the run's model and diffusion flags")


# Flags a resumed run never takes from its run config: where it is, what it resumes from, and how.
NOT_INHERITED = ("log_dir", "resume_checkpoint", "allow_partial_resume", "dry_run", "verbose")


def inherit_run_flags(args, argv, log_dir):
    """A resumed run continues as it was: flags not given on the command line come from the run's
    args.json (so `--log_dir X --resume_checkpoint auto` alone continues it). Returns their names."""
    flag = args.resume_checkpoint
    if not flag:
        return []
    config = read_run_config(log_dir if flag == "auto" else Path(flag).parent, RESUME_CONFIG_FIX)
    if config is None:
        return []
    given = given_flags(create_argparser, argv)
    inherited = [k for k, v in config.flags.items() if hasattr(args, k) and k not in given
                 and k not in NOT_INHERITED and getattr(args, k) != v]
    for k in inherited:
        setattr(args, k, config.flags[k])
    return inherited


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = create_argparser().parse_args(argv)
    log_dir = Path(args.log_dir or os.environ.get("OPENAI_LOGDIR") or os.path.join("logs", "scdm")).absolute()
    inherited = inherit_run_flags(args, argv, log_dir)
    if inherited:
        print(f"note: resuming with the run's own {', '.join(inherited)} (from its {RUN_CONFIG})", file=sys.stderr)
    precision = resolve_precision(args.precision, args.use_fp16)
    fast_paths = from_disable_spec(args.disable_fast_paths)
    note_gpus_per_node(args)
    info = resolve_dataset_flags(args)
    conditioning = Conditioning(args.num_classes, args.no_instance, info.unlabeled_id, drop_rate=args.drop_rate)
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    # Decided before anything is written, so that a refused run leaves the log dir as it was.
    warnings = []
    resume = resolve_resume(log_dir, args.resume_checkpoint, parse_ema_rates(args.ema_rate), warn=warnings.append)
    if resume:
        if not Path(resume).is_file():
            what = "is a folder" if Path(resume).is_dir() else "does not exist"
            raise CheckpointError(f"--resume_checkpoint {resume} {what} (expected a model*.pt file, or auto: the "
                                  "newest complete set in --log_dir)")
        check_same_architecture(resume, flags)
        warnings += check_resume_members(resume, parse_ema_rates(args.ema_rate), args.allow_partial_resume)
    check_writable(log_dir, "--log_dir")
    if args.sample_interval:
        check_sample_respacing(flags, args.sample_respacing)
    if args.dry_run:
        print(f"dry run: flags, data ({info.num_classes} classes in {args.data_dir}), resume "
              f"({resume or 'fresh run'}) and --log_dir {log_dir} are usable; nothing trained", flush=True)
        return 0

    dist_util.setup_dist()
    try:
        with rank_faults.watched():
            return train(args, log_dir, precision, fast_paths, info, conditioning, flags, resume, warnings)
    finally:
        dist_util.cleanup()


def train(args, log_dir, precision, fast_paths, info, conditioning, flags, resume, warnings):
    """The run itself, once every flag is checked and the process group is up; returns the exit code."""
    rank = dist_util.get_rank()
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)

    # fp16 is done with autocast + a grad scaler on fp32 master weights (same checkpoint layout).
    model, diffusion = create_model_and_diffusion(**dict(flags, use_fp16=False))
    model.fast_paths = fast_paths
    if dist_util.is_main():
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr, flush=True)
        n_params = sum(p.numel() for p in model.parameters())
        world = dist_util.get_world_size()
        print(f"scdm: {n_params / 1e6:.2f}M parameters, {world} process(es) on "
              f"{dist_util.dev()}, precision {precision}, log dir {log_dir}", flush=True)
        # --batch_size is per process, as in the released scripts (10 per GPU on 4 GPUs: 40).
        print(f"global batch {args.batch_size * world} (--batch_size {args.batch_size} per process x {world} "
              f"process(es))", flush=True)

    data = load_data(dataset_mode=args.dataset_mode, data_dir=args.data_dir, batch_size=args.batch_size,
                     image_size=args.image_size, class_cond=args.class_cond, is_train=args.is_train,
                     info=info, num_workers=args.num_workers)
    samples = None
    if dist_util.is_main() and args.sample_interval:
        samples = TrainSamples.for_run(dataset_mode=args.dataset_mode, data_dir=args.data_dir, info=info,
                                       conditioning=conditioning, flags=flags, respacing=args.sample_respacing,
                                       count=args.sample_maps, precision=precision, seed=args.seed)
    loop = TrainLoop(
        model=model, diffusion=diffusion, data=data, conditioning=conditioning, verbose=args.verbose,
        batch_size=args.batch_size, microbatch=args.microbatch, lr=args.lr, ema_rate=args.ema_rate,
        log_interval=args.log_interval, save_interval=args.save_interval,
        resume_checkpoint=resume, precision=precision, fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        weight_decay=args.weight_decay, lr_anneal_steps=args.lr_anneal_steps, max_steps=args.max_steps,
        max_bad_steps=args.max_bad_steps, log_dir=log_dir, flags=flags, ema_warmup=args.ema_warmup,
        notes=[f"warning: {line}" for line in warnings], samples=samples, sample_interval=args.sample_interval,
    )
    if dist_util.is_main():
        write_run_config(args, log_dir, resume)
        monitor = TrainMonitor(log_dir, tensorboard=args.tensorboard, wandb_project=args.wandb, config=vars(args),
                               start_step=loop.step)
        loop.monitor = monitor if monitor.enabled else None
    if args.compile:
        loop.ddp = maybe_compile(loop.ddp, True)
    try:
        stopped_by = loop.run_loop()
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if stopped_by is None:
        return 0
    if dist_util.is_main():
        print(f"stopped by {signal.Signals(stopped_by).name} at step {loop.step}; its checkpoint set is saved in "
              f"{log_dir}: continue with --resume_checkpoint auto", file=sys.stderr, flush=True)
    return exit_code(stopped_by)


def write_run_config(args, log_dir, resume):
    """LOG_DIR/args.json: every flag as resolved for this run (class count, unlabeled id, the
    checkpoint resumed from), with the class schedule copied into the log dir and named by its
    absolute path, so a sampler started anywhere can rebuild the diffusion from this file alone."""
    if args.cond_diffuse and args.cond_opt == DISCRETE_CLASSWISE and args.class_schedule:
        copy = log_dir / CLASS_SCHEDULE_COPY
        src = Path(args.class_schedule)
        if not (copy.exists() and os.path.samefile(src, copy)):
            copy_file(src, copy)
        args.class_schedule = str(copy)
    args.log_dir = str(log_dir)
    args.data_dir = str(Path(args.data_dir).absolute()) if args.data_dir else ""
    args.resume_checkpoint = str(Path(resume).absolute()) if resume else ""
    write_json(vars(args), log_dir / RUN_CONFIG)


if __name__ == "__main__":
    run_cli(main)
