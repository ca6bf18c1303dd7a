"""Figures of label maps and samples: overview.png of a results folder, legends, side-by-side panels."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .runtime.fileio import save_image
from .data.palettes import MASK_COLOR, ids_from_colors
from .results_folder import sample_dirs

OVERVIEW_TILE = 128   # smallest tile side in overview.png (pixels)
OVERVIEW_ROWS = 8
OVERVIEW_SETS = 4


def header_font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap font
        return ImageFont.load_default()


def legend_entries(maps, colors, class_names):
    """(name, colour) of every class present in the (H, W, 3) coloured maps, by id; [MASK] grey last."""
    present, masked = set(), False
    for rgb in maps:
        rgb = np.asarray(rgb)[..., :3]
        mask = (rgb == np.asarray(MASK_COLOR, dtype=rgb.dtype)).all(-1)
        masked |= bool(mask.any())
        try:
            present |= set(np.unique(ids_from_colors(rgb[~mask][None], colors)).tolist())
        except ValueError:
            continue  # not drawn in this palette: no legend for it
    entries = [(f"{k} {class_names[k]}", tuple(int(v) for v in colors[k])) for k in sorted(present)]
    return entries + ([("[MASK]", MASK_COLOR)] if masked else [])


def draw_legend(entries, width, font_size=13):
    """Swatches with class names, wrapped into lines of `width` px (a PIL image, or None when empty)."""
    if not entries:
        return None
    font = header_font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sw, pad, line = font_size, 6, font_size + 8
    spots, x, y = [], pad, pad
    for name, color in entries:
        w = sw + 4 + probe.textlength(name, font=font) + 12
        if x + w > width and x > pad:
            x, y = pad, y + line
        spots.append((x, y, name, color))
        x += w
    canvas = Image.new("RGB", (width, y + line + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for x, y, name, color in spots:
        draw.rectangle([x, y + 2, x + sw, y + 2 + sw], fill=tuple(color), outline="black")
        draw.text((x + sw + 4, y), name, fill="black", font=font)
    return canvas


def with_legend(picture, entries):
    legend = draw_legend(entries, picture.size[0])
    if legend is None:
        return picture
    out = Image.new("RGB", (picture.size[0], picture.size[1] + legend.size[1]), "white")
    out.paste(picture, (0, 0))
    out.paste(legend, (0, picture.size[1]))
    return out


def write_overview(root, names, max_rows=OVERVIEW_ROWS, colors=None, class_names=None):
    """label | ground truth | sample(s), one row per label map, with column headers; tiles of at
    least OVERVIEW_TILE px (label maps scaled with nearest, so their pixels stay visible). With the
    palette `colors` and `class_names`, a legend below names the classes shown."""
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
                canvas.paste(im.convert("RGB").resize((tile, tile), resample),
                             (c * (tile + gap), head + r * (tile + gap)))
    if colors is not None and class_names is not None:
        maps = []
        for name in rows:
            path = root / "labels_color" / f"{name}.png"
            if path.exists():
                with Image.open(path) as im:
                    maps.append(np.asarray(im.convert("RGB")))
        canvas = with_legend(canvas, legend_entries(maps, colors, class_names))
    save_image(np.asarray(canvas), root / "overview.png", format="PNG")


def side_by_side(tiles, titles, min_tile=OVERVIEW_TILE, legend=None):
    """One row of pictures with a title over each: the label map first (enlarged with nearest, so
    every pixel stays one class), then its samples (bicubic); `legend` entries (see
    `legend_entries`) below. Returns a PIL image."""
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
    return with_legend(canvas, legend or [])
