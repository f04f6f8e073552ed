"""Run a function in N real processes joined by a gloo group, with a deadline that turns a hang into a failure."""
from __future__ import annotations

import datetime
import os
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.parallel.distributed import free_port  # noqa: F401 (re-exported for the tests)


def _entry(rank: int, world: int, port: int, fn, args):
    import faulthandler
    import sys
    faulthandler.enable()  # a crash in native code prints every thread's Python stack
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Passed. Leave without running C++ static destructors: groups that DeepSpeed / FSDP2 create on the side can
    # still own gloo threads then, and a peer that already exited makes their destruction abort the process
    # ("terminate called without an active exception", seen once in CI after every check had passed).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Workers fork from a server that imported these once (per pytest worker), instead of each re-importing torch and
# transformers (about 4 CPU-s per process here, most of a small test's time); DeepSpeed through
# tests.preload_deepspeed, which sets the CPU accelerator in the server first.
_PRELOAD = ["torch", "torch.distributed", "transformers", "transformers.models.llama.modeling_llama",
            "datasets", "tests.preload_deepspeed", "pipeline.loss.divergences", "pipeline.loss.vocab_parallel", "pipeline.models.build",
            "pipeline.rollout.hf", "pipeline.parallel.backends", "pipeline.train", "tests.dist_utils"]
mp.set_forkserver_preload(_PRELOAD)


def run_workers(fn, world: int, *args, timeout: float = 120.0) -> None:
    """fn(rank, world, *args) in `world` processes; an exception in any rank fails the caller with its traceback;
    not finishing within `timeout` seconds (a hang) fails it too."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=False,
                             start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed workers did not finish within {timeout}s (a hang?)")


# --------------------------------------------------------------------------------------------------------------
# pipeline.train on N ranks, forked from the preloaded server
# --------------------------------------------------------------------------------------------------------------
def _rank_main(argv: list[str], env: dict, out_path: str, err_path: str, cwd: str) -> None:
    """One rank: the environment torchrun (or a plain `python -m pipeline.train`) would give it, stdout and stderr
    to files, then pipeline.train.main; the exit code is main's."""
    import sys
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    out, err = open(out_path, "w"), open(err_path, "w")
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout, sys.stderr = os.fdopen(1, "w", buffering=1), os.fdopen(2, "w", buffering=1)
    sys.argv = ["pipeline/train.py", *argv]
    code = 1
    try:
        import torch
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
        from pipeline import train
        code = train.main(argv) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def launch_preloaded(argv: list[str], nproc: int, env: dict, cwd, timeout: float = 600):
    """`python -m pipeline.train ARGV` on `nproc` ranks with torchrun's environment contract (RANK, LOCAL_RANK,
    WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT; none of them for one process, as a plain launch), each rank
    forked from the preloaded server instead of a fresh interpreter: the imports are most of a small run's time.
    As torchrun, the first rank to fail ends the others. Returns a CompletedProcess (the ranks' stdout and stderr
    in rank order, the first failing rank's exit code). What is about the launchers themselves (signals, kill -9,
    srun, mpirun, argument errors) runs the real ones."""
    import multiprocessing
    import shutil
    import subprocess
    import tempfile
    ctx = multiprocessing.get_context("forkserver")
    logs = tempfile.mkdtemp(prefix="ranks-")
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        e = dict(env)
        if nproc > 1:
            e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                     GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        paths = os.path.join(logs, f"{rank}.out"), os.path.join(logs, f"{rank}.err")
        procs.append((ctx.Process(target=_rank_main, args=(list(argv), e, *paths, str(cwd))), paths))
    for p, _ in procs:
        p.start()
    deadline, code = time.monotonic() + timeout, 0
    try:
        while any(p.exitcode is None for p, _ in procs):
            failed = [p.exitcode for p, _ in procs if p.exitcode not in (None, 0)]
            if failed and not code:
                code = failed[0]
                for p, _ in procs:  # as torchrun: the others get SIGTERM
                    if p.exitcode is None:
                        p.terminate()
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(argv, timeout)
            time.sleep(0.02)
        code = code or next((p.exitcode for p, _ in procs if p.exitcode), 0)
    finally:
        for p, _ in procs:
            if p.exitcode is None:
                p.kill()
            p.join()
    out = "".join(open(o).read() for _, (o, _e) in procs)
    err = "".join(open(e).read() for _, (_o, e) in procs)
    shutil.rmtree(logs, ignore_errors=True)
    return subprocess.CompletedProcess(argv, code, out, err)
