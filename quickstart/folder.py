"""The results folder: whose it is, whether its models fit the flags, and whether the disk can hold the run.

Every check here runs before a stage writes anything, so a refused run leaves the folder (and a
folder the quickstart did not make) exactly as it was.
"""
import json
import os
import shutil
import sys
import time

from scdm.runtime.fileio import folder_problem, write_json

from .config import MODELS, QuickstartError, model_flags, training_key

STATE_FILE = "quickstart.json"
GENERATOR = "quickstart"
LEGACY_GENERATORS = ("scdm.quickstart",)  # folders made before the quickstart left the scdm package


def log(msg):
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def read_state(out):
    """The folder's quickstart.json, or None when the quickstart did not make the folder."""
    try:
        state = json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(state, dict) and state.get("generator") in (GENERATOR, *LEGACY_GENERATORS)
    return state if ok else None


def write_state(out, **updates):
    state = read_state(out) or {"created": time.strftime("%Y-%m-%d %H:%M:%S")}
    state.update(updates, generator=GENERATOR)
    write_json(state, out / STATE_FILE, sort_keys=True)


def prepare_out(out, cfg, fresh):
    """Create or reuse the results folder; refuse a folder that is not a quickstart folder, or whose
    models were trained with other settings (they would be mixed with new ones)."""
    if out.exists() and not out.is_dir():
        raise QuickstartError(f"--out_dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        state = read_state(out)
        if state is None:
            raise QuickstartError(f"--out_dir {out} is not empty and is not a quickstart folder (no {STATE_FILE} "
                                  f"made by {GENERATOR}); choose a new or empty folder; nothing was changed")
        if fresh:
            log(f"--fresh: removing the previous quickstart results in {out}")
            shutil.rmtree(out)
        else:
            old, new = state.get("training_key"), training_key(cfg)
            if old is not None and old != new:
                diff = ", ".join(f"--{k} {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v)
                raise QuickstartError(f"{out} holds models trained with other settings ({diff}); pass --fresh to "
                                      f"start over, or --out_dir DIR for a separate run")
            log(f"reusing {out}: finished stages are skipped, training resumes from its last checkpoint")
    why = folder_problem(out)  # creates it; a file on the way or no permission is one line
    if why:
        raise QuickstartError(f"--out_dir {out} is not writable: {why}")
    write_state(out, training_key=training_key(cfg), config=cfg)


def count_parameters(cfg):
    from scdm.script_util import create_model_and_diffusion
    from scdm.toy import TOY_NUM_CLASSES
    model, _ = create_model_and_diffusion(**model_flags(cfg, "sdm"), num_classes=TOY_NUM_CLASSES)
    return sum(p.numel() for p in model.parameters())


def folder_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def disk_needed(cfg, n_params):
    """Bytes the whole run writes at most: per model a few checkpoint sets (model + EMA + Adam's two
    moments = 16 bytes per fp32 parameter) before the old ones are pruned, plus data and samples."""
    per_set = 16 * n_params + 2 ** 16
    saves = min(cfg["steps"], 4) + 1
    pixels = cfg["size"] ** 2
    data = (cfg["num_train"] + cfg["num_test"] * (1 + len(cfg["noises"]))) * (pixels * 6 + 3000)
    samples = len(MODELS) * len(cfg["noises"]) * cfg["num_test"] * (pixels * 8 + 4000)
    return len(MODELS) * saves * per_set + data + samples + 20 * 2 ** 20


def check_disk(out, cfg, n_params):
    """Refuse to start when the disk cannot hold what is left to write; returns (needed, free) bytes."""
    need = max(0, disk_needed(cfg, n_params) - folder_bytes(out))
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise QuickstartError(f"not enough free disk space for the quickstart in {probe}: about "
                              f"{need / 2 ** 20:.0f} MB needed, {free / 2 ** 20:.0f} MB free. Free some space or "
                              f"pass --out_dir on another disk")
    return need, free
