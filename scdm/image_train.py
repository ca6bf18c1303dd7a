"""Train an SCDM/SDM model: `python -m scdm.image_train --data_dir ... --dataset_mode ... [flags]`.

Runs as one process, under `mpiexec -n N` or under `torchrun --nproc_per_node N` (one code path).
A log dir holds one run: starting again in it needs `--resume_checkpoint auto` (or another --log_dir).
The run's config is LOG_DIR/args.json (every flag, resolved), with its class schedule copied beside it.
"""
import argparse
import inspect
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from .runtime import dist_util, rank_faults
from .checkpoint import (CLASS_SCHEDULE_COPY, RUN_CONFIG, CheckpointError, check_resume_members, parse_ema_rates,
                         resolve_resume)
from .data.dataset_layouts import dataset_info_for
from .runtime.cli import HelpFormatter, note_gpus_per_node
from .data.conditioning import Conditioning
from .runtime.errors import run_cli
from .runtime.fileio import check_writable, copy_file, write_json
from .data.datasets import load_data
from .fast.fast_paths import from_disable_spec
from .diffusion.label_diffusion import DISCRETE_CLASSWISE, load_class_schedule
from .flags import DIFFUSION_FLAGS, LAUNCH_FLAGS, MODEL_FLAGS, TRAIN_FLAGS, add_flags, config_class, for_command_line
from .fast.performance import maybe_compile, precision_note, resolve_precision
from .diffusion.resample import create_named_schedule_sampler
from .run_config import given_flags, read_run_config
from .runtime.stop_signals import exit_code
from .script_util import (architecture_conflicts, attention_note, create_model, create_model_and_diffusion,
                          model_and_diffusion_defaults)
from .training.train_monitor import TrainMonitor
from .training.train_samples import TrainSamples, check_sample_respacing
from .training.train_util import TrainingDiverged, TrainLoop

# Every flag of a training run, in --help order (data first, then the run, the model, the diffusion).
RUN_FLAGS = for_command_line(TRAIN_FLAGS[:1] + MODEL_FLAGS[-1:] + TRAIN_FLAGS[1:] + MODEL_FLAGS[:-1] + DIFFUSION_FLAGS
                             + LAUNCH_FLAGS)
TrainRun = config_class("TrainRun", RUN_FLAGS, doc="The flags of one training run, resolved and frozen.")


def create_argparser():
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=HelpFormatter)
    add_flags(parser, RUN_FLAGS)
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


def inherited_run_flags(args, argv, log_dir):
    """A resumed run continues as it was: flags not given on the command line come from the run's
    args.json (so `--log_dir X --resume_checkpoint auto` alone continues it). Returns {flag: value}."""
    flag = args.resume_checkpoint
    if not flag:
        return {}
    config = read_run_config(log_dir if flag == "auto" else Path(flag).parent, RESUME_CONFIG_FIX)
    if config is None:
        return {}
    given = given_flags(create_argparser, argv)
    return {k: v for k, v in config.flags.items() if hasattr(args, k) and k not in given
            and k not in NOT_INHERITED and getattr(args, k) != v}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parsed = create_argparser().parse_args(argv)
    log_dir = Path(parsed.log_dir or os.environ.get("OPENAI_LOGDIR") or os.path.join("logs", "scdm")).absolute()
    inherited = inherited_run_flags(parsed, argv, log_dir)
    resolved = dict(vars(parsed), **inherited)
    info = dataset_info_for(resolved["dataset_mode"], resolved["data_dir"], resolved["num_classes"],
                            resolved["unlabeled_id"])
    # The run's flags, resolved once (class count and unlabeled class from the dataset) and frozen.
    args = TrainRun(**dict(resolved, num_classes=info.num_classes,
                           unlabeled_id=-1 if info.unlabeled_id is None else info.unlabeled_id))
    if inherited:
        print(f"note: resuming with the run's own {', '.join(inherited)} (from its {RUN_CONFIG})", file=sys.stderr)
    precision = resolve_precision(args.precision, args.use_fp16, dist_util.dev(), training=True)
    fast_paths = from_disable_spec(args.disable_fast_paths)
    note_gpus_per_node(args)
    conditioning = Conditioning(args.num_classes, args.no_instance, info.unlabeled_id, drop_rate=args.drop_rate)
    flags = {k: getattr(args, k) for k in model_and_diffusion_defaults()}
    # Decided before anything is written, so that a refused run leaves the log dir as it was.
    warnings = []
    check_training_setup(args, flags, info)
    note = attention_note(flags)
    if note:
        warnings.append(note)
    resume = resolve_resume(log_dir, args.resume_checkpoint, parse_ema_rates(args.ema_rate), warn=warnings.append)
    if resume:
        if not Path(resume).is_file():
            what = "is a folder" if Path(resume).is_dir() else "does not exist"
            raise CheckpointError(f"--resume_checkpoint {resume} {what} (expected a model*.pt file, or auto: the "
                                  "newest complete set in --log_dir)")
        if Path(resume).name.startswith("opt"):
            raise CheckpointError(f"--resume_checkpoint {resume} is an optimizer state (opt*.pt); pass the run's "
                                  "model*.pt (its opt and ema files beside it are found by step)")
        check_same_architecture(resume, flags)
        warnings += check_resume_members(resume, parse_ema_rates(args.ema_rate), args.allow_partial_resume)
    check_writable(log_dir, "--log_dir")
    if args.sample_interval:
        check_sample_respacing(flags, args.sample_respacing)
    if args.dry_run:
        schedule = ""
        if args.cond_diffuse and args.cond_opt == DISCRETE_CLASSWISE and not args.class_schedule:
            schedule = "; the class schedule is still to come (--class_schedule, or train.sh computes one)"
        print(f"dry run: flags, network, data layout ({info.num_classes} classes in {args.data_dir}, at least one "
              f"batch), resume ({resume or 'fresh run'}) and --log_dir {log_dir} are usable{schedule}; nothing "
              "trained (the label maps are read when training starts)", flush=True)
        return 0

    dist_util.setup_dist()
    try:
        with rank_faults.watched():
            return train(args, log_dir, precision, fast_paths, info, conditioning, flags, resume, warnings)
    finally:
        dist_util.cleanup()


def check_training_setup(args, flags, info):
    """What would otherwise fail only once training starts, checked before anything is written and by
    --dry_run (which train.sh runs before it spends minutes on a class schedule): the network builds
    (on the meta device, so without memory), a given class schedule fits the classes, and the data has
    its layout and at least one batch. The label maps themselves are read when training starts."""
    model_flags = {k: v for k, v in flags.items() if k in inspect.signature(create_model).parameters}
    with torch.device("meta"):
        create_model(**model_flags)
    if args.cond_diffuse and args.cond_opt == DISCRETE_CLASSWISE and args.class_schedule:
        load_class_schedule(args.class_schedule, args.num_classes, None if args.unlabeled_id < 0 else args.unlabeled_id)
    load_data(dataset_mode=args.dataset_mode, data_dir=args.data_dir, batch_size=args.batch_size,
              image_size=args.image_size, class_cond=args.class_cond, is_train=args.is_train, info=info, num_workers=0)


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
              f"{dist_util.dev()}, {precision_note(args.precision, precision, dist_util.dev(), args.use_fp16, True)}, "
              f"log dir {log_dir}", flush=True)
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
        monitor = TrainMonitor(log_dir, tensorboard=args.tensorboard, wandb_project=args.wandb, config=args.values(),
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
    config = dict(args.values(), log_dir=str(log_dir),
                  data_dir=str(Path(args.data_dir).absolute()) if args.data_dir else "",
                  resume_checkpoint=str(Path(resume).absolute()) if resume else "")
    if args.cond_diffuse and args.cond_opt == DISCRETE_CLASSWISE and args.class_schedule:
        copy = log_dir / CLASS_SCHEDULE_COPY
        src = Path(args.class_schedule)
        if not (copy.exists() and os.path.samefile(src, copy)):
            copy_file(src, copy)
        config["class_schedule"] = str(copy)
    write_json(config, log_dir / RUN_CONFIG)


if __name__ == "__main__":
    run_cli(main)
