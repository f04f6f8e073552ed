"""SIGTERM and SIGUSR1 ask a run to stop: finish the step, write a checkpoint, leave. Imports nothing slow, so
train.py installs the handlers before torch loads: a signal during start-up is then a request, not a kill.

Who receives what: Slurm's `--signal=USR1@T` and `scancel --signal=USR1` reach every rank (srun steps); Slurm's
preemption and time limit send SIGTERM (SIGKILL after KillWait); torchrun forwards SIGTERM (and SIGUSR1 when in its
--signals-to-handle) to its workers, and when it dies of a signal it does not forward, its workers get SIGTERM from
the kernel (distributed.die_with_parent). Ranks may see a signal at different steps or not at all, so they agree
after every step (one MAX all-reduce, distributed.max_over_ranks) and all stop at the same step.
"""
from __future__ import annotations

import signal

STOP = 1     # SIGTERM: stop and checkpoint (a cancel or preemption: the job is not requeued by us)
REQUEUE = 2  # SIGUSR1: the time limit is near: stop, checkpoint, requeue the Slurm job

received: list[int] = []


def _handle(signum, frame) -> None:
    received.append(signum)


def install() -> None:
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, _handle)


def local_request() -> int:
    """0, STOP or REQUEUE from the signals this process has received."""
    if signal.SIGUSR1 in received:
        return REQUEUE
    return STOP if received else 0
