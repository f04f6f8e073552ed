"""Tensorboard scalars and a console progress bar on rank 0; no-ops elsewhere, so call sites need no `if`."""
from __future__ import annotations

import sys
import time


class Metrics:
    def __init__(self, log_dir: str | None, enabled: bool):
        self.writer = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter  # deferred: only the writing rank
            self.writer = SummaryWriter(log_dir)

    def log(self, step: int, scalars: dict) -> None:
        if self.writer is None:
            return
        for k, v in scalars.items():
            if v is not None:
                self.writer.add_scalar(k, float(v), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """`step 12/100 [#####     ] loss 1.2345 ...` rewritten in place on a terminal, one line per update otherwise."""

    def __init__(self, total: int, enabled: bool, start: int = 0):
        self.total, self.enabled, self.t0, self.start = total, enabled, time.time(), start
        self.tty = sys.stderr.isatty()

    def update(self, step: int, **fields) -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * step / max(self.total, 1))
        rate = (step - self.start) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        info = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        line = f"step {step}/{self.total} [{'#' * filled}{' ' * (width - filled)}] {info} eta {eta:.0f}s"
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
