"""Quickstart and miniature robustness benchmark: SCDM vs SDM on noisy toy label maps, on CPU.

    python -m scdm.quickstart                 # default budget (about 15 min on 2 CPU cores)
    python -m scdm.quickstart --quick         # smoke run (about 3 min), in results/quickstart-quick
    python -m scdm.quickstart --fresh         # wipe the results folder first

What it does, each step through the project's real entry points (subprocesses):

1. `scdm.toy` writes the built-in toy dataset (`--num_train` / `--num_test` maps of `--size` px);
2. `scdm.class_schedule` computes the per-class lambda file from the toy training labels;
3. `image_process.{downsample,edge,random[,painter]}` build the noisy versions of the held-out test
   maps (folder layout; DS at size/4 like the paper's 256 -> 64, Edge radius 1, Random p = 0.1);
4. `scdm.image_train` trains SCDM (class-wise label diffusion, `discrete_zero_classwise`) and the SDM
   baseline (the same network, data, steps and seed, no label diffusion), both with classifier-free
   dropout 0.2;
5. `scdm.image_sample` samples both models on every version (ddim25, s = 1.5, extrapolation 0.8,
   dynamic threshold 0.95, the released 25-step setting). SCDM reads unlabeled (noisy) pixels as its
   absorbing [MASK] state (`--unlabeled_to_zero True`, the released protocol for noisy maps); SDM
   reads them as the unlabeled class, as the released SDM does (`--sdm_unlabeled_to_zero` flips it);
6. scores: mIoU of the exact toy segmenter (`evaluations.miou`) against the CLEAN test labels
   (the unlabeled class is not scored), and a Frechet distance between Gaussian fits of simple image
   statistics of the samples and of the clean test images (`image_statistics` below; no pretrained
   network exists offline);
7. writes `<out>/grid.png` (label | noisy label | SDM | SCDM, one row per noise), `results.md` and
   `results.json`.

Reruns reuse the folder: finished stages are skipped, training resumes from the last checkpoint
(`--resume_checkpoint`), sampling skips finished images. Ctrl-C (or SIGTERM) asks a running training
to save a checkpoint before stopping. A folder that is not a quickstart folder is never touched.
"""
import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

GENERATOR = "scdm.quickstart"
STATE_FILE = "quickstart.json"
REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("sdm", "scdm")
MODEL_NAMES = {"sdm": "SDM", "scdm": "SCDM"}
NOISE_NAMES = {"clean": "clean", "ds": "DS", "edge": "Edge", "random": "Random", "painter": "Painter"}
NOISE_CLI = {"ds": "downsample", "edge": "edge", "random": "random", "painter": "painter"}

# The built-in toy architecture (scripts/common.sh TOY_ARCH) without the instance-edge channel: the
# paper's noisy benchmarks are on ADE20K, whose models take the label map only.
ARCH = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
            num_head_channels=16, learn_sigma=True, noise_schedule="linear", diffusion_steps=1000,
            resblock_updown=True, use_scale_shift_norm=True, class_cond=True, no_instance=True)

# Budgets. DEFAULT: <= 15 min on 2 shared CPU cores; QUICK: <= 3 min (a smoke run, numbers not meaningful).
PRESETS = {
    "default": dict(out="results/quickstart", size=32, num_train=512, num_test=64, steps=400, batch_size=16,
                    lr=5e-4, respacing="ddim25", sample_batch=16),
    "quick": dict(out="results/quickstart-quick", size=32, num_train=512, num_test=8, steps=60, batch_size=16,
                  lr=5e-4, respacing="ddim10", sample_batch=8),
}


class QuickstartError(Exception):
    """Something the user can fix; printed as one line, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the running child was asked to stop (training saves a checkpoint)."""


# ----------------------------------------------------------------------------------------------- config

def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m scdm.quickstart", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Defaults shown are the default budget's; --quick changes out, num_test, steps, respacing, "
               "sample_batch (see PRESETS in scdm/quickstart.py).")
    d = PRESETS["default"]
    p.add_argument("--quick", action="store_true", help="small smoke run (about 3 min on 2 cores)")
    p.add_argument("--out", default=None, help=f"results folder (default {d['out']}; --quick: "
                                                f"{PRESETS['quick']['out']})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reuse", dest="fresh", action="store_false",
                   help="continue in an existing quickstart folder (the default)")
    g.add_argument("--fresh", dest="fresh", action="store_true", help="wipe the quickstart folder first")
    p.set_defaults(fresh=False)
    p.add_argument("--steps", type=int, default=None, help=f"training steps per model (default {d['steps']}); "
                                                           "more than an existing run's continues its training")
    p.add_argument("--num_train", type=int, default=None, help=f"toy training maps (default {d['num_train']})")
    p.add_argument("--num_test", type=int, default=None, help=f"held-out test maps (default {d['num_test']})")
    p.add_argument("--size", type=int, default=None, help=f"image side in px (default {d['size']})")
    p.add_argument("--batch_size", type=int, default=None, help=f"training batch (default {d['batch_size']})")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default {d['lr']})")
    p.add_argument("--ema_rate", default="0.99",
                   help="EMA rate of training (0.9999 is far too slow for a few hundred steps)")
    p.add_argument("--sample_from", choices=("ema", "model"), default="ema",
                   help="sample the EMA weights (ema_<rate>_*.pt) or the raw model*.pt")
    p.add_argument("--respacing", default=None, help=f"sampler timestep respacing (default {d['respacing']})")
    p.add_argument("--s", type=float, default=1.5, help="classifier-free guidance scale")
    p.add_argument("--extrapolation", type=float, default=0.8)
    p.add_argument("--dynamic_threshold", type=float, default=0.95)
    p.add_argument("--sample_batch", type=int, default=None, help=f"maps per sampler batch (default {d['sample_batch']})")
    p.add_argument("--sdm_unlabeled_to_zero", action="store_true",
                   help="give SDM the unlabeled/noisy pixels as all-zero vectors too (ablation)")
    p.add_argument("--edge_radius", type=int, default=1, help="Edge noise radius (paper: 2 at 256 px)")
    p.add_argument("--random_p", type=float, default=0.1, help="Random noise probability (paper: 0.1)")
    p.add_argument("--painter", action="store_true", help="add the Painter noise as a fifth row")
    p.add_argument("--grid_maps", type=int, default=2, help="test maps shown in grid.png (the first ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_channels", type=int, default=ARCH["num_channels"], help=argparse.SUPPRESS)
    return p


def resolve_config(args):
    preset = PRESETS["quick" if args.quick else "default"]
    cfg = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in preset.items()}
    cfg.update(ema_rate=str(args.ema_rate), sample_from=args.sample_from, s=args.s, extrapolation=args.extrapolation,
               dynamic_threshold=args.dynamic_threshold, sdm_unlabeled_to_zero=args.sdm_unlabeled_to_zero,
               edge_radius=args.edge_radius, random_p=args.random_p, painter=args.painter,
               grid_maps=args.grid_maps, seed=args.seed, num_channels=args.num_channels, quick=args.quick,
               drop_rate=0.2)
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
    cfg["noises"] = ["clean", "ds", "edge", "random"] + (["painter"] if cfg["painter"] else [])
    cfg["out"] = str(cfg["out"])
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
    return dict(ARCH, image_size=cfg["size"], num_channels=cfg["num_channels"],
                attention_resolutions=str(max(8, cfg["size"] // 2)))


def training_key(cfg):
    """What the checkpoints depend on (all but the number of steps)."""
    keys = ("size", "num_train", "seed", "batch_size", "lr", "ema_rate", "drop_rate", "num_channels")
    return {k: cfg[k] for k in keys}


def flag_list(d):
    out = []
    for k, v in d.items():
        out += [f"--{k}", str(v)]
    return out


# ----------------------------------------------------------------------------------------------- running

def log(msg):
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def fmt_time(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Runner:
    """Runs entry points as `python -m module args` in their own session, so that Ctrl-C reaches the
    orchestrator only; it then sends the child SIGTERM (training saves a checkpoint) and waits."""

    def __init__(self, python=None):
        self.python = python or sys.executable
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    def __call__(self, module, argv, what):
        cmd = [self.python, "-m", module, *map(str, argv)]
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.Popen(cmd, env=self.env, start_new_session=True)
        try:
            code = proc.wait()
        except BaseException:
            _stop_child(proc)
            raise
        if code != 0:
            raise QuickstartError(f"{what} failed ({module} exit code {code}; its message is above). "
                                  f"Fix the cause and rerun: finished stages are kept")


def _stop_child(proc, grace=120):
    if proc.poll() is not None:
        return
    log("stopping the running step (a training run saves a checkpoint first) ...")
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except KeyboardInterrupt:  # a second Ctrl-C: stop now
        proc.kill()
        proc.wait()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------- folder

def read_state(out):
    path = out / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("generator") == GENERATOR else None


def write_json(obj, path):
    from evaluations.common import atomic_write
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def prepare_out(out, cfg, fresh):
    """Create or reuse the results folder; refuse a folder that is not a quickstart folder."""
    if out.exists() and not out.is_dir():
        raise QuickstartError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        state = read_state(out)
        if state is None:
            raise QuickstartError(f"--out {out} is not empty and is not a quickstart folder (no {STATE_FILE} made "
                                  f"by {GENERATOR}); choose a new or empty folder; nothing was changed")
        if fresh:
            log(f"--fresh: removing the previous quickstart results in {out}")
            shutil.rmtree(out)
        else:
            old = state.get("training_key")
            if old is not None and old != training_key(cfg):
                diff = ", ".join(f"--{k} {old.get(k)} -> {v}" for k, v in training_key(cfg).items() if old.get(k) != v)
                raise QuickstartError(f"{out} holds models trained with other settings ({diff}); pass --fresh to "
                                      f"start over, or --out DIR for a separate run")
            log(f"reusing {out}: finished stages are skipped, training resumes from its last checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    state = read_state(out) or {"generator": GENERATOR, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    state.update(training_key=training_key(cfg), config=cfg)
    write_json(state, out / STATE_FILE)


def folder_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def count_parameters(cfg):
    from .script_util import create_model
    model = create_model(**{k: v for k, v in arch_flags(cfg).items() if k not in
                            ("learn_sigma", "noise_schedule", "diffusion_steps")},
                         num_classes=8, learn_sigma=True)
    return sum(p.numel() for p in model.parameters())


def disk_needed(cfg, n_params):
    """Bytes the whole run writes at most: per model a few checkpoint sets (model + EMA + Adam's two
    moments = 16 bytes per fp32 parameter) before the old ones are pruned, plus data and samples."""
    per_set = 16 * n_params + 2 ** 16
    saves = min(cfg["steps"], 4) + 1
    pixels = cfg["size"] ** 2
    data = (cfg["num_train"] + cfg["num_test"] * (1 + len(cfg["noises"]))) * (pixels * 6 + 3000)
    samples = len(MODELS) * len(cfg["noises"]) * cfg["num_test"] * (pixels * 8 + 4000)
    return len(MODELS) * saves * per_set + data + samples + 20 * 2 ** 20


def check_disk(out, cfg, n_params):
    need = max(0, disk_needed(cfg, n_params) - folder_bytes(out))
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise QuickstartError(f"not enough free disk space for the quickstart in {probe}: about "
                              f"{need / 2 ** 20:.0f} MB needed, {free / 2 ** 20:.0f} MB free. Free some space or "
                              f"pass --out on another disk")
    return need, free


# ----------------------------------------------------------------------------------------------- stages

def toy_done(toy, cfg):
    try:
        meta = json.loads((toy / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    want = {"size": cfg["size"], "seed": cfg["seed"], "num_train": cfg["num_train"], "num_test": cfg["num_test"]}
    if any(meta.get(k) != v for k, v in want.items()):
        return False
    return all(len(list((toy / s / sub).glob("*.png"))) == n for s, n in (("train", cfg["num_train"]),
                                                                          ("test", cfg["num_test"]))
               for sub in ("images", "labels", "instances"))


def noisy_tree_done(tree, cfg, noise, source_meta):
    try:
        manifest = json.loads((tree / "corruption.json").read_text())
        meta = (tree / "dataset.json").read_text()
    except (OSError, ValueError):
        return False
    return (manifest.get("params") == noise_params(cfg, noise) and manifest.get("num") == cfg["num_test"]
            and manifest.get("seed") == cfg["seed"] and meta == source_meta
            and len(list((tree / "test" / "labels").glob("*.png"))) == cfg["num_test"])


CKPT_RE = re.compile(r"^model(\d{6})\.pt$")


def checkpoints(log_dir):
    """Steps of the complete checkpoint sets in `log_dir` (the model file is written last)."""
    if not log_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for f in log_dir.iterdir() if (m := CKPT_RE.match(f.name)))


def prune_checkpoints(log_dir, keep_step):
    """Delete the checkpoint files of other steps than `keep_step` (disk: ~50 MB per set)."""
    for f in log_dir.iterdir():
        m = re.match(r"^(model|opt|scaler|ema_[0-9.]+_)(\d{6})\.pt$", f.name)
        if m and int(m.group(2)) != keep_step:
            f.unlink()


def sample_checkpoint(cfg, log_dir):
    from .checkpoint import ema_name, model_name
    step = cfg["steps"]
    return log_dir / (ema_name(cfg["ema_rate"], step) if cfg["sample_from"] == "ema" else model_name(step))


def model_flags(cfg, model, schedule):
    flags = dict(arch_flags(cfg), dataset_mode="folder")
    if model == "scdm":
        flags.update(cond_diffuse=True, cond_opt="discrete_zero_classwise", class_schedule=str(schedule))
    else:
        flags.update(cond_diffuse=False)
    return flags


def sampling_key(cfg, model, noise, ckpt, tree):
    key = {"checkpoint": ckpt.name, "respacing": cfg["respacing"], "s": cfg["s"],
           "extrapolation": cfg["extrapolation"], "dynamic_threshold": cfg["dynamic_threshold"],
           "seed": cfg["seed"], "num_test": cfg["num_test"], "unlabeled_to_zero": unlabeled_to_zero(cfg, model),
           "steps": cfg["steps"], "training_key": training_key(cfg)}
    if noise != "clean":
        key["noise"] = json.loads((tree / "corruption.json").read_text())["params"]
    return key


def unlabeled_to_zero(cfg, model):
    return model == "scdm" or cfg["sdm_unlabeled_to_zero"]


def samples_done(folder, cfg, key):
    try:
        if json.loads((folder / "sampling.json").read_text()) != key:
            return False
    except (OSError, ValueError):
        return False
    return all(len(list((folder / d).glob("*.png"))) >= cfg["num_test"] for d in ("samples", "labels", "images"))


# ----------------------------------------------------------------------------------------------- scores

def image_statistics(images):
    """Simple image statistics for the distribution distance, 30 numbers per image (in grey levels 0..255):

    - per channel mean and standard deviation (6): global colour;
    - per channel mean |difference| of horizontal, vertical, diagonal and anti-diagonal neighbours (12):
      texture energy and orientation (the toy classes differ in stripe direction);
    - 2x2 average-pooled RGB (12): coarse layout.

    images: (N, H, W, 3) uint8 -> (N, 30) float64.
    """
    x = np.asarray(images, dtype=np.float64)
    n, h, w, _ = x.shape
    mean, std = x.mean(axis=(1, 2)), x.std(axis=(1, 2))
    grads = [np.abs(np.diff(x, axis=2)).mean(axis=(1, 2)), np.abs(np.diff(x, axis=1)).mean(axis=(1, 2)),
             np.abs(x[:, 1:, 1:] - x[:, :-1, :-1]).mean(axis=(1, 2)),
             np.abs(x[:, 1:, :-1] - x[:, :-1, 1:]).mean(axis=(1, 2))]
    pooled = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, 2, h // 2, 2, w // 2, 3).mean(axis=(2, 4)).reshape(n, -1)
    return np.concatenate([mean, std, *grads, pooled], axis=1)


def load_images(folder, names):
    return np.stack([np.asarray(Image.open(folder / f"{n}.png").convert("RGB")) for n in names])


def distribution_distance(sample_feats, ref_feats):
    from evaluations.fid import frechet_distance
    mu1, mu2 = sample_feats.mean(0), ref_feats.mean(0)
    s1, s2 = np.cov(sample_feats, rowvar=False), np.cov(ref_feats, rowvar=False)
    # Few images (fewer than 30) give singular covariances, whose matrix square root can make the
    # distance slightly negative; it is a distance, so it is clipped at 0.
    return max(0.0, float(frechet_distance(mu1, s1, mu2, s2)))


def score_all(out, cfg):
    """mIoU against the clean labels and the Frechet distance to the clean test images, per model and noise."""
    import contextlib
    import io

    from evaluations.miou import miou_of_toy_samples
    toy = out / "data" / "toy"
    names = sorted(p.stem for p in (toy / "test" / "images").glob("*.png"))
    ref = image_statistics(load_images(toy / "test" / "images", names))
    # The same number of real toy images that the samples were not made from: how far apart two
    # finite real samples are (the distance's noise floor at this number of images).
    train_names = sorted(p.stem for p in (toy / "train" / "images").glob("*.png"))[: len(names)]
    floor = distribution_distance(image_statistics(load_images(toy / "train" / "images", train_names)), ref) \
        if len(train_names) == len(names) else None
    results = {}
    for model in MODELS:
        for noise in cfg["noises"]:
            folder = out / "samples" / model / noise
            with contextlib.redirect_stderr(io.StringIO()):
                m = miou_of_toy_samples(folder / "samples", toy / "test" / "labels")
            fd = distribution_distance(image_statistics(load_images(folder / "samples", names)), ref)
            results.setdefault(noise, {})[model] = {
                "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "per_class_iou": m["per_class_iou"],
                "fd": fd, "num_images": m["num_images"]}
    return results, floor


# ----------------------------------------------------------------------------------------------- pictures

def label_colors():
    from .toy import TOY_COLORS, TOY_UNLABELED_ID
    colors = TOY_COLORS.copy()
    colors[TOY_UNLABELED_ID] = 0  # unlabeled / noise: black
    return colors


def colorize(ids):
    colors = label_colors()
    return colors[np.clip(np.asarray(ids, dtype=np.int64), 0, len(colors) - 1)]


def write_grid(out, cfg, path):
    """label | noisy label | SDM | SCDM, one row per noise, for the first --grid_maps test maps."""
    from PIL import ImageDraw
    toy = out / "data" / "toy"
    names = sorted(p.stem for p in (toy / "test" / "labels").glob("*.png"))[: cfg["grid_maps"]]
    size, scale = cfg["size"], max(1, 128 // cfg["size"])
    tile, gap, left, top = size * scale, 4, 64, 18
    cols = ["label", "noisy label", "SDM", "SCDM"]
    rows_per_map = len(cfg["noises"])
    height = top + len(names) * (rows_per_map * (tile + gap) + 2 * gap)
    width = left + len(cols) * (tile + gap)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(cols):
        draw.text((left + c * (tile + gap) + 4, 3), name, fill=(0, 0, 0))
    y = top
    for name in names:
        clean = np.asarray(Image.open(toy / "test" / "labels" / f"{name}.png"))
        for noise in cfg["noises"]:
            folder = out / "samples" / "sdm" / noise
            noisy = np.asarray(Image.open(folder / "labels" / f"{name}.png"))
            tiles = [colorize(clean), colorize(noisy)] + [
                np.asarray(Image.open(out / "samples" / m / noise / "samples" / f"{name}.png").convert("RGB"))
                for m in MODELS]
            for c, t in enumerate(tiles):
                im = Image.fromarray(t.astype(np.uint8)).resize((tile, tile), Image.NEAREST)
                canvas.paste(im, (left + c * (tile + gap), y))
            draw.text((4, y + tile // 2 - 12), NOISE_NAMES[noise], fill=(0, 0, 0))
            draw.text((4, y + tile // 2 + 2), f"map {name}", fill=(110, 110, 110))
            y += tile + gap
        y += 2 * gap
    from evaluations.common import atomic_write
    atomic_write(path, lambda f: canvas.save(f, format="PNG"), mode="wb")


# ----------------------------------------------------------------------------------------------- report

def results_markdown(cfg, results, floor, timing, machine):
    lines = ["# Quickstart: SCDM vs SDM on noisy toy label maps", "",
             f"{cfg['num_test']} held-out toy maps ({cfg['size']}x{cfg['size']}); both models: the same "
             f"{arch_flags(cfg)['num_channels']}-channel SPADE UNet, {cfg['steps']} steps of batch {cfg['batch_size']} "
             f"(lr {cfg['lr']}, dropout of the label map 0.2), sampled from "
             f"{'EMA ' + cfg['ema_rate'] if cfg['sample_from'] == 'ema' else 'the raw'} weights with "
             f"{cfg['respacing']}, s={cfg['s']}, extrapolation {cfg['extrapolation']}, dynamic threshold "
             f"{cfg['dynamic_threshold']}.", "",
             "| noise | mIoU SDM | mIoU SCDM | FD SDM | FD SCDM |", "|---|---:|---:|---:|---:|"]
    for noise in cfg["noises"]:
        r = results[noise]
        lines.append(f"| {NOISE_NAMES[noise]} | {100 * r['sdm']['miou']:.1f} | {100 * r['scdm']['miou']:.1f} | "
                     f"{r['sdm']['fd']:.1f} | {r['scdm']['fd']:.1f} |")
    noise_desc = {"ds": f"labels stored at {cfg['size'] // 4}x{cfg['size'] // 4} (nearest) and brought back with nearest",
                  "edge": f"pixels within L1 distance {cfg['edge_radius']} of a boundary set to unlabeled",
                  "random": f"each pixel set to unlabeled with probability {cfg['random_p']}",
                  "painter": "careless painter: borders moved by up to "
                             f"{noise_params(cfg, 'painter')['max_shift']} px, small regions dropped"}
    lines += ["",
              "- **mIoU** (%, higher is better): the exact toy segmenter (nearest class colour) on each sample, "
              "against the CLEAN label map, whatever version the model was given; the unlabeled class is not "
              "scored. Real toy images score 100.",
              "- **FD** (lower is better): Frechet distance between Gaussian fits of 30 image statistics "
              "(per-channel mean and std, mean absolute neighbour differences in 4 directions, 2x2 pooled "
              "colour; grey levels 0..255) of the samples and of the clean test images."
              + (f" Two real sets of {cfg['num_test']} toy images are {floor:.1f} apart (the noise floor)."
                 if floor is not None else ""),
              "- Noises (`image_process/`, folder layout): " + "; ".join(
                  f"{NOISE_NAMES[n]}: {noise_desc[n]}" for n in cfg["noises"] if n != "clean") + ".",
              "- SCDM gets unlabeled pixels as its absorbing [MASK] state (`--unlabeled_to_zero True`); SDM "
              + ("gets them as all-zero vectors too (`--sdm_unlabeled_to_zero`)." if cfg["sdm_unlabeled_to_zero"]
                 else "gets them as the unlabeled class, as the released SDM does."),
              f"- Machine: {machine}. Wall time of this run: {fmt_time(timing['total'])}"
              + (" (stages reused from an earlier run were not recomputed)" if timing.get("reused") else "") + ".",
              f"- Picture: `grid.png` (label | noisy label | SDM | SCDM, one row per noise; black = unlabeled).",
              ""]
    return "\n".join(lines)


def machine_line():
    import platform

    from .performance import describe_machine
    m = describe_machine()
    gpu = f"GPU {m['gpu']['name']}" if m["gpu"] else "no GPU"
    return f"{m['cpus_usable']} CPU cores ({m['cpu']}, {platform.machine()}), {gpu}"


# ----------------------------------------------------------------------------------------------- main

def run(cfg, fresh=False, runner=None):
    """The whole pipeline; returns the results dict (also written to <out>/results.json)."""
    runner = runner or Runner()
    start = time.perf_counter()
    out = Path(cfg["out"]).resolve()
    prepare_out(out, cfg, fresh)
    n_params = count_parameters(cfg)
    need, free = check_disk(out, cfg, n_params)
    log(f"results in {out} ({n_params / 1e6:.2f}M parameters per model; about {need / 2 ** 20:.0f} MB to write, "
        f"{free / 2 ** 20:.0f} MB free)")

    data, toy = out / "data", out / "data" / "toy"
    schedule = data / "class_schedule.npy"
    noisy = {n: data / "noisy" / n for n in cfg["noises"] if n != "clean"}
    trees = dict(clean=toy, **noisy)
    stages = (["toy dataset", "class schedule"] + [f"noisy maps: {NOISE_NAMES[n]}" for n in noisy]
              + [f"train {MODEL_NAMES[m]}" for m in ("scdm", "sdm")]
              + [f"sample {MODEL_NAMES[m]} on {NOISE_NAMES[n]}" for m in ("scdm", "sdm") for n in cfg["noises"]]
              + ["scores, grid and report"])
    timing, counter = {"stages": {}}, [0]

    def stage(name):
        counter[0] += 1
        log(f"stage {counter[0]}/{len(stages)} [{fmt_time(time.perf_counter() - start)}] {name}")
        return time.perf_counter()

    def done(name, t0, skipped=False):
        timing["stages"][name] = None if skipped else round(time.perf_counter() - t0, 1)
        if skipped:
            timing["reused"] = True
            log(f"  {name}: already done, reused")

    # 1. toy dataset
    t0 = stage(stages[0])
    if toy_done(toy, cfg):
        done(stages[0], t0, True)
    else:
        if toy.exists() and not (toy / "dataset.json").is_file():
            shutil.rmtree(toy)
        runner("scdm.toy", ["--out", toy, "--num_train", cfg["num_train"], "--num_test", cfg["num_test"],
                            "--size", cfg["size"], "--seed", cfg["seed"]], "making the toy dataset")
        done(stages[0], t0)

    # 2. class schedule (from the training labels only; they do not depend on --num_test)
    t0 = stage(stages[1])
    sched_key = {"num_train": cfg["num_train"], "size": cfg["size"], "seed": cfg["seed"]}
    stamp = data / "class_schedule.json"
    if schedule.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == sched_key:
        done(stages[1], t0, True)
    else:
        runner("scdm.class_schedule", ["--dataset_mode", "folder", "--data_dir", toy, "--out", schedule],
               "computing the class schedule")
        write_json(sched_key, stamp)
        done(stages[1], t0)

    # 3. noisy versions of the test maps
    source_meta = (toy / "dataset.json").read_text()
    for i, (noise, tree) in enumerate(noisy.items()):
        name = stages[2 + i]
        t0 = stage(name)
        if noisy_tree_done(tree, cfg, noise, source_meta):
            done(name, t0, True)
            continue
        if tree.exists():
            shutil.rmtree(tree)
        runner(f"image_process.{NOISE_CLI[noise]}",
               ["--dataset_mode", "folder", "--data_dir", toy, "--out_dir", tree, "--num", cfg["num_test"],
                "--seed", cfg["seed"], "--image_size", cfg["size"], "--workers", 1,
                *flag_list(noise_params(cfg, noise))], f"building the {NOISE_NAMES[noise]} maps")
        done(name, t0)

    # 4. training
    idx = 2 + len(noisy)
    for model in ("scdm", "sdm"):
        name = stages[idx]
        idx += 1
        t0 = stage(name)
        log_dir = out / "train" / model
        log_dir.mkdir(parents=True, exist_ok=True)
        steps = checkpoints(log_dir)
        last = steps[-1] if steps else None
        if last is not None and last > cfg["steps"]:
            raise QuickstartError(f"{log_dir} holds a model trained for {last} steps, more than --steps "
                                  f"{cfg['steps']}; pass --steps {last} (or more), --fresh, or --out DIR")
        if last == cfg["steps"] and sample_checkpoint(cfg, log_dir).is_file():
            prune_checkpoints(log_dir, last)
            done(name, t0, True)
            continue
        if last is not None:
            prune_checkpoints(log_dir, last)
            log(f"  resuming {MODEL_NAMES[model]} from step {last} of {cfg['steps']}")
        argv = ["--data_dir", toy, *flag_list(model_flags(cfg, model, schedule)),
                "--batch_size", cfg["batch_size"], "--lr", cfg["lr"], "--ema_rate", cfg["ema_rate"],
                "--drop_rate", cfg["drop_rate"], "--max_steps", cfg["steps"], "--log_dir", log_dir,
                "--save_interval", max(25, math.ceil(cfg["steps"] / 4)), "--log_interval", 10,
                "--num_workers", 0, "--seed", cfg["seed"]]
        if last is not None:
            argv += ["--resume_checkpoint", log_dir / f"model{last:06d}.pt"]
        runner("scdm.image_train", argv, f"training {MODEL_NAMES[model]}")
        if not sample_checkpoint(cfg, log_dir).is_file():
            raise QuickstartError(f"training {MODEL_NAMES[model]} stopped before step {cfg['steps']} "
                                  f"(no {sample_checkpoint(cfg, log_dir).name}); rerun to continue")
        prune_checkpoints(log_dir, cfg["steps"])
        done(name, t0)

    # 5. sampling
    for model in ("scdm", "sdm"):
        ckpt = sample_checkpoint(cfg, out / "train" / model)
        for noise in cfg["noises"]:
            name = stages[idx]
            idx += 1
            t0 = stage(name)
            folder = out / "samples" / model / noise
            key = sampling_key(cfg, model, noise, ckpt, trees[noise])
            if samples_done(folder, cfg, key):
                done(name, t0, True)
                continue
            try:
                stale = json.loads((folder / "sampling.json").read_text()) != key
            except (OSError, ValueError):
                stale = folder.exists() and not (folder / "sampling.json").exists() and any(folder.rglob("*.png"))
            if stale:
                log(f"  {folder} was sampled with other settings; sampling again")
                shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
            write_json(key, folder / "sampling.json")
            argv = ["--model_path", ckpt, "--data_dir", trees[noise], "--results_path", folder,
                    *flag_list(model_flags(cfg, model, out / "data" / "class_schedule.npy")),
                    "--num_samples", cfg["num_test"], "--batch_size", cfg["sample_batch"],
                    "--timestep_respacing", cfg["respacing"], "--s", cfg["s"],
                    "--extrapolation", cfg["extrapolation"], "--dynamic_threshold", cfg["dynamic_threshold"],
                    "--label_resize", True, "--unlabeled_to_zero", unlabeled_to_zero(cfg, model),
                    "--seed", cfg["seed"]]
            runner("scdm.image_sample", argv, f"sampling {MODEL_NAMES[model]} on {NOISE_NAMES[noise]}")
            done(name, t0)

    # 6. scores, grid, report
    t0 = stage(stages[-1])
    results, floor = score_all(out, cfg)
    write_grid(out, cfg, out / "grid.png")
    timing["stages"][stages[-1]] = round(time.perf_counter() - t0, 1)
    timing["total"] = round(time.perf_counter() - start, 1)
    machine = machine_line()
    report = {
        "config": cfg, "results": results, "fd_real_vs_real": floor, "seconds": timing, "machine": machine,
        "parameters_per_model": n_params,
        "metrics": {"miou": "exact toy segmenter vs the clean test labels (unlabeled not scored), 0..1",
                    "fd": "Frechet distance of 30 image statistics (scdm.quickstart.image_statistics) to the "
                          "clean test images"},
    }
    write_json(report, out / "results.json")
    md = results_markdown(cfg, results, floor, timing, machine)
    from evaluations.common import atomic_write
    atomic_write(out / "results.md", md)
    state = read_state(out) or {}
    state.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), last_run_seconds=timing["total"])
    write_json(state, out / STATE_FILE)
    print(md, flush=True)
    log(f"done in {fmt_time(timing['total'])}: {out / 'results.md'}, {out / 'grid.png'}, {out / 'results.json'}")
    return report


def main(argv=None):
    args = build_parser().parse_args(argv)
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        cfg = resolve_config(args)
        run(cfg, fresh=args.fresh)
    except QuickstartError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("\n[quickstart] interrupted; rerun the same command to continue (finished stages, checkpoints and "
              "samples are kept)", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
