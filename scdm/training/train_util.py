"""TrainLoop: DDP, AMP with a grad scaler, EMA, microbatches, classifier-free dropout,
checkpoints with resume (the checkpoint sets are written, found and loaded by scdm.checkpoint),
divergence guard, and logging (see docs/architecture.md). What a run
shows while it trains (sample grids, TensorBoard, W&B) comes in through two optional hooks,
`samples` (scdm.training.train_samples) and `monitor` (scdm.training.train_monitor)."""
import contextlib
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from ..runtime import dist_util
from ..checkpoint import (initial_ema_params, load_into_model, load_optimizer_state, model_name, parse_ema_rates,
                         parse_step, save_set)
from ..data.conditioning import Conditioning
from ..fast.fast_paths import unwrap
from ..runtime.logger import MetricLogger
from ..fast.performance import precision_context
from ..diffusion.resample import LossSecondMomentResampler, UniformSampler
from ..fast.fast_paths import route_details, summary_line
from ..fast.tuning_cache import reuse_record, write_record
from ..runtime.stop_signals import StopRequest
from .train_monitor import memory_stats


def adamw(params, lr, weight_decay, fused=True):
    """AdamW; `fused`: torch's one-kernel update where this torch and device have it (the same update up
    to rounding, a fraction of the per-tensor loop's time: docs/performance.md)."""
    params = list(params)
    if fused:
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError):  # this torch has no fused AdamW for the device
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for too many consecutive steps."""


def ema_decay(rate, step, warmup=False):
    """The EMA decay of the update made at `step` (0 for the first update). Warm-up caps it at
    (1 + step) / (10 + step), so the initial weights fade out after a few hundred steps instead of
    dominating the EMA for ~1/(1 - rate) steps."""
    return min(rate, (1 + step) / (10 + step)) if warmup else rate


def data_parallel(model, device):
    """DDP whose gradients live in its all-reduce buckets from the start (`gradient_as_bucket_view`,
    zeroed instead of freed), so that autograd accumulates into them in place. Otherwise a gradient
    that autograd creates in another layout than its parameter is copied into its bucket at every
    step ("Grad strides do not match bucket view strides"): a 1x1 conv's weight gradient computed
    from channels_last activations comes out channels_last at some batch sizes, which autograd's
    layout contract allows (only size-1 dimensions differ) and DDP's buckets do not.
    One process gets the model itself: DDP there only adds its hooks and bucket copies (a measurable
    share of a toy step, docs/performance.md) and has nothing to synchronise."""
    if dist_util.get_world_size() == 1:
        return model
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)


class TrainLoop:
    def __init__(self, *, model, diffusion, data, conditioning: Conditioning, batch_size, lr, log_dir, verbose=False,
                 microbatch=-1, ema_rate="0.9999", log_interval=10, save_interval=10000,
                 resume_checkpoint="", precision="fp32", fp16_scale_growth=1e-3, schedule_sampler=None,
                 weight_decay=0.0, lr_anneal_steps=0, max_steps=0, max_bad_steps=50, flags=None,
                 ema_warmup=False, notes=(), samples=None, sample_interval=0, monitor=None):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.conditioning = conditioning
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate_names = parse_ema_rates(ema_rate)
        self.ema_rate = [float(r) for r in self.ema_rate_names]
        self.ema_warmup = ema_warmup
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.precision = precision
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps
        self.max_bad_steps = max_bad_steps
        self.flags = flags or {}
        self.samples = samples  # a TrainSamples on rank 0 when grids are asked for (--sample_interval)
        self.sample_interval = sample_interval
        self.monitor = monitor  # a TrainMonitor (TensorBoard, W&B) on rank 0, or None
        self.last_sampled_step = None
        self.log_dir = Path(log_dir)
        self.device = dist_util.dev()
        self.logger = MetricLogger(log_dir, enabled=dist_util.is_main())
        if dist_util.is_main():  # each fast-path choice, in the run's log.txt (and on stderr with --verbose)
            route_details(self.logger.text, *([lambda line: tqdm.write(line, file=sys.stderr)] if verbose else []))

        self.step = 0
        self.bad_steps = 0
        self.last_saved_step = None

        self.model.to(self.device)
        tuner = getattr(self.model, "autotuner", None)
        if tuner is not None:  # a resumed run (same folder) runs the kernels it ran with
            reuse_record(self.log_dir, tuner, self.device)
        for line in notes:  # e.g. the checkpoint sets a resume skipped
            self.logger.text(line)
        if resume_checkpoint:
            self.step = parse_step(resume_checkpoint)
            load_into_model(self.model, resume_checkpoint, self.flags)
        dist_util.sync_params(self.model.parameters())
        self.opt = adamw(self.model.parameters(), lr, weight_decay, fused=unwrap(self.model).fast_paths.fused_adamw)
        self.scaler = None
        if precision == "fp16" and self.device.type == "cuda":
            growth_interval = max(1, round(1.0 / fp16_scale_growth)) if fp16_scale_growth > 0 else 2000
            self.scaler = torch.amp.GradScaler("cuda", growth_interval=growth_interval)
        self.ema_params = [initial_ema_params(self.model, resume_checkpoint, name, self.flags, self.device,
                                              warn=self._warn) for name in self.ema_rate_names]
        if resume_checkpoint:
            load_optimizer_state(self.opt, self.scaler, resume_checkpoint, self.model.parameters(), warn=self._warn)
            self.logger.resume(self.step)
            self.last_saved_step = self.step  # its set is on disk
            self.logger.text(f"resumed from {resume_checkpoint} at step {self.step}")
        self.ddp = data_parallel(self.model, self.device)

    def _warn(self, line):
        self.logger.text(f"warning: {line}")

    # ----- the loop ------------------------------------------------------------------------
    def done(self):
        return (self.max_steps and self.step >= self.max_steps) or (
            self.lr_anneal_steps and self.step >= self.lr_anneal_steps)

    def last_step(self):
        """The step the run stops at (the first limit reached), None without a limit: the bar's ETA."""
        return min([n for n in (self.max_steps, self.lr_anneal_steps) if n], default=None)

    def _announce_stop(self, message):
        if dist_util.is_main():
            print(message, file=sys.stderr, flush=True)
        self.logger.text(message)

    def run_loop(self):
        """Train to the end, or until a stop signal; returns the signal number that stopped it
        (None when it ran to the end). Either way the last step's checkpoint set is saved."""
        if self.done() and dist_util.is_main():
            limits = [f"--{name} is {n}" for name, n in (("max_steps", self.max_steps),
                                                          ("lr_anneal_steps", self.lr_anneal_steps)) if n]
            print(f"note: nothing to train: the run is at step {self.step} and {' and '.join(limits)}; raise it to "
                  "continue the run", file=sys.stderr, flush=True)
        bar = tqdm(total=self.last_step(), initial=self.step, desc="training", unit="step",
                   disable=not dist_util.is_main(), dynamic_ncols=True)
        images_seen, since, paused = 0, time.perf_counter(), 0.0
        stopping = said_fast_paths = False
        with StopRequest(self._announce_stop) as stop:
            try:
                while not self.done():
                    images, cond = next(self.data)
                    self.run_step(images, cond)
                    self.step += 1
                    if not said_fast_paths:  # the first step timed the fast paths: one line about it
                        said_fast_paths = True
                        tuner = getattr(self.model, "autotuner", None)
                        line = summary_line(tuner) if tuner is not None and dist_util.is_main() else None
                        if line:
                            tqdm.write(f"{line}; per choice: {self.logger.dir / 'log.txt'}", file=sys.stderr)
                        if tuner is not None and dist_util.is_main():
                            write_record(self.log_dir, tuner, self.device)
                    images_seen += images.shape[0] * dist_util.get_world_size()
                    bar.update(1)
                    saving = self.step % self.save_interval == 0
                    if saving:
                        self.save()
                    if self.sample_interval and (saving or self.step % self.sample_interval == 0):
                        paused += self.sample()
                    if self.step % self.log_interval == 0:
                        now = time.perf_counter()  # images/s of training: the sampling passes left out
                        self.logger.log("images_per_s", images_seen / max(now - since - paused, 1e-9))
                        for key, value in memory_stats(self.device).items():
                            self.logger.log(key, value)
                        means = self.logger.dump(self.step)
                        if self.monitor is not None:
                            self.monitor.scalars(self.step, means)
                        postfix = {k: f"{means[k]:.4f}" for k in ("loss", "mse") if k in means}
                        postfix["img/s"] = f"{means['images_per_s']:.1f}"
                        images_seen, since, paused = 0, now, 0.0
                        bar.set_postfix(postfix)
                    # Ranks agree, so that all of them stop after the same step.
                    stopping = dist_util.all_reduce_flag(stop.requested)
                    if stopping:
                        break
                if self.last_saved_step != self.step:
                    self.save()
                    if self.sample_interval and not stopping:  # a stopped run leaves at once
                        self.sample()
            finally:
                bar.close()
                if self.monitor is not None:
                    self.monitor.close()
        if not stopping:
            return None
        return stop.signum or signal.SIGTERM  # a rank that was not signalled stops with its peers

    def sample(self):
        """Rank 0 draws the sample grid of the first EMA and the raw weights; returns its seconds.
        The other ranks go on to their next all-reduce and wait there: the pass is kept small."""
        if self.samples is None or not dist_util.is_main() or self.last_sampled_step == self.step:
            return 0.0
        self.last_sampled_step = self.step
        weights = [(f"EMA {self.ema_rate_names[0]}", self.ema_params[0]), ("raw", list(self.model.parameters()))]
        result = self.samples.render(self.model, weights, self.device)
        path = self.samples.write(result, self.log_dir, self.step)
        scores = " ".join(f"{k}={v:.3f}" for k, v in result.miou.items())
        self.logger.text(f"samples: {path.name} ({result.seconds:.1f} s){' ' + scores if scores else ''}")
        for key, value in result.miou.items():  # progress.csv gets them on its next line
            self.logger.log(key, value)
        if self.monitor is not None:
            self.monitor.scalars(self.step, {**result.miou, "sample_seconds": result.seconds})
            self.monitor.image(self.step, "samples", result.image)
        return result.seconds

    def run_step(self, images, cond):
        images = images.to(self.device)
        y = self.conditioning.drop(self.conditioning.model_input(cond, self.device))
        self.opt.zero_grad(set_to_none=False)  # the gradients are DDP's bucket views: zeroed, never freed
        n = images.shape[0]
        for i in range(0, n, self.microbatch):
            mb, my = images[i:i + self.microbatch], y[i:i + self.microbatch]
            t, weights = self.schedule_sampler.sample(mb.shape[0], self.device)
            last = i + self.microbatch >= n
            no_sync = getattr(self.ddp, "no_sync", None)  # DDP's (also through torch.compile); none on one process
            sync = no_sync() if no_sync is not None and not last else contextlib.nullcontext()
            with sync:
                with precision_context(self.device, self.precision):
                    losses = self.diffusion.training_losses(self.ddp, mb, t, model_kwargs={"y": my})
                if isinstance(self.schedule_sampler, LossSecondMomentResampler):
                    self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
                loss = (losses["loss"].float() * weights).mean() * (mb.shape[0] / n)
                self.logger.log_loss_dict(self.diffusion, t, {k: v * weights for k, v in losses.items()})
                (self.scaler.scale(loss) if self.scaler else loss).backward()
        self._optimize()

    def _grads_finite(self):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True

    def _grad_norm(self):
        """The global L2 norm of the (unscaled) gradients, for the logs."""
        grads = [p.grad.detach().float() for p in self.model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0

    def _grad_norm_if_finite(self):
        """(norm, whether every gradient is finite). A finite norm means finite gradients; only a
        non-finite one (inf/nan, or squares beyond fp32) pays for the per-tensor check, which costs
        several norms (docs/performance.md)."""
        norm = self._grad_norm()
        return norm, math.isfinite(norm) or self._grads_finite()

    def _optimize(self):
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        # Gradients are all-reduced, so every rank reaches the same verdict.
        norm, finite = self._grad_norm_if_finite()
        if finite:
            self.logger.log("grad_norm", norm)
            self._anneal_lr()
            if self.scaler is not None:
                self.scaler.step(self.opt)
            else:
                self.opt.step()
            self._update_ema()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.logger.log("skipped_steps", 1)
        if self.scaler is not None:
            self.scaler.update()
            self.logger.log("grad_scale", self.scaler.get_scale())
        self.logger.log("lr", self.opt.param_groups[0]["lr"])
        if self.bad_steps >= self.max_bad_steps:
            last = self.last_saved_step
            where = (f"the last good checkpoint is {self.log_dir / model_name(last)}" if last is not None
                     else "no checkpoint was written in this run")
            raise TrainingDiverged(
                f"non-finite loss or gradients for {self.bad_steps} consecutive steps (up to step {self.step + 1}); "
                f"stopping without saving the diverged weights: {where}"
            )

    def _anneal_lr(self):
        if not self.lr_anneal_steps:
            return
        lr = self.lr * (1 - self.step / self.lr_anneal_steps)
        for g in self.opt.param_groups:
            g["lr"] = lr

    @torch.no_grad()
    def _update_ema(self):
        params = [p.detach().float() for p in self.model.parameters()]
        for rate, ema in zip(self.ema_rate, self.ema_params):
            decay = ema_decay(rate, self.step, self.ema_warmup)
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, params, alpha=1 - decay)

    # ----- checkpoints -----------------------------------------------------------------------
    def save(self):
        self.check_replicas_in_sync()
        if dist_util.is_main():
            save_set(self.log_dir, self.step, self.model, zip(self.ema_rate_names, self.ema_params), self.opt,
                     self.scaler, last_saved_step=self.last_saved_step)
            self.logger.text(f"saved checkpoint {model_name(self.step)}")
        self.last_saved_step = self.step
        dist_util.barrier()

    def check_replicas_in_sync(self):
        """Every rank must hold the same weights (cheap checksum, gathered at save time)."""
        if dist_util.get_world_size() == 1:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().double().flatten() for p in self.model.parameters()])
            idx = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device) % 9973 + 1
            checksum = torch.stack([flat.sum(), (flat * idx).sum()])
        gathered = [torch.zeros_like(checksum) for _ in range(dist_util.get_world_size())]
        dist.all_gather(gathered, checksum)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"replicas diverged at step {self.step}: checksums {[g.tolist() for g in gathered]}")
        self.logger.text(f"replicas in sync at step {self.step} (world size {dist_util.get_world_size()})")
