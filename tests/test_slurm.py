"""Slurm without Slurm: node lists, launcher precedence, two srun-style tasks that train in sync and
sample the files of one process, and the sbatch script's save-and-requeue on USR1 (with stand-ins for
srun and scontrol)."""
import csv
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scdm.runtime import dist_util
from scdm import slurm
from scdm.slurm import SlurmError, expand_nodelist

from conftest import wait_for, write_toy

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
BASE_ENV = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "PMI_", "OMPI_", "PMIX_", "MV2_")) and k not in LAUNCH_VARS}
BASE_ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))


# ----- node lists --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, hosts", [
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("node1,node2", ["node1", "node2"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("pre-[001-003]-x", ["pre-001-x", "pre-002-x", "pre-003-x"]),
    ("n[9-11]", ["n9", "n10", "n11"]),                 # width of the first number: no padding here
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("c[1,3],gpu[10-11],login", ["c1", "c3", "gpu10", "gpu11", "login"]),
    ("localhost", ["localhost"]),
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
])
def test_node_lists_expand(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text, says", [
    ("gpu[01-04", "expected host names"),
    ("gpu]1", "unbalanced"),
    ("x[[1]]", "nested"),
    ("x[3-1]", "descending range '3-1'"),
    ("x[a-b]", "'a-b' in brackets"),
    ("a,,b", "expected host names"),
    ("", "expected host names"),
])
def test_bad_node_lists_name_the_variable(text, says):
    with pytest.raises(SlurmError, match="SLURM_STEP_NODELIST") as e:
        expand_nodelist(text, "SLURM_STEP_NODELIST")
    assert says in str(e.value)


def test_nodelist_command_prints_the_hosts():
    def cli(*args, **env):
        return subprocess.run([sys.executable, "-m", "scdm.slurm", *args], env=dict(BASE_ENV, **env),
                              capture_output=True, text=True, timeout=60)
    assert cli("gpu[09-10],login").stdout.split() == ["gpu09", "gpu10", "login"]
    assert cli("--first", SLURM_JOB_NODELIST="pre-[007-009]-x").stdout.split() == ["pre-007-x"]
    bad = cli("gpu[2-1]")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: the NODELIST argument: 'gpu[2-1]' has the descending range '2-1'")
    none = cli()
    assert none.returncode == 2 and "no node list" in none.stderr and "Traceback" not in none.stderr


# ----- which launcher ------------------------------------------------------------------------------
def srun_env(rank=0, ntasks=2, nodelist="gpu[01-02]", job="4711", step="3", **extra):
    """The variables srun gives each task (plus the job's), as strings."""
    env = dict(SLURM_JOB_ID=job, SLURM_NTASKS=str(ntasks), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
               SLURM_NODELIST=nodelist, SLURM_JOB_NODELIST=nodelist, SLURM_STEP_NODELIST=nodelist,
               SLURM_STEP_ID=step, SLURM_STEP_NUM_TASKS=str(ntasks))
    env.update(extra)
    return env


def batch_shell_env(job="4711"):
    """What the batch shell of `sbatch --ntasks 4` has: job variables and SLURM_PROCID=0, but no step."""
    return dict(SLURM_JOB_ID=job, SLURM_NTASKS="4", SLURM_PROCID="0", SLURM_LOCALID="0",
                SLURM_NODELIST="gpu[01-02]", SLURM_JOB_NODELIST="gpu[01-02]")


TORCHRUN = dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="1", TORCHELASTIC_RUN_ID="x")


@pytest.mark.parametrize("env, launcher", [
    ({}, "single"),
    (batch_shell_env(), "single"),
    (dict(batch_shell_env(), SLURM_STEP_NUM_TASKS="1", SLURM_STEP_ID="0"), "single"),  # srun --pty bash
    (srun_env(), "slurm"),
    (dict(srun_env(), **TORCHRUN), "torchrun"),                  # torchrun started by srun, one per node
    (dict(srun_env(), PMI_RANK="0", PMI_SIZE="2"), "mpi"),       # the site's MPI plugin: MPI wins
    (dict(PMI_RANK="0", PMI_SIZE="2"), "mpi"),
    (TORCHRUN, "torchrun"),
])
def test_launcher_precedence(env, launcher, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "mpi4py" else None)
    assert dist_util.detect_launcher(env) == launcher


def test_mpi_plugin_without_mpi4py_uses_the_slurm_variables(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert dist_util.detect_launcher(dict(srun_env(), PMI_RANK="0", PMI_SIZE="2")) == "slurm"
    assert dist_util.detect_launcher(dict(PMI_RANK="0", PMI_SIZE="2")) == "mpi"  # setup_dist explains


def test_task_and_rendezvous_from_the_slurm_variables():
    task = slurm.srun_task(srun_env(rank=5, ntasks=8, nodelist="gpu[07-08,10]", job="123456", step="3",
                                    SLURM_LOCALID="1"))
    assert (task.rank, task.world_size, task.local_rank) == (5, 8, 1)
    # first node of the step; port 20000 + (job id mod 1000) * 10 + step id mod 10
    assert slurm.rendezvous(task, {}) == ("gpu07", 20000 + 456 * 10 + 3)
    assert slurm.rendezvous(task, {"MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29500"}) == ("10.0.0.9", 29500)


@pytest.mark.parametrize("env, says", [
    (srun_env(rank=2, ntasks=2), r"\$SLURM_PROCID=2 is not below \$SLURM_STEP_NUM_TASKS=2"),
    (srun_env(SLURM_STEP_NUM_TASKS="two"), r"\$SLURM_STEP_NUM_TASKS='two': expected an integer"),
    (srun_env(nodelist="gpu[1-"), r"\$SLURM_STEP_NODELIST='gpu\[1-'"),
    (srun_env(MASTER_PORT="70000"), r"\$MASTER_PORT=70000: expected a TCP port"),
    (srun_env(job=""), r"set \$MASTER_PORT"),
])
def test_bad_slurm_environment_is_a_user_error(env, says):
    with pytest.raises(SlurmError, match=says):
        task = slurm.srun_task(env)
        slurm.rendezvous(task, env)


def test_plain_python_in_a_batch_shell_runs_alone(tmp_path):
    """No srun step: one process at once, with a line saying so, instead of waiting for 3 peers."""
    code = ("from scdm.runtime import dist_util; dist_util.setup_dist(); "
            "print(dist_util.get_rank(), dist_util.get_world_size()); dist_util.cleanup()")
    p = subprocess.run([sys.executable, "-c", code], env=dict(BASE_ENV, **batch_shell_env()), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["0", "1"]
    launch = [line for line in p.stderr.splitlines() if line.startswith("launch:")]
    assert len(launch) == 1 and "single" in launch[0] and "Slurm job 4711" in launch[0], p.stderr


# ----- two srun-style tasks --------------------------------------------------------------------------
FAKE_SRUN = """#!{python}
# Stand-in for srun: start $SLURM_NTASKS tasks with the variables srun sets, pass USR1/TERM on to them.
import os, signal, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
n = int(os.environ["SLURM_NTASKS"])
nodes = os.environ["SLURM_JOB_NODELIST"]
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_ID="0",
                                         SLURM_STEP_NUM_TASKS=str(n), SLURM_STEP_NODELIST=nodes))
         for i in range(n)]
def forward(signum, frame):
    for p in procs:
        p.send_signal(signum)
signal.signal(signal.SIGUSR1, forward)
signal.signal(signal.SIGTERM, forward)
codes = [p.wait() for p in procs]
sys.exit(max(128 - c if c < 0 else c for c in codes))
"""


def job_with_free_port(step="0"):
    """A job id whose derived rendezvous port is free on this machine now."""
    for job in random.sample(range(100000, 999999), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm.default_port(job, step)))
            except OSError:
                continue
        return str(job)
    pytest.skip("no free port in the derived range")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("toy"), num_train=8, num_test=3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A folder with stand-ins for srun and scontrol (which logs its arguments)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)
    return bin_dir


def sbatch_env(cluster, toy, log_dir, job):
    """The batch shell of `sbatch --ntasks 2` on this machine, running the sbatch script."""
    return dict(BASE_ENV, PATH=f"{cluster}:{BASE_ENV['PATH']}", SCONTROL_LOG=str(log_dir.parent / "scontrol.log"),
                PYTHON=sys.executable, DATA_DIR=str(toy), LOG_DIR=str(log_dir),
                SLURM_JOB_ID=job, SLURM_NTASKS="2", SLURM_PROCID="0", SLURM_LOCALID="0",
                SLURM_JOB_NODELIST="localhost", SLURM_NODELIST="localhost", SLURM_SUBMIT_DIR=str(log_dir.parent))


TRAIN_FLAGS = ["--batch_size", "2", "--num_workers", "0", "--log_interval", "1", "--save_interval", "1000",
               "--ema_rate", "0.9999"]


@pytest.fixture(scope="module")
def requeued_run(toy, cluster, tmp_path_factory):
    """train.sbatch with two tasks, USR1 to its batch shell once training runs, then the requeued job."""
    work = tmp_path_factory.mktemp("job")
    log_dir = work / "run"
    job = job_with_free_port()
    env = sbatch_env(cluster, toy, log_dir, job)
    script = [str(ROOT / "scripts" / "slurm" / "train.sbatch"), "toy", *TRAIN_FLAGS]
    first = subprocess.Popen(["bash", *script, "--max_steps", "10000"], cwd=work, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: _has_steps(log_dir / "progress.csv", 2), first, "two logged steps")
    first.send_signal(signal.SIGUSR1)
    out1, _ = first.communicate(timeout=180)
    requeues = (work / "scontrol.log").read_text() if (work / "scontrol.log").exists() else ""
    saved = sorted(log_dir.glob("model*.pt"))
    step = int(saved[-1].stem[5:]) if saved else None
    # The requeued job: the same script, environment and folder, two more steps.
    second = subprocess.run(["bash", *script, "--max_steps", str((step or 0) + 2)], cwd=work, env=env,
                            capture_output=True, text=True, timeout=240)
    return dict(log_dir=log_dir, work=work, first=first, out1=out1, requeues=requeues, step=step,
                second=second, job=job)


def _has_steps(progress, n):
    return progress.exists() and len(progress.read_text().splitlines()) > n


def test_usr1_saves_stops_and_requeues_the_job(requeued_run):
    r = requeued_run
    assert r["first"].returncode == 0, r["out1"][-3000:]
    assert "launch: slurm, 2 process(es), srun step" in r["out1"] and "rendezvous localhost:" in r["out1"]
    step = r["step"]
    assert step is not None and 2 <= step < 10000, r["out1"][-3000:]
    assert r["requeues"].split() == ["requeue", r["job"]]
    assert "stopped for the signal (exit status 138)" in r["out1"]  # 128 + SIGUSR1: saved, stopped early
    log = (r["log_dir"] / "log.txt").read_text()
    assert "received SIGUSR1" in log  # the warning reached the tasks through the srun stand-in
    # the two replicas were compared (parameter checksums) at the save and were equal
    assert f"replicas in sync at step {step} (world size 2)" in log
    names = {p.name for p in r["log_dir"].iterdir()}
    assert {f"model{step:06d}.pt", f"ema_0.9999_{step:06d}.pt", f"opt{step:06d}.pt"} <= names


def test_requeued_job_continues_the_same_run(requeued_run):
    r = requeued_run
    second, step = r["second"], r["step"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert (r["work"] / "scontrol.log").read_text() == r["requeues"]  # no USR1 this time: no requeue
    log = (r["log_dir"] / "log.txt").read_text()
    assert f"resumed from {r['log_dir'] / f'model{step:06d}.pt'} at step {step}" in log
    assert f"replicas in sync at step {step + 2} (world size 2)" in log
    with open(r["log_dir"] / "progress.csv") as f:
        steps = [int(float(row["step"])) for row in csv.DictReader(f)]
    assert steps == list(range(1, step + 3))  # one curve, one header, no gap and no repeat


def test_two_slurm_tasks_sample_the_files_of_one_process(requeued_run, toy, tmp_path):
    step = requeued_run["step"] + 2
    model = requeued_run["log_dir"] / f"ema_0.9999_{step:06d}.pt"

    def sample_cmd(results):
        return [sys.executable, "-m", "scdm.image_sample", "--model_path", model, "--data_dir", toy,
                "--results_path", results, "--timestep_respacing", "ddim3", "--batch_size", 1, "--num_sets", 2]

    one = subprocess.run([str(a) for a in sample_cmd(tmp_path / "one")], env=BASE_ENV, capture_output=True,
                         text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    job = job_with_free_port(step="1")
    tasks = [subprocess.Popen([str(a) for a in sample_cmd(tmp_path / "two")],
                              env=dict(BASE_ENV, **srun_env(rank=i, ntasks=2, nodelist="127.0.0.[1-2]", job=job,
                                                            step="1")),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [t.communicate(timeout=240) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "launch: slurm, 2 process(es)" in outs[0][1] and "rendezvous 127.0.0.1:" in outs[0][1]
    assert "launch:" not in outs[1][1]  # one line, from rank 0
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png")
                   if p.name != "overview.png")
    assert len(files) == 3 * 6  # 3 maps: images, labels, labels_color, samples, samples_0, samples_1
    for rel in files:
        a = np.asarray(Image.open(tmp_path / "one" / rel))
        b = np.asarray(Image.open(tmp_path / "two" / rel))
        assert np.array_equal(a, b), rel


# ----- the requeue rule of scripts/slurm/requeue.sh, on a stand-in step ----------------------------
@pytest.mark.parametrize("signal_to_shell, step_on_term, status, requeued", [
    (signal.SIGUSR1, "exit 143", 0, True),    # stopped for the warning: requeue, and the job ends well
    (signal.SIGUSR1, "exit 0", 0, False),     # it was done anyway
    (signal.SIGUSR1, "exit 2", 2, False),     # a user error would fail the same way again
    (signal.SIGTERM, "exit 143", 143, False),  # scancel: stop, no requeue
    (None, "exit 143", 7, False),             # no warning: the step's own status
])
def test_requeue_rule(tmp_path, signal_to_shell, step_on_term, status, requeued):
    ticks = 20 if signal_to_shell is None else 3000  # a signalled step outlives any slow start
    step = f'trap "{step_on_term}" TERM; touch {tmp_path}/started; i=0; while [ $i -lt {ticks} ]; do sleep 0.1; ' \
           'i=$((i+1)); done; exit 7'
    driver = f'. {ROOT}/scripts/slurm/requeue.sh; run_requeueable TERM sh -c \'{step}\'; echo "status=$?"'
    env = dict(BASE_ENV, SLURM_JOB_ID="99", SCONTROL=f"{tmp_path}/scontrol")
    (tmp_path / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    (tmp_path / "scontrol").chmod(0o755)
    shell = subprocess.Popen(["bash", "-c", driver], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    wait_for((tmp_path / "started").exists, shell, "the step's start marker")
    if signal_to_shell is not None:
        shell.send_signal(signal_to_shell)
    out, err = shell.communicate(timeout=300)
    assert out.strip() == f"status={status}", err
    log = tmp_path / "scontrol.log"
    assert (log.read_text().split() if log.exists() else []) == (["requeue", "99"] if requeued else [])
