"""Sample grids during training: LOG_DIR/samples/step_NNNNNN.png.

Why: a run otherwise shows nothing to look at until a separate sampling job runs, and "how long
should I train" is best answered by watching a fixed set of label maps turn into pictures. The
maps are fixed (the first test maps, else the first training maps, centre-cropped), each is shown
clean and with the paper's three noises made on the fly with `scdm.data.corruptions` (DS, Edge,
Random; blanked pixels become the all-zero [MASK] vector, SCDM's absorbing state), and each is
sampled with the EMA and with the raw weights in a few DDIM steps from fixed seeds, so two grids
differ only by what the weights learned in between. On the toy data (`scdm.toy`) the exact toy
segmenter scores every sample column with mIoU against the clean map.
"""
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.corruptions import corrupt, resize_nearest
from ..data.dataset_layouts import DatasetError, display_names
from ..data.datasets import build_dataset
from ..runtime.errors import UserError
from ..runtime.fileio import save_image
from ..flags import DEFAULT_MAPS, DEFAULT_RESPACING
from ..figures import header_font, legend_entries, with_legend
from ..data.palettes import MASK_COLOR, TOY, colorize, palette, palette_name
from ..fast.performance import precision_context
from ..presets import SAMPLING
from ..diffusion.sampling import SamplerSettings, sample_batch
from ..script_util import create_diffusion
from ..toy import segment_toy_image

NOISES = ("clean", "DS", "Edge", "Random")
HOLE = -1               # a blanked pixel of a noisy id map: all-zero in `y`, MASK_COLOR in pictures
RANDOM_P = 0.1          # the paper's Random noise
EDGE_RADIUS_AT_256 = 2  # the paper's Edge noise at 256 px, scaled to the image size (32 px: 0, a 2-px band)
DS_FACTOR = 4           # the paper's DS: 256 -> 64, a quarter of the side, then back (nearest)
# The released few-step setting without guidance (a run trained without --drop_rate has no unconditional
# model): x0 extrapolation and dynamic thresholding, which keep DDIM at 10 steps from leaving noise behind.
SAMPLE_SETTINGS = SamplerSettings(sampler="ddim", extrapolation=SAMPLING["25"]["extrapolation"],
                                  dynamic_threshold=SAMPLING["25"]["dynamic_threshold"])
SAMPLES_DIR = "samples"
TILE = 64               # smallest tile side in the grid (pixels); label maps enlarged with nearest
GAP, HEAD, LEFT, FOOT = 4, 20, 110, 18


def grid_name(step):
    return f"step_{step:06d}.png"


def noisy_versions(ids, instance, seed):
    """{noise: (ids, instance or None)} for one (S, S) class-id map: the clean map and its DS, Edge
    and Random versions at this size, blanked pixels set to HOLE (in the instance map too, so the
    edge channel does not keep the clean boundaries). Random draws from `seed`."""
    size = ids.shape[0]
    out = {"clean": (ids, instance)}
    small_ids, small_inst = corrupt("downsample", ids, instance, size=max(1, size // DS_FACTOR))
    out["DS"] = (resize_nearest(small_ids, ids.shape),
                 None if small_inst is None else resize_nearest(small_inst, ids.shape))
    radius = round(EDGE_RADIUS_AT_256 * size / 256)
    out["Edge"] = corrupt("edge", ids, instance, fill=HOLE, radius=radius)
    out["Random"] = corrupt("random", ids, instance, fill=HOLE, rng=seed, p=RANDOM_P)
    return out


def model_input_with_holes(conditioning, ids, instance):
    """`y` (B, C, S, S) for id maps (B, S, S) that may hold HOLE: the conditioning's one-hot + edges,
    with every class channel of a hole zero ([MASK])."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    holes = ids == HOLE
    cond = {"label": ids.clamp(min=0)[:, None].float()}
    if instance is not None:
        cond["instance"] = torch.as_tensor(instance, dtype=torch.long)[:, None].float()
    y = conditioning.model_input(cond)
    y[:, :conditioning.num_classes] *= (~holes)[:, None].to(y.dtype)
    return y


def pooled_miou(preds, gts, num_classes, ignore=None):
    """mIoU of predicted against ground-truth id maps with one confusion matrix over all pixels of
    all maps, averaged over the classes present in the ground truth (`ignore` not scored), as
    `evaluations.miou` scores a results folder."""
    pred = np.concatenate([np.asarray(p).ravel() for p in preds]).astype(np.int64)
    gt = np.concatenate([np.asarray(g).ravel() for g in gts]).astype(np.int64)
    keep = (gt >= 0) & (gt < num_classes) & (gt != (-1 if ignore is None else ignore))
    pred = np.clip(pred[keep], 0, num_classes - 1)
    conf = np.bincount(gt[keep] * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    present = conf.sum(1) > 0
    if ignore is not None and 0 <= ignore < num_classes:
        present[ignore] = False
    return float((tp[present] / union[present]).mean()) if present.any() else float("nan")


@dataclass
class ValidationMaps:
    """The fixed maps of every grid: photos (K, S, S, 3) uint8, and per noise the id maps (K, S, S)
    with HOLE and the model input `y`."""
    split: str
    names: list
    photos: np.ndarray
    ids: dict = field(default_factory=dict)
    y: dict = field(default_factory=dict)


def load_validation_maps(dataset_mode, data_dir, image_size, info, conditioning, count, seed=0):
    """The first `count` maps of the test split (the training split, centre-cropped and not flipped,
    when there is no usable test split), with their noisy versions."""
    try:
        dataset, split = build_dataset(dataset_mode, data_dir, image_size, is_train=False, info=info), "test"
    except DatasetError:
        dataset, split = build_dataset(dataset_mode, data_dir, image_size, is_train=True, info=info,
                                       random_crop=False, random_flip=False), "train"
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    maps = ValidationMaps(split, [Path(c["path"]).stem for _, c in items],
                          np.stack([((img.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
                                    for img, _ in items]))
    per_noise = {noise: ([], []) for noise in NOISES}
    for k, (_, cond) in enumerate(items):
        ids = cond["label"][0].numpy().astype(np.int64)
        inst = cond["instance"][0].numpy().astype(np.int64) if "instance" in cond else None
        for noise, (nid, ninst) in noisy_versions(ids, inst, seed=[seed, k]).items():
            per_noise[noise][0].append(nid)
            per_noise[noise][1].append(ninst)
    for noise, (ids, insts) in per_noise.items():
        maps.ids[noise] = np.stack(ids)
        maps.y[noise] = model_input_with_holes(conditioning, maps.ids[noise],
                                               None if insts[0] is None else np.stack(insts))
    return maps


@dataclass
class GridResult:
    image: Image.Image
    miou: dict       # "miou_<weights>_<noise>" -> value (toy data only)
    seconds: float


class TrainSamples:
    """Draws the sample grid of the current weights (rank 0 only; see TrainLoop.sample)."""

    def __init__(self, maps, diffusion, colors, class_names, *, toy=False, unlabeled_id=None, precision="fp32",
                 seed=0):
        self.maps = maps
        self.diffusion = diffusion
        self.colors = colors
        self.class_names = class_names
        self.toy = toy
        self.unlabeled_id = unlabeled_id
        self.precision = precision
        self.seed = seed
        self.settings = SAMPLE_SETTINGS
        self.sampler_model = None

    @classmethod
    def for_run(cls, *, dataset_mode, data_dir, info, conditioning, flags, respacing=DEFAULT_RESPACING,
                count=DEFAULT_MAPS, precision="fp32", seed=0):
        diffusion = sampling_diffusion(flags, respacing)
        maps = load_validation_maps(dataset_mode, data_dir, flags["image_size"], info, conditioning, count, seed)
        name = palette_name(dataset_mode, data_dir)
        num_classes = conditioning.num_classes
        return cls(maps, diffusion, palette(name, num_classes, info.unlabeled_id),
                   display_names(dataset_mode, num_classes, data_dir, info.unlabeled_id), toy=name == TOY,
                   unlabeled_id=info.unlabeled_id, precision=precision, seed=seed)

    def _model_with(self, model, params):
        """A frozen eval-mode copy of `model` (made once) holding `params`: sampling never touches
        the training model's mode, weights or autograd state."""
        if self.sampler_model is None:
            self.sampler_model = copy.deepcopy(model).eval().requires_grad_(False)
            for p in self.sampler_model.parameters():
                p.grad = None  # deepcopy copies the training gradients too
            for p in self.sampler_model.parameters():
                p.grad = None  # the copy samples only; the training gradients stay with the model
        with torch.no_grad():
            for dst, src in zip(self.sampler_model.parameters(), params):
                dst.copy_(src)
        return self.sampler_model

    def sample(self, model, params, device):
        """{noise: uint8 (K, S, S, 3)} for one set of weights; the same seeds every time."""
        net = self._model_with(model, params)
        y = torch.cat([self.maps.y[n] for n in NOISES])
        k = len(self.maps.names)
        gens = [torch.Generator().manual_seed(self.seed * 100003 + i % k) for i in range(y.shape[0])]
        with torch.no_grad(), precision_context(device, self.precision, model=net):
            x = sample_batch(net, self.diffusion, y, self.settings, generators=gens, device=device)
        x = ((x.float() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        return {n: x[i * k:(i + 1) * k] for i, n in enumerate(NOISES)}

    def render(self, model, weights, device):
        """The grid for `weights` [(title, params), ...]: GridResult (picture, toy mIoU, seconds)."""
        start = time.perf_counter()
        samples = {title: self.sample(model, params, device) for title, params in weights}
        miou = {}
        if self.toy:
            clean = self.maps.ids["clean"]
            for title, by_noise in samples.items():
                for noise, imgs in by_noise.items():
                    key = f"miou_{metric_name(title)}_{noise.lower()}"
                    miou[key] = pooled_miou([segment_toy_image(im) for im in imgs], clean, len(self.colors),
                                            self.unlabeled_id)
        return GridResult(self.draw(samples, miou), miou, time.perf_counter() - start)

    def colored(self, ids):
        rgb = colorize(np.maximum(ids, 0), self.colors)
        rgb[ids == HOLE] = MASK_COLOR
        return rgb

    def layout(self, titles):
        return GridLayout(len(self.maps.names), [w for w in titles], max(TILE, self.maps.photos.shape[1]))

    def draw(self, samples, miou):
        titles = list(samples)
        lay = self.layout(titles)
        canvas = Image.new("RGB", lay.size, "white")
        draw = ImageDraw.Draw(canvas)
        font, small = header_font(13), header_font(11)
        tile = lay.tile

        def centered(text, x, y, width, f=font):
            draw.text((x + (width - draw.textlength(text, font=f)) / 2, y), text, fill="black", font=f)

        x0, _ = lay.box(0, 0)
        centered("photo", x0, HEAD + 2, tile)
        for g, noise in enumerate(NOISES):
            gx, _ = lay.box(0, lay.column(g, 0))
            width = lay.group_width
            centered(noise, gx, 2, width)
            draw.line([gx, HEAD - 3, gx + width, HEAD - 3], fill="black")
            for c, title in enumerate(["label", *titles]):
                x, _ = lay.box(0, lay.column(g, c))
                centered(title, x, HEAD + 2, tile, small)
        maps_drawn = []
        for r, name in enumerate(self.maps.names):
            _, y = lay.box(r, 0)
            draw.text((4, y + tile / 2 - 14), f"{self.maps.split}/", fill="black", font=small)
            draw.text((4, y + tile / 2), name[:14], fill="black", font=small)
            canvas.paste(Image.fromarray(self.maps.photos[r]).resize((tile, tile), Image.BICUBIC), lay.box(r, 0))
            for g, noise in enumerate(NOISES):
                rgb = self.colored(self.maps.ids[noise][r])
                maps_drawn.append(rgb)
                canvas.paste(Image.fromarray(rgb).resize((tile, tile), Image.NEAREST), lay.box(r, lay.column(g, 0)))
                for c, title in enumerate(titles, start=1):
                    im = Image.fromarray(samples[title][noise][r]).resize((tile, tile), Image.BICUBIC)
                    canvas.paste(im, lay.box(r, lay.column(g, c)))
        if miou:
            _, y = lay.box(len(self.maps.names), 0)
            draw.text((4, y + 2), "toy mIoU", fill="black", font=small)
            for g, noise in enumerate(NOISES):
                for c, title in enumerate(titles, start=1):
                    x, _ = lay.box(0, lay.column(g, c))
                    centered(f"{miou[f'miou_{metric_name(title)}_{noise.lower()}']:.3f}", x, y + 2, tile, small)
        return with_legend(canvas, legend_entries(maps_drawn, self.colors, self.class_names))

    def write(self, result, log_dir, step):
        path = Path(log_dir) / SAMPLES_DIR / grid_name(step)
        save_image(result.image, path, format="PNG")
        return path


def metric_name(title):
    """"EMA 0.9999" -> "ema", "raw" -> "raw": the weights' part of a metric name."""
    return title.split()[0].lower()


@dataclass
class GridLayout:
    """Where each tile of the grid goes: a photo column, then per noise a label column and one
    column per set of weights; one row per map, two header lines, a footer line for mIoU."""
    rows: int
    weights: list
    tile: int

    @property
    def per_group(self):
        return 1 + len(self.weights)

    @property
    def columns(self):
        return 1 + len(NOISES) * self.per_group

    @property
    def group_width(self):
        return self.per_group * (self.tile + GAP) - GAP

    def column(self, group, index):
        return 1 + group * self.per_group + index

    def box(self, row, col):
        """Top-left corner of tile (row, col); groups of noise are set apart by an extra GAP * 2."""
        group_pad = 0 if col == 0 else 2 * GAP * (1 + (col - 1) // self.per_group)
        return LEFT + col * (self.tile + GAP) + group_pad, 2 * HEAD + 4 + row * (self.tile + GAP)

    @property
    def size(self):
        x, _ = self.box(0, self.columns - 1)
        _, y = self.box(self.rows, 0)
        return x + self.tile + GAP, y + FOOT


def check_sample_respacing(flags, respacing):
    """Stop before training on a --sample_respacing this diffusion cannot take. Only the image
    diffusion's steps matter here, so the check needs no class schedule (train.sh computes it after)."""
    from ..script_util import create_gaussian_diffusion
    try:
        create_gaussian_diffusion(steps=flags["diffusion_steps"], noise_schedule=flags["noise_schedule"],
                                  timestep_respacing=respacing)
    except ValueError as e:
        raise UserError(f"--sample_respacing {respacing}: {e}") from None


def sampling_diffusion(flags, respacing):
    """The training diffusion respaced to `respacing` (e.g. ddim10) for the grids."""
    try:
        return create_diffusion(**dict(flags, timestep_respacing=respacing))
    except ValueError as e:
        raise UserError(f"--sample_respacing {respacing}: {e}") from None
