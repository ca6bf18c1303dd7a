"""The quickstart's flags and budgets, resolved once into a plain `cfg` dict.

Everything downstream (stage keys, the report, `quickstart.json`) reads `cfg`, so what a run did is
one JSON-able dict. The network is the toy preset of `scdm.presets`, not a copy of it.
"""
import argparse

from scdm.runtime.cli import (HelpFormatter, add_bool_argument, add_deprecated_alias, int_at_least, nonnegative_float,
                      nonnegative_int, positive_float, positive_int, probability, rate_list, respacing)
from scdm.runtime.errors import UserError
from scdm.presets import PRESETS

MODELS = ("sdm", "scdm")
MODEL_NAMES = {"sdm": "SDM", "scdm": "SCDM"}
NOISE_NAMES = {"clean": "clean", "ds": "DS", "edge": "Edge", "random": "Random", "painter": "Painter"}
NOISE_CLI = {"ds": "downsample", "edge": "edge", "random": "random", "painter": "painter"}
DROP_RATE = 0.2  # classifier-free label dropout of both models

# DEFAULT: the tour; QUICK: a smoke run of every stage (numbers not meaningful). Their measured times
# depend on the machine: docs/quickstart.md (and --quick's help, which users read before choosing).
BUDGETS = {
    "default": dict(out_dir="results/quickstart", size=32, num_train=512, num_test=64, steps=400, batch_size=16,
                    lr=5e-4, respacing="ddim25", sample_batch=16),
    "quick": dict(out_dir="results/quickstart-quick", size=32, num_train=512, num_test=8, steps=60, batch_size=16,
                  lr=5e-4, respacing="ddim10", sample_batch=8),
}


class QuickstartError(UserError):
    """Something the user can fix; printed as one `error: ...` line, exit code 2."""


def build_parser():
    d, q = BUDGETS["default"], BUDGETS["quick"]

    def budget(key, text=""):  # budget flags default to SUPPRESS: absent means "the budget's value"
        return f"{text}{'; ' if text else ''}default {d[key]}" + (f", --quick: {q[key]}" if q[key] != d[key] else "")

    p = argparse.ArgumentParser(allow_abbrev=False,
        prog="python -m quickstart", formatter_class=HelpFormatter,
        description="Quickstart and miniature robustness benchmark: SCDM vs SDM on noisy toy label maps, on CPU.",
        epilog="--quick changes the defaults of out_dir, num_test, steps, respacing and sample_batch "
               "(BUDGETS in quickstart/config.py).")
    add_bool_argument(p, "--quick", help="small smoke run: 8 min on the 2-core AMD EPYC VM, 2 min 15 s on the "
                                         "2-core Intel Xeon (AVX512) VM; its samples are still mostly noise")
    p.add_argument("--out_dir", default=argparse.SUPPRESS, help=budget("out_dir", "results folder"))
    add_deprecated_alias(p, "--out", "--out_dir", dest="out_dir")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reuse", dest="fresh", action="store_false", default=argparse.SUPPRESS,
                   help="continue in an existing quickstart folder (the default)")
    add_bool_argument(g, "--fresh", help="wipe the quickstart folder first")
    p.add_argument("--steps", type=positive_int, default=argparse.SUPPRESS,
                   help=budget("steps", "training steps per model; more than an existing run's continues its training"))
    p.add_argument("--num_train", type=positive_int, default=argparse.SUPPRESS,
                   help=budget("num_train", "toy training maps"))
    p.add_argument("--num_test", type=int_at_least(2), default=argparse.SUPPRESS,
                   help=budget("num_test", "held-out test maps"))
    p.add_argument("--size", type=int_at_least(16, 1024), default=argparse.SUPPRESS,
                   help=budget("size", "image side in px"))
    p.add_argument("--batch_size", type=positive_int, default=argparse.SUPPRESS,
                   help=budget("batch_size", "training batch"))
    p.add_argument("--lr", type=positive_float, default=argparse.SUPPRESS, help=budget("lr", "learning rate"))
    p.add_argument("--ema_rate", default="0.99", type=rate_list,
                   help="EMA rate of training (0.9999 is far too slow for a few hundred steps)")
    add_bool_argument(p, "--ema_warmup", default=True,
                      help="EMA decay min(rate, (1+s)/(10+s)): a short run's EMA is not mostly its initial weights "
                           "(default: %(default)s)")
    p.add_argument("--sample_from", choices=("ema", "model"), default="ema",
                   help="sample the EMA weights (ema_<rate>_*.pt) or the raw model*.pt")
    p.add_argument("--respacing", type=respacing, default=argparse.SUPPRESS,
                   help=budget("respacing", "sampler timestep respacing"))
    p.add_argument("--s", type=nonnegative_float, default=1.5, help="classifier-free guidance scale")
    p.add_argument("--extrapolation", type=nonnegative_float, default=0.8,
                   help="sampler extrapolation (released 25-step setting)")
    p.add_argument("--dynamic_threshold", type=probability, default=0.95,
                   help="sampler dynamic-thresholding percentile")
    p.add_argument("--sample_batch", type=positive_int, default=argparse.SUPPRESS,
                   help=budget("sample_batch", "maps per sampler batch"))
    add_bool_argument(p, "--sdm_unlabeled_to_zero",
                      help="give SDM the unlabeled/noisy pixels as all-zero vectors too (ablation)")
    p.add_argument("--edge_radius", type=nonnegative_int, default=1, help="Edge noise radius (paper: 2 at 256 px)")
    p.add_argument("--random_p", type=probability, default=0.1, help="Random noise probability (paper: 0.1)")
    add_bool_argument(p, "--painter", help="add the Painter noise as a fifth row")
    p.add_argument("--grid_maps", type=positive_int, default=2, help="test maps shown in grid.png (the first ones)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="data, noise, training and sampling seed")
    p.add_argument("--num_channels", type=int_at_least(32), default=PRESETS["toy"].model["num_channels"],
                   help=argparse.SUPPRESS)
    return p


def resolve_config(args):
    """The run's settings: the budget's values unless a flag was given, checked."""
    budget = BUDGETS["quick" if args.quick else "default"]
    cfg = {k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in budget.items()}
    cfg.update(ema_rate=str(args.ema_rate), ema_warmup=bool(args.ema_warmup), sample_from=args.sample_from, s=args.s,
               extrapolation=args.extrapolation,
               dynamic_threshold=args.dynamic_threshold, sdm_unlabeled_to_zero=args.sdm_unlabeled_to_zero,
               edge_radius=args.edge_radius, random_p=args.random_p, painter=args.painter,
               grid_maps=args.grid_maps, seed=args.seed, num_channels=args.num_channels, quick=args.quick,
               drop_rate=DROP_RATE)
    checks = [("num_train", 1), ("num_test", 2), ("size", 16), ("steps", 1), ("batch_size", 1),
              ("sample_batch", 1), ("num_channels", 32), ("grid_maps", 1)]
    for key, lo in checks:
        if cfg[key] < lo:
            raise QuickstartError(f"--{key} must be >= {lo}, got {cfg[key]}")
    if cfg["size"] % 4:
        raise QuickstartError(f"--size must be a multiple of 4 (DS stores maps at size/4), got {cfg['size']}")
    if cfg["num_channels"] % 32:
        raise QuickstartError(f"--num_channels must be a multiple of 32 (GroupNorm32), got {cfg['num_channels']}")
    if not 0 <= cfg["random_p"] <= 1:
        raise QuickstartError(f"--random_p must be in [0, 1], got {cfg['random_p']}")
    if cfg["edge_radius"] < 0:
        raise QuickstartError(f"--edge_radius must be >= 0, got {cfg['edge_radius']}")
    if not cfg["lr"] > 0:
        raise QuickstartError(f"--lr must be > 0, got {cfg['lr']}")
    if cfg["batch_size"] > cfg["num_train"]:
        raise QuickstartError(f"--batch_size {cfg['batch_size']} is larger than --num_train {cfg['num_train']}: "
                              "training needs at least one full batch")
    try:  # the sampler's own check, now rather than after both trainings
        from scdm.script_util import create_gaussian_diffusion
        create_gaussian_diffusion(steps=PRESETS["toy"].model["diffusion_steps"], timestep_respacing=cfg["respacing"])
    except ValueError as e:
        raise QuickstartError(f"--respacing {cfg['respacing']}: {e}") from None
    cfg["noises"] = ["clean", "ds", "edge", "random"] + (["painter"] if cfg["painter"] else [])
    cfg["out_dir"] = str(cfg["out_dir"])
    return cfg


def noise_params(cfg, noise):
    """image_process flags of each noise, scaled from the paper's 256 px to --size."""
    size = cfg["size"]
    return {"ds": {"size": size // 4},
            "edge": {"radius": cfg["edge_radius"]},
            "random": {"p": cfg["random_p"]},
            # 3 px at 256 is at most one pixel here; 64 px regions at 256 are 1 px here, so "small" = 8 px.
            "painter": {"max_shift": max(1, round(3 * size / 256)), "small_area": 8, "drop_prob": 0.5}}[noise]


def arch_flags(cfg):
    """The toy preset's network at --size / --num_channels, without the instance-edge channel: the
    paper's noisy benchmarks are on ADE20K, whose models take the label map only."""
    return dict(PRESETS["toy"].model, no_instance=True, image_size=cfg["size"], num_channels=cfg["num_channels"],
                attention_resolutions=str(max(8, cfg["size"] // 2)))


def model_flags(cfg, model, schedule=None):
    """Model and diffusion flags of SCDM (class-wise label diffusion) or SDM (none; otherwise the same)."""
    flags = arch_flags(cfg)
    if model == "scdm":
        flags.update(cond_diffuse=True, cond_opt="discrete_zero_classwise")
        if schedule is not None:
            flags["class_schedule"] = str(schedule)
    else:
        flags["cond_diffuse"] = False
        flags.pop("cond_opt", None)
    return flags


def training_key(cfg):
    """What the checkpoints depend on (all but the number of steps): a folder holding models trained
    with another key is refused instead of being mixed with new ones."""
    keys = ("size", "num_train", "seed", "batch_size", "lr", "ema_rate", "ema_warmup", "drop_rate", "num_channels")
    return {k: cfg[k] for k in keys}


def unlabeled_to_zero(cfg, model):
    return model == "scdm" or cfg["sdm_unlabeled_to_zero"]
