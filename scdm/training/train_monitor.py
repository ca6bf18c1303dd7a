"""TensorBoard and Weights & Biases beside log.txt and progress.csv, both optional.

Why optional: a training run must not fail for want of a viewer. TensorBoard event files go into
the log dir when `tensorboard` is installed (the `monitor` extra; one line says so when it is
not); W&B logs only when `wandb` is installed and `--wandb PROJECT` asks for it, and follows
W&B's own settings (WANDB_MODE=offline keeps the run on disk for a later `wandb sync`). Event
files are append-only streams written by TensorBoard itself, the one kind of file here that does
not go through `scdm.runtime.fileio`; a resumed run purges the events logged after its checkpoint's step,
as `MetricLogger.resume` drops those rows of progress.csv.
"""
import re
import resource
import sys
from pathlib import Path

import numpy as np
import torch

QUARTILE = re.compile(r"_q\d$")
LOSSES = ("loss", "mse", "vb")


def say(line):
    print(line, file=sys.stderr, flush=True)


def scalar_tag(key):
    """progress.csv column -> TensorBoard tag, grouped so that related curves share a panel."""
    if QUARTILE.search(key):
        return f"loss_by_timestep_quartile/{key}"
    if key in LOSSES:
        return f"loss/{key}"
    if key.startswith("miou_") or key.startswith("sample_"):
        return f"samples/{key}"
    return f"train/{key}"


def memory_stats(device):
    """Peak memory since the last call, in GiB: the accelerator's allocations on CUDA (peak reset
    here), else the process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
        torch.cuda.reset_peak_memory_stats(device)
        return {"memory_gb": peak}
    return {"rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


class TrainMonitor:
    """Scalars and pictures of a run for TensorBoard and W&B (rank 0 only)."""

    def __init__(self, log_dir, *, tensorboard=True, wandb_project="", config=None, start_step=0, note=say):
        self.tb = None
        self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                note("note: tensorboard is not installed (pip install tensorboard); training goes on with "
                     "log.txt and progress.csv (python -m scdm.plot_progress LOG_DIR draws them)")
            else:
                self.tb = SummaryWriter(log_dir=str(log_dir), purge_step=start_step or None)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                note(f"warning: --wandb {wandb_project}: wandb is not installed (pip install wandb); training goes "
                     "on without it")
            else:
                self.wandb = wandb.init(project=wandb_project, dir=str(log_dir), config=config or {},
                                        name=Path(log_dir).name, resume="allow")

    @property
    def enabled(self):
        return self.tb is not None or self.wandb is not None

    def scalars(self, step, values):
        values = {k: float(v) for k, v in values.items() if np.isfinite(v)}
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(scalar_tag(key), value, step)
        if self.wandb is not None:
            self.wandb.log({scalar_tag(k): v for k, v in values.items()}, step=step)

    def image(self, step, tag, picture):
        """A PIL picture (e.g. the sample grid)."""
        if self.tb is not None:
            self.tb.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb
            self.wandb.log({tag: wandb.Image(picture)}, step=step)

    def flush(self):
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
