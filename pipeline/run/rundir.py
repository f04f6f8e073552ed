"""One run per run directory, and a run directory that always tells the truth about what it holds.

- An exclusive lock (`run_dir/.lock`, flock held by rank 0 for the whole run) makes a second launch on the same
  directory stop at once with a message naming the holder. The kernel drops the lock when the holder exits or dies,
  so a lock is never stale. (flock needs a filesystem that supports it across nodes: local disks, NFSv4, Lustre
  mounted with -o flock, GPFS.)
- `checkpoint.resume: false` on a directory that holds checkpoints is refused unless `checkpoint.overwrite: true`;
  so is any launch on a directory whose checkpoints are gone but whose results are not (an export, recorded steps).
- Resuming checks the newest checkpoint's recorded config against this launch's before anything loads: fields that
  change the meaning of the run must match (config.SAFE_TO_CHANGE lists the others, which are allowed and recorded).
- `config.yaml` is written only once a run actually starts; every launch appends a line to `history.jsonl`.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time

from pipeline import config as C
from pipeline.run import checkpoint, integrity

LOCK = ".lock"
HISTORY = "history.jsonl"
# what a run writes into its directory (deleted by checkpoint.overwrite; history.jsonl and the lock are kept)
RUN_OUTPUTS = ("checkpoints", "student", "tb", "losses.tsv", "eval.tsv", "config.yaml", "teacher_probe.json")
RUN_OUTPUT_PATTERNS = ("summary_rank", "rollouts_rank")


class RunDirError(ValueError):
    """The launch cannot use this run directory as asked; the message says why and what to do. Nothing on disk was
    changed."""


class RunLock:
    """flock on run_dir/.lock; the file records who holds it (for the message a second launch prints)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.fd = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"run directory {os.path.dirname(self.path)!r} is in use by another run ({holder}); "
                              f"wait for it to end, stop it, or choose another run_dir") from None
        os.ftruncate(fd, 0)
        who = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
               "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, (", ".join(f"{k} {v}" for k, v in who.items() if v is not None) + "\n").encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def prepare(cfg: C.Config, world: int, is_main: bool = True) -> tuple[str | None, dict]:
    """Decide what this launch does with its run directory, before any model loads: (the checkpoint it will try
    first or None, the safe config changes against it). Raises RunDirError (nothing touched) when the launch must
    not go on; deletes the previous run's outputs only with checkpoint.overwrite."""
    run_dir = cfg.run_dir
    existing = checkpoint.complete_checkpoints(run_dir)
    done = [] if existing else finished_outputs(run_dir)
    if done and not cfg.checkpoint.overwrite:  # no checkpoint, but a run's results: a new start would lose them
        raise RunDirError(f"{run_dir} holds {' and '.join(done)} of an earlier run but no checkpoint to resume "
                          f"from: choose another run_dir, or pass --checkpoint.resume=false "
                          f"--checkpoint.overwrite=true to delete them and start again")
    if not cfg.checkpoint.resume:
        if existing and not cfg.checkpoint.overwrite:
            raise RunDirError(f"{run_dir} already holds {len(existing)} checkpoint(s) (newest "
                              f"{os.path.basename(existing[-1])}) and checkpoint.resume is false: resume it (drop "
                              f"--checkpoint.resume=false), choose another run_dir, or pass "
                              f"--checkpoint.overwrite=true to delete it and start again")
        if cfg.checkpoint.overwrite and is_main:
            clear_outputs(run_dir)
        return None, {}
    if not existing:
        return None, {}
    newest = existing[-1]
    manifest = checkpoint.read_manifest(newest)
    if manifest is None:
        return newest, {}  # unverifiable: load_newest_valid reports it and falls back
    return newest, check_resumable(manifest, cfg, world, newest)


def check_resumable(manifest: dict, cfg: C.Config, world: int, where: str) -> dict:
    """Raise RunDirError listing the fields that differ from checkpoint `where` and may not; return the safe
    differences {field: (saved, now)}."""
    unsafe, safe = C.config_changes(manifest.get("config", {}), C.to_dict(cfg))
    saved_world = manifest.get("world_size")
    if saved_world is not None and saved_world != world:
        unsafe["world size"] = (saved_world, world)
    now = integrity.input_fingerprints(cfg)
    for field, saved in (manifest.get("inputs") or {}).items():  # the same paths may hold other content now
        if field in now and now[field] != saved:
            unsafe[f"{field} content (fingerprint)"] = (saved, now[field])
    if unsafe:
        lines = "\n  ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in
                            ((k, *v) for k, v in unsafe.items()))
        raise RunDirError(f"cannot resume {where}: these fields change the meaning of the run and differ from the "
                          f"checkpoint's config:\n  {lines}\nrestore them, or use another run_dir (or "
                          f"--checkpoint.resume=false --checkpoint.overwrite=true to start this one again)")
    return safe


def finished_outputs(run_dir: str) -> list[str]:
    """What in `run_dir` a new start would lose: an exported student, steps recorded in losses.tsv."""
    out = []
    if os.path.isdir(os.path.join(run_dir, "student")):
        out.append("an exported student (student/)")
    try:
        with open(os.path.join(run_dir, "losses.tsv")) as f:
            steps = sum(1 for line in f if line.strip())
    except OSError:
        steps = 0
    if steps:
        out.append(f"{steps} recorded step(s) (losses.tsv)")
    return out


def clear_outputs(run_dir: str) -> None:
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name in RUN_OUTPUTS or name.startswith(RUN_OUTPUT_PATTERNS):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def record_start(cfg: C.Config, world: int, source: str, *, resumed_from: str | None, start_step: int,
                 changes: dict, argv: list[str]) -> None:
    """Rank 0, once the run has started: the resolved config.yaml and a line in history.jsonl."""
    C.save_resolved(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    line = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(), "world_size": world,
            "world_size_from": source, "slurm_job": os.environ.get("SLURM_JOB_ID"), "argv": argv,
            "resumed_from": resumed_from, "start_step": start_step, "overwrite": cfg.checkpoint.overwrite,
            "changed": {k: {"checkpoint": a, "now": b} for k, (a, b) in changes.items()}}
    with open(os.path.join(cfg.run_dir, HISTORY), "a") as f:
        f.write(json.dumps(line, default=str) + "\n")
