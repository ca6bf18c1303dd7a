"""overview.png: the first label maps of a results folder beside their ground truth and samples."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .fileio import save_image
from .results_folder import sample_dirs

OVERVIEW_TILE = 128   # smallest tile side in overview.png (pixels)
OVERVIEW_ROWS = 8
OVERVIEW_SETS = 4


def header_font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap font
        return ImageFont.load_default()


def write_overview(root, names, max_rows=OVERVIEW_ROWS):
    """label | ground truth | sample(s), one row per label map, with column headers; tiles of at
    least OVERVIEW_TILE px (label maps scaled with nearest, so their pixels stay visible)."""
    sets = [d for d in sample_dirs(99) if (root / d).is_dir()][1:] or ["samples"]
    sets = sets[:OVERVIEW_SETS]
    columns = [("label", "labels_color", Image.NEAREST), ("ground truth", "images", Image.BICUBIC)]
    columns += [("sample" if len(sets) == 1 else f"sample {d.rsplit('_', 1)[-1]}", d, Image.BICUBIC) for d in sets]
    rows = [n for n in names[:max_rows] if (root / "samples" / f"{n}.png").exists()]
    if not rows:
        return
    with Image.open(root / "samples" / f"{rows[0]}.png") as first:
        tile = max(OVERVIEW_TILE, first.size[0])
    gap, head = 4, 24
    canvas = Image.new("RGB", (len(columns) * (tile + gap) - gap, head + len(rows) * (tile + gap) - gap), "white")
    draw = ImageDraw.Draw(canvas)
    font = header_font(14)
    for c, (title, _, _) in enumerate(columns):
        x = c * (tile + gap)
        width = draw.textlength(title, font=font)
        draw.text((x + (tile - width) / 2, 5), title, fill="black", font=font)
    for r, name in enumerate(rows):
        for c, (_, folder, resample) in enumerate(columns):
            path = root / folder / f"{name}.png"
            if not path.exists():
                continue
            with Image.open(path) as im:
                canvas.paste(im.convert("RGB").resize((tile, tile), resample), (c * (tile + gap), head + r * (tile + gap)))
    save_image(np.asarray(canvas), root / "overview.png", format="PNG")


def side_by_side(tiles, titles, min_tile=OVERVIEW_TILE):
    """One row of pictures with a title over each: the label map first (enlarged with nearest, so
    every pixel stays one class), then its samples (bicubic). Returns a PIL image."""
    side = max(min_tile, max(t.size[0] for t in tiles))
    gap, head = 4, 24
    canvas = Image.new("RGB", (len(tiles) * (side + gap) - gap, head + side), "white")
    draw = ImageDraw.Draw(canvas)
    font = header_font(14)
    for c, (tile, title) in enumerate(zip(tiles, titles)):
        x = c * (side + gap)
        draw.text((x + (side - draw.textlength(title, font=font)) / 2, 5), title, fill="black", font=font)
        resample = Image.NEAREST if c == 0 else Image.BICUBIC
        canvas.paste(tile.convert("RGB").resize((side, side), resample), (x, head))
    return canvas
