"""The command-line vocabulary every tool of the project shares.

- Booleans: `--flag`, `--flag True` and `--flag False` (also 1/0/yes/no) mean the same everywhere,
  so the released `--use_fp16 True` style and the bare `--overwrite` style both work.
- Names: `--dataset_mode`, `--data_dir`, `--num_workers`; output folders end in `_dir` (plus the
  released `--results_path` and `--log_dir`), a single output file is `--out`.
- Spellings we introduced and later renamed stay as aliases for one release and print one
  deprecation line (`add_deprecated_alias`).
- Errors: see `scdm.runtime.errors` (one `error: ...` line, exit code 2).
"""
import argparse
import math
import sys


TRUE_WORDS = ("yes", "true", "t", "y", "1")
FALSE_WORDS = ("no", "false", "f", "n", "0")


def str2bool(v):
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in TRUE_WORDS:
        return True
    if s in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (True/False/1/0/yes/no), got {v!r}")


def _number(v, kind):
    try:
        return kind(v)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{'an integer' if kind is int else 'a number'} expected, got {v!r}")


def int_at_least(n, at_most=None):
    """argparse `type=`: an integer >= n (and <= at_most, e.g. an image side that must fit in memory)."""
    def check(v):
        x = _number(v, int)
        if x < n or (at_most is not None and x > at_most):
            wanted = f"an integer in {n}..{at_most}" if at_most is not None else f"an integer >= {n}"
            raise argparse.ArgumentTypeError(f"{wanted} expected, got {v!r}")
        return x
    check.__name__ = f"int_at_least_{n}"
    return check


positive_int = int_at_least(1)
positive_int.__name__ = "positive_int"
nonnegative_int = int_at_least(0)
nonnegative_int.__name__ = "nonnegative_int"


def float_in(lo, hi, lo_open=False, hi_open=False):
    """argparse `type=`: a finite float in the interval [lo, hi] (ends open when asked; None = unbounded)."""
    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"

    def check(v):
        x = _number(v, float)
        ok = math.isfinite(x)
        if ok and lo is not None:
            ok = x > lo if lo_open else x >= lo
        if ok and hi is not None:
            ok = x < hi if hi_open else x <= hi
        if not ok:
            raise argparse.ArgumentTypeError(f"a number in {span} expected, got {v!r}")
        return x
    check.__name__ = f"float_in_{span}"
    return check


probability = float_in(0.0, 1.0)
probability.__name__ = "probability"
positive_float = float_in(0.0, None, lo_open=True)
positive_float.__name__ = "positive_float"
nonnegative_float = float_in(0.0, None)
nonnegative_float.__name__ = "nonnegative_float"


def minus_one_or_positive(v):
    """argparse `type=`: -1 (the released flags' "automatic" or "all") or an integer >= 1."""
    x = _number(v, int)
    if x != -1 and x < 1:
        raise argparse.ArgumentTypeError(f"-1 or an integer >= 1 expected, got {v!r}")
    return x


def one_of(*names):
    """argparse `type=`: one of these words (the empty string only when listed)."""
    def check(v):
        if v not in names:
            shown = ", ".join(repr(n) if n == "" else n for n in names)
            raise argparse.ArgumentTypeError(f"one of {shown} expected, got {v!r}")
        return v
    check.__name__ = "one_of"
    return check


def int_list(v):
    """argparse `type=`: comma-separated integers >= 1, or empty (e.g. --channel_mult 1,2,4)."""
    parts = [p.strip() for p in str(v).split(",") if p.strip()]
    for p in parts:
        if not p.isdigit() or int(p) < 1:
            raise argparse.ArgumentTypeError(f"comma-separated integers >= 1 expected, got {v!r}")
    return str(v)


def rate_list(v):
    """argparse `type=`: comma-separated numbers in (0, 1), e.g. EMA rates "0.9999,0.999"."""
    parts = [p.strip() for p in str(v).split(",") if p.strip()]
    check = float_in(0.0, 1.0, lo_open=True, hi_open=True)
    if not parts:
        raise argparse.ArgumentTypeError(f"comma-separated numbers in (0, 1) expected, got {v!r}")
    for p in parts:
        try:
            check(p)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"comma-separated numbers in (0, 1) expected, got {v!r}") from None
    return str(v)


def respacing(v):
    """argparse `type=`: '' (every step), 'ddimN', 'logsnrN' or comma-separated section counts >= 1."""
    spec = str(v).strip()
    for prefix in ("ddim", "logsnr"):
        if spec.startswith(prefix):
            tail = spec[len(prefix):]
            if tail.isdigit() and int(tail) >= 1:
                return spec
            raise argparse.ArgumentTypeError(f"'{prefix}N' with an integer N >= 1 expected, got {v!r}")
    if spec == "":
        return spec
    try:
        return int_list(spec) if all(p.strip() for p in spec.split(",")) else int_list("x")
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"'' (every step), 'ddimN', 'logsnrN' or comma-separated step counts such as 25 or 10,20 expected, "
            f"got {v!r}") from None


def device_name(v):
    """A `--device` value this machine has: cpu, or cuda / cuda:N where CUDA and that GPU exist
    (an empty value: the tool's default). Checked at parsing, so a typo never reaches torch."""
    if v == "":
        return v
    import torch
    try:
        device = torch.device(v)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{v!r} is not a device: expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return v
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"{v!r}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{v}: CUDA is not available on this machine (no GPU or driver visible); "
                                         "use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{v}: this machine has {torch.cuda.device_count()} GPU(s) "
                                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return v


def add_bool_argument(parser, *names, default=False, help=None, **kwargs):
    """A boolean flag that takes `--name`, `--name True` or `--name False`."""
    return parser.add_argument(*names, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL",
                               help=help, **kwargs)


class _DeprecatedAlias(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated and will be removed; use {self.metavar_new} instead",
              file=sys.stderr)
        setattr(namespace, self.dest, values if self.nargs != 0 else self.const)


def add_deprecated_alias(parser, old, new, dest, type=None, nargs=None, const=None):
    """`old` still works like `new` (same destination), with one deprecation line when used.
    argparse cannot see an alias satisfy `required=True`: check a required `new` after parsing."""
    action = parser.add_argument(old, dest=dest, type=type, nargs=nargs, const=const, default=argparse.SUPPRESS,
                                 action=_DeprecatedAlias, help=argparse.SUPPRESS)
    action.metavar_new = new
    return action


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help lines show each flag's default (an empty default is shown as nothing rather than "()")."""

    def _get_help_string(self, action):
        if action.default in ("", None) and "%(default)" not in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def note_gpus_per_node(args):
    """Say that --gpus_per_node is ignored, and apply --gpu."""
    if getattr(args, "gpus_per_node", None) is not None:
        print(f"note: --gpus_per_node {args.gpus_per_node} is ignored: processes come from the launcher "
              "(mpiexec -n N / torchrun --nproc_per_node N), one device each", file=sys.stderr, flush=True)
    if getattr(args, "gpu", None) is not None:
        from .dist_util import select_gpu
        select_gpu(args.gpu)
