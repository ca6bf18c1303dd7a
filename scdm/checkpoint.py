"""Checkpoint files and checkpoint sets: their names, how a set is written, found, checked and loaded
for a resume, and loading weights with a clear message on mismatch.

File names follow the released code: model{step:06d}.pt, ema_{rate}_{step:06d}.pt, opt{step:06d}.pt
(plain state dicts). The AMP grad scaler, when used, goes to scaler{step:06d}.pt.

A checkpoint set is complete when its model, every EMA rate and its optimizer are there and readable
(the scaler is optional: it exists only for fp16 on a GPU). `save_set` writes one with the model file
last; `resolve_resume` finds the set a run continues from, `check_resume_members` refuses one with
missing members, and `initial_ema_params` / `load_optimizer_state` load its state.
"""
import copy
import os
import re
import sys
from pathlib import Path

import torch

from .runtime.errors import UserError
from .runtime.fileio import WriteError, save_torch

# Beside the checkpoints of a run: its flags (written by image_train) and its class schedule.
RUN_CONFIG = "args.json"
CLASS_SCHEDULE_COPY = "class_schedule.npy"

# Every file of a checkpoint set: (kind, rate or "", step). The model file is written last.
CHECKPOINT_FILE = re.compile(r"^(?P<kind>model|opt|scaler|ema_(?P<rate>[0-9.]+)_)(?P<step>\d{6,})\.pt$")

RUN_FILES = ("progress.csv",)  # besides checkpoints, what shows that a log dir holds a run


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


def parse_ema_rates(ema_rate):
    """`--ema_rate "0.9999,0.999"` -> the rate names as they appear in ema_{rate}_{step}.pt."""
    return [r.strip() for r in str(ema_rate).split(",") if r.strip()]


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
    """torch.save through a temporary file, fsync and rename (`scdm.runtime.fileio`): a crash mid-write
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
    if "Weights only load failed" in str(exc) and "Unsupported operand" not in str(exc):
        # torch's advice there is to unpickle it anyway
        return ("it holds Python objects, not only tensors (a whole saved model?); expected a state dict, as "
                "torch.save(model.state_dict(), path) writes")
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


# ----- a run's checkpoint sets: writing one, finding and checking the one to resume, loading its state -----
def weights_state(model, params):
    """`model`'s state dict with `params` (in `model.parameters()` order, e.g. EMA weights) in place of
    its parameters, these on the CPU in the dtypes of the model's own: what an ema_*.pt file holds."""
    state = model.state_dict()
    for (name, _), p in zip(model.named_parameters(), params):
        state[name] = p.detach().to(state[name].dtype).cpu()
    return state


def save_set(log_dir, step, model, ema, opt, scaler=None, last_saved_step=None):
    """Write the checkpoint set of `step` into `log_dir`: one ema_{rate}_{step}.pt per (rate name,
    params) of `ema`, opt{step}.pt, scaler{step}.pt when there is a grad scaler, and model{step}.pt last
    (its presence marks a complete set). Each file is written atomically and built just before it is
    written, so one CPU copy of the weights is held at a time.

    A failed write removes the members of this step already written (no half set) and raises a
    WriteError naming the last complete set, `last_saved_step` (None: none was saved in this run)."""
    log_dir = Path(log_dir)
    written = []
    try:
        for rate_name, params in ema:
            written.append(log_dir / ema_name(rate_name, step))
            save_atomic(weights_state(model, params), written[-1])
        written.append(log_dir / opt_name(step))
        save_atomic(opt.state_dict(), written[-1])
        if scaler is not None:
            written.append(log_dir / scaler_name(step))
            save_atomic(scaler.state_dict(), written[-1])
        # The model file goes last: its presence marks a complete checkpoint set.
        written.append(log_dir / model_name(step))
        save_atomic({k: v.cpu() for k, v in model.state_dict().items()}, written[-1])
    except WriteError as e:
        for path in written:  # no half set: the members of this step already written go
            path.unlink(missing_ok=True)
        last = (f"the last complete set is {log_dir / model_name(last_saved_step)}"
                if last_saved_step is not None else "no checkpoint was saved in this run")
        raise WriteError(f"checkpoint set of step {step} not saved ({e}); {last}") from None


def resolve_resume(log_dir, resume_checkpoint, ema_rates, warn=warn_stderr):
    """The checkpoint to resume from ("" for a fresh run), refusing to restart over an existing run.

    `auto`: the newest complete set in `log_dir` (sets with a missing or unreadable member are
    skipped with one warning each), or a fresh run when the log dir holds no run at all."""
    log_dir = Path(log_dir)
    if resume_checkpoint and resume_checkpoint != "auto":
        return str(resume_checkpoint)
    found = checkpoint_files(log_dir)
    evidence = [name for _, name in found] + [n for n in RUN_FILES if (log_dir / n).exists()]
    if not evidence:
        return ""
    if resume_checkpoint == "auto":
        skipped = []
        latest = latest_complete_set(log_dir, ema_rates, warn=skipped.append)
        if latest is not None:
            for line in skipped:
                warn(line)
            return str(latest[1])
        hint = ("it stopped before its first checkpoint: remove its " + " and ".join(
            n for n in RUN_FILES if (log_dir / n).exists()) + " to start it again, or pass another --log_dir"
                if not found else "pass another --log_dir")
        why = f" ({'; '.join(line.removeprefix('skipping the ') for line in skipped)})" if skipped else ""
        raise CheckpointError(
            f"--resume_checkpoint auto: --log_dir {log_dir} holds a run ({', '.join(evidence[-3:])}) but no "
            f"complete checkpoint set (model, ema_{{{','.join(ema_rates)}}}, opt) to resume from{why}; {hint}")
    models = [name for _, name in found if name.startswith("model")]
    last = (models or [name for _, name in found] or [None])[-1]
    what = f"last checkpoint: {last}" if last else f"{', '.join(evidence)}, no checkpoint"
    raise CheckpointError(
        f"--log_dir {log_dir} already holds a run ({what}); pass --resume_checkpoint auto to continue it, "
        "or another --log_dir to start a new run")


def missing_resume_members(resume_checkpoint, ema_rates):
    """The files of `resume_checkpoint`'s set that are not there (EMA per rate, optimizer), which
    a resume would otherwise restart silently from the model weights or from scratch."""
    folder, step = Path(resume_checkpoint).parent, parse_step(resume_checkpoint)
    wanted = [folder / ema_name(rate, step) for rate in ema_rates] + [folder / opt_name(step)]
    return [p for p in wanted if not p.exists()]


def check_resume_members(resume_checkpoint, ema_rates, allow_partial):
    """Refuse a resume whose set lacks members unless `allow_partial`; returns the warnings to say."""
    missing = missing_resume_members(resume_checkpoint, ema_rates)
    if not missing:
        return []
    names = ", ".join(p.name for p in missing)
    if not allow_partial:
        raise CheckpointError(
            f"--resume_checkpoint {resume_checkpoint}: its checkpoint set lacks {names} (EMA files follow "
            "--ema_rate); resume from a complete set, set --ema_rate to the run's rates, or pass "
            "--allow_partial_resume to restart the missing state (EMA from the model weights, optimizer from scratch)")
    return [f"--allow_partial_resume: {p.name} not found; "
            + ("the optimizer restarts from scratch" if p.name.startswith("opt") else
               "this EMA restarts from the model weights") for p in missing]


def initial_ema_params(model, resume_checkpoint, rate_name, flags, device, warn=warn_stderr):
    """The starting weights of EMA `rate_name` (float copies in `model.parameters()` order): the model's
    own for a fresh run (`resume_checkpoint` ""), else its set's ema file, loaded strictly; a missing one
    restarts from the model weights with one `warn(line)` (check_resume_members has allowed that)."""
    params = [p.detach().clone().float() for p in model.parameters()]
    if not resume_checkpoint:
        return params
    path = Path(resume_checkpoint).parent / ema_name(rate_name, parse_step(resume_checkpoint))
    if not path.exists():
        warn(f"{path} not found; EMA {rate_name} restarts from the model weights")
        return params
    ema_model = copy.deepcopy(model)
    load_into_model(ema_model, path, flags)
    return [p.detach().clone().float().to(device) for p in ema_model.parameters()]


def check_optimizer_state(path, state, params):
    """An optimizer state of another architecture loads without complaint when the parameter
    count matches, and fails at the first step; say so at load time instead."""
    params = list(params)
    saved = state.get("state", {}) if isinstance(state, dict) else {}
    if not isinstance(state, dict) or "param_groups" not in state:
        raise CheckpointError(f"{path} is not an optimizer state (opt*.pt)")
    count = sum(len(g.get("params", ())) for g in state["param_groups"])
    if count != len(params):
        raise CheckpointError(f"{path} holds the optimizer state of {count} parameter tensors; this model has "
                              f"{len(params)}: it comes from another architecture")
    for idx, entry in saved.items():
        moment = entry.get("exp_avg") if isinstance(entry, dict) else None
        i = int(idx)
        if moment is not None and (i >= len(params) or tuple(moment.shape) != tuple(params[i].shape)):
            shape = tuple(params[i].shape) if i < len(params) else "none"
            raise CheckpointError(f"{path} does not fit this model: parameter {i} has shape {tuple(moment.shape)} "
                                  f"there and {shape} here (another architecture)")


def load_adamw_state(opt, state):
    """Load a saved AdamW state, keeping this optimizer's kind of update: a saved state carries the
    fused/foreach flags of the run that wrote it (the released code's: neither), which load_state_dict
    would otherwise adopt; the step counters move to where that update keeps them."""
    kind = {key: opt.defaults.get(key) for key in ("fused", "foreach")}
    opt.load_state_dict(state)
    for group in opt.param_groups:
        group.update(kind)
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                opt.state[p]["step"] = (step.to(device=p.device, dtype=torch.float32) if kind["fused"]
                                        else step.to(device="cpu", dtype=torch.get_default_dtype()))


def load_optimizer_state(opt, scaler, resume_checkpoint, params, warn=warn_stderr):
    """Load the optimizer (and grad scaler, when both exist) of `resume_checkpoint`'s set into `opt`
    (built on `params`) and `scaler`. A missing opt file restarts the optimizer from scratch with one
    `warn(line)`; one of another architecture, or not an optimizer state, raises CheckpointError."""
    folder, step = Path(resume_checkpoint).parent, parse_step(resume_checkpoint)
    path = folder / opt_name(step)
    if not path.exists():
        warn(f"{path} not found; the optimizer restarts from scratch")
    else:
        state = load_file(path, "optimizer checkpoint")
        check_optimizer_state(path, state, params)
        try:
            load_adamw_state(opt, state)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path} does not fit this model's optimizer: {e}") from None
    spath = folder / scaler_name(step)
    if scaler is not None and spath.exists():
        scaler.load_state_dict(load_file(spath, "grad scaler checkpoint"))
