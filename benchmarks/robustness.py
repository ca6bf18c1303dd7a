"""The robustness claim in miniature, with error bars: SDM vs SCDM (uniform and class-wise label diffusion)
over training seeds, on clean and noisy toy label maps, on a CPU.

    python benchmarks/robustness.py                  # the study (its wall time: docs/robustness.md); rerun to resume
    python benchmarks/robustness.py --budget tiny    # a smoke run of every stage

Everything runs through the project's entry points, with the quickstart's stages (`quickstart.stages`):
1. one toy dataset (`scdm.toy`, seed --data_seed), its class schedule, and DS / Edge / Random / Painter
   versions of its test maps (`image_process`, the quickstart's noise parameters);
2. per training seed, three models with the same network, data, batches and steps (`scdm.image_train`):
   SDM (no label diffusion), SCDM with uniform and SCDM with class-wise label diffusion;
3. per model and seed, samples of every version of the test maps with the released 25-step setting
   (`scdm.image_sample`, sampling seed = training seed). SCDM gets unlabeled pixels as its absorbing
   [MASK] state (`--unlabeled_to_zero True`); the models named by --both_ways are also sampled with them
   as the unlabeled class (False), which is how SDM always gets them.
Scores per model, seed and noise: mIoU of the exact toy segmenter against the CLEAN labels, the
image-statistics Frechet distance (`evaluations.image_stats`) to the clean test images, and LPIPS
diversity between two sample sets per map when an AlexNet backbone is found (--lpips_weights or the
torch hub cache; else the JSON says it was not computed).

Writes <out_dir>/ (data, runs, samples, results.md), --out (the JSON: machine, code version, every setting,
every per-seed number, mean and std over seeds, SCDM-minus-SDM differences paired by seed) and
--grid (samples of every model on every noise). Stages run --jobs at a time with --threads each: at
this size two single-threaded training runs side by side go as fast as one with two threads (the
timing: docs/robustness.md), and the sixty short sampling runs overlap their start-up. Finished stages
are skipped on a rerun; training resumes from its checkpoint.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluations.image_stats import distribution_distance, image_statistics, load_images  # noqa: E402
from evaluations.lpips import find_sample_sets  # noqa: E402
from quickstart.config import NOISE_NAMES, arch_flags  # noqa: E402
from quickstart.report import colorize, fmt_time  # noqa: E402
from quickstart.stages import MARKER_DIR, Runner, data_stages, sample_stage, train_stage  # noqa: E402
from scdm.runtime.cli import (HelpFormatter, int_at_least, nonnegative_float, nonnegative_int, positive_float,  # noqa: E402
                      positive_int, rate_list)
from scdm.runtime.errors import EXIT_INTERRUPTED, Terminated, UserError, run_cli  # noqa: E402
from scdm.runtime.fileio import (  # noqa: E402
    atomic_write, check_writable_file, first_non_folder, recorded_path, save_image, write_json,
)
from scdm.presets import SAMPLING  # noqa: E402
from scdm.results_folder import code_version  # noqa: E402

STATE_FILE = "study.json"
GENERATOR = "benchmarks/robustness.py"  # in STATE_FILE: the folders this study may reuse or remove
NOISES = ("clean", "ds", "edge", "random", "painter")
MODELS = {  # id: (name, label-diffusion flags); the network is the same for all
    "sdm": ("SDM", dict(cond_diffuse=False)),
    "scdm_uniform": ("SCDM uniform", dict(cond_diffuse=True, cond_opt="discrete_zero_uniform")),
    "scdm_classwise": ("SCDM class-wise", dict(cond_diffuse=True, cond_opt="discrete_zero_classwise")),
}
RELEASED = SAMPLING["25"]  # the released 25-step sampling setting
BUDGETS = {
    "default": dict(out_dir="results/robustness", size=16, num_train=512, num_test=32, steps=700, batch_size=16,
                    lr=1e-3, ema_rate="0.999", respacing=RELEASED["timestep_respacing"], sample_batch=32),
    "tiny": dict(out_dir="results/robustness-tiny", size=16, num_train=8, num_test=2, steps=2, batch_size=2,
                 lr=5e-4, ema_rate="0.99", respacing="ddim2", sample_batch=2),
}
# Settings the trained models depend on: a folder holding models trained with others is refused.
# Every model, the SDM baseline included, trains with SCDM's recipe (label dropout from the first step);
# SDM differs only in having no label diffusion, so the comparison isolates the method.
RECIPE = "SCDM (label dropout 0.2 from scratch); SDM baseline: the same recipe, no label diffusion"
TRAINING_KEYS = ("size", "num_train", "num_test", "batch_size", "lr", "ema_rate", "ema_warmup", "drop_rate",
                 "num_channels", "data_seed")


class StudyError(UserError):
    """Something the user can fix; one `error: ...` line, exit code 2."""


def build_parser():
    d, t = BUDGETS["default"], BUDGETS["tiny"]

    def budget(key, text):
        return f"{text}; default {d[key]}" + (f", tiny: {t[key]}" if t[key] != d[key] else "")

    p = argparse.ArgumentParser(allow_abbrev=False, prog="python benchmarks/robustness.py",
                                formatter_class=HelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", choices=tuple(BUDGETS), default="default", help="size of the study (default: default)")
    p.add_argument("--out_dir", default=None, help=budget("out_dir", "working folder (data, runs, samples)"))
    p.add_argument("--fresh", action="store_true", help="remove the working folder first")
    p.add_argument("--out", default=None, help="result JSON (default: <out_dir>/robustness.json)")
    p.add_argument("--grid", default=None, help="sample picture (default: <out_dir>/grid.png)")
    p.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0, 1, 2],
                   help="training seeds (default: 0 1 2)")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS), help="models (default: all)")
    p.add_argument("--both_ways", nargs="*", choices=tuple(m for m in MODELS if m != "sdm"),
                   default=["scdm_classwise"],
                   help="SCDM models also sampled with unlabeled pixels as the unlabeled class "
                        "(--unlabeled_to_zero False); default: scdm_classwise")
    p.add_argument("--noises", nargs="+", choices=NOISES[1:], default=list(NOISES[1:]),
                   help="noisy versions besides clean (default: all)")
    p.add_argument("--steps", type=positive_int, default=None, help=budget("steps", "training steps per model"))
    p.add_argument("--num_test", type=int_at_least(2), default=None,
                   help=budget("num_test", "test maps per noise (the FD needs more than its 30 statistics)"))
    p.add_argument("--lr", type=positive_float, default=None, help=budget("lr", "learning rate"))
    p.add_argument("--extrapolation", type=nonnegative_float, default=0.0,
                   help=f"sampler extrapolation (default 0: the released {RELEASED['extrapolation']} turns the "
                        "samples of models trained this briefly into pixel noise)")
    p.add_argument("--lpips_weights", default=None,
                   help="AlexNet state dict for LPIPS diversity ('random': random weights, for tests); default: the "
                        "torch hub cache if it holds one, else no LPIPS")
    p.add_argument("--jobs", type=positive_int, default=2, help="stages run side by side (default: 2)")
    p.add_argument("--threads", type=positive_int, default=1, help="threads per stage (default: 1)")
    p.add_argument("--data_seed", type=nonnegative_int, default=0, help="toy data and noise seed (default: 0)")
    p.add_argument("--grid_maps", type=positive_int, default=2, help="test maps in the picture (default: 2)")
    return p


def resolve_config(args):
    """One JSON-able dict of every setting (the quickstart's cfg keys plus the study's)."""
    cfg = dict(BUDGETS[args.budget], budget=args.budget)
    for key in ("out_dir", "steps", "num_test", "lr"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg.update(
        ema_rate=rate_list(cfg["ema_rate"]), ema_warmup=True, drop_rate=0.2, num_channels=32,
        sample_from="ema", s=RELEASED["s"], extrapolation=args.extrapolation,
        dynamic_threshold=RELEASED["dynamic_threshold"], edge_radius=1, random_p=0.1,
        seeds=sorted(set(args.seeds)), models=[m for m in MODELS if m in args.models],
        both_ways=[m for m in args.both_ways if m in args.models],
        noises=["clean", *[n for n in NOISES if n in args.noises]],
        data_seed=args.data_seed, grid_maps=args.grid_maps, jobs=args.jobs, threads=args.threads,
        out_dir=str(Path(cfg["out_dir"]).resolve()))
    if cfg["num_test"] > cfg["num_train"]:
        raise StudyError(f"--num_test {cfg['num_test']}: at most num_train {cfg['num_train']} (the FD floor compares "
                         "as many training images)")
    return cfg


def variants(cfg):
    """(id, model, unlabeled_to_zero, name) of every sampled configuration."""
    out = []
    for m in cfg["models"]:
        name = MODELS[m][0]
        if m == "sdm":
            out.append((m, m, False, name))
        else:
            out.append((m, m, True, name))
            if m in cfg["both_ways"]:
                out.append((f"{m}_unlabeled_class", m, False, f"{name}, holes as class"))
    return out


def model_flags(cfg, model, schedule=None):
    flags = {k: v for k, v in arch_flags(cfg).items() if k not in ("cond_diffuse", "cond_opt", "class_schedule")}
    flags.update(MODELS[model][1])
    if model == "scdm_classwise" and schedule is not None:
        flags["class_schedule"] = str(schedule)
    return flags


def plan(out, cfg, runner):
    """(stages, what each stage waits for, the sample folder of every (variant, seed, noise))."""
    markers = out / MARKER_DIR
    data_cfg = dict(cfg, seed=cfg["data_seed"])
    stages, toy, schedule, trees = data_stages(out, data_cfg, runner, markers)
    deps = {s: [stages[0]] for s in stages[1:]}
    sample_dirs = {}
    for seed in cfg["seeds"]:
        seed_cfg = dict(cfg, seed=seed)
        trained = {}
        for model in cfg["models"]:
            key = dict({k: cfg[k] for k in TRAINING_KEYS}, steps=cfg["steps"], seed=seed, model=model,
                       flags=model_flags(cfg, model))
            st = train_stage(seed_cfg, runner, markers, toy, out / "train" / f"{model}_seed{seed}",
                             model_flags(cfg, model, schedule), key, f"{MODELS[model][0]} seed {seed}")
            deps[st] = stages[:2]  # the toy data and the class schedule
            stages.append(st)
            trained[model] = st
        for vid, model, zero, name in variants(cfg):
            for noise in cfg["noises"]:
                tree, made = trees[noise]
                folder = out / "samples" / vid / f"seed{seed}" / noise
                st = sample_stage(seed_cfg, runner, markers, trained[model], made, folder,
                                  model_flags(cfg, model, schedule), zero,
                                  f"{name} seed {seed} on {NOISE_NAMES[noise]}")
                deps[st] = [trained[model], made]
                stages.append(st)
                sample_dirs[vid, seed, noise] = folder
    return stages, deps, sample_dirs


def run_stages(stages, deps, jobs, runner):
    """Each stage after the ones it waits for, `jobs` at a time. After a failure the running stages end
    and no new one starts; Ctrl-C stops the running ones (training saves first). Returns seconds per stage."""
    pending, running, done, failures, seconds = list(stages), {}, set(), [], {}
    start = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        try:
            while pending or running:
                ready = [s for s in pending if all(d in done for d in deps.get(s, ()))]
                for st in ready[: 0 if failures else jobs - len(running)]:
                    pending.remove(st)
                    log(f"[{fmt_time(time.perf_counter() - start)}] {len(done) + len(running) + 1}/{len(stages)} "
                        f"{st.name}")
                    running[pool.submit(timed, st)] = st
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    st = running.pop(fut)
                    if fut.exception() is not None:
                        failures.append(fut.exception())
                    else:
                        done.add(st)
                        seconds[st.name] = fut.result()
        except BaseException:  # Ctrl-C or SIGTERM: stop the children before the pool waits for them
            runner.stop_all()
            raise
    if failures:
        raise failures[0]
    return seconds


def timed(stage):
    """Seconds the stage's work took, or None when it was already done."""
    t0 = time.perf_counter()
    return round(time.perf_counter() - t0, 1) if stage.run() else None


def log(msg):
    print(f"[robustness] {msg}", file=sys.stderr, flush=True)


def lpips_scorer(cfg):
    """(distance function or None, why not): LPIPS on samples upsampled to 64 px (AlexNet needs 32)."""
    from evaluations.common import EvalError
    from evaluations.lpips import backbone_weights, lpips_model
    try:
        weights = backbone_weights(cfg["lpips_weights"], "alex", "--lpips_weights")
    except EvalError as e:
        if cfg["lpips_weights"]:  # asked for and not usable: say so before hours of work
            raise StudyError(str(e)) from None
        return None, f"not computed: {e}"
    import torch
    import torch.nn.functional as F
    model = lpips_model(weights, "alex", "cpu")

    def up(x):
        return F.interpolate(x, size=max(64, x.shape[-1]), mode="bilinear", align_corners=False)

    def distance(a, b):
        with torch.no_grad():
            return model(up(a), up(b)).flatten()
    return distance, f"LPIPS (AlexNet, {'random weights' if weights == 'random' else weights}) between 2 sample sets"


def score(out, cfg, sample_dirs, lpips_fn):
    """Per (variant, seed, noise): mIoU, pixel accuracy, FD and LPIPS diversity, from the files on disk."""
    import contextlib
    import io
    from evaluations.lpips import lpips_diversity
    from evaluations.miou import miou_of_toy_samples
    toy = out / "data" / "toy"
    names = sorted(p.stem for p in (toy / "test" / "images").glob("*.png"))
    ref = image_statistics(load_images(toy / "test" / "images", names))
    train = sorted(p.stem for p in (toy / "train" / "images").glob("*.png"))[: len(names)]
    floor = frechet(image_statistics(load_images(toy / "train" / "images", train)), ref)
    per = {}
    for (vid, seed, noise), folder in sample_dirs.items():
        sets = find_sample_sets(folder, cfg["num_sets"])
        with contextlib.redirect_stderr(io.StringIO()):
            m = miou_of_toy_samples(sets[0], toy / "test" / "labels")
            lp = lpips_diversity(sets, distance_fn=lpips_fn)["lpips"] if lpips_fn else None
        per.setdefault(vid, {}).setdefault(noise, {})[str(seed)] = {
            "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "per_class_iou": m["per_class_iou"],
            "fd": frechet(image_statistics(load_images(sets[0], names)), ref), "lpips": lp}
    return per, floor


def frechet(a, b):
    """The image-statistics distance, or None when too few images make it undefined (tiny runs)."""
    try:
        return distribution_distance(a, b)
    except UserError:
        return None


def mean_std(values):
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


def summarize(per, cfg):
    """Mean and sample std over seeds per variant and noise, and SCDM minus SDM paired by seed."""
    summary, paired = {}, {}
    for vid, by_noise in per.items():
        for noise, by_seed in by_noise.items():
            row = {"seeds": len(by_seed)}
            for metric in ("miou", "fd", "lpips"):
                row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(r[metric] for r in by_seed.values())
            summary.setdefault(vid, {})[noise] = row
            if vid != "sdm" and "sdm" in per:
                diffs = {m: [by_seed[s][m] - per["sdm"][noise][s][m] for s in by_seed
                             if by_seed[s][m] is not None and per["sdm"][noise][s][m] is not None]
                         for m in ("miou", "fd")}
                paired.setdefault(vid, {})[noise] = {
                    **{f"{m}_diff_{k}": v for m in diffs for k, v in zip(("mean", "std"), mean_std(diffs[m]))},
                    "miou_wins": sum(d > 0 for d in diffs["miou"]), "fd_wins": sum(d < 0 for d in diffs["fd"]),
                    "seeds": len(diffs["miou"])}
    return summary, paired


def fmt(mean, std, scale=1.0, digits=1):
    if mean is None:
        return "n/a"
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def markdown(cfg, variant_list, summary, paired, floor, lpips_note, seconds, wall, machine):
    """The README's tables: mIoU and FD, mean ± std over seeds, and the paired differences to SDM."""
    cols = [v for v in variant_list if v[0] in summary]
    head = "| noise | " + " | ".join(v[3] for v in cols) + " |\n|---|" + "---:|" * len(cols)
    lines = [f"**mIoU** (%, toy segmenter vs the clean labels; mean ± std over {len(cfg['seeds'])} training seeds)",
             "", head]
    for noise in cfg["noises"]:
        lines.append(f"| {NOISE_NAMES[noise]} | " + " | ".join(
            fmt(summary[v[0]][noise]["miou_mean"], summary[v[0]][noise]["miou_std"], 100) for v in cols) + " |")
    lines += ["", f"**FD** (image statistics to the clean test images, lower is better; two real sets of "
                  f"{cfg['num_test']} images: {fmt(floor, None, 1, 0)})", "", head]
    for noise in cfg["noises"]:
        lines.append(f"| {NOISE_NAMES[noise]} | " + " | ".join(
            fmt(summary[v[0]][noise]["fd_mean"], summary[v[0]][noise]["fd_std"], 1, 0) for v in cols) + " |")
    if paired:
        pcols = [v for v in cols if v[0] in paired]
        lines += ["", "**Paired by seed, minus SDM**: mIoU points (seeds where higher) / FD (seeds where lower)", "",
                  "| noise | " + " | ".join(v[3] for v in pcols) + " |\n|---|" + "---:|" * len(pcols)]
        for noise in cfg["noises"]:
            lines.append(f"| {NOISE_NAMES[noise]} | " + " | ".join(
                f"{fmt(p['miou_diff_mean'], p['miou_diff_std'], 100)} ({p['miou_wins']}/{p['seeds']}) / "
                f"{fmt(p['fd_diff_mean'], p['fd_diff_std'], 1, 0)} ({p['fd_wins']}/{p['seeds']})"
                for p in (paired[v[0]][noise] for v in pcols)) + " |")
    lines += ["", f"LPIPS diversity: {lpips_note}.",
              f"Budget: {cfg['size']}x{cfg['size']} px, {cfg['num_train']} training maps, {cfg['steps']} steps "
              f"of batch "
              f"{cfg['batch_size']} (lr {cfg['lr']}, EMA {cfg['ema_rate']}), {cfg['num_test']} test maps per noise, "
              f"sampled with {cfg['respacing']}, s={cfg['s']}, extrapolation {cfg['extrapolation']}, dynamic "
              f"threshold {cfg['dynamic_threshold']}. Machine: {machine}. Wall time {fmt_time(wall)}, stages "
              f"{fmt_time(sum(v for v in seconds.values() if v))} summed ({cfg['jobs']} side by side"
              f"{'; stages reused from an earlier run are not counted' if None in seconds.values() else ''})."]
    return "\n".join(lines) + "\n"


def write_grid(out, cfg, variant_list, sample_dirs, path):
    """label | noisy label | one column per model (seed 0's samples), a row per noise and test map."""
    seed = cfg["seeds"][0]
    labels = out / "data" / "toy" / "test" / "labels"
    names = sorted(p.stem for p in labels.glob("*.png"))[: cfg["grid_maps"]]
    tile, gap, left, top = 64, 4, 70, 32
    cols = ["label", "noisy label"] + [v[3] for v in variant_list]
    width = left + len(cols) * (tile + gap)
    canvas = Image.new("RGB", (width, top + len(names) * (len(cfg["noises"]) * (tile + gap) + 2 * gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(cols):
        for k, part in enumerate(header_lines(draw, text, tile)):
            draw.text((left + c * (tile + gap) + 1, 1 + 10 * k), part, fill=(0, 0, 0))
    y = top
    for name in names:
        clean = np.asarray(Image.open(labels / f"{name}.png"))
        for noise in cfg["noises"]:
            first = sample_dirs[variant_list[0][0], seed, noise]
            tiles = [colorize(clean), colorize(np.asarray(Image.open(first / "labels" / f"{name}.png")))]
            for vid, *_ in variant_list:
                sample0 = find_sample_sets(sample_dirs[vid, seed, noise], cfg["num_sets"])[0]
                tiles.append(np.asarray(Image.open(sample0 / f"{name}.png").convert("RGB")))
            for c, t in enumerate(tiles):
                canvas.paste(Image.fromarray(t.astype(np.uint8)).resize((tile, tile), Image.NEAREST),
                             (left + c * (tile + gap), y))
            draw.text((4, y + tile // 2 - 12), NOISE_NAMES[noise], fill=(0, 0, 0))
            draw.text((4, y + tile // 2 + 2), f"map {name}", fill=(110, 110, 110))
            y += tile + gap
        y += 2 * gap
    save_image(canvas, path)


def header_lines(draw, text, width):
    """`text` broken at spaces into lines no wider than `width` pixels (at most 3)."""
    lines = []
    for word in text.replace(",", "").split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines[:3]


def prepare_out(out, cfg, fresh):
    """Create or reuse the working folder; refuse a foreign folder or models trained with other settings."""
    state_path = out / STATE_FILE
    if out.is_dir() and any(out.iterdir()):
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            state = None
        if not isinstance(state, dict) or state.get("generator") != GENERATOR:
            raise StudyError(f"--out_dir {out} is not empty and holds no {STATE_FILE} of this study; choose a new "
                             "or empty folder (nothing was changed)")
        if fresh:
            log(f"--fresh: removing {out}")
            shutil.rmtree(out)
        elif state.get("training") != {k: cfg[k] for k in TRAINING_KEYS}:
            old = state.get("training") or {}
            diff = ", ".join(f"{k} {old.get(k)} -> {cfg[k]}" for k in TRAINING_KEYS if old.get(k) != cfg[k])
            raise StudyError(f"{out} holds models trained with other settings ({diff}); pass --fresh or another "
                             "--out_dir")
    out.mkdir(parents=True, exist_ok=True)
    write_json({"generator": GENERATOR, "training": {k: cfg[k] for k in TRAINING_KEYS}},
               state_path, sort_keys=True)


def run(cfg, fresh=False, runner=None):
    """The whole study; returns the report written to cfg['out']."""
    from scdm.fast.performance import describe_machine
    from quickstart.report import machine_line
    out = Path(cfg["out_dir"])
    blocker = first_non_folder(out)
    if blocker is not None:
        raise StudyError(f"--out_dir {out}: {blocker} is a file, not a folder")
    for flag in ("out", "grid"):  # outputs written at the end are checked before the work
        if cfg[flag]:
            check_writable_file(cfg[flag], f"--{flag}")
    lpips_fn, lpips_note = lpips_scorer(cfg)
    prepare_out(out, cfg, fresh)
    cfg["num_sets"] = 2 if lpips_fn else 1
    log(f"LPIPS diversity: {lpips_note}")
    code = code_version()  # at the start: the code that ran the stages
    runner = runner or Runner(threads=cfg["threads"])
    stages, deps, sample_dirs = plan(out, cfg, runner)
    t0 = time.perf_counter()
    seconds = run_stages(stages, deps, cfg["jobs"], runner)
    wall = round(time.perf_counter() - t0, 1)
    log("scoring ...")
    per, floor = score(out, cfg, sample_dirs, lpips_fn)
    summary, paired = summarize(per, cfg)
    variant_list = variants(cfg)
    machine = machine_line()
    md = markdown(cfg, variant_list, summary, paired, floor, lpips_note, seconds, wall, machine)
    atomic_write(out / "results.md", md)
    grid = Path(cfg["grid"] or out / "grid.png")
    write_grid(out, cfg, variant_list, sample_dirs, grid)
    report = {
        "machine": describe_machine(), "machine_line": machine, "code": code,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {k: recorded_path(v) if k in ("out_dir", "out", "grid") and v else v for k, v in cfg.items()},
        "variants": [{"id": v, "model": m, "unlabeled_to_zero": z, "name": n,
                      "model_flags": model_flags(cfg, m), "recipe": RECIPE} for v, m, z, n in variant_list],
        "metrics": {"miou": "exact toy segmenter (scdm.toy) vs the clean test labels, unlabeled not scored, 0..1",
                    "fd": "Frechet distance of 30 image statistics (evaluations.image_stats) to the clean test images",
                    "lpips": lpips_note},
        "fd_real_vs_real": floor, "per_seed": per, "summary": summary, "paired_vs_sdm": paired,
        "seconds": {"stages": seconds, "wall": wall, "stage_sum": round(sum(v for v in seconds.values() if v), 1)},
        "grid": recorded_path(grid),
    }
    write_json(report, Path(cfg["out"] or out / "robustness.json"), sort_keys=True)
    print(md, flush=True)
    log(f"done: {cfg['out'] or out / 'robustness.json'}, {grid}, {out / 'results.md'}")
    return report


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    cfg.update(out=args.out, grid=args.grid, lpips_weights=args.lpips_weights)
    try:  # a cluster's stop takes the Ctrl-C path: run_cli raises it as `Terminated`
        run(cfg, fresh=args.fresh)
    except KeyboardInterrupt as e:
        print("\n[robustness] interrupted; rerun the same command to continue (finished stages are kept)",
              file=sys.stderr, flush=True)
        return 128 + int(e.signum) if isinstance(e, Terminated) else EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    run_cli(main)
