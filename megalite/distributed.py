"""Start torch.distributed from whatever launched us: torchrun, deepspeed, srun, mpirun, or nothing.

`detect_launch(env)` is a pure function of the environment (unit-tested without any launcher);
`init_distributed()` applies it. Detection order, first match wins:

1. ``RANK`` + ``WORLD_SIZE`` set: torchrun, the deepspeed launcher, or a user who set them.
2. ``SLURM_PROCID`` inside an ``srun`` step: rank/size/local rank from SLURM_*, MASTER_ADDR =
   first host of the step's node list (bracket ranges expanded), port derived from the job id.
3. MPI (``OMPI_COMM_WORLD_*``, ``PMI_RANK``/``PMI_SIZE``, ``PMIX_RANK``): rank/size from those
   variables; the master address and a free port are broadcast from rank 0 over mpi4py when it is
   importable (else MASTER_ADDR/MASTER_PORT must be set).
4. Otherwise a single process on localhost.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_MINUTES = 10.0


@dataclass
class LaunchInfo:
    """Where this process sits in the job, as told by its launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str]
    master_port: Optional[int]
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list: ``"node[03-05,7],gpu1"`` -> node03 node04 node05 node7 gpu1.

    Zero padding is kept, several bracket groups in one name multiply out
    (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2), commas inside brackets do not split hosts.
    """
    hosts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {nodelist!r}")
        elif ch == "," and depth == 0:
            item = nodelist[start:i].strip()
            if item:
                hosts.extend(_expand_one(item, nodelist))
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in node list {nodelist!r}")
    return hosts


def _expand_one(name: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if not m:
        return [name]
    head, tail = name[: m.start()], name[m.end() :]
    out = []
    for part in m.group(1).split(","):
        part = part.strip()
        if re.fullmatch(r"\d+", part):
            values = [part]
        elif re.fullmatch(r"\d+-\d+", part):
            lo, hi = part.split("-")
            if int(hi) < int(lo):
                raise ValueError(f"descending range {part!r} in node list {whole!r}")
            width = len(lo)
            values = [str(v).zfill(width) for v in range(int(lo), int(hi) + 1)]
        else:
            raise ValueError(f"cannot parse range {part!r} in node list {whole!r}")
        for v in values:
            out.extend(_expand_one(head + v + tail, whole))
    return out


def _int(env: Mapping[str, str], *names: str) -> Optional[int]:
    for n in names:
        if env.get(n, "") != "":
            return int(env[n])
    return None


def detect_launch(env: Mapping[str, str] = os.environ) -> LaunchInfo:
    """Read rank, world size, local rank and the rendezvous address from `env`."""
    port = _int(env, "MASTER_PORT")
    if env.get("RANK") is not None and env.get("WORLD_SIZE") is not None:
        return LaunchInfo(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=_int(env, "LOCAL_RANK") or 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port or 29500,
            launcher="torchrun",
        )
    # SLURM_PROCID is also set in the batch script itself (rank 0 of 1 task there); only trust it
    # inside an srun step, where SLURM_STEP_ID / SLURM_STEP_NUM_TASKS exist.
    if env.get("SLURM_PROCID") is not None and env.get("SLURM_STEP_ID") is not None:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        nodes = nodes or env.get("SLURM_NODELIST")
        if not nodes:
            raise RuntimeError("srun launch detected but SLURM_STEP_NODELIST/SLURM_NODELIST unset")
        job = _int(env, "SLURM_JOB_ID", "SLURM_JOBID") or 0
        return LaunchInfo(
            rank=int(env["SLURM_PROCID"]),
            world_size=_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1,
            local_rank=_int(env, "SLURM_LOCALID") or 0,
            master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodes)[0],
            # A port derived from the job id: every task computes the same one with no exchange.
            master_port=port or 20000 + job % 20000,
            launcher="slurm",
        )
    mpi_rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    if mpi_rank is not None:
        size = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
        return LaunchInfo(
            rank=mpi_rank,
            world_size=size or 1,
            local_rank=local or 0,
            master_addr=env.get("MASTER_ADDR"),
            master_port=port,
            launcher="mpi",
        )
    return LaunchInfo(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def free_port() -> int:
    """An unused TCP port on this host (races are possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _this_host_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _mpi_rendezvous(info: LaunchInfo) -> LaunchInfo:
    """Fill a missing master address/port by broadcasting rank 0's over MPI."""
    if info.master_addr and info.master_port:
        return info
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(
            "launched under MPI but mpi4py is not importable and MASTER_ADDR/MASTER_PORT are "
            "not set: pip install 'megalite[mpi]' or export MASTER_ADDR and MASTER_PORT"
        ) from e
    comm = MPI.COMM_WORLD
    mine = (info.master_addr or _this_host_address(), info.master_port or free_port())
    addr, port = comm.bcast(mine if comm.Get_rank() == 0 else None, root=0)
    info.master_addr, info.master_port = addr, port
    if comm.Get_size() != info.world_size or comm.Get_rank() != info.rank:
        raise RuntimeError(
            f"MPI says rank {comm.Get_rank()} of {comm.Get_size()}, environment says "
            f"{info.rank} of {info.world_size}"
        )
    return info


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def get_timeout() -> Optional[datetime.timedelta]:
    """The collective timeout given to `init_distributed` (kept by `parallel_state`, the one
    holder of process-wide parallel state; None before it)."""
    from megalite import parallel_state

    return parallel_state.get_default_timeout()


def init_distributed(
    backend: Optional[str] = None,
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
    env: Optional[Mapping[str, str]] = None,
) -> LaunchInfo:
    """Initialize the default process group from the launcher's environment.

    Exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (DeepSpeed and others read them),
    picks nccl with CUDA else gloo unless `backend` is given, binds the local GPU, and sets the
    collective timeout that `parallel_state` passes on to every group.
    """
    info = detect_launch(os.environ if env is None else env)
    if info.launcher == "mpi":
        info = _mpi_rendezvous(info)
    if info.master_port is None:
        info.master_port = free_port()
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise RuntimeError(f"bad launch: rank {info.rank} of world size {info.world_size}")
    os.environ.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        MASTER_ADDR=str(info.master_addr),
        MASTER_PORT=str(info.master_port),
    )
    backend = backend or default_backend()
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("--distributed-backend nccl requested but CUDA is not available")
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    timeout = datetime.timedelta(minutes=timeout_minutes)
    from megalite import parallel_state  # it passes the timeout on to every group it builds

    parallel_state.set_default_timeout(timeout)
    if dist.is_initialized():
        return info
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timeout,
    )
    return info


def device() -> torch.device:
    """The device this rank computes on: its local GPU under nccl, else the CPU."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def allreduce_coalesced(grads: list[torch.Tensor], group) -> None:
    """One all-reduce (sum) over `group` for all `grads`, flattened together and copied back."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
