"""Label map in, photos out, from Python: the way diffusers users expect it.

    from scdm.pipeline import SCDMPipeline
    pipe = SCDMPipeline.from_checkpoint("results/quickstart/train/scdm")   # a run folder or a checkpoint file
    images = pipe("my_map.png", num_samples=2, steps=25, guidance_scale=1.5, seed=0)   # PIL images

A checkpoint is loaded by `scdm.loading` as `scdm.image_sample` loads it (the run config beside it,
or `preset=` for a released checkpoint), so the Python API, `scdm.generate` and `scdm.app` cannot
disagree with the sampler about what a checkpoint is. Seeds are per label map and sample, as in
the sampler: the same map, seed and name give the same image in any batch.

A label map is an (H, W) integer array of class ids, a PIL image or a PNG path of ids (8/16-bit
grey or palette indices), or a colour picture in the model's palette. `MASK_ID` (-1) marks pixels in
SCDM's absorbing [MASK] state (the all-zero conditioning vector): holes the model fills freely.
"""
import argparse
import os
import warnings
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .runtime.cli import device_name
from .flags import PIPELINE_FLAGS, defaults
from .data.conditioning import Conditioning
from .data.dataset_layouts import DatasetError, DatasetInfo, check_label_ids, display_names, remap_labels, resize_ids
from .runtime.errors import UserError
from .diffusion.label_diffusion import COND_OPTS, GAUSSIAN
from .loading import LoadedCheckpoint, load_checkpoint
from .data.palettes import MASK_COLOR, colorize, ids_from_colors, palette, palette_name
from .fast.performance import precision_context, precision_note, resolve_precision
from .presets import SAMPLING
from .diffusion.sampling import SamplerSettings, image_generators, image_seed, sample_batch, to_uint8

MASK_ID = -1
# The released 25-step schedule is the default of every entry point built on the pipeline.
_DEFAULTS = defaults(PIPELINE_FLAGS)
DEFAULT_STEPS = _DEFAULTS["steps"]
DEFAULT_GUIDANCE = _DEFAULTS["s"]
DEFAULT_THRESHOLD = _DEFAULTS["dynamic_threshold"]
DEFAULT_SAMPLER = _DEFAULTS["sampler"]
DEFAULT_EXTRAPOLATION = SAMPLING["25"]["extrapolation"]  # what extrapolation=None means, except with dpm++2m
MAX_MAP_SIDE = 4096  # a map larger than this is a mistake (or an attack on the app), not a drawing


class LabelMapResized(UserWarning):
    """A label map of another size than the model's was nearest-resized to it."""


def respacing_for(steps, diffusion_steps, sampler=DEFAULT_SAMPLER):
    """The step grid of `sampler` (see `sampling.sample_loop`): log-SNR spacing for the multistep
    solver ("dpm..."), else the released `ddimN` where N strided steps fit exactly, else N evenly
    spread steps."""
    from .diffusion.respace import space_timesteps
    if sampler.startswith("dpm"):
        return f"logsnr{steps}"
    try:
        space_timesteps(diffusion_steps, f"ddim{steps}")
        return f"ddim{steps}"
    except ValueError:
        return str(steps)


def is_sequence_of_maps(label_map):
    if isinstance(label_map, (np.ndarray, torch.Tensor)):
        return label_map.ndim == 3
    if isinstance(label_map, (list, tuple)) and label_map:
        return isinstance(label_map[0], (str, PathLike, Image.Image, np.ndarray, torch.Tensor))
    return False


class PipelineOutput(list):
    """What a call returns: the images as before (a list of PIL images, or one list per map), with
    `.images` (the same), and what made them: `.names` (the seed keys), `.seeds` (per map and
    sample) and `.unlabeled_to_zero` (how unlabeled pixels reached the model)."""

    def __init__(self, images, names, seeds, unlabeled_to_zero):
        super().__init__(images)
        self.images = list(images)
        self.names, self.seeds, self.unlabeled_to_zero = names, seeds, unlabeled_to_zero


def checked_device(device):
    """torch.device(device) for a device this machine has; ValueError (a user error) naming it otherwise."""
    try:
        return torch.device(device_name(str(device)))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"device {e}") from None


class SCDMPipeline:
    """A loaded checkpoint that turns label maps into images (see the module docstring)."""

    def __init__(self, loaded: LoadedCheckpoint, device=None, precision=None):
        self.loaded = loaded
        self.device = checked_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # auto (the default) and empty follow the model's use_fp16; an explicit precision wins.
        requested = "auto" if precision is None else precision
        use_fp16 = bool(loaded.flags["use_fp16"]) and requested in ("", "auto")
        self.precision = resolve_precision(requested, use_fp16, self.device)
        self.precision_note = precision_note(requested, self.precision, self.device, use_fp16)
        self.model = loaded.model.to(self.device)
        self.dataset_mode = loaded.dataset_mode
        self.num_classes = loaded.num_classes
        self.unlabeled_id = loaded.unlabeled_id
        self.image_size = int(loaded.flags["image_size"])
        self.no_instance = bool(loaded.flags["no_instance"])
        data_dir = loaded.data_dir if loaded.data_dir and Path(loaded.data_dir).is_dir() else None
        self.class_names = display_names(self.dataset_mode, self.num_classes, data_dir, self.unlabeled_id)
        self.colors = palette(palette_name(self.dataset_mode, data_dir), self.num_classes, self.unlabeled_id)
        self._diffusions = {}

    @classmethod
    def from_checkpoint(cls, path, device=None, precision=None, preset="", class_schedule=None, use_ema=False):
        """Load `path` (model*.pt or ema_*.pt): flags from its run's args.json, or `preset` for a
        released checkpoint; `class_schedule` replaces the run's class schedule file."""
        return cls(load_checkpoint(path, preset=preset, class_schedule=class_schedule, use_ema=use_ema),
                   device=device, precision=precision)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """diffusers' spelling of `from_checkpoint` (which also takes a run folder: its newest
        checkpoint, the EMA weights when saved). Nothing is downloaded."""
        return cls.from_checkpoint(path, **kwargs)

    def to(self, device):
        """Move the model to `device`; returns the pipeline (diffusers' `pipe.to("cuda")`)."""
        self.device = checked_device(device)
        self.model.to(self.device)
        return self

    @property
    def is_scdm(self):
        """Whether the label map itself diffuses into the [MASK] state (SCDM), so [MASK] pixels mean something."""
        opt = self.loaded.flags["cond_opt"]
        return bool(self.loaded.flags["cond_diffuse"]) and opt in COND_OPTS and opt != GAUSSIAN

    def diffusion(self, steps, sampler=DEFAULT_SAMPLER):
        total = int(self.loaded.flags["diffusion_steps"])
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= total:
            raise UserError(f"steps={steps!r}: expected an integer in 1..{total} (the model's diffusion steps)")
        spacing = respacing_for(int(steps), total, sampler)
        if spacing not in self._diffusions:
            self._diffusions[spacing] = self.loaded.diffusion(spacing)
        return self._diffusions[spacing]

    # ------------------------------------------------------------------------------ label maps
    def read_label_map(self, label_map, raw_ids=False, what="label_map", resize=True):
        """(S, S) int64 class ids at the model's size S, with MASK_ID for [MASK] pixels.

        `raw_ids`: the values are stored dataset ids, remapped by the layout's rule (ADE20K 0 ->
        unlabeled, k -> k-1; COCO 255 -> unlabeled). Colour pictures map by exact palette colour.
        `resize=False` keeps the map's own size (the caller resizes and says so)."""
        ids, colour = self._decode(label_map, what)
        if raw_ids and not colour:
            info = DatasetInfo(self.num_classes, self.unlabeled_id, not self.no_instance)
            try:
                check_label_ids(ids, self.dataset_mode, info, what)
            except DatasetError as e:
                raise UserError(str(e)) from None
            ids = remap_labels(ids, self.dataset_mode, self.unlabeled_id).astype(np.int64)
        else:
            bad = ((ids < 0) | (ids >= self.num_classes)) & (ids != MASK_ID)
            if bad.any():
                values = np.unique(ids[bad])[:10].tolist()
                raise UserError(f"{what} holds ids {values} outside 0..{self.num_classes - 1} (the model's "
                                f"{self.num_classes} classes; {MASK_ID} marks [MASK] pixels); "
                                + ("pass raw_ids=True for stored dataset ids" if self.dataset_mode in ("ade20k", "coco")
                                   else "check the map against the model"))
        return self._fit(ids, what) if resize else ids

    def read_instance_map(self, instance, what="instance"):
        ids, _ = self._decode(instance, what, colours=False)
        return self._fit(ids, what)

    def _fit(self, ids, what):
        size = self.image_size
        if ids.shape != (size, size):
            warnings.warn(f"{what} is {ids.shape[1]}x{ids.shape[0]}; resized to the model's {size}x{size} with "
                          "nearest neighbour", LabelMapResized, stacklevel=3)
            ids = resize_ids(ids, (size, size))
        return ids

    def _decode(self, label_map, what, colours=True):
        """(ids, came_from_colours)."""
        if isinstance(label_map, (str, PathLike)):
            what = str(label_map)
            try:
                with Image.open(label_map) as img:
                    if max(img.size) > MAX_MAP_SIDE:  # before decoding: a tiny file may hold a huge picture
                        raise UserError(f"{what} is {img.size[0]}x{img.size[1]}; expected at most {MAX_MAP_SIDE} "
                                        "px a side")
                    img.load()
                    return self._decode(img, what, colours)
            except FileNotFoundError:
                raise UserError(f"label map {label_map} does not exist") from None
            except (OSError, Image.DecompressionBombError) as e:
                raise UserError(f"cannot read label map {label_map}: {e} (expected a PNG of class ids)") from None
        if isinstance(label_map, Image.Image):
            img = label_map
            if img.mode in ("RGB", "RGBA"):
                rgb = np.asarray(img.convert("RGB"))
                if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
                    arr = rgb[..., 0]
                elif colours:
                    masked = (rgb == np.asarray(MASK_COLOR, dtype=rgb.dtype)).all(-1)  # as `colorize` draws [MASK]
                    try:
                        ids = ids_from_colors(np.where(masked[..., None], self.colors[0], rgb), self.colors, what)
                        return self._check_shape(np.where(masked, MASK_ID, ids), what), True
                    except ValueError as e:
                        raise UserError(str(e)) from None
                else:
                    raise UserError(f"{what} is a colour image; expected integer ids (grey or palette PNG)")
            elif img.mode in ("LA", "PA"):
                arr = np.asarray(img.getchannel(0))
            elif img.mode in ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"):
                arr = np.asarray(img)
            else:
                raise UserError(f"{what} has image mode {img.mode}; expected integer ids (grey or palette PNG) "
                                "or colours of the model's palette")
            return self._check_shape(arr.astype(np.int64), what), False
        if isinstance(label_map, torch.Tensor):
            label_map = label_map.detach().cpu().numpy()
        arr = np.asarray(label_map)
        if arr.dtype.kind == "f" and arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iub":
            raise UserError(f"{what} has dtype {arr.dtype}; expected an (H, W) array of integer class ids")
        return self._check_shape(arr.astype(np.int64), what), False

    @staticmethod
    def _check_shape(arr, what):
        if arr.ndim != 2 or 0 in arr.shape:
            raise UserError(f"{what} has shape {arr.shape}; expected an (H, W) map of class ids")
        if max(arr.shape) > MAX_MAP_SIDE:
            raise UserError(f"{what} is {arr.shape[1]}x{arr.shape[0]}; expected at most {MAX_MAP_SIDE} px a side")
        return arr

    def model_input(self, ids, instance=None, unlabeled_to_zero=False):
        """`y` for a batch of (S, S) id maps: one-hot (+ edges), [MASK] pixels all-zero."""
        ids = torch.as_tensor(np.stack(ids))
        masked = ids == MASK_ID
        cond = {"label": torch.where(masked, torch.zeros_like(ids), ids)[:, None]}
        if not self.no_instance:
            inst = ids if instance is None else torch.as_tensor(np.stack(instance))
            cond["instance"] = inst[:, None]
        conditioning = Conditioning(self.num_classes, self.no_instance, self.unlabeled_id,
                                    unlabeled_to_zero=unlabeled_to_zero)
        y = conditioning.model_input(cond)
        y[:, : self.num_classes] *= (~masked)[:, None].to(y.dtype)
        return y

    def colorize(self, ids):
        """A label map as an RGB picture (PIL) in the model's palette, [MASK] pixels in MASK_COLOR."""
        ids = np.asarray(ids)
        rgb = colorize(ids, self.colors)
        rgb[ids == MASK_ID] = MASK_COLOR
        return Image.fromarray(rgb)

    # ------------------------------------------------------------------------------ sampling
    def __call__(self, label_map, num_samples=1, steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE,
                 seed=_DEFAULTS["seed"], *, raw_ids=False, instance=None, sampler=DEFAULT_SAMPLER, eta=_DEFAULTS["eta"],
                 extrapolation=None, dynamic_threshold=DEFAULT_THRESHOLD, clip_denoised=True, unlabeled_to_zero=None,
                 batch_size=_DEFAULTS["batch_size"], names=None, callback=None,
                 batch_invariant=_DEFAULTS["batch_invariant"]):
        """Sample `num_samples` images per label map; returns a list of PIL images, or one such list
        per map when `label_map` is a batch (a list of maps, or an (N, H, W) array).

        The sampler options are the ones of `scdm.image_sample` (`sampler` one of sampling.SAMPLERS,
        `eta`, `extrapolation`, `dynamic_threshold` (0: plain clipping), `unlabeled_to_zero`; None: [MASK] for
        a model with label diffusion, the unlabeled class for one without, as generate and the painter).
        `extrapolation=None`: the released 0.8, or 0 for the multistep solver, whose own history
        extrapolates already (0.8 on top of it ruins toy samples at 10 steps; docs/sampling.md).
        `names` key the per-image seeds (default: a path's file name, as `scdm.generate` and
        `scdm.image_sample` key them, else the position in the batch). `callback(done, total)`
        runs after every model step; an exception raised there stops sampling (the app's cancel).
        `batch_invariant`: one network call per image, so a map's images are the same bits alone or in
        any batch, here, in `scdm.generate` and in the painter (`sample_loop`); False batches them."""
        single = not is_sequence_of_maps(label_map)
        maps = [label_map] if single else list(label_map)
        if instance is not None:
            instances = [instance] if single else list(instance)
            if len(instances) != len(maps):
                raise UserError(f"{len(instances)} instance maps for {len(maps)} label maps")
        if not maps:
            raise UserError("no label map given")
        for value, what, lo in ((num_samples, "num_samples", 1), (batch_size, "batch_size", 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise UserError(f"{what}={value!r}: expected an integer >= {lo}")
        if extrapolation is None:
            extrapolation = 0.0 if str(sampler).startswith("dpm") else DEFAULT_EXTRAPOLATION
        if unlabeled_to_zero is None:
            unlabeled_to_zero = self.is_scdm
        try:
            settings = SamplerSettings(sampler=sampler, guidance_scale=guidance_scale, extrapolation=extrapolation,
                                       dynamic_threshold=dynamic_threshold, clip_denoised=bool(clip_denoised),
                                       eta=eta, unlabeled_to_zero=bool(unlabeled_to_zero),
                                       batch_invariant=bool(batch_invariant))
        except ValueError as e:
            raise UserError(str(e)) from None
        if names is None:
            names = [Path(m).stem if isinstance(m, (str, os.PathLike)) else str(i) for i, m in enumerate(maps)]
        names = [str(n) for n in names]
        if len(names) != len(maps):
            raise UserError(f"{len(names)} names for {len(maps)} label maps")
        ids = [self.read_label_map(m, raw_ids, what=f"label map {names[i]}") for i, m in enumerate(maps)]
        inst = None if instance is None or self.no_instance else [
            self.read_instance_map(m, what=f"instance map {names[i]}") for i, m in enumerate(instances)]
        y = self.model_input(ids, inst, settings.unlabeled_to_zero)
        diffusion = self.diffusion(steps, settings.sampler)
        jobs = [(i, k) for i in range(len(maps)) for k in range(num_samples)]
        total, done = len(jobs) * diffusion.num_timesteps, 0
        out = [[None] * num_samples for _ in maps]
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            gens = [g for i, k in chunk for g in image_generators(seed, [names[i]], k)]

            def on_step(n=len(chunk)):
                nonlocal done
                done += n
                if callback is not None:
                    callback(done, total)

            with torch.no_grad(), precision_context(self.device, self.precision, model=self.model):
                x = sample_batch(self.model, diffusion, y[[i for i, _ in chunk]], settings, generators=gens,
                                 device=self.device, on_step=on_step)
            for j, (i, k) in enumerate(chunk):
                out[i][k] = Image.fromarray(to_uint8(x[j].float()))
        seeds = [[image_seed(seed, n, k) for k in range(num_samples)] for n in names]
        if single:
            return PipelineOutput(out[0], names, seeds[0], settings.unlabeled_to_zero)
        return PipelineOutput(out, names, seeds, settings.unlabeled_to_zero)

