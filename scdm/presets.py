"""The one table of presets: architecture, training and sampling settings per dataset.

`scripts/train.sh` and `scripts/sample.sh` read it through `python -m scdm.presets`, and the
quickstart, the benchmarks and the tests import it, so a preset is written down once.

- ade20k, coco, celeba: the released SCDM 256x256 models (their checkpoints load with these flags;
  the released class-schedule file is passed separately).
- cityscapes: not released with SCDM; the same 256 architecture with the Cityscapes class count and
  edge channel (square crops, as our loader makes them), trained with SCDM's recipe.
- toy: the built-in toy data (`scdm.toy`) at 32x32, small enough to train on a CPU in minutes.

Stages are SCDM's released recipe: `train` (from scratch, label dropout 0.2 from the start),
`resume` (the second stage: continue from the scratch checkpoint at a lower lr), `sample25`,
`sample1000`; `sample8` is ours (not in the released scripts). SDM's recipe stays as a named
baseline: `sdm-train` (no dropout) and
`sdm-finetune` (classifier-free fine-tuning with dropout 0.2); `finetune` is its older name.
Batch sizes are per process, as in the released scripts (4 GPUs per node there).

    python -m scdm.presets ade20k model          # the flags, one shell word each
    python -m scdm.presets toy train --json      # as JSON
    python -m scdm.presets toy model --get dataset_mode
"""
import argparse
import json
import shlex
import sys
from dataclasses import dataclass, field

from .runtime.errors import run_cli

# The released 256x256 architecture and diffusion, shared by the released datasets.
RELEASED_ARCH = dict(
    image_size=256, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8", num_head_channels=64,
    resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True, noise_schedule="linear",
    diffusion_steps=1000, class_cond=True, cond_diffuse=True, cond_opt="discrete_zero_classwise",
)
# SCDM's released scripts/train.sh: scratch, then resume at 2e-5; dropout 0.2 in both.
SCDM_TRAIN = dict(lr=1e-4, batch_size=10, drop_rate=0.2, save_interval=1000, use_fp16=True, use_checkpoint=True)
SCDM_RESUME = dict(SCDM_TRAIN, lr=2e-5)
# SDM's recipe (Wang et al.): from scratch without dropout, then classifier-free fine-tuning.
SDM_TRAIN = dict(lr=1e-4, batch_size=4, use_fp16=True, use_checkpoint=True, save_interval=10000)
SDM_FINETUNE = dict(SDM_TRAIN, lr=2e-5, drop_rate=0.2)

TOY_ARCH = dict(
    dataset_mode="folder", image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
    attention_resolutions="16", num_head_channels=16, resblock_updown=True, use_scale_shift_norm=True,
    learn_sigma=True, noise_schedule="linear", diffusion_steps=1000, class_cond=True, no_instance=False,
    cond_diffuse=True, cond_opt="discrete_zero_classwise",
)
TOY_RUN = dict(batch_size=8, log_interval=20, save_interval=500, max_steps=1000, num_workers=0, ema_warmup=True)
TOY_SDM_TRAIN = dict(TOY_RUN, lr=2e-4)

# Sampling schedules by number of steps: the released scripts' 25 and 1000, and ours at 8 steps (the
# stochastic multistep solver with a small extrapolation: the released 25-step quality on clean and Edge
# toy maps at a third of the model calls, docs/sampling.md "Few steps on noisy maps").
SAMPLING = {
    "25": dict(timestep_respacing="ddim25", s=1.5, extrapolation=0.8, dynamic_threshold=0.95),
    "1000": dict(timestep_respacing="1000", s=1.5),
    "8": dict(sampler="dpm++2m-sde", timestep_respacing="logsnr8", s=1.5, extrapolation=0.2, dynamic_threshold=0.95),
}
TRAIN_STAGES = ("train", "resume", "sdm-train", "sdm-finetune")
ALIASES = {"finetune": "sdm-finetune", "scratch": "train"}  # older names of SDM's and SCDM's stages
STAGES = ("model", *TRAIN_STAGES, *(f"sample{n}" for n in SAMPLING), *ALIASES)
# Stages that continue from a checkpoint (train.sh's RESUME).
CONTINUES = ("resume", "sdm-finetune")
RECIPES = {"train": "SCDM", "resume": "SCDM", "sdm-train": "SDM", "sdm-finetune": "SDM"}


@dataclass(frozen=True)
class Preset:
    model: dict                     # model and diffusion flags (create_model_and_diffusion)
    runs: dict                      # training stage -> image_train run flags (TRAIN_STAGES)
    sample_batch_size: int = 10
    sample_fp16: bool = True        # the released sampling lines pass --use_fp16 True
    note: str = ""
    extra: dict = field(default_factory=dict)

    def flags(self, stage):
        """Flags of one stage: `model`; a training stage (model + run flags); or `sample25` /
        `sample1000` / `sample8` (model flags + the released sampling schedule and batch size, as the released
        sample.sh passes them; the sampler checks them against a run's args.json)."""
        stage = ALIASES.get(stage, stage)
        if stage == "model":
            return dict(self.model)
        if stage in TRAIN_STAGES:
            return dict(self.model, **self.runs[stage])
        if stage.startswith("sample") and stage[len("sample"):] in SAMPLING:
            fp16 = dict(use_fp16=True) if self.sample_fp16 else {}
            return dict(self.model, **SAMPLING[stage[len("sample"):]], batch_size=self.sample_batch_size, **fp16)
        raise ValueError(f"unknown preset stage {stage!r}; expected one of {STAGES}")


def _released(dataset_mode, num_classes, no_instance, note, lr=1e-4):
    scdm = dict(SCDM_TRAIN, lr=lr)
    return Preset(dict(RELEASED_ARCH, dataset_mode=dataset_mode, num_classes=num_classes, no_instance=no_instance),
                  {"train": scdm, "resume": dict(SCDM_RESUME), "sdm-train": dict(SDM_TRAIN),
                   "sdm-finetune": dict(SDM_FINETUNE)}, note=note)


PRESETS = {
    "ade20k": _released("ade20k", 151, True, "released SCDM ADE20K model (150 classes + unlabeled)"),
    "coco": _released("coco", 183, False, "released SCDM COCO-Stuff model (182 classes + unlabeled, edge channel)"),
    "celeba": _released("celeba", 19, False, "released SCDM CelebAMask-HQ model (19 classes, edge channel)", lr=2e-5),
    "cityscapes": _released("cityscapes", 35, False, "not released with SCDM: the 256 architecture for Cityscapes, "
                            "trained with the ADE20K recipe"),
    "toy": Preset(dict(TOY_ARCH), {"train": dict(TOY_RUN, lr=2e-4, drop_rate=0.2),
                                   "resume": dict(TOY_RUN, lr=5e-5, drop_rate=0.2),
                                   "sdm-train": dict(TOY_SDM_TRAIN),
                                   "sdm-finetune": dict(TOY_SDM_TRAIN, drop_rate=0.2)},
                  sample_batch_size=16, sample_fp16=False, note="built-in toy data at 32x32, CPU"),
}


def get_preset(name):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {' '.join(PRESETS)}")
    return PRESETS[name]


def as_argv(flags):
    """['--key', 'value', ...] in the form the entry points parse (booleans as True/False)."""
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m scdm.presets", description="Print the flags of a preset.",
                                allow_abbrev=False)
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("stage", nargs="?", default="model", choices=STAGES,
                   help="train/resume: SCDM's released recipe; sdm-train/sdm-finetune: SDM's (finetune: its old "
                        "name); sample25/sample1000: the released sampling lines")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of shell words")
    p.add_argument("--get", metavar="FLAG", help="print the value of one flag only")
    p.add_argument("--omit_model", action="store_true",
                   help="leave out the model flags (sample.sh: a run's args.json or --preset gives them)")
    args = p.parse_args(argv)
    preset = get_preset(args.preset)
    flags = preset.flags(args.stage)
    if args.omit_model:
        flags = {k: v for k, v in flags.items() if k not in preset.model}
    if args.get:
        if args.get not in flags:
            p.error(f"preset {args.preset} ({args.stage}) has no flag {args.get!r}; it has: {' '.join(flags)}")
        print(flags[args.get])
    elif args.json:
        print(json.dumps(flags, indent=2))
    else:
        print(" ".join(shlex.quote(a) for a in as_argv(flags)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main) or 0)
