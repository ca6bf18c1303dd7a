"""Checkpoint files: atomic writes, step parsing, and loading with a clear message on mismatch.

File names follow the released code: model{step:06d}.pt, ema_{rate}_{step:06d}.pt, opt{step:06d}.pt
(plain state dicts). The AMP grad scaler, when used, goes to scaler{step:06d}.pt.

A checkpoint set is complete when its model, every EMA rate and its optimizer are there and readable
(the scaler is optional: it exists only for fp16 on a GPU).
"""
import os
import re
import sys
from pathlib import Path

import torch

from .errors import UserError
from .fileio import save_torch

# Beside the checkpoints of a run: its flags (written by image_train) and its class schedule.
RUN_CONFIG = "args.json"
CLASS_SCHEDULE_COPY = "class_schedule.npy"

# Every file of a checkpoint set: (kind, rate or "", step). The model file is written last.
CHECKPOINT_FILE = re.compile(r"^(?P<kind>model|opt|scaler|ema_(?P<rate>[0-9.]+)_)(?P<step>\d{6,})\.pt$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked (missing, corrupt, or not fitting the flags)."""


def model_name(step):
    return f"model{step:06d}.pt"


def ema_name(rate, step):
    return f"ema_{rate}_{step:06d}.pt"


def opt_name(step):
    return f"opt{step:06d}.pt"


def scaler_name(step):
    return f"scaler{step:06d}.pt"


def checkpoint_steps(log_dir):
    """Steps of the checkpoint sets in `log_dir` whose model file exists (it is written last, so
    its presence marks a set whose other files are complete), ascending."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        return []
    steps = set()
    for f in log_dir.iterdir():
        m = CHECKPOINT_FILE.match(f.name)
        if m and m.group("kind") == "model":
            steps.add(int(m.group("step")))
    return sorted(steps)


def checkpoint_files(log_dir):
    """Every checkpoint file in `log_dir` (model, EMA, optimizer, scaler) as (step, name), ascending."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        return []
    found = [(int(m.group("step")), f.name) for f in log_dir.iterdir() if (m := CHECKPOINT_FILE.match(f.name))]
    return sorted(found)


def newest_checkpoint(run_dir):
    """The checkpoint of a run folder to sample: its newest step, the EMA weights when they were saved
    (the lowest-named rate when there are several), else the raw model file."""
    run_dir = Path(run_dir)
    steps = checkpoint_steps(run_dir)
    if not steps:
        return None
    emas = sorted(run_dir.glob(f"ema_*_{steps[-1]:06d}.pt"))
    return emas[0] if emas else run_dir / model_name(steps[-1])


def set_names(step, ema_rates):
    """The files a complete set of `step` must have: model, one EMA per rate name, optimizer."""
    return [model_name(step), *(ema_name(r, step) for r in ema_rates), opt_name(step)]


def is_readable(path):
    """Whether torch.load can open `path`. mmap reads only the zip directory and the pickle, so a
    truncated file is caught without reading gigabytes; legacy (non-zip) files get a full load."""
    for mmap in (True, False):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            return True
        except Exception:
            continue
    return False


def warn_stderr(line):
    print(f"warning: {line}", file=sys.stderr, flush=True)


def latest_complete_set(log_dir, ema_rates, warn=warn_stderr):
    """(step, path of its model file) of the newest complete checkpoint set in `log_dir`, or None.

    Newer sets with a missing or unreadable member are skipped with one `warn(line)` each (a run
    killed mid-save, a truncated copy), so a resume falls back to the last set that can be used."""
    log_dir = Path(log_dir)
    for step in sorted({step for step, _ in checkpoint_files(log_dir)}, reverse=True):
        problem = None
        for name in set_names(step, ema_rates):
            path = log_dir / name
            if not path.is_file():
                problem = f"{path} is missing"
            elif not is_readable(path):
                problem = f"{path} cannot be read (truncated or not a torch file)"
            if problem:
                break
        if problem is None:
            return step, log_dir / model_name(step)
        warn(f"skipping the checkpoint set of step {step}: {problem}")
    return None


def prune_checkpoints(log_dir, keep_steps):
    """Delete the checkpoint files (model, EMA, optimizer, scaler) of every step not in `keep_steps`."""
    keep = {int(s) for s in keep_steps}
    removed = []
    for f in Path(log_dir).iterdir():
        m = CHECKPOINT_FILE.match(f.name)
        if m and int(m.group("step")) not in keep:
            f.unlink()
            removed.append(f)
    return removed


def parse_step(path):
    """The step of `.../model012000.pt` or `.../ema_0.9999_012000.pt`."""
    m = re.search(r"(\d+)\.pt$", os.path.basename(str(path)))
    if not m:
        raise CheckpointError(f"cannot read a step number from checkpoint name {path} (expected e.g. model012000.pt)")
    return int(m.group(1))


def save_atomic(obj, path):
    """torch.save through a temporary file, fsync and rename (`scdm.fileio`): a crash mid-write
    never leaves a partial file under the final name."""
    save_torch(obj, path)


def load_file(path, what="checkpoint"):
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder; expected a .pt file")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{what} {path} cannot be read: {unreadable_reason(path, e)}") from None


def unreadable_reason(path, exc):
    """What is wrong with a file torch cannot load, in a user's words (torch's own can run to 6 lines)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return e.strerror or str(e)
    if size == 0:
        return "it is empty (0 bytes): a copy or a save that did not finish"
    if head.startswith(b"PK\x03\x04"):
        return f"a torch zip archive that is truncated or damaged ({size} bytes; a copy that did not finish?)"
    if head.startswith(b"\x80"):
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return f"a pickle torch refuses to load ({first})"
    try:
        head.decode("utf-8")
        return f"it holds text ({size} bytes), not a torch file"
    except UnicodeDecodeError:
        return f"not a torch file ({size} bytes, truncated or another format)"


def load_model_state(path):
    """A model (or EMA) state dict, refusing optimizer files and other objects."""
    state = load_file(path, "model checkpoint")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} is not a model state dict")
    if "param_groups" in state and "state" in state:
        raise CheckpointError(
            f"{path} is an optimizer state (opt*.pt), not model weights: pass model*.pt or ema_*.pt as --model_path"
        )
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a model state dict (it holds non-tensor values)")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{path} holds non-finite weights (NaN or Inf) in {len(bad)} tensor(s), e.g. {', '.join(bad[:3])}: it "
            "would give blank samples; it comes from a diverged or damaged run, so use an earlier checkpoint")
    return state


def _shape(state, key):
    v = state.get(key)
    return tuple(v.shape) if v is not None else None


def describe_mismatch(state, model, flags):
    """Name the flags that do not fit the checkpoint, from a few telltale shapes."""
    own = model.state_dict()
    msgs = []
    key = "middle_block.0.in_norm.mlp_shared.0.weight"
    if _shape(state, key) and _shape(own, key) and _shape(state, key)[1] != _shape(own, key)[1]:
        ck = _shape(state, key)[1]
        nc, ni = flags.get("num_classes"), flags.get("no_instance")
        msgs.append(
            f"checkpoint has {ck} label channels, flags give num_classes={nc}, no_instance={ni} "
            f"({_shape(own, key)[1]} channels)"
        )
    key = "out.2.weight"
    if _shape(state, key) and _shape(own, key) and _shape(state, key)[0] != _shape(own, key)[0]:
        msgs.append(f"checkpoint outputs {_shape(state, key)[0]} channels, flags give learn_sigma="
                    f"{flags.get('learn_sigma')} ({_shape(own, key)[0]} channels)")
    key = "time_embed.0.weight"
    if _shape(state, key) and _shape(own, key) and _shape(state, key)[1] != _shape(own, key)[1]:
        msgs.append(f"checkpoint has num_channels={_shape(state, key)[1]}, flags give "
                    f"num_channels={flags.get('num_channels')}")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if not msgs and (missing or unexpected):
        msgs.append(
            "the block structure differs (check num_res_blocks, channel_mult, attention_resolutions, "
            f"resblock_updown, image_size): {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})"
        )
    if not msgs:
        bad = [k for k in own if k in state and own[k].shape != state[k].shape]
        if bad:
            msgs.append(f"shapes differ for {len(bad)} tensors, e.g. {bad[0]}: checkpoint "
                        f"{tuple(state[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)} "
                        "(check num_channels, channel_mult, num_head_channels)")
    return "; ".join(msgs)


def load_into_model(model, path, flags):
    """Load weights strictly; on mismatch raise CheckpointError naming the flags that differ."""
    state = load_model_state(path)
    problem = describe_mismatch(state, model, flags)
    if problem:
        raise CheckpointError(f"{path} does not fit the flags: {problem}")
    target_dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.to(target_dtypes.get(k, v.dtype)) for k, v in state.items()}, strict=True)
    return model
