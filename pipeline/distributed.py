"""Process group from the launcher's environment (torchrun, srun, mpirun); rank helpers. No model or loss maths."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# launcher variables -> the torch.distributed names, first match wins (torchrun sets the targets itself)
ENV_MAP = (
    ("RANK", ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")),
    ("WORLD_SIZE", ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")),
    ("LOCAL_RANK", ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")),
)


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    group: object  # the data-parallel (= vocab-parallel) group; None for a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return device()


def device() -> torch.device:
    """Where this process computes: its GPU (init() selected it by local rank) or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def env_ranks(environ=os.environ) -> tuple[int, int, int]:
    """(rank, world, local_rank) from the environment; (0, 1, 0) when no launcher set anything. An environment
    whose variables disagree is an error that names them."""
    found = {}
    for dst, srcs in ENV_MAP:
        if dst in environ:
            found[dst] = environ[dst]
            continue
        for src in srcs:
            if src in environ:
                found[dst] = environ[src]
                break
    if not found:
        return 0, 1, 0
    try:
        rank = int(found.get("RANK", 0))
        world = int(found.get("WORLD_SIZE", 1))
        local = int(found.get("LOCAL_RANK", 0))
    except ValueError as e:
        raise ValueError(f"launcher environment is not numeric: {found}") from e
    if not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    return rank, world, local


def mpi_discover() -> tuple[int, int, int]:
    """Ranks from MPI itself (mpirun, or srun --mpi=pmix): rank 0 picks the rendezvous address and a free port and
    broadcasts them, so the job needs no MASTER_ADDR / MASTER_PORT from its script."""
    import socket
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    addr = port = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        with socket.socket() as s:
            s.bind(("", 0))
            port = os.environ.get("MASTER_PORT") or str(s.getsockname()[1])
    addr, port = comm.bcast((addr, port), root=0)
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=port)
    return rank, world, local


def free_port() -> int:
    """A free TCP port on this machine (for a lone process's rendezvous, and for tests)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(backend: str | None = None, timeout_s: int = 600, require_group: bool = False) -> Dist:
    """Join the process group described by the environment (gloo on CPU, nccl on GPU). One process without a
    launcher gets no group: every distributed helper then runs its single-process path. PIPELINE_DISCOVERY=mpi
    takes the ranks from mpi4py instead of launcher variables."""
    if os.environ.get("PIPELINE_DISCOVERY") == "mpi":
        rank, world, local = mpi_discover()
    else:
        rank, world, local = env_ranks()
    if world == 1 and "MASTER_ADDR" not in os.environ and not require_group:
        return Dist(0, 1, 0, None)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # a lone process (ZeRO-3 / FSDP2 still need a group) must not collide with another run's default port
    os.environ.setdefault("MASTER_PORT", str(free_port()) if world == 1 else "29500")
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"), rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, local, dist.group.WORLD)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def any_rank(flag: bool, group) -> bool:
    """True on every rank when `flag` is true on at least one (one MAX all-reduce): decisions that gate
    collectives (stop decoding, stop training) must come out the same everywhere."""
    if group is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device())  # NCCL reduces device tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def barrier(group) -> None:
    if group is not None:
        dist.barrier(group=group)
