"""A checkpoint as a model, its diffusion and its resolved flags, from Python values.

The one way a checkpoint is opened for sampling: `scdm.image_sample`, `SCDMPipeline` (and through it
`scdm.generate` and the painter) and the benchmarks call it, so they cannot disagree about what a
file is. The flags come from the run config (args.json) beside the checkpoint, else from a preset
(released checkpoints), else from the caller's own flag values (the released way).

    from scdm import load_checkpoint
    loaded = load_checkpoint("logs/scdm/ema_0.9999_050000.pt")
    model, diffusion = loaded.model, loaded.diffusion("ddim25")
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import CheckpointError, ema_name, newest_checkpoint, parse_step
from .data.dataset_layouts import DatasetInfo, dataset_info_for
from .run_config import ModelFlags, ema_warning, load_checked, preset_differences, resolve_model_flags
from .script_util import create_diffusion, create_model_and_diffusion, model_and_diffusion_defaults

DEFAULT_EMA_RATE = "0.9999"


def sampling_model_defaults():
    """Model and diffusion flag values before a checkpoint's own: class count and unlabeled class
    from the dataset (-1), no layout yet."""
    return dict(model_and_diffusion_defaults(), num_classes=-1, unlabeled_id=-1, dataset_mode="")


def checkpoint_path(model_path, use_ema=False, ema_rate=DEFAULT_EMA_RATE):
    """The checkpoint file `model_path` stands for: a run folder gives its newest checkpoint, and
    `use_ema` with a model*.pt path the EMA file of the same step beside it."""
    if not model_path:
        raise ValueError("--model_path is required (a model*.pt or ema_*.pt file, or a run folder)")
    path = Path(model_path)
    if path.is_dir():  # a run folder: its newest checkpoint, the EMA weights when saved
        newest = newest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"--model_path {path} is a folder without checkpoints (model<step>.pt); give a "
                                  "checkpoint file or a run folder")
        print(f"--model_path {path}: using {newest.name}, its newest checkpoint", file=sys.stderr, flush=True)
        path = newest
    if use_ema and path.name.startswith("model"):
        path = path.parent / ema_name(ema_rate, parse_step(path))
        if not path.exists():
            raise CheckpointError(f"--use_ema True: {path} does not exist beside --model_path {model_path}")
    if not path.is_file():
        raise CheckpointError(f"--model_path {path} does not exist" if not path.exists()
                              else f"--model_path {path} is not a file")
    return path


@dataclass(frozen=True)
class CheckpointSpec:
    """What a checkpoint is, before its weights are read: everything needed to build and check it."""
    path: Path
    flags: dict                 # every model and diffusion flag, resolved (class count from the dataset)
    model_flags: ModelFlags     # where they came from, and what the caller's flags contradict
    dataset: DatasetInfo
    preset_ignored: tuple = ()  # flags where the preset differs from the run config that won

    @property
    def source(self):
        return self.model_flags.source

    @property
    def data_dir(self):
        """The run's training data ("" for released checkpoints): class names, palettes, examples."""
        run = self.model_flags.run_config
        return str((run.flags if run else {}).get("data_dir") or "")

    def build_model(self, fast_paths=None):
        """The network with the checkpoint's weights (checked against the flags), in eval mode."""
        model, _ = create_model_and_diffusion(**dict(self.flags, use_fp16=False, timestep_respacing=""))
        if fast_paths is not None:
            model.fast_paths = fast_paths
        load_checked(model, self.path, self.flags, self.model_flags)
        return model.eval()

    def diffusion(self, respacing=None):
        """The checkpoint's diffusion on the step grid `respacing` (None: the flags' own)."""
        flags = self.flags if respacing is None else dict(self.flags, timestep_respacing=respacing)
        return create_diffusion(**flags)

    def ema_warning(self):
        """One line when the file is an EMA that is still mostly its initial weights, else None."""
        return ema_warning(self.path, self.model_flags.run_config)


def resolve_checkpoint(model_path, *, preset="", use_ema=False, ema_rate=DEFAULT_EMA_RATE, flags=None, given=None,
                       data_dir=""):
    """The `CheckpointSpec` of `model_path`. `flags`: model and diffusion flag values the caller sets
    (e.g. a `class_schedule` or `timestep_respacing`, or every architecture flag of a released file);
    `given`: which of them the user named (default: all of `flags`), checked against the run config.
    `data_dir` resolves a folder layout's class count when the run config does not hold it."""
    path = checkpoint_path(model_path, use_ema, ema_rate)
    flags = dict(flags or {})
    unknown = sorted(set(flags) - set(model_and_diffusion_defaults()))
    if unknown:
        raise ValueError(f"unknown model/diffusion flags: {unknown}")
    given = set(flags if given is None else given)
    resolved, model_flags = resolve_model_flags({**sampling_model_defaults(), **flags}, given, path, preset)
    info = dataset_info_for(resolved["dataset_mode"], data_dir, resolved["num_classes"], resolved["unlabeled_id"])
    resolved.update(num_classes=info.num_classes, unlabeled_id=-1 if info.unlabeled_id is None else info.unlabeled_id)
    return CheckpointSpec(path, resolved, model_flags, info, tuple(preset_differences(model_flags, resolved)))


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A built model with the `CheckpointSpec` it came from (see `load_checkpoint`)."""
    model: torch.nn.Module
    spec: CheckpointSpec

    @property
    def flags(self):
        return self.spec.flags

    @property
    def model_path(self):
        return self.spec.path

    @property
    def source(self):
        return self.spec.source

    @property
    def data_dir(self):
        return self.spec.data_dir

    @property
    def dataset_mode(self):
        return self.spec.flags["dataset_mode"]

    @property
    def num_classes(self):
        return self.spec.dataset.num_classes

    @property
    def unlabeled_id(self) -> Optional[int]:
        return self.spec.dataset.unlabeled_id

    def diffusion(self, respacing=None):
        return self.spec.diffusion(respacing)


def load_checkpoint(model_path, *, preset="", class_schedule=None, use_ema=False, ema_rate=DEFAULT_EMA_RATE,
                    flags=None, fast_paths=None, warn=None):
    """The model of `model_path` (a checkpoint file or a run folder) with its resolved flags, loaded
    strict and in eval mode. `preset` names a released checkpoint's architecture (a run config beside
    the file wins, and `warn` hears of the flags where they differ); `class_schedule` replaces the
    run's class schedule file; `flags` sets other model/diffusion flags. `warn(line)` gets every
    warning (default: `warnings.warn`)."""
    if warn is None:
        import warnings
        warn = warnings.warn
    flags = dict(flags or {})
    if class_schedule:
        flags["class_schedule"] = str(class_schedule)
    spec = resolve_checkpoint(model_path, preset=preset, use_ema=use_ema, ema_rate=ema_rate, flags=flags)
    if spec.preset_ignored:  # the run's own args.json wins over a preset: said, never silent
        warn(f"preset {preset!r} not used for {', '.join(spec.preset_ignored)}: the {spec.source} gives the model "
             "flags")
    model = spec.build_model(fast_paths)
    line = spec.ema_warning()
    if line:
        warn(line)
    return LoadedCheckpoint(model, spec)
