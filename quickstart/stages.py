"""The pipeline: each stage runs one of the project's entry points in its own process, and is skipped
when an earlier run already made its outputs from the same inputs.

1. `scdm.toy` writes the toy dataset; 2. `scdm.class_schedule` the per-class lambda file;
3. `image_process.{downsample,edge,random[,painter]}` the noisy versions of the test maps;
4. `scdm.image_train` trains SCDM and SDM (same network, data, steps and seed; SDM has no label
   diffusion); 5. `scdm.image_sample` samples both on every version; 6. scores, grid and report.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from scdm.checkpoint import checkpoint_steps, ema_name, model_name, prune_checkpoints
from scdm.runtime.fileio import write_json
from scdm.presets import as_argv

from . import warm_start
from .config import (MODEL_NAMES, NOISE_CLI, NOISE_NAMES, QuickstartError, model_flags, noise_params, training_key,
                     unlabeled_to_zero)
from .folder import check_disk, count_parameters, log, prepare_out, write_state
from .report import fmt_time, score_all, write_grid, write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER_DIR = "stages"  # <out_dir>/stages/<stage>.json


class Stage:
    """A step that is skipped when it already ran with the same inputs and its outputs are still there.

    `key` (JSON) is everything the outputs depend on; `outputs` are the files the step makes; `work(resume)`
    makes them. The marker file records the key as incomplete before the work starts and as complete
    only after it ends, so an interrupted step never counts as done, and the partial outputs it left
    are offered for resuming (`resume=True`) only when they were made with the same key.
    """

    def __init__(self, name, key, outputs, marker_dir, work=None):
        self.name = name
        self.key = json.loads(json.dumps(key))  # as it reads back from the marker (tuples -> lists)
        self.outputs = [Path(p) for p in outputs]
        self.marker = Path(marker_dir) / (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".json")
        self.work = work

    def recorded(self):
        try:
            record = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def missing(self):
        return [p for p in self.outputs if not p.exists()]

    def is_done(self):
        record = self.recorded()
        return bool(record and record.get("complete") is True and record.get("key") == self.key
                    and not self.missing())

    def start(self):
        """Mark the stage as running; returns whether what an earlier attempt left was made with this key."""
        record = self.recorded()
        resume = bool(record and record.get("key") == self.key)
        write_json({"stage": self.name, "key": self.key, "complete": False}, self.marker)
        return resume

    def finish(self):
        missing = self.missing()
        if missing:
            raise QuickstartError(f"{self.name} ended without writing {missing[0]} ({len(missing)} outputs missing)")
        write_json({"stage": self.name, "key": self.key, "complete": True}, self.marker)

    def run(self):
        """Run the stage unless it is done; returns whether it ran."""
        if self.is_done():
            return False
        resume = self.start()
        self.work(resume)
        self.finish()
        return True


class Runner:
    """Runs entry points as `python -m module args` in their own session, so that Ctrl-C reaches the
    quickstart only; it then sends the children SIGTERM (training saves a checkpoint) and waits.

    Each one is a fork of a server that has already imported torch (`warm_start`), which saves a new
    interpreter's torch import per stage; `warm=False`, another `python`, or a platform without a fork
    server starts a new interpreter instead. threads: OMP/MKL threads of each child (None: torch's
    default). Calls may come from several threads at once (the robustness study runs stages side by
    side); `stop_all` stops every live child."""

    def __init__(self, python=None, threads=None, warm=True):
        self.python = python or sys.executable
        self.threads = threads
        self.warm = warm and self.python == sys.executable and warm_start.available()
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        if threads:
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.live = set()

    def __call__(self, module, argv, what):
        cmd = [self.python, "-m", module, *map(str, argv)]
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        if self.warm:
            proc = warm_start.start(module, argv, self.env, self.threads)
        else:
            proc = subprocess.Popen(cmd, env=self.env, start_new_session=True)
        self.live.add(proc)
        try:
            code = proc.wait()
        except BaseException:
            stop_children([proc])
            raise
        finally:
            self.live.discard(proc)
        if code != 0:
            raise QuickstartError(f"{what} failed ({module} exit code {code}; its message is above). "
                                  f"Fix the cause and rerun: finished stages are kept")

    def stop_all(self):
        stop_children(list(self.live))


def stop_children(procs, grace=120):
    """SIGTERM to every running child, then wait for all (a training run saves a checkpoint first);
    the ones still running after `grace` seconds, or after a second Ctrl-C, are killed."""
    procs = [p for p in procs if p.poll() is None]
    if not procs:
        return
    log("stopping the running step(s) (a training run saves a checkpoint first) ...")
    deadline = time.monotonic() + grace
    try:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except (subprocess.TimeoutExpired, KeyboardInterrupt):  # too slow, or a second Ctrl-C: stop now
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def sample_checkpoint(cfg, log_dir):
    step = cfg["steps"]
    return log_dir / (ema_name(cfg["ema_rate"], step) if cfg["sample_from"] == "ema" else model_name(step))


def files(folder, subfolders, names):
    return [folder / sub / f"{n}.png" for sub in subfolders for n in names]


def remake(folder):
    if folder.exists():
        shutil.rmtree(folder)


def data_stages(out, cfg, runner, markers):
    """The toy dataset (seed cfg["seed"]), its class schedule and a noisy copy of its test maps per noise.
    Returns (stages, toy, schedule, trees) with trees[noise] = (folder, the stage that makes it)."""
    data, toy = out / "data", out / "data" / "toy"
    schedule = data / "class_schedule.npy"
    test_names = [f"{i:05d}" for i in range(cfg["num_test"])]  # scdm.toy's names
    train_names = [f"{i:05d}" for i in range(cfg["num_train"])]
    stages = []

    def make_toy(resume):
        remake(toy)
        runner("scdm.toy", ["--out_dir", toy, "--num_train", cfg["num_train"], "--num_test", cfg["num_test"],
                            "--size", cfg["size"], "--seed", cfg["seed"]], "making the toy dataset")
    toy_key = {k: cfg[k] for k in ("num_train", "num_test", "size", "seed")}
    stages.append(Stage("toy dataset", toy_key,
                        [toy / "dataset.json", *files(toy / "train", ("images", "labels", "instances"), train_names),
                         *files(toy / "test", ("images", "labels", "instances"), test_names)], markers, make_toy))

    # From the training labels only: they do not depend on --num_test.
    stages.append(Stage(
        "class schedule", {k: cfg[k] for k in ("num_train", "size", "seed")}, [schedule], markers,
        lambda resume: runner("scdm.class_schedule", ["--dataset_mode", "folder", "--data_dir", toy, "--out", schedule],
                              "computing the class schedule")))

    trees = {"clean": (toy, stages[0])}
    for noise in cfg["noises"][1:]:
        tree = data / "noisy" / noise
        params = noise_params(cfg, noise)

        def make_noisy(resume, noise=noise, tree=tree, params=params):
            remake(tree)  # image_process writes into an empty folder only
            runner(f"image_process.{NOISE_CLI[noise]}",
                   ["--dataset_mode", "folder", "--data_dir", toy, "--out_dir", tree, "--num", cfg["num_test"],
                    "--seed", cfg["seed"], "--image_size", cfg["size"], "--num_workers", 1, *as_argv(params)],
                   f"building the {NOISE_NAMES[noise]} maps")
        stages.append(Stage(f"noisy maps: {NOISE_NAMES[noise]}", {"noise": noise, "params": params, "toy": toy_key},
                            [tree / "dataset.json", tree / "corruption.json",
                             *files(tree / "test", ["labels"], test_names)],
                            markers, make_noisy))
        trees[noise] = (tree, stages[-1])
    return stages, toy, schedule, trees


def train_stage(cfg, runner, markers, toy, log_dir, flags, key, what):
    """Train one model (flags: model and diffusion flags) with cfg's budget and cfg["seed"] into log_dir,
    resuming from its last checkpoint; the outputs are the one checkpoint that is sampled."""
    ckpt = sample_checkpoint(cfg, log_dir)

    def train(resume):
        log_dir.mkdir(parents=True, exist_ok=True)
        steps = checkpoint_steps(log_dir)
        last = steps[-1] if steps else None
        if last is not None and last > cfg["steps"]:
            raise QuickstartError(f"{log_dir} holds a model trained for {last} steps, more than --steps "
                                  f"{cfg['steps']}; pass --steps {last} (or more), --fresh, or --out_dir DIR")
        if last is not None:
            prune_checkpoints(log_dir, [last])  # keep one set (disk): the one to resume from
        if last == cfg["steps"] and ckpt.is_file():
            return  # an earlier run ended right after its last save
        argv = ["--data_dir", toy, *as_argv(flags),
                "--batch_size", cfg["batch_size"], "--lr", cfg["lr"], "--ema_rate", cfg["ema_rate"],
                "--ema_warmup", cfg["ema_warmup"],
                "--drop_rate", cfg["drop_rate"], "--max_steps", cfg["steps"], "--log_dir", log_dir,
                "--save_interval", max(25, math.ceil(cfg["steps"] / 4)), "--log_interval", 10,
                "--num_workers", 0, "--seed", cfg["seed"]]
        if last is not None:
            log(f"  resuming {what} from step {last} of {cfg['steps']}")
            argv += ["--resume_checkpoint", log_dir / model_name(last)]
        else:  # stopped before its first checkpoint: nothing to resume, so no curve to continue either
            for name in ("progress.csv", "log.txt"):
                (log_dir / name).unlink(missing_ok=True)
        runner("scdm.image_train", argv, f"training {what}")
        if not ckpt.is_file():
            raise QuickstartError(f"training {what} stopped before step {cfg['steps']} "
                                  f"(no {ckpt.name}); rerun to continue")
        prune_checkpoints(log_dir, [cfg["steps"]])
    return Stage(f"train {what}", key, [ckpt], markers, train)


def sample_stage(cfg, runner, markers, trained, made, folder, flags, unlabeled_to_zero, what):
    """Sample the checkpoint of the `trained` stage on the test maps of the `made` stage's tree into folder
    (cfg's sampler settings and cfg["seed"]; cfg.get("num_sets", 1) sample sets per map)."""
    ckpt, tree = trained.outputs[0], made.outputs[0].parent
    num_sets = cfg.get("num_sets", 1)
    test_names = [f"{i:05d}" for i in range(cfg["num_test"])]

    def sample(resume):
        if not resume and folder.exists():
            log(f"  {folder} holds samples of other settings or an unknown run; sampling again")
            remake(folder)
        argv = ["--model_path", ckpt, "--data_dir", tree, "--results_path", folder, *as_argv(flags),
                "--num_samples", cfg["num_test"], "--batch_size", cfg["sample_batch"],
                "--timestep_respacing", cfg["respacing"], "--s", cfg["s"],
                "--extrapolation", cfg["extrapolation"], "--dynamic_threshold", cfg["dynamic_threshold"],
                "--label_resize", True, "--unlabeled_to_zero", unlabeled_to_zero, "--seed", cfg["seed"]]
        if num_sets > 1:
            argv += ["--num_sets", num_sets]
        runner("scdm.image_sample", argv, f"sampling {what}")
    key = {"checkpoint": ckpt.name, "model": trained.key, "data": made.key, "unlabeled_to_zero": unlabeled_to_zero,
           **{k: cfg[k] for k in ("respacing", "s", "extrapolation", "dynamic_threshold", "seed", "num_test")}}
    sets = ["samples"] if num_sets == 1 else [f"samples_{k}" for k in range(num_sets)]
    if num_sets > 1:
        key["num_sets"] = num_sets
    return Stage(f"sample {what}", key, files(folder, (*sets, "labels", "images"), test_names), markers, sample)


def plan(out, cfg, runner):
    """Every stage of the run, in order, with its key, outputs and work."""
    markers = out / MARKER_DIR
    stages, toy, schedule, trees = data_stages(out, cfg, runner, markers)
    trained = {}
    for model in ("scdm", "sdm"):
        key = dict(training_key(cfg), steps=cfg["steps"], model=model, flags=model_flags(cfg, model))
        trained[model] = train_stage(cfg, runner, markers, toy, out / "train" / model,
                                     model_flags(cfg, model, schedule), key, MODEL_NAMES[model])
        stages.append(trained[model])
    for model in ("scdm", "sdm"):
        for noise in cfg["noises"]:
            tree, made = trees[noise]
            stages.append(sample_stage(cfg, runner, markers, trained[model], made, out / "samples" / model / noise,
                                       model_flags(cfg, model, schedule), unlabeled_to_zero(cfg, model),
                                       f"{MODEL_NAMES[model]} on {NOISE_NAMES[noise]}"))
    return stages


def run(cfg, fresh=False, runner=None):
    """The whole pipeline; returns the report (also written to <out_dir>/results.json)."""
    start = time.perf_counter()
    out = Path(cfg["out_dir"]).resolve()
    prepare_out(out, cfg, fresh)
    n_params = count_parameters(cfg)
    need, free = check_disk(out, cfg, n_params)
    log(f"results in {out} ({n_params / 1e6:.2f}M parameters per model; about {need / 2 ** 20:.0f} MB to write, "
        f"{free / 2 ** 20:.0f} MB free)")

    stages = plan(out, cfg, runner or Runner())
    final = "scores, grid and report"
    total = len(stages) + 1
    timing = {"stages": {}}
    for i, stage in enumerate(stages, 1):
        log(f"stage {i}/{total} [{fmt_time(time.perf_counter() - start)}] {stage.name}")
        t0 = time.perf_counter()
        if stage.run():
            timing["stages"][stage.name] = round(time.perf_counter() - t0, 1)
        else:
            timing["stages"][stage.name] = None
            timing["reused"] = True
            log(f"  {stage.name}: already done, reused")

    log(f"stage {total}/{total} [{fmt_time(time.perf_counter() - start)}] {final}")
    t0 = time.perf_counter()
    results, floor = score_all(out, cfg)
    write_grid(out, cfg, out / "grid.png")
    timing["stages"][final] = round(time.perf_counter() - t0, 1)
    timing["total"] = round(time.perf_counter() - start, 1)
    report, md = write_report(out, cfg, results, floor, timing, n_params)
    write_state(out, finished=time.strftime("%Y-%m-%d %H:%M:%S"), last_run_seconds=timing["total"])
    print(md, flush=True)
    log(f"done in {fmt_time(timing['total'])}: {out / 'results.md'}, {out / 'grid.png'}, {out / 'results.json'}")
    return report
