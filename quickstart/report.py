"""Scores, the picture and the report of a finished quickstart run.

Scores are recomputed from the files on every run (seconds), so a report always describes the
samples that are on disk, including ones a rerun reused.
"""
import contextlib
import io
import platform

import numpy as np
from PIL import Image, ImageDraw

from evaluations.image_stats import distribution_distance, image_statistics, load_images
from scdm.data import palettes
from scdm.runtime.fileio import atomic_write, save_image, write_json
from scdm.toy import TOY_NUM_CLASSES

from .config import MODELS, NOISE_NAMES, arch_flags, noise_params


def held_out_names(out):
    return sorted(p.stem for p in (out / "data" / "toy" / "test" / "images").glob("*.png"))


def score_all(out, cfg):
    """mIoU against the clean labels and the Frechet distance to the clean test images, per model and
    noise; plus the distance between two real sets of the same size (the distance's noise floor)."""
    from evaluations.miou import miou_of_toy_samples
    toy = out / "data" / "toy"
    names = held_out_names(out)
    ref = image_statistics(load_images(toy / "test" / "images", names))
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


def colorize(ids):
    """Toy label ids as RGB in the class colours, the unlabeled class (noise) black."""
    return palettes.colorize(ids, palettes.palette(palettes.TOY, TOY_NUM_CLASSES))


def write_grid(out, cfg, path):
    """label | noisy label | SDM | SCDM, one row per noise, for the first --grid_maps test maps."""
    labels = out / "data" / "toy" / "test" / "labels"
    names = sorted(p.stem for p in labels.glob("*.png"))[: cfg["grid_maps"]]
    tile = cfg["size"] * max(1, 128 // cfg["size"])
    gap, left, top = 4, 64, 18
    cols = ["label", "noisy label", "SDM", "SCDM"]
    height = top + len(names) * (len(cfg["noises"]) * (tile + gap) + 2 * gap)
    canvas = Image.new("RGB", (left + len(cols) * (tile + gap), height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(cols):
        draw.text((left + c * (tile + gap) + 4, 3), name, fill=(0, 0, 0))
    y = top
    for name in names:
        clean = np.asarray(Image.open(labels / f"{name}.png"))
        for noise in cfg["noises"]:
            # image_sample copies the label map it was given: the noisy version of this row.
            noisy = np.asarray(Image.open(out / "samples" / "sdm" / noise / "labels" / f"{name}.png"))
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
    save_image(canvas, path)


def fmt_time(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def machine_line():
    """`scdm.fast.performance.describe_machine` in one line, for the report."""
    from scdm.fast.performance import describe_machine
    m = describe_machine()
    gpu = f"GPU {m['gpu']['name']}" if m["gpu"] else "no GPU"
    return f"{m['cpus_usable']} CPU cores ({m['cpu']}, {platform.machine()}), {gpu}"


def results_markdown(cfg, results, floor, timing, machine):
    ema = "EMA " + cfg["ema_rate"] + (" with warm-up" if cfg.get("ema_warmup") else "")
    weights = ema if cfg["sample_from"] == "ema" else "the raw"
    lines = ["# Quickstart: SCDM vs SDM on noisy toy label maps", "",
             f"{cfg['num_test']} held-out toy maps ({cfg['size']}x{cfg['size']}); both models: the same "
             f"{arch_flags(cfg)['num_channels']}-channel SPADE UNet, {cfg['steps']} steps of batch {cfg['batch_size']} "
             f"(lr {cfg['lr']}, dropout of the label map {cfg['drop_rate']} from the first step: SCDM's recipe, "
             f"for the SDM baseline too, which differs only in having no label diffusion), sampled from "
             f"{weights} weights with "
             f"{cfg['respacing']}, s={cfg['s']}, extrapolation {cfg['extrapolation']}, dynamic threshold "
             f"{cfg['dynamic_threshold']}.", "",
             "| noise | mIoU SDM | mIoU SCDM | FD SDM | FD SCDM |", "|---|---:|---:|---:|---:|"]
    for noise in cfg["noises"]:
        r = results[noise]
        lines.append(f"| {NOISE_NAMES[noise]} | {100 * r['sdm']['miou']:.1f} | {100 * r['scdm']['miou']:.1f} | "
                     f"{r['sdm']['fd']:.1f} | {r['scdm']['fd']:.1f} |")
    small = cfg["size"] // 4
    noise_desc = {"ds": f"labels stored at {small}x{small} (nearest) and brought back with nearest",
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
              "- Picture: `grid.png` (label | noisy label | SDM | SCDM, one row per noise; black = unlabeled).",
              ""]
    return "\n".join(lines)


def write_report(out, cfg, results, floor, timing, n_params):
    """results.json and results.md; returns the report dict and the markdown."""
    machine = machine_line()
    report = {
        "config": cfg, "results": results, "fd_real_vs_real": floor, "seconds": timing, "machine": machine,
        "parameters_per_model": n_params,
        "recipe": "SCDM (label dropout from the first step) for both; the SDM baseline has no label diffusion",
        "metrics": {"miou": "exact toy segmenter vs the clean test labels (unlabeled not scored), 0..1",
                    "fd": "Frechet distance of 30 image statistics (evaluations.image_stats) to the "
                          "clean test images"},
    }
    write_json(report, out / "results.json", sort_keys=True)
    md = results_markdown(cfg, results, floor, timing, machine)
    atomic_write(out / "results.md", md)
    return report, md
