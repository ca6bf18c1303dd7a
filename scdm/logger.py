"""Training metrics: averaged over a log interval, written to log.txt and progress.csv on rank 0."""
import csv
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


class MetricLogger:
    def __init__(self, log_dir, enabled=True):
        self.dir = Path(log_dir)
        self.enabled = enabled
        self.values = defaultdict(list)
        self.columns = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def log(self, key, value):
        self.values[key].append(float(value))

    def log_loss_dict(self, diffusion, ts, losses):
        """Mean of each loss term, and its mean per timestep quartile (q0: t in the first quarter)."""
        for key, values in losses.items():
            values = values.detach().float().cpu().numpy()
            self.log(key, values.mean())
            for t, v in zip(ts.cpu().numpy(), values):
                self.log(f"{key}_q{int(4 * t / diffusion.num_timesteps)}", v)

    def text(self, line):
        if self.enabled:
            with open(self.dir / "log.txt", "a") as f:
                f.write(line.rstrip("\n") + "\n")

    def dump(self, step):
        """Write the means since the last dump; returns them (for the progress bar)."""
        means = {k: float(np.mean(v)) for k, v in self.values.items() if v}
        self.values.clear()
        if not self.enabled:
            return means
        row = {"step": step, "time": round(time.time(), 1), **means}
        self.text(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        path = self.dir / "progress.csv"
        if self.columns is None and path.exists():  # resumed run: keep the existing header
            with open(path, newline="") as f:
                self.columns = next(csv.reader(f), None)
        new_cols = [k for k in row if self.columns is None or k not in self.columns]
        if self.columns is None or new_cols:
            self._rewrite_with_columns((self.columns or []) + new_cols)
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(row)
        return means

    def _rewrite_with_columns(self, columns):
        path = self.dir / "progress.csv"
        rows = []
        if path.exists():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        self.columns = columns
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        tmp.replace(path)
