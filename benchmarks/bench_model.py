"""Plain path vs fast path of the SCDM UNet, in one run. Prints JSON with the machine and the config.

    OMP_NUM_THREADS=2 python benchmarks/bench_model.py                 # CPU part
    python benchmarks/bench_model.py --part gpu                         # GPU part, on a GPU machine
    python benchmarks/bench_model.py --smoke                            # every code path, tiny, seconds

CPU part, at our reference configuration (ADE20K class count 151, no edge channel, 64x64, num_channels 64,
2 res blocks, learned sigma, the released ADE20K flags otherwise, batch 4, fp32, 2 threads):
- a guided reverse step (s=1.5, extrapolation 0.8, dynamic threshold 0.95, class-wise label diffusion,
  ddim25) at several steps of the 25, since the cost of the label-dependent part depends on how much
  of the map the label diffusion has masked;
- a training step: forward + backward + AdamW step on the hybrid loss, with label diffusion and one of
  the four maps zeroed (classifier-free dropout); also the fast step on all-zero maps
  (`fast_without_labels`: what is left when no label-dependent work remains, so `speedup_bound_best`,
  plain over it, bounds what any SPADE fast path can give).
Targets: guided step >= 4x, training step >= 2x; outputs equal within 1e-4 relative (reported).
The fast path is the default config: switches set to "auto" are timed on the first call of each
shape (in the warm-up) and the choices, with their timings, are recorded in the JSON.

Precision check (`--part precision`, also in `cpu`): the trained toy model (the newest
results/bench_steps/train/ema_*.pt, or --toy_model) samples toy test maps with 25 guided DDIM steps
from fixed noise in fp32, bf16 and fp16 autocast; the JSON has the max/mean absolute difference of
the bf16 and fp16 samples from the fp32 ones and the toy mIoU of each. Where the CPU lacks native
bf16/fp16, autocast emulates the type: the numbers are the type's rounding all the same, the time
is not representative.

GPU part: 25-step guided sampling at the released 256x256 ADE20K configuration (random weights),
images/s per batch size in fp32 and bf16, plain vs fast, model FLOP utilisation against the GPU's bf16
peak; training images/s and peak memory at batch 10 with and without gradient checkpointing.

The plain path is the released computation: every fast path off (the model's config
`FastPaths.all_off()`), two separate passes for guidance, AdamW's per-tensor loop; the fast path is
the default config.
Times are wall clock after warm-up, plain and fast interleaved; we report the median and the best
of the repeats (the best is the robust figure on a machine shared with other jobs).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scdm.fast.fast_paths import FastPaths, override
from scdm.runtime.cli import nonnegative_float, nonnegative_int, positive_int
from scdm.runtime.fileio import recorded_path
from scdm.fast.performance import describe_machine, maybe_compile, precision_context
from scdm.diffusion.sampling import SamplerSettings, reverse_step, sample_batch, sample_loop
from scdm.script_util import create_model_and_diffusion
from scdm.training.train_util import adamw

COMPAT = Path(__file__).resolve().parents[2] / "shared" / "compat"
REPO = Path(__file__).resolve().parents[1]
TOY_RUN = REPO / "results" / "bench_steps"
GUIDANCE = dict(guidance_scale=1.5, extrapolation=0.8, threshold_percentile=0.95)
# The same guided setting on the released ddim25 grid, for whole samples.
RELEASED_25 = SamplerSettings(sampler="ddim", respacing="ddim25", guidance_scale=1.5, extrapolation=0.8,
                              dynamic_threshold=0.95)
# bf16 dense peak (TFLOP/s) by GPU name, for model FLOP utilisation; --peak_tflops overrides.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


# ----- configuration --------------------------------------------------------------------------
def released_ade20k_flags():
    path = COMPAT / "layout_ade20k.json"
    if path.exists():
        flags = dict(json.loads(path.read_text())["config"])
    else:  # the same values, for machines without ../shared/compat
        flags = dict(attention_resolutions="32,16,8", diffusion_steps=1000, image_size=256, learn_sigma=True,
                     noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2,
                     resblock_updown=True, use_fp16=False, use_scale_shift_norm=True, class_cond=True,
                     cond_diffuse=True, cond_opt="discrete_zero_classwise", num_classes=151, no_instance=True,
                     dataset_mode="ade20k")
    schedule = COMPAT / "ade20k_psiphi.npy"
    if flags.get("cond_opt") == "discrete_zero_classwise":
        if schedule.exists():
            flags["class_schedule"] = str(schedule)
        else:
            flags["cond_opt"] = "discrete_zero_uniform"
    flags["use_fp16"] = False
    return flags


def recorded(flags):
    """The flags as the JSON records them: file paths relative to the repository."""
    return {k: recorded_path(v) if k == "class_schedule" and v else v for k, v in flags.items()}


def cpu_flags(smoke=False):
    flags = dict(released_ade20k_flags(), image_size=64, num_channels=64, num_res_blocks=2)
    if smoke:
        flags.update(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                     attention_resolutions="16,8", num_head_channels=32)
    return flags


def build(flags, respacing="", device="cpu", seed=0):
    """Model with random weights: the released init, plus the zero-initialised output layers drawn
    small, so that outputs and gradients are non-trivial and comparisons mean something."""
    torch.manual_seed(seed)
    model, diffusion = create_model_and_diffusion(**dict(flags, timestep_respacing=respacing))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model.to(device), diffusion


def region_label_maps(batch, num_classes, size, regions=10, seed=0, device="cpu"):
    """One-hot maps (B, num_classes, S, S) made of `regions` smooth irregular regions per map (argmax of
    upsampled noise), classes drawn from all num_classes: the structure of a real segmentation map."""
    g = torch.Generator().manual_seed(seed)
    logits = F.interpolate(torch.randn(batch, regions, 5, 5, generator=g), size=(size, size), mode="bicubic",
                           align_corners=False)
    classes = torch.stack([torch.randperm(num_classes, generator=g)[:regions] for _ in range(batch)])
    ids = torch.gather(classes, 1, logits.argmax(1).flatten(1)).view(batch, size, size)
    return F.one_hot(ids, num_classes).permute(0, 3, 1, 2).float().to(device)


# ----- timing ---------------------------------------------------------------------------------
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
CLOCK = {"fn": time.perf_counter}  # --clock: process CPU time is robust to other jobs (with --threads 1)


def interleaved(fns, device, warmup, repeats):
    """Run every fn `warmup` times, then `repeats` rounds of each in turn; seconds per fn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t0 = CLOCK["fn"]()
            fn()
            _sync(device)
            times[k].append(CLOCK["fn"]() - t0)
    return {k: {"best_s": round(min(v), 4), "median_s": round(statistics.median(v), 4)} for k, v in times.items()}


def rel_diff(a, b):
    """max |a - b| / max |b| (how far the fast result is from the plain one)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def ratio(times, key="best_s", num="fast", den="plain"):
    """How many times faster `num` ran than `den`."""
    return round(times[den][key] / times[num][key], 2)


# ----- CPU: guided reverse step ---------------------------------------------------------------
def cpu_guided_step(flags, batch, steps, warmup, repeats, half=()):
    """plain (the released computation) and fast in fp32; with `half` (e.g. ["bf16"]) the fast path in
    that precision too, as sampling runs it (the torso holding half weights: `precision_context` with the
    model) and under plain autocast, for comparison."""
    model, diffusion = build(flags, respacing="ddim25")
    model.eval()
    size, num_classes = flags["image_size"], flags["num_classes"]
    y = region_label_maps(batch, num_classes, size)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g)
    prev = torch.randn(batch, 3, size, size, generator=g) * 0.5
    results = []
    for step in steps:
        t = torch.full((batch,), step, dtype=torch.long)
        u = torch.rand(batch, 1, size, size, generator=g)

        def run(fast, precision="fp32", held=True):
            with override(model, fast), torch.no_grad(), \
                    precision_context("cpu", precision, model=model if held else None):
                return reverse_step(model, diffusion, x, t, y, label_noise=u, prev_xstart=prev,
                                    batched_guidance=fast, **GUIDANCE)

        plain, fast = run(False), run(True)
        fns = {"plain": lambda: run(False), "fast": lambda: run(True)}
        for p in half:
            fns[f"fast_{p}"] = lambda p=p: run(True, p)
            fns[f"fast_{p}_autocast"] = lambda p=p: run(True, p, held=False)
        y_t = diffusion.diffuse_cond(y, t, noise=u)
        times = interleaved(fns, "cpu", warmup, repeats)
        row = {
            "step": step, "of": diffusion.num_timesteps, "model_timestep": int(diffusion.model_timesteps(t)[0]),
            "labelled_pixel_fraction": round(float(y_t.sum() / y.sum()), 3),
            **times, "speedup_best": ratio(times), "speedup_median": ratio(times, "median_s"),
            "max_rel_diff": {"mean": rel_diff(fast.mean, plain.mean),
                             "pred_xstart": rel_diff(fast.pred_xstart, plain.pred_xstart)},
        }
        for p in half:
            out = run(True, p)
            row[f"{p}_over_fp32_fast_best"] = ratio(times, num=f"fast_{p}", den="fast")
            row[f"{p}_autocast_over_fp32_fast_best"] = ratio(times, num=f"fast_{p}_autocast", den="fast")
            row[f"{p}_max_abs_diff_pred_xstart"] = round(float((out.pred_xstart - fast.pred_xstart).abs().max()), 4)
        results.append(row)
    keys = ["plain", "fast", *[f"fast_{p}{v}" for p in half for v in ("", "_autocast")]]
    total = {k: sum(r[k]["best_s"] for r in results) for k in keys}
    summary = {f"{k}_over_steps_best_s": round(v, 3) for k, v in total.items()}
    summary["speedup_over_steps_best"] = round(total["plain"] / total["fast"], 2)
    for p in half:
        summary[f"{p}_over_fp32_fast_over_steps"] = round(total["fast"] / total[f"fast_{p}"], 2)
        summary[f"{p}_over_plain_over_steps"] = round(total["plain"] / total[f"fast_{p}"], 2)
    return {"per_step": results, **summary,
            "max_rel_diff": max(max(r["max_rel_diff"].values()) for r in results),
            "auto_choices": auto_choices(model)}


def auto_choices(model):
    """What the "auto" fast paths chose, per key, with the timings (ms) they were chosen on (none for a
    choice taken from the machine's tuning cache: it was timed by an earlier process)."""
    tuner = model.autotuner
    return {" ".join(map(str, key)): {"choice": tuner.choices[key],
                                      "ms": {k: round(v * 1e3, 2) for k, v in tuner.timings[key].items()}
                                      if key in tuner.timings else "from the tuning cache"}
            for key in tuner.choices}


# ----- CPU: training step ---------------------------------------------------------------------
def cpu_train_step(flags, batch, warmup, repeats, dropped=1, half=()):
    model, diffusion = build(flags)
    size, num_classes = flags["image_size"], flags["num_classes"]
    y = region_label_maps(batch, num_classes, size, seed=2)
    y[batch - dropped:] = 0  # classifier-free dropout of the last map(s)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    t = torch.linspace(50, diffusion.num_timesteps - 50, batch).long()
    noise = torch.randn(x0.shape, generator=g)
    u = torch.rand(batch, 1, size, size, generator=g)
    models = {"plain": model, "fast": copy.deepcopy(model)}
    models["plain"].fast_paths = FastPaths.all_off()
    opts = {k: adamw(m.parameters(), 1e-4, 0.01, fused=m.fast_paths.fused_adamw) for k, m in models.items()}

    def run(key, maps=y, precision="fp32"):
        m, opt = models[key], opts[key]
        opt.zero_grad(set_to_none=True)
        with precision_context("cpu", precision):  # training autocasts: fp32 weights, fp32 optimizer
            loss = diffusion.training_losses(m, x0, t, model_kwargs={"y": maps}, noise=noise,
                                             label_noise=u)["loss"].mean()
        loss.backward()
        opt.step()
        return loss.detach()

    # Correctness on the first step, from identical weights: loss and gradients. (Weights after the
    # step are not compared: Adam's first update is lr * sign(grad), which turns rounding noise in
    # gradients that are zero in exact arithmetic into full-size differences, whatever the path.)
    losses = {k: run(k) for k in models}
    grads = {k: [p.grad for p in m.parameters()] for k, m in models.items()}
    scale = max(float(gr.abs().max()) for gr in grads["plain"])
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(grads["fast"], grads["plain"])) / scale
    # The floor: the fast step on all-zero maps, where no label-dependent work is left but the closed
    # form; no SPADE fast path can go below it, so plain / floor bounds their speedup.
    no_labels = torch.zeros_like(y)
    fns = {**{k: (lambda k=k: run(k)) for k in models}, "fast_without_labels": lambda: run("fast", no_labels)}
    for p in half:
        fns[f"fast_{p}"] = lambda p=p: run("fast", precision=p)
    times = interleaved(fns, "cpu", warmup, repeats)
    floor = times.pop("fast_without_labels")
    for p in half:
        times[f"{p}_over_plain_best"] = ratio(times, num=f"fast_{p}")
        times[f"{p}_over_fp32_fast_best"] = ratio(times, num=f"fast_{p}", den="fast")
    return {**times, "speedup_best": ratio(times), "speedup_median": ratio(times, "median_s"),
            "fast_without_labels": floor, "speedup_bound_best": round(times["plain"]["best_s"] / floor["best_s"], 2),
            "dropped_maps": dropped, "timesteps": t.tolist(),
            "max_rel_diff": {"loss": rel_diff(losses["fast"], losses["plain"]),
                             "grads_vs_largest_grad": grad_diff},
            "auto_choices": auto_choices(models["fast"])}


def cpu_peaks(size=2048, repeats=3):
    """GFLOP/s of a dense matmul and of a 3x3 convolution (128 channels, 32x32, batch 8) per precision
    this CPU runs natively: the ceiling a compute-bound step can reach."""
    from scdm.fast.performance import cpu_half_support
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if cpu_half_support("bf16")[0] else {})}
    out = {}
    for name, dtype in dtypes.items():
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        x, w = torch.randn(8, 128, 32, 32, dtype=dtype), torch.randn(128, 128, 3, 3, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        jobs = {"matmul": (lambda: a @ b, 2 * size ** 3),
                "conv3x3": (lambda: F.conv2d(x, w, padding=1), 2 * 8 * 128 * 128 * 9 * 32 * 32)}
        for op, (fn, flop) in jobs.items():
            fn()
            best = min(_timed(fn) for _ in range(repeats))
            out[f"{op}_{name}_gflops"] = round(flop / best / 1e9, 1)
    return out


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def half_precisions(args):
    """The half precisions to time besides fp32: those of --half this CPU runs natively."""
    from scdm.fast.performance import cpu_half_support
    asked = [p for p in args.half.split(",") if p]
    return [p for p in asked if cpu_half_support(p)[0]]


def run_cpu(args):
    flags = cpu_flags(args.smoke)
    steps = [int(s) for s in args.steps.split(",")]
    half = half_precisions(args)
    out = {"config": {**recorded(flags), "batch": args.batch, "precisions": ["fp32", *half], "guidance": GUIDANCE,
                      "clock": args.clock,
                      "timestep_respacing": "ddim25", "label_maps": "10 smooth regions per map",
                      "fast_paths": sorted(FastPaths.names()), "warmup": args.warmup, "repeats": args.repeats}}
    out["config"]["half_precisions_timed"] = half
    out["load_average_before"] = os.getloadavg()
    out["peaks"] = cpu_peaks(512 if args.smoke else 2048)
    if "guided" in args.cpu_parts:
        out["guided_reverse_step"] = cpu_guided_step(flags, args.batch, steps, args.warmup, args.repeats, half)
    if "train" in args.cpu_parts:
        out["training_step"] = cpu_train_step(flags, args.batch, args.warmup, args.repeats, half=half)
    out["load_average_after"] = os.getloadavg()
    return out


# ----- precision: bf16 / fp16 samples against fp32 -------------------------------------------
def newest_toy_checkpoint():
    found = sorted((TOY_RUN / "train").glob("ema_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return found[-1] if found else None


def run_precision(args):
    """Samples of the trained toy model from fixed noise, 25 guided DDIM steps, per precision."""
    from bench_steps import load_maps, miou, to_uint8
    from scdm.data.conditioning import Conditioning
    from scdm.data.dataset_layouts import dataset_info
    from scdm.loading import load_checkpoint
    from scdm.fast.performance import cpu_half_support

    model_path = Path(args.toy_model) if args.toy_model else newest_toy_checkpoint()
    data_dir = Path(args.toy_data)
    if model_path is None or not model_path.is_file() or not (data_dir / "test").is_dir():
        return {"skipped": f"no trained toy model ({model_path}) or toy data ({data_dir}): "
                           "train one as benchmarks/bench_steps.py describes"}
    loaded = load_checkpoint(model_path)
    model, flags, diffusion = loaded.model, loaded.flags, loaded.diffusion("ddim25")
    info = dataset_info("folder", data_dir)
    conditioning = Conditioning(info.num_classes, flags["no_instance"], info.unlabeled_id, unlabeled_to_zero=True)
    names, y = load_maps(data_dir, args.precision_maps, info, conditioning, flags["image_size"])
    shape = (len(names), 3, flags["image_size"], flags["image_size"])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    samples, rows = {}, {}
    for precision in ("fp32", "bf16", "fp16"):
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(names))]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        t0 = time.perf_counter()
        with ctx, torch.no_grad():
            x = sample_batch(model, diffusion, y, RELEASED_25, noise=noise, generators=gens)
        samples[precision] = x.float()
        rows[precision] = {"seconds": round(time.perf_counter() - t0, 2),
                           "toy_miou": round(float(miou(to_uint8(x), names, data_dir / "test" / "labels")), 4)}
        if dtype is not None:
            diff = (samples[precision] - samples["fp32"]).abs()
            rows[precision].update(max_abs_diff_from_fp32=round(float(diff.max()), 5),
                                   mean_abs_diff_from_fp32=round(float(diff.mean()), 5),
                                   native_on_this_cpu=cpu_half_support(precision)[0])
    return {"model": str(model_path.relative_to(REPO) if model_path.is_relative_to(REPO) else model_path),
            "maps": len(names), "image_size": flags["image_size"], "steps": "ddim25", "guidance": GUIDANCE,
            "sample_range": "[-1, 1]", "per_precision": rows,
            "note": "bf16/fp16 emulated by autocast where the CPU lacks them: same rounding, time not representative"
            if not all(cpu_half_support(p)[0] for p in ("bf16", "fp16")) else "native bf16/fp16",
            "toy_miou_of_fp32_minus_bf16": round(rows["fp32"]["toy_miou"] - rows["bf16"]["toy_miou"], 4)}


# ----- GPU: sampling and training at 256x256 --------------------------------------------------
def model_flops_per_image(model, flags, device):
    """FLOPs of one plain forward per image (the model FLOPs MFU is measured against)."""
    from torch.utils.flop_counter import FlopCounterMode
    size = flags["image_size"]
    x = torch.randn(1, 3, size, size, device=device)
    y = region_label_maps(1, flags["num_classes"], size, device=device)
    with override(model, False), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([500], device=device), y=y)
    return counter.get_total_flops()


def bf16_peak(args):
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def gpu_sampling(args, flags, device):
    model, diffusion = build(flags, respacing="ddim25", device=device)
    model.eval()
    fast_model = maybe_compile(copy.deepcopy(model), args.compile) if args.compile else model
    flops = model_flops_per_image(model, flags, device)
    forwards = 2 * diffusion.num_timesteps  # guidance: two forwards per step
    peak = bf16_peak(args)
    rows = []
    for precision in ("fp32", "bf16"):
        for batch in [int(b) for b in args.gpu_batches.split(",")]:
            y = region_label_maps(batch, flags["num_classes"], flags["image_size"], device=device)
            shape = (batch, 3, flags["image_size"], flags["image_size"])

            def run(fast, batch=batch, y=y, shape=shape):
                net = fast_model if fast else model
                gens = [torch.Generator(device).manual_seed(i) for i in range(batch)]
                with override(net, fast), precision_context(device, precision):
                    if args.smoke:  # one step is enough to check the code
                        x = torch.randn(shape, generator=gens[0], device=device)
                        t = torch.full((batch,), 12, device=device)
                        return reverse_step(net, diffusion, x, t, y, batched_guidance=fast, **GUIDANCE).mean
                    return sample_loop(net, diffusion, shape, y, generators=gens, device=device,
                                       batched_guidance=fast, **GUIDANCE)

            try:
                _reset_memory(device)
                plain_out, fast_out = run(False), run(True)
                times = interleaved({"plain": lambda: run(False), "fast": lambda: run(True)}, device, 1,
                                    args.gpu_repeats)
            except torch.cuda.OutOfMemoryError:
                rows.append({"precision": precision, "batch": batch, "error": "out of memory"})
                torch.cuda.empty_cache()
                break
            row = {"precision": precision, "batch": batch, **times, "speedup_best": ratio(times),
                   "peak_memory_gib": _peak_memory_gib(device),
                   "max_abs_diff_images": float((fast_out - plain_out).abs().max())}
            for k in ("plain", "fast"):
                row[f"{k}_images_per_s"] = round(batch / times[k]["best_s"], 3)
                if peak:
                    achieved = flops * forwards * batch / times[k]["best_s"]
                    row[f"{k}_mfu_vs_bf16_peak"] = round(achieved / (peak * 1e12), 3)
            rows.append(row)
    return {"model_tflops_per_image_forward": round(flops / 1e12, 3), "forwards_per_image": forwards,
            "bf16_peak_tflops": peak, "rows": rows}


def gpu_training(args, flags, device):
    rows = []
    for checkpointing in (False, True):
        model, diffusion = build(dict(flags, use_checkpoint=checkpointing), device=device)
        batch = args.gpu_train_batch
        y = region_label_maps(batch, flags["num_classes"], flags["image_size"], device=device)
        x0 = torch.rand(batch, 3, flags["image_size"], flags["image_size"], device=device) * 2 - 1
        opts = {fast: adamw(model.parameters(), 1e-4, 0.01, fused=fast) for fast in (False, True)}  # plain: the loop
        for precision in ("bf16", "fp32"):
            for fast in (False, True):
                def run():
                    opt = opts[fast]
                    with override(model, fast):
                        opt.zero_grad(set_to_none=True)
                        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
                        with precision_context(device, precision):
                            loss = diffusion.training_losses(model, x0, t, model_kwargs={"y": y})["loss"].mean()
                        loss.backward()
                        opt.step()
                try:
                    _reset_memory(device)
                    times = interleaved({"step": run}, device, 2, args.gpu_repeats)["step"]
                    rows.append({"checkpointing": checkpointing, "precision": precision, "fast": fast,
                                 "batch": batch, **times, "images_per_s": round(batch / times["best_s"], 3),
                                 "peak_memory_gib": _peak_memory_gib(device)})
                except torch.cuda.OutOfMemoryError:
                    rows.append({"checkpointing": checkpointing, "precision": precision, "fast": fast,
                                 "batch": batch, "error": "out of memory"})
                    torch.cuda.empty_cache()
        model = opts = None  # the next configuration starts with this one's memory freed
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _reset_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gib(device):
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.type == "cuda" else None


def run_gpu(args):
    if not torch.cuda.is_available() and not args.smoke:
        return {"skipped": "no GPU on this machine"}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # smoke: the code paths on CPU
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the plain/fast comparison
    torch.backends.cudnn.allow_tf32 = False
    flags = released_ade20k_flags()
    if args.smoke:
        flags = cpu_flags(smoke=True)
        args.gpu_batches, args.gpu_train_batch, args.gpu_repeats = "2", 2, 1
    out = {"config": {**recorded(flags), "guidance": GUIDANCE, "timestep_respacing": "ddim25", "compile": args.compile}}
    out["sampling"] = gpu_sampling(args, flags, device)
    out["training"] = gpu_training(args, flags, device)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cpu", "gpu", "precision", "all"], default="cpu")
    parser.add_argument("--cpu_parts", default="guided,train,precision",
                        help="which CPU measurements: comma-separated guided, train, precision")
    parser.add_argument("--toy_model", default="", help="trained toy checkpoint (default: newest under "
                                                        "results/bench_steps/train)")
    parser.add_argument("--toy_data", default=str(TOY_RUN / "data" / "toy"), help="its toy dataset")
    parser.add_argument("--precision_maps", type=positive_int, default=16)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="process: CPU seconds of this process; on a machine shared with other jobs and "
                             "--threads 1 it counts this job's work only")
    parser.add_argument("--threads", type=positive_int, default=2, help="CPU threads (the reference figures: 2)")
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--half", default="bf16", help="half precisions to time besides fp32 where this CPU "
                                                      "runs them natively (comma-separated bf16, fp16; empty: none)")
    parser.add_argument("--steps", default="22,16,12,8,2", help="respaced steps (of 25) to time the guided step at")
    parser.add_argument("--warmup", type=nonnegative_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--gpu_batches", default="1,2,4,8,16")
    parser.add_argument("--gpu_train_batch", type=positive_int, default=10)
    parser.add_argument("--gpu_repeats", type=positive_int, default=3)
    parser.add_argument("--peak_tflops", type=nonnegative_float, default=0.0, help="bf16 peak of the GPU, for MFU")
    parser.add_argument("--compile", action="store_true", help="GPU fast path: also torch.compile the model")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration, one repeat: checks the code")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    CLOCK["fn"] = CLOCKS[args.clock]
    if args.smoke:
        args.repeats, args.warmup, args.steps, args.precision_maps = 1, 0, "12", 2
    result = {"machine": describe_machine()}
    if args.part in ("cpu", "all"):
        result["cpu"] = run_cpu(args)
    if args.part in ("precision", "all") or (args.part == "cpu" and "precision" in args.cpu_parts):
        result["precision"] = run_precision(args)
    if args.part in ("gpu", "all"):
        result["gpu"] = run_gpu(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
