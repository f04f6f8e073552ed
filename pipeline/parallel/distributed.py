"""Process group from the launcher's environment (torchrun, srun, mpirun); rank helpers. No model or loss maths."""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import datetime
import os
import signal
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode

# launcher variables -> the torch.distributed names, first match wins (torchrun sets the targets itself). Slurm's
# variables count only inside an srun step (SLURM_STEP_ID set): an sbatch shell or an interactive allocation also
# carries SLURM_NTASKS / SLURM_PROCID, and a plain `python -m pipeline.train` there is one process, not rank 0 of a
# world that will never arrive.
ENV_MAP = (
    ("RANK", ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")),
    ("WORLD_SIZE", ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")),
    ("LOCAL_RANK", ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")),
)


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    group: object  # the data-parallel (= vocab-parallel) group; None for a single process
    source: str = "no launcher variables"  # where the world size came from (said in errors and the log)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return device()


def device() -> torch.device:
    """Where this process computes: its GPU (init() selected it by local rank) or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def env_ranks(environ=os.environ) -> tuple[int, int, int, str]:
    """(rank, world, local_rank, source) from the environment, source naming the variable the world size came from;
    (0, 1, 0, ...) when no launcher set anything. An environment whose variables disagree is an error that names
    them."""
    in_srun_step = "SLURM_STEP_ID" in environ
    found, names = {}, {}
    for dst, srcs in ENV_MAP:
        for name in (dst,) + srcs:
            if name.startswith("SLURM_") and not in_srun_step:
                continue
            if name in environ:
                found[dst], names[dst] = environ[name], name
                break
    if not found:
        return 0, 1, 0, "no launcher variables"
    source = f"{names['WORLD_SIZE']}={found['WORLD_SIZE']}" if "WORLD_SIZE" in found else "default 1"
    try:
        rank = int(found.get("RANK", 0))
        world = int(found.get("WORLD_SIZE", 1))
        local = int(found.get("LOCAL_RANK", 0))
    except ValueError as e:
        raise ValueError(f"launcher environment is not numeric: {names} = {found}") from e
    if not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local} "
                         f"(from {', '.join(f'{v}' for v in names.values())}); a stale variable from another job?")
    return rank, world, local, source


def mpi_discover() -> tuple[int, int, int]:
    """Ranks from MPI itself (mpirun, or srun --mpi=pmix): rank 0 picks the rendezvous address and a free port and
    broadcasts them, so the job needs no MASTER_ADDR / MASTER_PORT from its script."""
    from mpi4py import MPI  # deferred: mpi4py is optional: only srun --mpi / mpirun launches need it
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
    return rank, world, local, f"MPI (COMM_WORLD size {world})"


def free_port() -> int:
    """A free TCP port on this machine (for a lone process's rendezvous, and for tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(backend: str | None = None, timeout_s: float = 1800, require_group: bool = False) -> Dist:
    """Join the process group described by the environment (gloo on CPU, nccl on GPU). One process without a
    launcher gets no group: every distributed helper then runs its single-process path. PIPELINE_DISCOVERY=mpi
    takes the ranks from mpi4py instead of launcher variables. timeout_s bounds the rendezvous and every collective
    until set_timeout() lowers it once the models are loaded."""
    if os.environ.get("PIPELINE_DISCOVERY") == "mpi":
        rank, world, local, source = mpi_discover()
    else:
        rank, world, local, source = env_ranks()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    if world == 1 and "MASTER_ADDR" not in os.environ and not require_group:
        return Dist(0, 1, 0, None, source)
    check_gpu_build()
    gpu = local_device(local, torch.cuda.device_count()) if torch.cuda.is_available() else None
    os.environ.update(launch_environment(rank, world, local, gpu))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # a lone process (ZeRO-3 / FSDP2 still need a group) must not collide with another run's default port
    os.environ.setdefault("MASTER_PORT", str(free_port()) if world == 1 else "29500")
    if gpu is not None:
        torch.cuda.set_device(gpu)
        for k, v in NCCL_ENVIRONMENT.items():  # read when the NCCL group is built; a user's choice stands
            os.environ.setdefault(k, v)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"), rank=rank,
                                    world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        except dist.DistError as e:
            raise RendezvousError(
                f"rank {rank} could not join a world of {world} processes (world size from {source}) at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:.0f} s: "
                f"{str(e).splitlines()[0]}") from None
    return Dist(rank, world, local, dist.group.WORLD, source)


# A collective that times out or fails: NCCL's watchdog thread aborts the communicators and leaves the process alive
# ("CleanUpOnly"), so the failure surfaces as a DistBackendError at this rank's next collective and ends through
# pipeline.train's exit-1 path (the bound named, the run lock released, the last checkpoint intact). The default
# tears the process down from the watchdog thread (SIGABRT), which says nothing of which bound was hit.
NCCL_ENVIRONMENT = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


class RendezvousError(RuntimeError):
    pass


def launch_environment(rank: int, world: int, local: int, gpu: int | None) -> dict:
    """The variables this process exports for the libraries that read them. LOCAL_RANK is the index of this
    rank's GPU among the visible ones, not the launcher's local rank: DeepSpeed's engine and vLLM's external
    launcher each select cuda:LOCAL_RANK themselves, which under srun --gpus-per-task / --gpu-bind (one visible GPU
    per task) is cuda:0 for every task, and cuda:3 ("invalid device ordinal") if we passed SLURM_LOCALID on.
    gpu None (no CUDA): the launcher's local rank."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local if gpu is None else gpu)}


def local_device(local_rank: int, visible: int) -> int:
    """The GPU index for this rank: its local rank when the node's GPUs are all visible, 0 where the launcher binds
    one GPU per task (srun --gpus-per-task / --gpu-bind: CUDA_VISIBLE_DEVICES holds just this task's GPU)."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise ValueError(f"local rank {local_rank} but only {visible} GPU(s) visible (CUDA_VISIBLE_DEVICES="
                     f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): ask for one GPU per task, or as many "
                     f"tasks per node as GPUs")


def gpus_on_node(environ=os.environ) -> bool:
    """Whether this node has NVIDIA GPUs for us, whatever torch says: device files, or a GPU allocation."""
    if environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1", "NoDevFiles"):
        return True
    if environ.get("SLURM_JOB_GPUS") or environ.get("SLURM_STEP_GPUS"):
        return True
    return os.path.exists("/dev/nvidia0")


def check_gpu_build(environ=os.environ) -> None:
    """A GPU node with a CPU-only torch would silently train on the CPU over gloo: refuse it, naming the fix
    (PIPELINE_ALLOW_CPU=1 to mean it)."""
    if torch.cuda.is_available() or environ.get("PIPELINE_ALLOW_CPU") == "1" or not gpus_on_node(environ):
        return
    build = "a CPU-only torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
    raise ValueError(f"this node has GPUs (CUDA_VISIBLE_DEVICES / SLURM_JOB_GPUS / /dev/nvidia0) but {build} sees "
                     f"none: install the CUDA build (environment.yml) or check the driver; PIPELINE_ALLOW_CPU=1 runs "
                     f"on the CPU anyway")


def is_comm_failure(e: BaseException) -> bool:
    """A collective timed out or lost a peer (c10d's DistError, or the bare RuntimeError gloo and NCCL raise from
    inside FSDP / DeepSpeed hooks)."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in (
        "Timed out waiting", "Connection closed by peer", "Connection reset by peer", "gloo/transport", "NCCL error",
        "ProcessGroupNCCL", "Socket Timeout"))


def set_timeout(seconds: float) -> None:
    """Bound every later collective of every process group of this process (the world and the side groups that
    DeepSpeed / FSDP2 created) by `seconds`: a rank that stopped or died then becomes an error on the others
    instead of an endless wait. _set_pg_timeout is private but the only way to change a live group's timeout."""
    if not dist.is_initialized():
        return
    for pg in list(c10d._world.pg_map):
        try:
            c10d._set_pg_timeout(datetime.timedelta(seconds=seconds), pg)
        except (ValueError, RuntimeError, AssertionError):
            pass  # a group this rank is not part of


def die_with_parent(sig: int | None = None) -> None:
    """Ask the kernel to send us SIGTERM (a graceful stop: checkpoint and leave) when the launcher dies, so a
    torchrun killed by a signal it does not forward never leaves its ranks orphaned and writing. Linux only; set
    only under torchrun (a shell's `nohup python -m pipeline.train &` must survive its shell)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(sig or signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), int(sig or signal.SIGTERM))


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def max_over_ranks(value: float, group) -> float:
    """The largest `value` over all ranks, on every rank (one MAX all-reduce and one host read): decisions that gate
    collectives (stop decoding, stop training) must come out the same everywhere."""
    if group is None:
        return value
    t = torch.tensor([float(value)], device=device())  # NCCL reduces device tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def any_rank(flag: bool, group) -> bool:
    """True on every rank when `flag` is true on at least one."""
    return max_over_ranks(1.0 if flag else 0.0, group) > 0


class timeout_scope:
    """`with timeout_scope(long, restore):` collectives inside may wait up to `long` seconds (a checkpoint or export
    that rank 0 writes alone); `restore` afterwards."""

    def __init__(self, seconds: float, restore: float):
        self.seconds, self.restore = seconds, restore

    def __enter__(self):
        set_timeout(self.seconds)

    def __exit__(self, *exc):
        set_timeout(self.restore)


def shutdown() -> None:
    """Tear the process group down after a clean finish. NCCL needs it (communicators hold GPU memory and threads,
    and an exit without it warns of leaked resources or hangs); gloo's side groups from DeepSpeed / FSDP can abort
    the process in their destructors when a peer has already exited, so on CPUs the process exit tears down."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        dist.destroy_process_group()


def barrier(group) -> None:
    if group is not None:
        dist.barrier(group=group)


# ----------------------------------------------------------------------------------------------------------------
# The 2-D layout: replicas x shard groups
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Ranks arranged as (replicas, shard): rank = replica_rank * shard_size + shard_rank, so a shard group is a run
    of consecutive ranks (one node under every launcher here). Parameters are sharded and the loss is vocab-parallel
    inside `shard_group`; `replica_group` joins the ranks holding the same shard in different groups (gradients are
    all-reduced there and nothing else). Groups are None for one process."""
    world: int
    shard_size: int
    shard_rank: int
    replica_rank: int
    shard_group: object = None
    replica_group: object = None
    mesh: object = None  # the (replicate, shard) DeviceMesh the groups come from (FSDP2's HSDP mesh)

    @property
    def replicas(self) -> int:
        return self.world // self.shard_size


def ranks_per_node(environ=os.environ) -> tuple[int | None, str]:
    """(ranks on this node, the variable it came from) from the launcher, or (None, why not)."""
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if environ.get(name, "").isdigit():
            return int(environ[name]), name
    if "SLURM_STEP_ID" in environ:
        for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
            head = environ.get(name, "").split("(")[0].split(",")[0]  # "2(x2)" or "4,3": the first node's count
            if head.isdigit():
                return int(head), name
    return None, "no launcher variable gives the ranks per node"


def shard_size_for(world: int, requested: int | None, environ=os.environ) -> tuple[int, str]:
    """The shard group size and why: parallel.shard_group_size if set, else the ranks of one node when that divides
    the world (uneven nodes fall back to one group of all ranks)."""
    if requested is not None:
        if world % requested:
            raise ValueError(f"parallel.shard_group_size ({requested}) must divide the world size ({world})")
        return requested, "parallel.shard_group_size"
    per_node, source = ranks_per_node(environ)
    if per_node and world % per_node == 0:
        return per_node, f"ranks per node ({source}={per_node})"
    why = source if not per_node else f"{source}={per_node} does not divide {world}"
    return world, f"one group of all ranks ({why})"


def make_layout(shard_size: int | None = None) -> Layout:
    """Build the (replicas, shard) groups of the initialised world (shard_size None: all ranks in one group); one
    process without a group gets the trivial layout. Collective: every rank calls it with the same shard_size."""
    if not dist.is_initialized():
        return Layout(1, 1, 0, 0)
    world, rank = dist.get_world_size(), dist.get_rank()
    shard_size = shard_size or world
    mesh = init_device_mesh(device().type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))
    return Layout(world, shard_size, rank % shard_size, rank // shard_size, mesh.get_group("shard"),
                  mesh.get_group("replicate"), mesh)


# ----------------------------------------------------------------------------------------------------------------
# Host reads: the hot path's device-to-host synchronisations, made explicit and counted
# ----------------------------------------------------------------------------------------------------------------
HOST_READS = [0]  # explicit reads so far (bench/scale_bench.py reads the count; it also counts any implicit ones)
_HOST_DATA = contextvars.ContextVar("host_data", default=False)


def host_read(t: torch.Tensor) -> list:
    """The tensor's values on the host: a synchronisation with the device. The training step makes two per step."""
    HOST_READS[0] += 1
    return t.tolist()


@contextlib.contextmanager
def host_data():
    """Marks work on host-side data (batches before they move to the device): reads of it are not device syncs,
    and the sync counter of bench/scale_bench.py leaves them out."""
    token = _HOST_DATA.set(True)
    try:
        yield
    finally:
        _HOST_DATA.reset(token)


def in_host_data() -> bool:
    return _HOST_DATA.get()


class SyncCounter:
    """Counts the device-to-host synchronisations of the code run inside it: scalar reads (.item(), float(),
    bool() of a tensor), ops whose output size depends on the data (nonzero, masked_select, unique), and the
    explicit host_read()s; reads of host-side batch data (host_data()) are left out. A TorchDispatchMode, so it
    sees every aten op of every library (HF, DeepSpeed, FSDP) on this thread; slow, for diagnosis only
    (bench/scale_bench.py, tests/test_layout.py)."""

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive")

    def __init__(self):
        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.__name__.split(".")[0] in SyncCounter.SYNC_OPS and not in_host_data():
                    counter.implicit += 1
                return func(*args, **(kwargs or {}))

        self._mode, self.implicit, self._explicit0 = _Mode(), 0, 0

    @property
    def count(self) -> int:
        return self.implicit + HOST_READS[0] - self._explicit0

    def __enter__(self):
        self.implicit, self._explicit0 = 0, HOST_READS[0]
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
