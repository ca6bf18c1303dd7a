"""Whole guided samples, end to end: the released 25-step sampler against our settings, same weights, same
label maps, same threads, interleaved in one run. Prints JSON (and writes --out) with the machine.

    OMP_NUM_THREADS=2 python benchmarks/bench_sample.py [--batch 2] [--repeats 2] [--out FILE]
    REF_DIR=/path/to/released/SCDM python benchmarks/bench_sample.py     # also times the released code itself
    python benchmarks/bench_sample.py --smoke                             # every setting, tiny, seconds

The configuration is bench_model.py's CPU reference (ADE20K's 151 classes, 64x64, num_channels 64, 2 res
blocks, random weights, smooth 10-region label maps, class-wise label diffusion). Settings (SETTINGS):
- `released computation`: the released 25-step setting (ancestral ddim25, s 1.5, extrapolation 0.8,
  dynamic threshold 0.95) with every fast path off and two passes for guidance, in fp32;
- `released code` (only with REF_DIR): the released checkout's own `p_sample_loop` on the same weights;
- ours: the same 25-step setting with the fast paths, in fp32 and in bf16 where this CPU has native bf16;
  then the few-step settings of docs/sampling.md ("Few steps on noisy maps") in bf16.
The baseline of the speed-ups is the released code when REF_DIR is given, else the released computation.
Every setting draws each image's noise from its own generator (seed = image index), so the fp32 samples of
the released computation and of our 25-step fast path are the same up to rounding (reported).
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scdm.diffusion.sampling import SamplerSettings, sample_batch  # noqa: E402
from scdm.fast.fast_paths import override  # noqa: E402
from scdm.fast.performance import cpu_half_support, describe_machine, precision_context  # noqa: E402
from scdm.presets import SAMPLING  # noqa: E402
from scdm.runtime.cli import HelpFormatter, positive_int  # noqa: E402
from scdm.runtime.errors import UserError, run_cli  # noqa: E402
from scdm.runtime.fileio import write_json  # noqa: E402
from scdm.script_util import create_diffusion  # noqa: E402


def _bench_model():
    spec = importlib.util.spec_from_file_location("bench_model", Path(__file__).with_name("bench_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench_model()  # one owner of the reference configuration, the random weights and the timing loop
R25 = SAMPLING["25"]
RELEASED = SamplerSettings(sampler="ancestral", respacing=R25["timestep_respacing"], guidance_scale=R25["s"],
                           extrapolation=R25["extrapolation"], dynamic_threshold=R25["dynamic_threshold"])


def ours(sampler, respacing, extrapolation=0.0, **extra):
    return SamplerSettings(sampler=sampler, respacing=respacing, guidance_scale=R25["s"], extrapolation=extrapolation,
                           dynamic_threshold=R25["dynamic_threshold"], **extra)


# key: (label, settings, precision, fast paths). "half" rows run where this CPU has native bf16 (or --half).
SETTINGS = {
    "released": ("released computation, ancestral ddim25, fp32", RELEASED, "fp32", False),
    "ours25": ("ours, ancestral ddim25, fp32", RELEASED, "fp32", True),
    "ours25_half": ("ours, ancestral ddim25, {half}", RELEASED, "half", True),
    "dpm10_half": ("ours, dpm++2m logsnr10, {half}", ours("dpm++2m", "logsnr10"), "half", True),
    "sde10_half": ("ours, dpm++2m-sde logsnr10, {half}", ours("dpm++2m-sde", "logsnr10"), "half", True),
    "sde8_half": ("ours, dpm++2m-sde logsnr8, {half}", ours("dpm++2m-sde", "logsnr8"), "half", True),
    "sample8_half": ("ours, sample.sh PRESET 8 (dpm++2m-sde logsnr8, e 0.2), {half}",
                     ours(SAMPLING["8"]["sampler"], SAMPLING["8"]["timestep_respacing"],
                          SAMPLING["8"]["extrapolation"]), "half", True),
}


def evaluations(settings):
    """Model evaluations of one sample (a guided evaluation is one batched call of both branches)."""
    steps = int("".join(c for c in settings.respacing if c.isdigit()))
    restart = settings.restart
    return steps + (restart[2] * (restart[1] - restart[0]) if restart else 0)


def released_code(ref_dir, flags, state_dict, shape, y):
    """A function that samples `y` with the released checkout's own code (its guided_diffusion package:
    `script_util.create_model_and_diffusion` and `p_sample_loop`, the SDM interface SCDM extends) from the
    same weights; the released 25-step flags go wherever that code takes them."""
    ref = Path(ref_dir)
    if not (ref / "guided_diffusion" / "script_util.py").is_file():
        raise UserError(f"REF_DIR={ref_dir}: expected a released SCDM checkout with guided_diffusion/script_util.py")
    sys.path.insert(0, str(ref))
    try:
        from guided_diffusion import script_util
    except Exception as exc:  # noqa: BLE001 - whatever the checkout raises, name it
        raise UserError(f"REF_DIR={ref_dir}: importing guided_diffusion failed: {type(exc).__name__}: {exc}") from exc
    args = dict(script_util.model_and_diffusion_defaults())
    wanted = dict(flags, timestep_respacing=R25["timestep_respacing"], use_fp16=False,
                  extrapolation=R25["extrapolation"], dynamic_threshold=R25["dynamic_threshold"])
    args.update({k: v for k, v in wanted.items() if k in args})
    model, diffusion = script_util.create_model_and_diffusion(**args)
    missing = model.load_state_dict(state_dict, strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise UserError(f"REF_DIR={ref_dir}: the released model built from the reference flags does not take our "
                        f"weights (missing {missing.missing_keys[:3]}, unexpected {missing.unexpected_keys[:3]})")
    model.eval()
    loop = diffusion.p_sample_loop
    accepted = inspect.signature(loop).parameters
    extra = {k: wanted[k] for k in ("extrapolation", "dynamic_threshold") if k in accepted and k not in args}
    unplaced = [k for k in ("extrapolation", "dynamic_threshold") if k not in args and k not in accepted]
    if unplaced:
        raise UserError(f"REF_DIR={ref_dir}: found no place for {', '.join(unplaced)} in the released code "
                        "(neither a model_and_diffusion_defaults key nor a p_sample_loop argument)")

    def run():
        torch.manual_seed(0)
        with torch.no_grad():
            return loop(model, shape, clip_denoised=True, model_kwargs={"y": y, "s": R25["s"]}, progress=False,
                        **extra)
    return run


def measure(args):
    flags = BENCH.cpu_flags(args.smoke)
    half = [p for p in args.half.split(",") if p and (args.force_half or cpu_half_support(p)[0])][:1]
    model, _ = BENCH.build(flags)
    model.eval()
    size, b = flags["image_size"], args.batch
    y = BENCH.region_label_maps(b, flags["num_classes"], size)
    keys = [k for k in (args.settings.split(",") if args.settings else SETTINGS) if k]
    unknown = [k for k in keys if k not in SETTINGS]
    if unknown:
        raise UserError(f"--settings: unknown {', '.join(unknown)}; expected some of {', '.join(SETTINGS)}")
    keys = [k for k in keys if SETTINGS[k][2] != "half" or half]
    diffusions = {}
    fns, rows = {}, {}
    for key in keys:
        label, settings, precision, fast = SETTINGS[key]
        precision = half[0] if precision == "half" else precision
        if settings.respacing not in diffusions:
            diffusions[settings.respacing] = create_diffusion(**dict(flags, timestep_respacing=settings.respacing))
        diffusion = diffusions[settings.respacing]
        if not fast:
            settings = SamplerSettings(**{**settings.__dict__, "batched_guidance": False})

        def run(settings=settings, diffusion=diffusion, precision=precision, fast=fast):
            gens = [torch.Generator().manual_seed(i) for i in range(b)]
            with override(model, fast), torch.no_grad(), precision_context("cpu", precision, model=model):
                return sample_batch(model, diffusion, y, settings, generators=gens)
        fns[key] = run
        rows[key] = {"setting": label.format(half=precision), "sampler": settings.sampler,
                     "respacing": settings.respacing, "extrapolation": settings.extrapolation,
                     "precision": precision, "fast_paths": fast, "model_evaluations": evaluations(settings)}
    ref_dir = os.environ.get("REF_DIR", "")
    if ref_dir:
        fns["released_code"] = released_code(ref_dir, flags, model.state_dict(), (b, 3, size, size), y)
        rows["released_code"] = {"setting": "released code, p_sample_loop ddim25, fp32", "ref_dir": "REF_DIR",
                                 "precision": "fp32", "model_evaluations": 25}
    samples = {k: fn() for k, fn in fns.items()}  # also the warm-up: the fast paths time themselves here
    times = BENCH.interleaved(fns, "cpu", 0, args.repeats)
    base = "released_code" if ref_dir else "released"
    for key, row in rows.items():
        row.update(times[key], speedup_best=BENCH.ratio(times, num=key, den=base),
                   speedup_median=BENCH.ratio(times, "median_s", num=key, den=base),
                   max_abs_diff_from_released=round(float((samples[key] - samples[base]).abs().max()), 4))
    return {"config": {**BENCH.recorded(flags), "batch": b, "threads": torch.get_num_threads(),
                       "repeats": args.repeats, "baseline": base, "half_precision": half[0] if half else None,
                       "label_maps": "10 smooth regions per map, per-image seeds 0..batch-1"},
            "results": rows}


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--batch", type=positive_int, default=2, help="images per sample call")
    p.add_argument("--repeats", type=positive_int, default=2, help="timed rounds after the warm-up (best is reported)")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads (the reference figures: 2)")
    p.add_argument("--half", default="bf16", help="the half precision of the 'half' rows, where this CPU has it "
                   "natively ('' for none)")
    p.add_argument("--force_half", action="store_true", help="time the half rows even where the CPU emulates it")
    p.add_argument("--settings", default="", help=f"comma-separated keys (default: all of {', '.join(SETTINGS)})")
    p.add_argument("--out", default="", help="also write the JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny configuration, one repeat: checks the code")
    args = p.parse_args(argv)
    if args.half not in ("", "bf16", "fp16"):
        p.error(f"argument --half: expected bf16, fp16 or '', got {args.half!r}")
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.repeats = 1
    result = {"benchmark": "bench_sample", "machine": describe_machine(), **measure(args)}
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(result, args.out)


if __name__ == "__main__":
    run_cli(main)
