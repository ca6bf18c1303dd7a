"""A sampler results folder: what made it (`manifest.json`) and what may be done to it.

A results folder is only trustworthy when it says where its samples came from: the checkpoint (by
sha256), every flag, the label maps (and the corruption of a noisy tree), the code version. A rerun
with the same settings resumes; one with other settings is refused before anything is written, naming
the settings that differ; `--overwrite` removes only what an earlier sampler run wrote.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from .runtime import dist_util
from .checkpoint import CHECKPOINT_FILE, parse_step
from .data.dataset_layouts import CORRUPTION_FILE, DatasetError, listed
from .runtime.errors import UserError
from .runtime.fileio import TEMP_NAME, check_writable, file_sha256, write_json
from .diffusion.label_diffusion import DISCRETE_CLASSWISE
from .fast.performance import running_precision
from .run_config import SAMPLING_TIME_FLAGS
from .script_util import model_and_diffusion_defaults
from .fast.tuning_cache import RECORD as TUNING_RECORD

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
OUTPUT_DIRS = ("images", "labels", "labels_color", "samples")
OUTPUT_FILES = ("overview.png", MANIFEST, TUNING_RECORD)
SET_DIR = re.compile(r"^samples_\d+$")
# Manifest entries that do not change the pixels, so a rerun may differ in them and still resume:
# where the checkpoint lies (its sha256 is compared), how the work is split (seeds are per image, so
# batch size and process count change a sample by at most a rounding step, as torch.compile does),
# how much is sampled (a rerun may add images or sets), exact fast paths, and the code version.
# (--batch_invariant removes the rounding step: see docs/reliability.md.)
# Precision is compared: fp16 visibly changes samples.
NOT_COMPARED = {
    "created", "updated", "model_flags_from", "seed", "checkpoint.path", "checkpoint.size", "checkpoint.step",
    "checkpoint.ema_rate", "model.dataset_mode", "sampling.num_samples", "sampling.batch_size",
    "sampling.num_sets", "sampling.num_workers", "sampling.compile", "sampling.disable_fast_paths",
    "sampling.use_ema", "sampling.ema_rate", "sampling.results_path", "sampling.overwrite", "sampling.preset",
    "sampling.use_checkpoint", "sampling.use_fp16", "sampling.class_schedule", "sampling.gpus_per_node",
    "sampling.gpu", "sampling.seed_align", "sampling.verbose", "sampling.batch_invariant", "labels.unlabeled",
    "sampling.precision_requested",
    "outputs", "code", "environment",
}

def sample_dirs(num_sets):
    return ["samples"] if num_sets == 1 else ["samples"] + [f"samples_{k}" for k in range(num_sets)]


def check_results_path(results_path, data_dir=""):
    """Refuse an unusable --results_path before any work, without creating anything: one that is a
    file or read-only, one that overlaps the label maps it reads (--data_dir), and one whose sampler
    folders hold things the sampler never writes (an --overwrite would delete them)."""
    if not results_path:
        raise ValueError("--results_path is required")
    root = Path(results_path)
    if data_dir:
        data, where = Path(data_dir).resolve(), root.resolve()
        if where == data or data in where.parents or any(data == where / d or where / d in data.parents
                                                         for d in OUTPUT_DIRS):
            raise UserError(f"--results_path {root} overlaps --data_dir {data_dir} (the label maps it reads, "
                            "which an --overwrite or a rerun could replace); choose a folder outside it")
    if root.is_dir():
        foreign = foreign_entries(root)
        if foreign:
            raise UserError(f"--results_path {root} holds {listed(foreign)}, which image_sample never writes (its "
                            f"folders {', '.join(OUTPUT_DIRS)} and samples_N hold only its PNG files); nothing was "
                            "changed: move them, or choose another --results_path")
    if root.exists() and not root.is_dir():
        raise PermissionError(f"--results_path {root} is not writable: it is a file, not a folder")
    base = root
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise PermissionError(f"--results_path {root} is not writable: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise PermissionError(f"--results_path {root} is not writable: no write permission in {base}")
    return root


def code_version():
    """The scdm version and, for a git checkout, its commit and whether tracked files differ from it
    (None when unavailable): results made by uncommitted code say so."""
    try:
        from importlib.metadata import version
        scdm_version = version("scdm")
    except Exception:
        scdm_version = None
    source = Path(__file__).resolve().parents[1]
    commit = dirty = None
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=source, capture_output=True,
                             text=True, timeout=10)
        lines = out.stdout.split()
        # Only the tree the package lives in: not a repository that merely contains an installed copy.
        if out.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == source:
            commit = lines[1]
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                                    capture_output=True, text=True, timeout=10)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"scdm": scdm_version, "git_commit": commit, "git_dirty": dirty}


def read_corruption(data_dir):
    """The corruption.json of a noisy tree made by image_process, or None."""
    if not data_dir:
        return None
    path = Path(data_dir) / CORRUPTION_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} is not readable JSON ({e}); it describes the noisy tree --data_dir") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path} must hold a JSON object (the corruption image_process applied)")
    return meta


def unlabeled_handling(args):
    """How the unlabeled id reaches the model, in words (the log and the manifest say it)."""
    if getattr(args, "unlabeled_id", -1) is None or getattr(args, "unlabeled_id", -1) < 0:
        return "not at all (no unlabeled id)"
    if args.unlabeled_to_zero:
        return "as the all-zero [MASK] state"
    return f"as the unlabeled class {args.unlabeled_id}"


def build_manifest(args, model_path, model_flags, precision, corruption):
    """What makes this results folder: checkpoint, every flag, label source, code version."""
    match = CHECKPOINT_FILE.match(model_path.name)
    model_keys = [k for k in model_and_diffusion_defaults() if k not in SAMPLING_TIME_FLAGS]
    sampler_keys = [k for k in args.values() if k not in model_keys and k not in
                    ("model_path", "data_dir", "dataset_mode", "is_train")]
    sampling = {k: getattr(args, k) for k in sampler_keys}
    # What runs, not what was asked: fp16 on a device without it runs in fp32; auto is resolved.
    sampling["precision"] = running_precision(dist_util.dev(), precision)
    sampling["precision_requested"] = args.precision
    sampling["results_path"] = str(Path(args.results_path).resolve())
    schedule = None
    if args.cond_diffuse and args.cond_opt == DISCRETE_CLASSWISE and args.class_schedule:
        schedule = file_sha256(args.class_schedule)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": now,
        "updated": now,
        "checkpoint": {"path": str(model_path.resolve()), "size": model_path.stat().st_size,
                       "sha256": file_sha256(model_path), "step": parse_step(model_path) if match else None,
                       "ema_rate": (match.group("rate") or None) if match else None},
        "model_flags_from": model_flags.source,
        "model": {k: getattr(args, k) for k in model_keys},
        "class_schedule_sha256": schedule,
        "sampling": sampling,
        "seed": args.seed,
        "labels": {"data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else "",
                   "dataset_mode": args.dataset_mode, "is_train": args.is_train, "corruption": corruption,
                   "unlabeled": unlabeled_handling(args)},
        "outputs": [*OUTPUT_DIRS, *sample_dirs(args.num_sets)[1:], *OUTPUT_FILES],
        "code": code_version(),
        "environment": {"device": str(dist_util.dev()), "world_size": dist_util.get_world_size(),
                        "torch": torch.__version__},
    }
    return json.loads(json.dumps(manifest))  # the form it has when read back


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("labels.corruption",):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def compared(manifest):
    flat = flatten(manifest)
    return {k: v for k, v in flat.items()
            if k not in NOT_COMPARED and k.split(".")[0] not in NOT_COMPARED}


def setting_name(key):
    return {"checkpoint.sha256": "model sha256", "class_schedule_sha256": "class schedule sha256",
            "format": "manifest format"}.get(key, key.rsplit(".", 1)[-1])


def show(value):
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value[:12] + ".."
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def manifest_differences(old, new):
    """["s: 1.5 -> 3.0", ...] for every compared setting that differs."""
    a, b = compared(old), compared(new)
    return [f"{setting_name(k)}: {show(a.get(k))} -> {show(b.get(k))}"
            for k in sorted(set(a) | set(b), key=lambda k: (k != "checkpoint.sha256", k)) if a.get(k) != b.get(k)]


def main_settings(manifest):
    """The settings a reader looks for first, as (name, value) pairs (reports print them)."""
    m = manifest or {}
    ck, s, lab, code = (m.get(k) or {} for k in ("checkpoint", "sampling", "labels", "code"))
    corruption = lab.get("corruption")
    pairs = [
        ("checkpoint", f"{ck.get('path')} (sha256 {str(ck.get('sha256'))[:12]}.., step {ck.get('step')})"),
        ("model flags from", m.get("model_flags_from")),
        ("respacing", s.get("timestep_respacing") or "all steps"),
        ("guidance s", s.get("s")), ("extrapolation", s.get("extrapolation")),
        ("dynamic threshold", s.get("dynamic_threshold")),
        ("sampler", s.get("sampler") or ("ddim" if s.get("use_ddim") else "ancestral")), ("seed", s.get("seed")),
        ("precision", s.get("precision")), ("unlabeled_to_zero", s.get("unlabeled_to_zero")),
        ("labels", f"{lab.get('data_dir')} ({lab.get('dataset_mode')}, "
                   f"{'train' if lab.get('is_train') else 'test'} split)"),
        ("corruption", f"{corruption.get('noise')} {json.dumps(corruption.get('params'))}" if corruption else "none"),
        ("code", f"scdm {code.get('scdm')}, commit {code.get('git_commit')}"),
    ]
    return pairs


def read_manifest(path):
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is not a sampler manifest (a JSON object)")
    return manifest


def sampler_outputs(root, manifest=None):
    """What an earlier sampler run wrote in `root`: its folders and files, nothing else."""
    names = set(OUTPUT_DIRS) | set(OUTPUT_FILES)
    for name in (manifest or {}).get("outputs") or []:
        if isinstance(name, str) and name and "/" not in name and "\\" not in name and name not in (".", ".."):
            names.add(name)
    found = [root / n for n in sorted(names) if (root / n).exists()]
    found += sorted(p for p in root.iterdir() if p.is_dir() and SET_DIR.match(p.name) and p not in found)
    return found


def foreign_entries(root):
    """What lies in the sampler's folders of `root` that it never writes (anything but its PNG files
    and the temporary files of an interrupted write), relative to `root`."""
    old = None
    try:
        old = read_manifest(root / MANIFEST) if (root / MANIFEST).is_file() else None
    except UserError:
        pass
    found = []
    for path in sampler_outputs(root, old):
        if path.name in OUTPUT_FILES:
            if path.is_dir() and not path.is_symlink():
                found.append(path.relative_to(root))
        elif path.is_dir() and not path.is_symlink():
            found += [p.relative_to(root) for p in sorted(path.iterdir())
                      if p.is_symlink() or not p.is_file() or not (p.suffix == ".png" or TEMP_NAME.match(p.name))]
    return found


def holds_samples(root, old):
    return any(d.is_dir() and any(d.glob("*.png")) for d in sampler_outputs(root, old) if d.name not in OUTPUT_FILES)


def plan_results(root, manifest, overwrite):
    """'new', 'resume' or 'overwrite' for `root`; refuses a folder of other settings before anything
    is written (every rank runs this before rank 0 changes the folder)."""
    if not root.exists():
        return "new", None
    old_path = root / MANIFEST
    if old_path.exists():
        try:
            old = read_manifest(old_path)
        except UserError as e:
            if overwrite:
                return "overwrite", None
            raise UserError(f"--results_path {root}: {e}; pass --overwrite to start over, or choose another "
                            "--results_path") from None
        if overwrite:
            return "overwrite", old
        diffs = manifest_differences(old, manifest)
        if diffs and not holds_samples(root, old):  # an earlier run that failed before its first sample
            print(f"note: --results_path {root}: the earlier run there ({', '.join(diffs)}) wrote no sample; "
                  "starting over", file=sys.stderr, flush=True)
            return "overwrite", old
        if diffs:
            raise UserError(f"--results_path {root} holds samples made with other settings ({', '.join(diffs)}); "
                            "pass --overwrite to replace them, or choose another --results_path")
        return "resume", old
    if holds_samples(root, None):
        if overwrite:
            return "overwrite", None
        raise UserError(f"--results_path {root} holds samples without a {MANIFEST} (from an earlier version or "
                        "another tool), so their settings are unknown; pass --overwrite to replace them, or "
                        "choose another --results_path")
    return "new", None


def prepare_results(root, plan, old, manifest, num_sets):
    """Rank 0: clear an earlier run (with --overwrite), create the folders, write the manifest."""
    if plan == "overwrite" and root.is_dir():
        for p in sampler_outputs(root, old):
            if p.is_dir() and not p.is_symlink():
                # Only PNG and temporary files: check_results_path refused a folder holding anything else.
                for f in p.iterdir():
                    if f.is_file() and (f.suffix == ".png" or TEMP_NAME.match(f.name)):
                        f.unlink()
                p.rmdir()
            else:
                p.unlink()
        kept = sorted(p.name for p in root.iterdir())
        note = f"; kept {', '.join(kept)} (not written by the sampler)" if kept else ""
        print(f"note: --overwrite: removed the earlier samples from {root}{note}", file=sys.stderr, flush=True)
    check_writable(root, "--results_path")
    for d in [*OUTPUT_DIRS, *sample_dirs(num_sets)]:
        (root / d).mkdir(parents=True, exist_ok=True)
    if plan == "resume" and old and old.get("created"):
        manifest = dict(manifest, created=old["created"])
    write_json(manifest, root / MANIFEST)
