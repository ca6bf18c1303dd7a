"""Quality against steps on a trained toy model: DPM-Solver++(2M), DDIM, the released 25-step ancestral
setting and the 1000-step ancestral reference, on clean and noisy label maps, over several seeds.

    python benchmarks/bench_steps.py --model_path RUN/ema_0.999_000400.pt --data_dir TOY \
        --noisy edge=NOISY_TREE [--num_maps 16] [--seeds 0 1] [--steps 5 8 10 15 25 50] \
        [--out benchmarks/results/bench_steps.json] [--plot docs/bench_steps.png]
    python benchmarks/bench_steps.py --smoke     # seconds: an untrained tiny model on generated toy maps

Every setting samples the same maps with the same per-image seeds (the sampler's per-image
generators), with guidance s=1.5 and dynamic thresholding 0.95 as the released 25-step setting:
- dpm++2m: `--sampler dpm++2m --timestep_respacing logsnrN` (and on the uniform grid "N" at a few N,
  the ablation that explains the grid);
- ddim: `--sampler ddim --timestep_respacing ddimN` (the released DDIM grid), no extrapolation;
- ancestral 25: `presets.SAMPLING["25"]` (ddim25 grid, extrapolation 0.8);
- ancestral 1000: `presets.SAMPLING["1000"]` (all steps, s=1.5, clipping), the reference.
Scores: mIoU of the exact toy segmenter (`scdm.toy`) against the clean labels, per seed; the
image-statistics Frechet distance (`evaluations.image_stats`) of all seeds' samples pooled against the
real test images; seconds per image (one process, the threads it reports). The JSON is rewritten after
every setting, so a stopped run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluations.image_stats import distribution_distance, image_statistics, load_images  # noqa: E402
from evaluations.miou import confusion_matrix, gt_to_classes, label_spec, scores  # noqa: E402
from scdm.runtime.cli import HelpFormatter, nonnegative_int, positive_int  # noqa: E402
from scdm.data.conditioning import Conditioning  # noqa: E402
from scdm.data.dataset_layouts import dataset_info, read_ids  # noqa: E402
from scdm.data.datasets import build_dataset  # noqa: E402
from scdm.runtime.errors import UserError, run_cli  # noqa: E402
from scdm.runtime.fileio import save_image, write_json  # noqa: E402
from scdm.fast.performance import describe_machine  # noqa: E402
from scdm.presets import SAMPLING  # noqa: E402
from scdm.run_config import read_run_config  # noqa: E402
from scdm.loading import load_checkpoint  # noqa: E402
from scdm.diffusion.sampling import SamplerSettings, sample_batch  # noqa: E402
from scdm.script_util import create_diffusion, create_model_and_diffusion  # noqa: E402
from scdm.toy import segment_toy_image  # noqa: E402

GUIDANCE, THRESHOLD = SAMPLING["25"]["s"], SAMPLING["25"]["dynamic_threshold"]


# Which part of the released 25-step setting matters (names with a comma are left out of the plot).
ABLATIONS = [("dpm++2m 10, extrapolation 0.8", "dpm++2m", "logsnr10", GUIDANCE, 0.8, THRESHOLD, 10),
             ("ancestral 25, no extrapolation", "ancestral", "ddim25", GUIDANCE, 0.0, THRESHOLD, 25)]




def candidate(name, sampler, steps, extrapolation=0.0, grid="logsnr", **extra):
    """A few-step candidate for noisy maps (docs/sampling.md, "Few steps on noisy maps"): its setting
    tuple, with the SamplerSettings it adds (eta, label_noise, restart) as an eighth element."""
    restart = extra.get("restart", ())
    evaluations = steps + (restart[2] * (restart[1] - restart[0]) if restart else 0)
    return (name, sampler, f"{grid}{steps}", GUIDANCE, extrapolation, THRESHOLD, evaluations, extra)


# Few-step candidates for the Edge maps, by key (--candidates KEY ...; "all": every one).
CANDIDATES = {
    "anc-ddim10": candidate("ancestral 10 ddim10, e 0.8", "ancestral", 10, 0.8, grid="ddim"),
    "anc-logsnr10": candidate("ancestral 10 logsnr10, e 0.8", "ancestral", 10, 0.8),
    "anc-logsnr10-e0": candidate("ancestral 10 logsnr10", "ancestral", 10),
    "anc-logsnr8": candidate("ancestral 8 logsnr8, e 0.8", "ancestral", 8, 0.8),
    "ddim1-logsnr10": candidate("ddim eta 1 logsnr10", "ddim", 10, eta=1.0),
    "ddim1-logsnr10-e0.8": candidate("ddim eta 1 logsnr10, e 0.8", "ddim", 10, 0.8, eta=1.0),
    "dpm-eta0.5": candidate("dpm++2m eta 0.5 logsnr10", "dpm++2m", 10, eta=0.5),
    "dpm-eta0.8": candidate("dpm++2m eta 0.8 logsnr10", "dpm++2m", 10, eta=0.8),
    "sde-e0.4": candidate("dpm++2m-sde 10, e 0.4", "dpm++2m-sde", 10, 0.4),
    "sde-fixed": candidate("dpm++2m-sde 10, fixed label noise", "dpm++2m-sde", 10, label_noise="fixed"),
    "dpm-fixed": candidate("dpm++2m 10, fixed label noise", "dpm++2m", 10, label_noise="fixed"),
    "dpm-restart": candidate("dpm++2m 7 + restart 2-5", "dpm++2m", 7, restart=(2, 5, 1)),
    "sde-restart": candidate("dpm++2m-sde 7 + restart 2-5", "dpm++2m-sde", 7, restart=(2, 5, 1)),
    "anc-restart": candidate("ancestral 7 logsnr7 + restart 2-5, e 0.8", "ancestral", 7, 0.8,
                             restart=(2, 5, 1)),
    "anc-logsnr10-e0.4": candidate("ancestral 10 logsnr10, e 0.4", "ancestral", 10, 0.4),
    "anc-ddim10-e0.4": candidate("ancestral 10 ddim10, e 0.4", "ancestral", 10, 0.4, grid="ddim"),
    "ddim1-logsnr10-e0.4": candidate("ddim eta 1 logsnr10, e 0.4", "ddim", 10, 0.4, eta=1.0),
    "dpm-eta0.8-e0.4": candidate("dpm++2m eta 0.8 logsnr10, e 0.4", "dpm++2m", 10, 0.4, eta=0.8),
    "sde-fixed-e0.4": candidate("dpm++2m-sde 10, e 0.4, fixed label noise", "dpm++2m-sde", 10, 0.4,
                                label_noise="fixed"),
    **{f"sde-e{e}": candidate(f"dpm++2m-sde 10, e {e}", "dpm++2m-sde", 10, e) for e in (0.1, 0.2, 0.3, 0.5, 0.6)},
    **{f"sde{n}-e0.4": candidate(f"dpm++2m-sde {n}, e 0.4", "dpm++2m-sde", n, 0.4) for n in (5, 6, 8)},
    **{f"sde{n}-e{e}": candidate(f"dpm++2m-sde {n}, e {e}", "dpm++2m-sde", n, e)
       for n, e in ((8, 0.0), (8, 0.1), (8, 0.2), (6, 0.1), (9, 0.2), (9, 0.3))},
    "sde8-fixed-e0.2": candidate("dpm++2m-sde 8, e 0.2, fixed label noise", "dpm++2m-sde", 8, 0.2,
                                 label_noise="fixed"),
    **{f"dpm-eta{eta}-e0.3": candidate(f"dpm++2m eta {eta} logsnr10, e 0.3", "dpm++2m", 10, 0.3, eta=eta)
       for eta in (0.6, 0.8)},
    "sde-fixed-e0.3": candidate("dpm++2m-sde 10, e 0.3, fixed label noise", "dpm++2m-sde", 10, 0.3,
                                label_noise="fixed"),
    "sde-restart-e0.3": candidate("dpm++2m-sde 7 + restart 2-5, e 0.3", "dpm++2m-sde", 7, 0.3, restart=(2, 5, 1)),
    **{f"sde{n}-e{e}": candidate(f"dpm++2m-sde {n}, e {e}", "dpm++2m-sde", n, e)
       for n, e in ((8, 0.3), (7, 0.2), (7, 0.1), (6, 0.2))},
    **{f"sde{n}-fixed-e{e}": candidate(f"dpm++2m-sde {n}, e {e}, fixed label noise", "dpm++2m-sde", n, e,
                                       label_noise="fixed") for n, e in ((8, 0.3), (8, 0.1), (7, 0.2))},
    "dpm8-eta0.8-e0.4": candidate("dpm++2m eta 0.8 logsnr8, e 0.4", "dpm++2m", 8, 0.4, eta=0.8),
}


def settings(steps, uniform_steps, reference=True, ablations=False, sde_steps=(), released=True, candidates=()):
    """(name, sampler, respacing, s, extrapolation, threshold, steps[, SamplerSettings extras]) of every
    setting, cheap ones first."""
    out = list(ABLATIONS) if ablations else []
    out += [CANDIDATES[k] for k in (CANDIDATES if "all" in candidates else candidates)]
    for n in steps:
        out.append((f"dpm++2m {n}", "dpm++2m", f"logsnr{n}", GUIDANCE, 0.0, THRESHOLD, n))
        out.append((f"ddim {n}", "ddim", f"ddim{n}", GUIDANCE, 0.0, THRESHOLD, n))
    for n in sde_steps:
        out.append((f"dpm++2m-sde {n}", "dpm++2m-sde", f"logsnr{n}", GUIDANCE, 0.0, THRESHOLD, n))
    for n in uniform_steps:
        out.append((f"dpm++2m uniform-t {n}", "dpm++2m", str(n), GUIDANCE, 0.0, THRESHOLD, n))
    r25 = SAMPLING["25"]
    if released:
        out.append(("ancestral 25 (released)", "ancestral", r25["timestep_respacing"], r25["s"],
                    r25["extrapolation"], r25["dynamic_threshold"], 25))
    if reference:
        r = SAMPLING["1000"]
        out.append(("ancestral 1000 (reference)", "ancestral", r["timestep_respacing"], r["s"], 0.0, None, 1000))
    return out


def load_maps(data_dir, num_maps, info, conditioning, image_size):
    """(names, y) of the first num_maps test maps of a (clean or noisy) tree, as the sampler's input."""
    noisy = (Path(data_dir) / "corruption.json").is_file()
    dataset = build_dataset("folder", data_dir, image_size, is_train=False, info=info, label_resize=noisy)
    n = min(num_maps, len(dataset))
    conds = [dataset[i][1] for i in range(n)]
    batch = {k: torch.stack([torch.as_tensor(c[k]) for c in conds]) for k in conds[0] if k != "path"}
    names = [Path(c["path"]).stem for c in conds]
    return names, conditioning.model_input(batch)


def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def miou(images, names, label_dir):
    spec = label_spec("toy")
    cm = np.zeros((spec.num_classes, spec.num_classes), np.int64)
    for img, name in zip(images, names):
        path = Path(label_dir) / f"{name}.png"
        cm += confusion_matrix(segment_toy_image(img), gt_to_classes(read_ids(path), spec, path),
                               spec.num_classes, spec.ignore_index)
    return scores(cm)["miou"]


def image_seed(seed, name):
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


def sample(model, flags, setting, y, names, seed, batch_size):
    _, sampler, respacing, s, extrapolation, threshold, _, *extra = setting
    diffusion = create_diffusion(**dict(flags, timestep_respacing=respacing))
    settings = SamplerSettings(sampler=sampler, respacing=respacing, guidance_scale=s, extrapolation=extrapolation,
                               dynamic_threshold=threshold or 0.0, **(extra[0] if extra else {}))
    outs, seconds = [], 0.0
    for i in range(0, len(names), batch_size):
        gens = [torch.Generator().manual_seed(image_seed(seed, n)) for n in names[i:i + batch_size]]
        yb = y[i:i + batch_size]
        t0 = time.perf_counter()
        x = sample_batch(model, diffusion, yb, settings, generators=gens, device="cpu")
        seconds += time.perf_counter() - t0
        outs.append(to_uint8(x))
    return np.concatenate(outs), seconds / len(names)


def run(args):
    model_path = Path(args.model_path)
    if read_run_config(model_path.parent) is None:
        raise UserError(f"--model_path {model_path}: no args.json beside it (train with scdm.image_train)")
    loaded = load_checkpoint(model_path)
    model, flags = loaded.model, dict(loaded.flags, use_fp16=False)

    toy = Path(args.data_dir)
    info = dataset_info("folder", toy)
    conditioning = Conditioning(info.num_classes, flags["no_instance"], info.unlabeled_id, unlabeled_to_zero=True)
    label_dir = toy / "test" / "labels"
    sets = {"clean": toy, **dict(args.noisy)}
    maps = {k: load_maps(v, args.num_maps, info, conditioning, flags["image_size"])
            for k, v in sets.items()}
    names = maps["clean"][0]
    real = image_statistics(load_images(toy / "test" / "images"))
    # FD per seed (num_maps samples against all real test images), so that every setting's FD has the
    # same sample count, and its floor: real training images of the same count.
    train_names = sorted(p.stem for p in (toy / "train" / "images").glob("*.png"))[: len(names)]
    floor = distribution_distance(image_statistics(load_images(toy / "train" / "images", train_names)), real)

    result = {"benchmark": "bench_steps", "model_path": str(model_path), "model_flags": flags,
              "data_dir": str(toy), "noisy": {k: str(v) for k, v in args.noisy},
              "num_maps": len(names), "seeds": args.seeds, "reference_seeds": args.seeds[: args.reference_seeds],
              "batch_size": args.batch_size, "guidance": GUIDANCE, "threshold": THRESHOLD,
              "fd_floor_real_vs_real": floor, "fd_reference_images": len(real),
              "machine": describe_machine(), "torch_threads": torch.get_num_threads(), "results": {}}
    todo = settings(args.steps, args.uniform_steps, reference=args.reference_seeds > 0,
                    ablations=getattr(args, "ablations", False), sde_steps=getattr(args, "sde_steps", ()),
                    released=not getattr(args, "no_released", False), candidates=getattr(args, "candidates", ()))
    start = time.perf_counter()
    for setting in todo:
        name = setting[0]
        seeds = args.seeds[: args.reference_seeds] if setting[2] == SAMPLING["1000"]["timestep_respacing"] \
            and setting[1] == "ancestral" else args.seeds
        for set_name, (set_names, y) in maps.items():
            per_seed, fds, seconds = [], [], []
            for seed in seeds:
                imgs, sec = sample(model, flags, setting, y, set_names, seed, args.batch_size)
                per_seed.append(miou(imgs, set_names, label_dir))
                fds.append(distribution_distance(image_statistics(imgs), real))
                seconds.append(sec)
            entry = {"sampler": setting[1], "respacing": setting[2], "s": setting[3], "extrapolation": setting[4],
                     "dynamic_threshold": setting[5], "model_evaluations": setting[6],
                     **(setting[7] if len(setting) > 7 else {}), "seeds": seeds,
                     "miou_per_seed": per_seed, "miou_mean": float(np.mean(per_seed)),
                     "miou_std": float(np.std(per_seed)), "fd_per_seed": fds, "fd": float(np.mean(fds)),
                     "fd_std": float(np.std(fds)), "seconds_per_image": float(np.mean(seconds))}
            result["results"].setdefault(name, {})[set_name] = entry
            print(f"[{time.perf_counter() - start:7.1f}s] {name:28s} {set_name:7s} mIoU {100 * entry['miou_mean']:5.1f}"
                  f" +- {100 * entry['miou_std']:4.1f}  FD {entry['fd']:8.0f}  {entry['seconds_per_image']:.3f} s/img",
                  flush=True)
            result["elapsed_seconds"] = time.perf_counter() - start
            if args.out:
                write_json(result, args.out, indent=2)
    if args.plot:
        plot(result, args.plot)
    return result


def read_results(path):
    """An earlier run's JSON (--plot_from), checked to be one."""
    try:
        result = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--plot_from {path}: {e.strerror or e}") from None
    except ValueError:
        raise UserError(f"--plot_from {path}: not JSON; expected the --out file of an earlier run") from None
    if not (isinstance(result, dict) and isinstance(result.get("results"), dict) and result["results"]
            and all(isinstance(v, dict) and v for v in result["results"].values())):
        raise UserError(f"--plot_from {path}: no 'results' of settings by label set; expected the --out file of an "
                        "earlier run of bench_steps.py")
    return result


def plot(result, path):
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install -e .[bench]); pass --plot '' for none") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sets = list(next(iter(result["results"].values())))
    fig, axes = plt.subplots(2, len(sets), figsize=(4.2 * len(sets), 6.4), squeeze=False)
    for col, set_name in enumerate(sets):
        for row, (key, label) in enumerate((("miou_mean", "mIoU (%)"), ("fd", "image-statistics FD"))):
            ax = axes[row][col]
            for sampler, style in (("dpm++2m", "o-"), ("dpm++2m-sde", "^-"), ("ddim", "s-")):
                pts = sorted((e[set_name]["model_evaluations"], e[set_name][key]) for n, e in result["results"].items()
                             if set_name in e and e[set_name]["sampler"] == sampler and "uniform" not in n
                             and "," not in n)
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, [100 * v if key == "miou_mean" else v for v in ys], style,
                            label=sampler + (" (ddimN grid)" if sampler == "ddim" else " (logSNR grid)"))
            for n, e in result["results"].items():
                if set_name in e and e[set_name]["sampler"] == "ancestral" and "," not in n:
                    v = e[set_name][key] * (100 if key == "miou_mean" else 1)
                    ax.axhline(v, ls="--" if "reference" in n else ":", color="k" if "reference" in n else "C3",
                               label=n)
            ax.set_xscale("log")
            steps = sorted({e[set_name]["model_evaluations"] for e in result["results"].values()
                            if set_name in e and e[set_name]["sampler"] != "ancestral"})
            ax.set_xticks(steps, [str(n) for n in steps])
            ax.minorticks_off()
            ax.set_xlabel("model evaluations (steps)")
            ax.set_ylabel(label)
            ax.set_title(f"{set_name} maps")
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_png = Path(tmp) / "plot.png"
        fig.savefig(tmp_png, dpi=90)
        from PIL import Image
        save_image(Image.open(tmp_png), path, format="PNG")
    plt.close(fig)


def smoke(args):
    """The whole benchmark in seconds: toy maps and an untrained tiny model written to a temp folder."""
    from scdm.runtime.fileio import save_torch
    from scdm.presets import PRESETS
    from scdm.toy import make_toy_dataset
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_toy_dataset(tmp / "toy", num_train=4, num_test=4, size=8, seed=0)
        flags = dict(PRESETS["toy"].model, image_size=8, attention_resolutions="4", no_instance=True,
                     num_classes=dataset_info("folder", tmp / "toy").num_classes, cond_diffuse=True,
                     cond_opt="discrete_zero_uniform")
        model, _ = create_model_and_diffusion(**flags)
        (tmp / "run").mkdir()
        save_torch(model.state_dict(), tmp / "run" / "ema_0.999_000000.pt")
        write_json(flags, tmp / "run" / "args.json")
        ns = argparse.Namespace(model_path=str(tmp / "run" / "ema_0.999_000000.pt"), data_dir=str(tmp / "toy"),
                                noisy=[("same", tmp / "toy")], num_maps=2, seeds=[0, 1], steps=[2], sde_steps=[2],
                                uniform_steps=[2], reference_seeds=0, batch_size=2, out=args.out, plot=args.plot)
        return run(ns)


def noisy_arg(text):
    name, sep, path = text.partition("=")
    if not sep or not name or not Path(path, "corruption.json").is_file():
        raise argparse.ArgumentTypeError(f"NAME=TREE with TREE a noisy tree made by image_process, got {text!r}")
    return name, Path(path)


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python benchmarks/bench_steps.py",
                                formatter_class=HelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", help="checkpoint of a toy run (its args.json beside it)")
    p.add_argument("--data_dir", help="the toy dataset root (clean test maps, real images)")
    p.add_argument("--noisy", type=noisy_arg, action="append", default=[], metavar="NAME=TREE",
                   help="a noisy tree of the same test maps (repeatable)")
    p.add_argument("--num_maps", type=positive_int, default=16, help="test maps per set (the first ones)")
    p.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0, 1], help="sampling seeds")
    p.add_argument("--steps", type=positive_int, nargs="*", default=[5, 8, 10, 15, 25, 50],
                   help="steps of dpm++2m and ddim")
    p.add_argument("--uniform_steps", type=positive_int, nargs="*", default=[10],
                   help="steps of dpm++2m on the uniform-t grid (ablation)")
    p.add_argument("--sde_steps", type=positive_int, nargs="*", default=[5, 10, 25],
                   help="steps of dpm++2m-sde (logsnrN grid)")
    p.add_argument("--no_released", action="store_true", help="leave out the released 25-step setting")
    p.add_argument("--candidates", nargs="*", default=[], choices=["all", *CANDIDATES], metavar="KEY",
                   help="few-step candidates for noisy maps (CANDIDATES in this file; all: every one)")
    p.add_argument("--ablations", action="store_true", help="also: dpm++2m 10 with the released extrapolation "
                   "0.8, and the released ancestral 25 without it")
    p.add_argument("--reference_seeds", type=int, default=1, choices=range(0, 11), metavar="K",
                   help="seeds of the 1000-step ancestral reference (the first K of --seeds; 0: none)")
    p.add_argument("--batch_size", type=positive_int, default=16, help="maps per sampler call")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_steps.json"), help="JSON file")
    p.add_argument("--plot", default=str(ROOT / "docs" / "bench_steps.png"), help="plot PNG ('' for none)")
    p.add_argument("--smoke", action="store_true", help="tiny untrained model on 2 generated maps, in seconds")
    p.add_argument("--plot_from", metavar="JSON", help="only draw --plot from an earlier run's JSON")
    args = p.parse_args(argv)
    if args.plot_from:
        plot(read_results(args.plot_from), args.plot)
        return 0
    if args.smoke:
        smoke(args)
        return 0
    if not args.model_path or not args.data_dir:
        raise UserError("--model_path and --data_dir are required (or --smoke)")
    run(args)
    return 0


if __name__ == "__main__":
    run_cli(main)
