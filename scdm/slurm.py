"""Slurm: is this process a task of an `srun` step, and where do the step's tasks meet.

The rule for "launched by srun": `SLURM_PROCID` is set and `SLURM_STEP_NUM_TASKS` says the step has
more than one task. srun sets both in every task it starts. The batch shell of `sbatch` and an `salloc`
shell carry job variables (`SLURM_JOB_ID`, `SLURM_NTASKS`, in a batch shell even `SLURM_PROCID=0`) but
are no task of a multi-task step, so a plain `python` started there runs alone instead of waiting for
peers that never come. `srun --pty bash` is a one-task step: a `python` in it runs alone too.

Node lists are expanded here (no `scontrol`, which compute nodes may lack): `gpu[01-04,07]`,
`node1,node2`, `a[1-2],b3`, `pre-[001-003]-x`, `rack[1-2]-n[1-2]`. `python -m scdm.slurm [--first]
[NODELIST]` prints them, one per line (for a torchrun `--rdzv_endpoint`, say).
"""
import argparse
import itertools
import os
import re
from dataclasses import dataclass

from .runtime.errors import UserError, run_cli

NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
# Derived rendezvous ports stay below Linux's ephemeral range (32768+), where clients pick their ports.
PORT_BASE, PORT_SPAN = 20000, 10000


class SlurmError(UserError, RuntimeError):
    """The Slurm environment of this task cannot be used as it is (bad node list, rank, port)."""


def expand_nodelist(text, name="SLURM_NODELIST"):
    """Host names of a Slurm node list, in Slurm's order; `name` is the variable (or flag) it came from."""
    name = f"${name}" if re.fullmatch(r"[A-Z_]+", name) else name
    hosts = []
    for item in _top_level_items(text, name):
        parts = re.split(r"(\[[^\[\]]*\])", item)
        choices = []
        for part in parts:
            if part.startswith("["):
                choices.append(_expand_brackets(part[1:-1], item, name))
            elif "[" in part or "]" in part:
                raise SlurmError(f"{name}={text!r}: unbalanced bracket in {item!r}")
            else:
                choices.append([part])
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    return hosts


def _top_level_items(text, name):
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise SlurmError(f"{name}={text!r}: unbalanced or nested brackets")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    items = [s.strip() for s in items]
    if depth or not all(items):
        raise SlurmError(f"{name}={text!r}: expected host names such as 'gpu[01-04,07]' or 'node1,node2'")
    return items


def _expand_brackets(body, item, name):
    values = []
    for piece in body.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", piece)
        if not m:
            raise SlurmError(f"{name}: {item!r} has {piece!r} in brackets; expected numbers or ranges like 01-04")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise SlurmError(f"{name}: {item!r} has the descending range {piece!r}")
        width = len(lo)  # Slurm pads to the width of the range's first number: 01-10 -> 01 ... 10
        values += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return values


def _int_var(environ, name, low=0, default=None):
    raw = environ.get(name)
    if raw is None:
        if default is None:
            raise SlurmError(f"${name} is not set; srun sets it in every task")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SlurmError(f"${name}={raw!r}: expected an integer") from None
    if value < low:
        raise SlurmError(f"${name}={raw!r}: expected an integer >= {low}")
    return value


@dataclass(frozen=True)
class SrunTask:
    rank: int
    world_size: int
    local_rank: int
    job_id: str
    step_id: str
    nodelist_var: str
    nodelist: str


def srun_task(environ):
    """This task's place in its srun step, or None when the process is not one of several srun tasks."""
    if "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return None
    world = _int_var(environ, "SLURM_STEP_NUM_TASKS", low=1)
    if world == 1:
        return None
    rank = _int_var(environ, "SLURM_PROCID")
    if rank >= world:
        raise SlurmError(f"$SLURM_PROCID={rank} is not below $SLURM_STEP_NUM_TASKS={world}")
    var = next((v for v in NODELIST_VARS if environ.get(v)), None)
    if var is None:
        raise SlurmError(f"none of ${', $'.join(NODELIST_VARS)} is set; srun sets them in every task")
    return SrunTask(rank=rank, world_size=world, local_rank=_int_var(environ, "SLURM_LOCALID", default=0),
                    job_id=environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID", ""),
                    step_id=environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID", "0"),
                    nodelist_var=var, nodelist=environ[var])


def default_port(job_id, step_id="0"):
    """The rendezvous port every task of a step derives alike: from the job id's last three digits and
    the step id's last digit, so two steps of one job and jobs sharing a node rarely meet."""
    step = int(step_id) if str(step_id).isdigit() else 0
    return PORT_BASE + (int(job_id) % 1000) * 10 + step % 10


def rendezvous(task, environ):
    """(address, port): $MASTER_ADDR or the step's first node; $MASTER_PORT or a port from the job id."""
    addr = environ.get("MASTER_ADDR") or expand_nodelist(task.nodelist, task.nodelist_var)[0]
    if environ.get("MASTER_PORT"):
        port = _int_var(environ, "MASTER_PORT", low=1)
        if port > 65535:
            raise SlurmError(f"$MASTER_PORT={port}: expected a TCP port, 1 to 65535")
    elif task.job_id.isdigit():
        port = default_port(task.job_id, task.step_id)
    else:
        raise SlurmError(f"$SLURM_JOB_ID={task.job_id!r} gives no rendezvous port: set $MASTER_PORT "
                         "to a free TCP port, the same in every task")
    return addr, port


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m scdm.slurm",
                                description="Expand a Slurm node list (default: $SLURM_JOB_NODELIST), one host a line.")
    p.add_argument("nodelist", nargs="?", type=str, default=None,
                   help="e.g. 'gpu[01-04,07]' (default: $SLURM_JOB_NODELIST, else $SLURM_NODELIST)")
    p.add_argument("--first", action="store_true", help="print only the first host (where rank 0 meets the others)")
    args = p.parse_args(argv)
    name, text = "the NODELIST argument", args.nodelist
    if text is None:
        name = next((v for v in ("SLURM_JOB_NODELIST", "SLURM_NODELIST") if os.environ.get(v)), None)
        if name is None:
            raise SlurmError("no node list: pass one (e.g. 'gpu[01-04]') or run inside a Slurm job "
                             "($SLURM_JOB_NODELIST)")
        text = os.environ[name]
    hosts = expand_nodelist(text, name)
    print("\n".join(hosts[:1] if args.first else hosts))
    return 0


if __name__ == "__main__":
    run_cli(main)
