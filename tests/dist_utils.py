"""Run a function in N real processes joined by a gloo group, with a deadline that turns a hang into a failure."""
from __future__ import annotations

import datetime
import os
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.distributed import free_port  # noqa: F401 (re-exported for the tests)


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


def run_workers(fn, world: int, *args, timeout: float = 120.0) -> None:
    """fn(rank, world, *args) in `world` processes; an exception in any rank fails the caller with its traceback;
    not finishing within `timeout` seconds (a hang) fails it too."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed workers did not finish within {timeout}s (a hang?)")
