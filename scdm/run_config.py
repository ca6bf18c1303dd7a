"""The model flags of a checkpoint, so that `--model_path` is enough to sample it.

`image_train` saves all its flags as `args.json` beside its checkpoints (the run config). The
sampler takes the model and diffusion flags from there; flags given on the command line change
only sampling-time settings, and one that contradicts the run is refused instead of silently
building another network. Released checkpoints have no run config: `--preset NAME` (the table of
`scdm.presets`) or the released way, every architecture flag spelled out, says what they are.
"""
import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .checkpoint import (
    CHECKPOINT_FILE, CLASS_SCHEDULE_COPY, RUN_CONFIG, CheckpointError, load_into_model, model_name, parse_step,
)
from .runtime.cli import str2bool
from .diffusion.label_diffusion import DISCRETE_CLASSWISE
from .runtime.errors import UserError
from .presets import PRESETS
from .script_util import model_and_diffusion_defaults

# Model/diffusion flags that belong to sampling, not to the trained network: the command line
# (or the sampler's default) wins over the run config for these.
SAMPLING_TIME_FLAGS = ("timestep_respacing", "class_schedule", "use_fp16", "use_checkpoint")
# Given alone, this does not describe a released checkpoint (the sampler needs it anyway).
NOT_ARCHITECTURE = ("dataset_mode",) + SAMPLING_TIME_FLAGS
# Flags whose -1 means "resolve from the dataset" (the run config holds the resolved value).
AUTO_FLAGS = ("num_classes", "unlabeled_id")
# Above this share of initial weights an EMA file is mostly the random initialisation.
EMA_INITIAL_SHARE_WARNING = 0.5


def run_flag_names():
    """The model and diffusion flags a run fixes (all but the sampling-time ones)."""
    return [k for k in model_and_diffusion_defaults() if k not in SAMPLING_TIME_FLAGS]


@dataclass
class RunConfig:
    path: Path
    flags: dict


@dataclass
class ModelFlags:
    """Where the model flags came from, and the command-line flags that contradict the run."""
    source: str                          # "run config <path>", "preset NAME" or "command line"
    run_config: Optional[RunConfig] = None
    preset: str = ""
    contradictions: dict = field(default_factory=dict)  # flag -> (given, run's value)


def read_run_config(folder, fix="restore it, or move the checkpoint out and pass --preset or the model flags"):
    """The run config (`args.json`) in a run's folder, or None when there is none; `fix` says what
    to do when it is there but unreadable."""
    path = Path(folder) / RUN_CONFIG
    if not path.exists():
        return None
    try:
        flags = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"run config {path} cannot be read ({e}); it is the {RUN_CONFIG} image_train "
                              f"wrote beside the checkpoint: {fix}") from None
    if not isinstance(flags, dict):
        raise CheckpointError(f"run config {path} must hold a JSON object of flags (the {RUN_CONFIG} "
                              "image_train writes)")
    for name, value in flags.items():
        problem = flag_value_problem(name, value)
        if problem:
            raise CheckpointError(f"run config {path}: {name} is {json.dumps(value)}; expected {problem} ({fix})")
    return RunConfig(path, flags)


def flag_value_problem(name, value):
    """What a model or diffusion flag's saved value should be, when it is not that (else None)."""
    like = model_and_diffusion_defaults().get(name)
    if like is None:
        return None  # not a model flag, or one without a typed default
    kind = "true or false" if isinstance(like, bool) else "an integer" if isinstance(like, int) else \
        "a number" if isinstance(like, float) else "a string"
    if value is None:  # an empty text flag, or a layout without an unlabeled class, may be saved as null
        return None if isinstance(like, str) or name == "unlabeled_id" else kind
    if isinstance(value, (list, dict)):
        return kind
    if isinstance(like, bool):
        try:
            str2bool(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError, AttributeError):
            return kind
    elif isinstance(like, int):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and
                                                                      value.strip().lstrip("-").isdigit())):
            return kind
    elif isinstance(like, float):
        if isinstance(value, bool):
            return kind
        try:
            float(value)
        except (TypeError, ValueError):
            return kind
    return None


def find_run_config(model_path):
    """The run config beside a checkpoint, or None when there is none (a released checkpoint)."""
    return read_run_config(Path(model_path).parent)


def given_flags(make_parser, argv):
    """The destinations the user set on the command line (whatever their value, the default's
    included): `argv` parsed again into a namespace pre-filled with a sentinel, which argparse
    leaves alone for every flag not given."""
    parser = make_parser()
    unset = object()
    dests = vars(parser.parse_known_args([])[0])
    namespace = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(dests, unset)))
    return {k for k, v in vars(namespace).items() if v is not unset}


def coerce(value, like):
    """A run-config value in the type of the parser's default `like` (JSON keeps most, not all)."""
    if value is None or like is None:
        return value
    try:
        if isinstance(like, bool):
            return str2bool(value)
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        return value


def same_value(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return str(a).strip() == str(b).strip()


def class_schedule_path(saved, model_path):
    """The run's class schedule: its recorded path, else the copy beside the checkpoint (a moved run)."""
    beside = Path(model_path).parent / CLASS_SCHEDULE_COPY
    if saved and Path(saved).is_file():
        return str(saved)
    return str(beside) if beside.is_file() else (saved or "")


def resolve_model_flags(values, given, model_path, preset=""):
    """The model and diffusion flags of `model_path` as a new dict: `values` (every flag, as given or
    defaulted) updated from the run config beside the checkpoint, else from `preset`, else as given
    (the released way). Returns (flags, `ModelFlags`).

    Given values of run flags are kept so that loading can name a mismatch with the checkpoint;
    `load_checked` refuses them afterwards."""
    values = dict(values)
    defaults = model_and_diffusion_defaults()
    run = find_run_config(model_path)
    if run is not None:
        result = ModelFlags(f"run config {run.path}", run_config=run, preset=preset)
        for k in defaults:
            if k not in run.flags:
                continue
            saved = coerce(run.flags[k], values.get(k, defaults[k]))
            if k == "class_schedule":
                saved = class_schedule_path(saved, model_path)
                classwise = run.flags.get("cond_opt") == DISCRETE_CLASSWISE and run.flags.get("cond_diffuse")
                if classwise and saved and not Path(saved).is_file() and k not in given:
                    raise UserError(f"the run config {run.path} names the class schedule {saved}, which no longer "
                                    f"exists, and there is no {CLASS_SCHEDULE_COPY} beside {model_path}; pass "
                                    "--class_schedule PATH.npy")
            auto = k in AUTO_FLAGS and values[k] < 0  # -1: "from the dataset", not a value
            if k in given and not auto:
                if k not in SAMPLING_TIME_FLAGS and not same_value(values[k], saved):
                    result.contradictions[k] = (values[k], saved)
                continue
            values[k] = saved
        return values, result
    if preset:
        if preset not in PRESETS:
            raise UserError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
        for k, v in PRESETS[preset].model.items():
            if k not in given:
                values[k] = coerce(v, values.get(k, defaults.get(k)))
        return values, ModelFlags(f"preset {preset}", preset=preset)
    if not [k for k in given if k in defaults and k not in NOT_ARCHITECTURE]:
        raise CheckpointError(
            f"{model_path}: no {RUN_CONFIG} beside it (a released checkpoint?), so its architecture is unknown: "
            f"pass --preset {'|'.join(PRESETS)} (or every model flag, as the released scripts did)")
    return values, ModelFlags("command line")


def preset_differences(model_flags, flags):
    """Flags where --preset differs from the run config that was used instead (`flags`: the resolved ones)."""
    if not model_flags.preset or model_flags.run_config is None or model_flags.preset not in PRESETS:
        return []
    return [k for k, v in PRESETS[model_flags.preset].model.items()
            if k in model_flags.run_config.flags and not same_value(coerce(v, flags[k]), flags[k])]


def load_checked(model, model_path, flags, model_flags):
    """Load the weights; refuse flags that do not fit them (named by `scdm.checkpoint`), then
    command-line flags that contradict the run config even where the weights would load."""
    run = model_flags.run_config
    told = ""
    if run is not None and model_flags.contradictions:
        told = f"the run config {run.path} has " + ", ".join(
            f"{k}={saved}" for k, (_, saved) in model_flags.contradictions.items())
    try:
        load_into_model(model, model_path, flags)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {told}") if told else e
    if model_flags.contradictions:
        given = ", ".join(f"--{k} {v}" for k, (v, _) in model_flags.contradictions.items())
        raise CheckpointError(f"{given} contradicts the run of {model_path}: {told}. Model and diffusion flags "
                              "come from the run; leave them out (sampling settings such as --s, "
                              "--timestep_respacing or --class_schedule may change)")
    return model


def ema_initial_share(rate, step, warmup=False):
    """The weight an EMA still gives the initial parameters after `step` updates: the product of the
    decays, `rate` each, or `min(rate, (1 + s) / (10 + s))` with warm-up."""
    if step <= 0:
        return 1.0
    if not warmup:
        return rate ** step
    log_share = 0.0
    for s in range(step):
        log_share += math.log(min(rate, (1 + s) / (10 + s)))
        if log_share < -50:
            return 0.0
    return math.exp(log_share)


def ema_warning(model_path, run_config=None):
    """One line when `model_path` is an EMA file whose weights are mostly the initial ones, else None."""
    path = Path(model_path)
    m = CHECKPOINT_FILE.match(path.name)
    if not m or not m.group("rate"):
        return None
    try:
        rate = float(m.group("rate"))
    except ValueError:
        return None
    step = parse_step(path)
    warmup = bool(str2bool((run_config.flags if run_config else {}).get("ema_warmup", False)))
    share = ema_initial_share(rate, step, warmup)
    if share <= EMA_INITIAL_SHARE_WARNING:
        return None
    return (f"{path.name} averages {step} steps at rate {rate}{' with warm-up' if warmup else ''}: "
            f"{100 * share:.2f}% of its weights are still the initial (random) ones; sample the raw "
            f"{model_name(step)} instead, or train with --ema_warmup True")
