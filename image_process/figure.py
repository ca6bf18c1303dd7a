"""Draw the corruption figure: one synthetic label map, clean and under each noise, colourised.

    python -m image_process.figure --out docs/corruptions.png [--seed 9] [--size 256]

The default output is corruptions.png in the current folder (never inside the installed package).

Unlabeled pixels are black. DS is shown brought back to full size with nearest, as the loader does.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from image_process.synthetic import colorize, scene
from scdm.data import corruptions as C
from scdm.runtime.cli import HelpFormatter, int_at_least, nonnegative_int
from scdm.runtime.errors import run_cli
from scdm.runtime.fileio import check_writable_file, save_image

MIN_SIZE = 64  # the DS panel is a 64x64 map
MAX_SIZE = 2048  # five panels of 2048^2 are already a 100-megapixel picture


def panels(size: int = 256, seed: int = 9) -> list:
    """[(caption, raw-id map at size x size)] for clean, DS, Edge, Random, Painter."""
    rng = np.random.default_rng(seed)
    label, _ = scene(size, size, rng, num_objects=30)
    label = label.astype(np.uint8)
    return [
        ("clean", label),
        ("DS (64x64)", C.resize_nearest(C.downsample(label, 64), size)),
        ("Edge (r=2)", C.edge_noise(label, radius=2)),
        ("Random (p=0.1)", C.random_noise(label, p=0.1, rng=rng)),
        ("Painter (new)", C.painter_noise(label, max_shift=3, small_area=64, drop_prob=0.5, rng=rng)),
    ]


def draw(items: list, gap: int = 8, caption: int = 22) -> Image.Image:
    size = items[0][1].shape[0]
    canvas = Image.new("RGB", (len(items) * (size + gap) + gap, size + caption + 2 * gap), "white")
    pen = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=15)
    except (TypeError, OSError):  # no FreeType: the bitmap font
        font = ImageFont.load_default()
    for i, (text, label) in enumerate(items):
        x = gap + i * (size + gap)
        canvas.paste(Image.fromarray(colorize(label)), (x, gap))
        width = pen.textlength(text, font=font)
        pen.text((x + (size - width) / 2, size + gap + 3), text, fill="black", font=font)
    return canvas


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m image_process.figure",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=Path("corruptions.png"),
                   help="the PNG to write (the README's picture is docs/corruptions.png)")
    p.add_argument("--seed", type=nonnegative_int, default=9, help="seed of the synthetic map and the noises")
    p.add_argument("--size", type=int_at_least(MIN_SIZE, MAX_SIZE), default=256,
                   help=f"side of each panel in pixels ({MIN_SIZE}..{MAX_SIZE})")
    args = p.parse_args(argv)
    if args.out.suffix.lower() != ".png":
        p.error(f"argument --out: a .png path (the figure is a palette PNG) expected, got '{args.out}'")
    check_writable_file(args.out, "--out")
    image = draw(panels(args.size, args.seed))
    # few colours: a palette PNG is a fraction of the RGB one's size
    save_image(image.quantize(colors=256, method=Image.Quantize.MAXCOVERAGE), args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    run_cli(main)
