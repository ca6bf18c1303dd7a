"""One launch path for `torchrun --nproc_per_node N`, `mpiexec -n N`, `srun` and plain `python`.

Every run gets a torch.distributed process group (of size 1 for a plain run), so training and
sampling code has no special cases. NCCL on GPU, gloo on CPU; local rank r uses GPU r % visible GPUs.
Launchers are recognised in this order: torchrun, MPI, Slurm (see `scdm.slurm` for what counts as an
srun task), one process; rank 0 says on stderr which one it found.
"""
import datetime
import gc
import importlib.util
import os
import socket
import sys

import torch
import torch.distributed as dist

from .. import slurm
from .errors import UserError

MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

_local_rank = 0


class LaunchError(UserError, RuntimeError):
    """The processes cannot be set up as launched (missing MPI, bad environment)."""


def detect_launcher(environ=os.environ):
    """'torchrun', 'mpi', 'slurm' or 'single', from the environment the launcher leaves.

    A site's MPI plugin may add PMI_RANK to srun tasks: MPI then wins (the same ranks), unless mpi4py
    is not installed, where the Slurm variables are enough and need no MPI."""
    if "TORCHELASTIC_RUN_ID" in environ or ("RANK" in environ and "WORLD_SIZE" in environ and "MASTER_ADDR" in environ):
        return "torchrun"
    mpi = any(v in environ for v in MPI_RANK_VARS)
    if mpi and importlib.util.find_spec("mpi4py") is not None:
        return "mpi"
    if slurm.srun_task(environ) is not None:
        return "slurm"
    return "mpi" if mpi else "single"  # MPI without mpi4py: setup_dist says how to install it


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_comm():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchError(
            "launched under mpiexec, but mpi4py cannot be imported "
            f"({e}). Install it with an MPI runtime: `pip install mpi4py mpich` (or run with torchrun "
            "--nproc_per_node N, or plain python for one process)"
        ) from None
    return MPI


_gpu = None  # --gpu N of a single-process run (the released flag); None: local rank % visible GPUs


def select_gpu(index):
    """The released `--gpu N`: the CUDA device of a single-process run."""
    global _gpu, _local_rank
    if index is None:
        return
    if not torch.cuda.is_available():
        raise LaunchError(f"--gpu {index}: CUDA is not available here; leave --gpu out to run on the CPU")
    if index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise LaunchError(f"--gpu {index}: only {count} GPU(s) visible (0..{count - 1})")
    _gpu = _local_rank = index


def setup_dist(backend=None, timeout_minutes=30):
    """Create the process group for however this process was launched. Idempotent."""
    global _local_rank
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    launcher = detect_launcher()
    if _gpu is not None and launcher != "single":
        raise LaunchError(f"--gpu {_gpu} picks the device of a single-process run; under {launcher} each process "
                          "takes its local rank's GPU: leave --gpu out")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if launcher == "torchrun":
        _local_rank = int(os.environ.get("LOCAL_RANK", 0))
        _set_device()
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
        _say_launcher("torchrun", f"rendezvous {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
        return
    if launcher == "slurm":
        task = slurm.srun_task(os.environ)
        addr, port = slurm.rendezvous(task, os.environ)
        _local_rank = task.local_rank
        _set_device()
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=task.rank,
                                world_size=task.world_size, timeout=timeout)
        _say_launcher("slurm", f"srun step {task.job_id}.{task.step_id}, rendezvous {addr}:{port}")
        return
    if launcher == "mpi":
        MPI = _mpi_comm()
        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        _local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        hosts = comm.allgather(socket.gethostname())
        if rank == 0:
            addr = os.environ.get("MASTER_ADDR") or (
                "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(socket.getfqdn())
            )
            port = int(os.environ.get("MASTER_PORT") or _free_port())
        else:
            addr = port = None
        addr, port = comm.bcast((addr, port) if rank == 0 else None, root=0)
        _set_device()
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=size,
                                timeout=timeout)
        _say_launcher("mpi", f"rendezvous {addr}:{port}")
        return
    _local_rank = 0 if _gpu is None else _gpu
    _set_device()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=timeout)
    _say_launcher("single", _single_note(os.environ))


def _say_launcher(launcher, detail):
    """The one line that tells which launcher was found (rank 0, stderr)."""
    if dist.get_rank() == 0:
        print(f"launch: {launcher}, {dist.get_world_size()} process(es), {detail}", file=sys.stderr, flush=True)


def _single_note(environ):
    if environ.get("SLURM_JOB_ID"):
        return (f"inside Slurm job {environ['SLURM_JOB_ID']} but not one of several srun tasks "
                "(for one task per GPU, start it with srun)")
    return "no launcher variables"


def _set_device():
    if torch.cuda.is_available():
        torch.cuda.set_device(_local_rank % torch.cuda.device_count())


def dev():
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", _local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return get_rank() == 0


def barrier():
    if dist.is_initialized() and get_world_size() > 1:
        dist.barrier()


def sync_params(params):
    """Broadcast rank 0's parameters so that every replica starts identical."""
    if get_world_size() == 1:
        return
    for p in params:
        with torch.no_grad():
            dist.broadcast(p, 0)


def all_reduce_flag(flag: bool, op="any"):
    """A boolean agreed on by all ranks (any or all)."""
    if get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=dev() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "any" else dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def cleanup():
    """Destroy the process group once nothing holds it: a DDP wrapper left in a reference cycle keeps
    the group alive past destroy_process_group, and gloo then aborts the process at interpreter exit
    ("terminate called without an active exception", SIGABRT) after a run that succeeded."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
