"""Training metrics: averaged over a log interval, written to log.txt and progress.csv on rank 0.

log.txt lines start with a local timestamp for people; progress.csv keeps a numeric `time` column
for plots. A resumed run appends to both, continuing the curve from its checkpoint's step."""
import csv
import io
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from .fileio import atomic_write


class MetricLogger:
    def __init__(self, log_dir, enabled=True):
        self.dir = Path(log_dir)
        self.enabled = enabled
        self.values = defaultdict(list)
        self.columns = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def csv_path(self):
        return self.dir / "progress.csv"

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
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with open(self.dir / "log.txt", "a") as f:
                f.write(f"{stamp} {line.rstrip()}\n")

    def resume(self, step):
        """Continue progress.csv at `step`: rows logged after that checkpoint describe weights that
        were lost, and keeping them would make the steps go back."""
        if not self.enabled or not self.csv_path.exists():
            return
        columns, rows = self.read_csv()
        kept = [r for r in rows if float(r.get("step") or 0) <= step]
        if columns and len(kept) != len(rows):
            self.text(f"progress.csv: dropped {len(rows) - len(kept)} rows logged after step {step}")
            self.write_csv(columns, kept)

    def dump(self, step):
        """Write the means since the last dump; returns them (for the progress bar)."""
        means = {k: float(np.mean(v)) for k, v in self.values.items() if v}
        self.values.clear()
        if not self.enabled:
            return means
        row = {"step": step, "time": round(time.time(), 1), **means}
        self.text(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                           if k != "time"))  # the line's timestamp says it
        if self.columns is None and self.csv_path.exists():  # resumed run: keep the existing header
            self.columns = self.read_csv()[0]
        new_cols = [k for k in row if k not in (self.columns or [])]
        if self.columns is None or new_cols:
            self.write_csv((self.columns or []) + new_cols, self.read_csv()[1])
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(row)
        return means

    def read_csv(self):
        if not self.csv_path.exists():
            return None, []
        with open(self.csv_path, newline="") as f:
            reader = csv.DictReader(f)
            return reader.fieldnames, list(reader)

    def write_csv(self, columns, rows):
        self.columns = list(columns or [])
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.csv_path, buf.getvalue())
