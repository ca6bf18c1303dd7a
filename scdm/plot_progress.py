"""Plot a run's progress.csv: `python -m scdm.plot_progress LOG_DIR [--out PNG] [--smoothing 0.9]`.

For people without TensorBoard: the loss terms, the MSE per timestep quartile, the gradient norm
and learning rate, throughput, and the sample grids' toy mIoU when the run drew them, each curve
raw (faint) and smoothed with TensorBoard's debiased exponential moving average. Needs matplotlib
(the `monitor` extra). Writes LOG_DIR/progress.png unless --out says otherwise.
"""
import argparse
import csv
import io
import math
from pathlib import Path

import numpy as np

from .runtime.cli import HelpFormatter, float_in
from .runtime.errors import UserError, run_cli
from .runtime.fileio import atomic_write, check_writable_file

PROGRESS = "progress.csv"
DEFAULT_OUT = "progress.png"


def read_progress(path):
    """{column: float array} of progress.csv, NaN where a row has no value (columns appear as a run
    logs them for the first time)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: LOG_DIR must be the --log_dir of an image_train run")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "step" not in rows[0]:
        raise UserError(f"{path} holds no logged steps yet (a run writes a line every --log_interval steps)")

    def number(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan
    return {k: np.array([number(r.get(k)) for r in rows]) for k in rows[0] if k}


def smooth(values, weight):
    """TensorBoard's smoothing: an exponential moving average debiased at the start; NaNs skipped."""
    out = np.full(len(values), np.nan)
    last, count = 0.0, 0
    for i, v in enumerate(values):
        if not np.isfinite(v):
            continue
        count += 1
        last = last * weight + (1 - weight) * v
        out[i] = last / (1 - weight ** count) if weight > 0 else v
    return out


def effective_smoothing(weight, points):
    """`weight`, capped at 1 - 10 / points: the average spans at most a tenth of a short run's points,
    where TensorBoard's 0.9 would lag behind the whole curve."""
    return max(0.0, min(weight, 1 - 10 / max(points, 1)))


def panels(columns):
    """(title, [column, ...], log scale) of each panel that has data."""
    have = [k for k in columns if np.isfinite(columns[k]).any()]
    quartiles = sorted(k for k in have if k.startswith("mse_q"))
    wanted = [
        ("loss", [k for k in ("loss", "mse", "vb") if k in have], True),
        ("MSE by timestep quartile (q0: t < T/4)", quartiles, True),
        ("gradient norm", [k for k in ("grad_norm",) if k in have], True),
        ("learning rate", [k for k in ("lr",) if k in have], False),
        ("training images/s", [k for k in ("images_per_s",) if k in have], False),
        ("sample grids: toy mIoU", sorted(k for k in have if k.startswith("miou_")), False),
    ]
    return [p for p in wanted if p[1]]


def plot(columns, out, smoothing=0.9, title=""):
    try:
        import matplotlib
    except ImportError:
        raise UserError("python -m scdm.plot_progress needs matplotlib (pip install matplotlib, or the "
                        "scdm[monitor] extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    found = panels(columns)
    if not found:
        raise UserError(f"{title or PROGRESS}: no loss columns to plot")
    ncols = 2
    nrows = math.ceil(len(found) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 3.4 * nrows), squeeze=False)
    step = columns["step"]
    for ax, (name, keys, log) in zip(axes.flat, found):
        for i, key in enumerate(keys):
            values = columns[key]
            ok = np.isfinite(values)
            color = f"C{i}"
            sparse = ok.sum() < 20 or key.startswith("miou_")  # few points: markers, no smoothing
            if sparse:
                ax.plot(step[ok], values[ok], "o-", color=color, label=key, markersize=3)
                continue
            ax.plot(step[ok], values[ok], color=color, alpha=0.25, linewidth=0.8)
            ax.plot(step[ok], smooth(values, effective_smoothing(smoothing, ok.sum()))[ok], color=color, label=key,
                    linewidth=1.5)
        if log and all((columns[k][np.isfinite(columns[k])] > 0).all() for k in keys):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(found):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(out, buf.getvalue(), mode="wb")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m scdm.plot_progress", formatter_class=HelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("log_dir", help="a training run's --log_dir (it holds progress.csv)")
    p.add_argument("--out", default="", help=f"the PNG to write (default: LOG_DIR/{DEFAULT_OUT})")
    p.add_argument("--smoothing", type=float_in(0.0, 1.0, hi_open=True), default=0.9,
                   help="weight of TensorBoard-style exponential smoothing, in [0, 1), at most 1 - 10/points so that "
                        "short runs are not smoothed flat; 0: none (default: %(default)s)")
    args = p.parse_args(argv)
    log_dir = Path(args.log_dir)
    if not log_dir.is_dir():
        raise UserError(f"LOG_DIR {log_dir} is not a folder (expected a training run's --log_dir)")
    out = Path(args.out) if args.out else log_dir / DEFAULT_OUT
    check_writable_file(out, "--out")
    columns = read_progress(log_dir / PROGRESS)
    plot(columns, out, args.smoothing, title=str(log_dir))
    print(f"wrote {out} ({len(columns['step'])} logged steps, up to step {int(np.nanmax(columns['step']))})")
    return 0


if __name__ == "__main__":
    run_cli(main)
