"""Running a grid: the embedded pair and task prepared once, the teacher caches built once, then every unfinished
run trained and evaluated in its own processes, a pool of them at a time, seed-major."""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace

import torch

from pipeline import assets, config as C, demo, instruct_task, teacher_cache as TC
from pipeline.models import build as M
from pipeline.study.grid import RESULT, SPEC, Grid, RunSpec, init_student, record_path, run_dir, status


@dataclass(frozen=True)
class Inputs:
    """What every run of a grid is pointed at: pipeline.train overrides and the data files among them."""
    overrides: tuple[str, ...] = ()
    data_files: tuple[str, ...] = ()

    def identity(self) -> dict:
        """The overrides and a digest of each data file (a rebuilt task is a different input)."""
        digests = {f: hashlib.sha256(open(f, "rb").read()).hexdigest()[:16] for f in self.data_files}
        return {"paths": list(self.overrides), "data": digests} if self.overrides else {}


def prepare_assets(assets_dir: str, log) -> Inputs:
    """The embedded teacher, the student initialised from its layers and the instruction task, and the
    pipeline.train overrides that point the job at them (cached: seconds once built)."""
    teacher = assets.teacher_checkpoint(assets_dir)
    student = assets.student_from_teacher(teacher, os.path.join(assets_dir, "student-init"), demo.STUDENT_LAYERS)
    train, held = instruct_task.build(os.path.join(assets_dir, "instruct"), teacher, log=log,
                                      teacher_id=assets.teacher_source())
    return Inputs((f"--model.teacher_path={teacher}", f"--model.student_path={student}", f"--data.files=[{train}]",
                   f"--data.eval_files=[{held}]"), (train, held))


def teacher_caches(specs: list[RunSpec], inputs: Inputs, assets_dir: str, threads: int, log) -> dict:
    """{(job, overrides): a teacher cache of its training and held-out examples} for the instruction jobs among
    `specs` (pipeline.teacher_cache, computed once per machine: the runs then skip the teacher's forward on the
    dataset's responses and on the held-out references). An exact substitute for that forward, like the thread
    count, so not part of a run's identity."""
    torch.set_num_threads(threads)
    out = {}
    for job, overrides in dict.fromkeys((s.job, s.overrides) for s in specs):
        cfg = C.load_config(job, [*inputs.overrides, *overrides])
        if cfg.data.kind != "chat" or cfg.data.store:
            continue
        examples = TC.examples_of(cfg, M.load_tokenizer(cfg))
        # named for what it holds: jobs with the same teacher and examples share one
        name = hashlib.sha256(json.dumps(TC.fingerprint(cfg, examples), sort_keys=True).encode()).hexdigest()[:12]
        out[(job, overrides)] = TC.build(cfg, examples, os.path.join(assets_dir, "teacher_cache", name),
                                         log=lambda m: m.startswith(f"teacher cache: {len(examples)}/") and log(m))
    return out


def train_command(spec: RunSpec, out: str, paths, cache: str | None = None) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", "--config", spec.job, f"--run_dir={run_dir(out, spec)}",
            f"--loss.method={spec.method}", f"--loss.options={json.dumps(spec.options)}",
            f"--train.steps={spec.steps}", f"--train.seed={spec.seed}", f"--data.shuffle_seed={spec.seed}",
            "--logging.progress=false", "--checkpoint.keep_last=1", *paths, *spec.overrides,
            *([f"--model.student_path={init_student(spec)}", "--model.student_config=null"]
              if spec.init is not None else []),
            *([f"--loss.teacher_cache={cache}"] if cache else [])]


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def _timed(cmd: list[str], logf, env: dict) -> tuple[int, float, float]:
    """Run `cmd`; its exit code, wall seconds and CPU seconds (user + system, its own rusage from wait4: a run paused
    with SIGSTOP, or sharing a core, keeps its CPU time honest where the wall clock is not)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, env=env)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # as subprocess.run does: an interrupted wait leaves no child behind
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, round(time.time() - t0, 1), round(usage.ru_utime + usage.ru_stime, 1)


def execute(spec: RunSpec, out: str, inputs: Inputs, threads: int, log, *, record: str | None = None,
            cache: str | None = None) -> bool:
    """Train (resuming a partial run) and evaluate one run; True when its result was written (and recorded in the
    ledger `record`)."""
    d = run_dir(out, spec)
    os.makedirs(d, exist_ok=True)
    resumed = os.path.exists(os.path.join(d, SPEC))  # started before: this machine sees only the last leg's time
    key = spec.key(inputs.identity())
    with open(os.path.join(d, SPEC), "w") as f:
        json.dump(key, f)
    paths = inputs.overrides
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(os.path.join(d, "study.log"), "a") as logf:
        rc, train_wall, train_cpu = _timed(train_command(spec, out, paths, cache), logf, env)
        if rc:
            log(f"{spec.name} seed {spec.seed}: training failed; see {d}/study.log")
            return False
        cmd = [sys.executable, "-m", "pipeline.study", "evaluate", "--run-dir", d, "--config", spec.job,
               "--eval", json.dumps(spec.eval), "--", *paths, *spec.overrides]
        rc, eval_wall, eval_cpu = _timed(cmd, logf, env)
        if rc:
            log(f"{spec.name} seed {spec.seed}: evaluation failed; see {d}/study.log")
            return False
    # what the run cost, kept with its result so the README's cost figures come from the ledger, not from file times
    result = {**json.load(open(os.path.join(d, RESULT))),
              "seconds": {"train": train_wall, "evaluate": eval_wall, "train_cpu": train_cpu, "evaluate_cpu": eval_cpu,
                          "threads": threads, "resumed": resumed}}
    write_json(os.path.join(d, RESULT), result)
    if record:
        write_json(record_path(record, spec), {"key": key, "result": result})
    return True


def select(grids: list[Grid], only=None, seeds=None) -> list[Grid]:
    """The grids restricted to the run names `only` and the training seeds `seeds` (None: all); a name or a seed that
    none of the grids has is an error that says what they have."""
    names, have = {s.name for g in grids for s in g.runs}, {s.seed for g in grids for s in g.runs}
    if only is not None and set(only) - names:
        raise ValueError(f"--only names {sorted(set(only) - names)}, which the grid does not run (it runs "
                         f"{', '.join(sorted(names))})")
    if seeds is not None and set(seeds) - have:
        raise ValueError(f"--seeds {sorted(set(seeds) - have)}: the grid's training seeds are {sorted(have)}")
    return [replace(g, runs=[s for s in g.runs if (only is None or s.name in only)
                             and (seeds is None or s.seed in seeds)]) for g in grids]


def run_grid(grid: Grid, out: str, *, jobs: int = 1, threads: int = 1, only=None, seeds=None,
             assets_dir: str = "runs/assets", log=print, inputs: Inputs | None = None,
             record: str | None = None) -> dict:
    """Every run of the grid not done yet (in `out` or the ledger `record`), `jobs` at a time, restricted to the run
    names `only` and the training seeds `seeds` when given; returns {done, ran, failed} counts."""
    (grid,) = select([grid], only, seeds)
    return run_grids([(grid, out, record)], jobs=jobs, threads=threads, assets_dir=assets_dir, log=log,
                     inputs=inputs)


def run_grids(parts: list[tuple[Grid, str, str | None]], *, jobs: int = 1, threads: int = 1,
              assets_dir: str = "runs/assets", log=print, inputs: Inputs | None = None, on_done=None) -> dict:
    """The runs not done yet of several (grid, out, record) parts in one pool of `jobs`, seed-major across the parts
    (every part's seed 0 before any seed 1): a part's odd last run shares the cores with the next part's first
    instead of running beside an idle one. `on_done(spec)` after each finished run. Returns {done, ran, failed}."""
    todo = [(s, out, record) for grid, out, record in parts for s in grid.runs]
    embedded = any(grid.embedded_pair for grid, _, _ in parts)
    if embedded and not all(grid.embedded_pair for grid, _, _ in parts):
        raise ValueError("grids run together must all use the embedded pair or none")
    if inputs is None:
        inputs = prepare_assets(assets_dir, log) if embedded else Inputs()
    identity = inputs.identity()
    # spec clashes fail here, before any training
    states = [status(out, s, identity, record) for s, out, record in todo]
    # seed-major: every run's first seed before any second one, so a grid cut short still has a whole table
    pending = sorted((t for t, state in zip(todo, states) if state != "done"), key=lambda t: t[0].seed)
    for s, _, _ in pending:  # a warm start needs its starting run finished here (a ledger holds no students)
        if s.init is not None and not (status(s.init_out, s.init, identity) == "done"
                                       and os.path.isdir(init_student(s))):
            raise ValueError(f"{s.name} seed {s.seed} starts from {s.init.name} seed {s.seed}'s student, which is not "
                             f"finished in {run_dir(s.init_out, s.init)} on this machine: run that grid's "
                             f"{s.init.name!r} there first (pipeline.study run GRID --only {s.init.name}), or point "
                             f"init.out at its runs")
    log(f"{len(todo) - len(pending)} of {len(todo)} runs done; {len(pending)} to run, {jobs} at a time")
    if not pending:
        return {"done": len(todo), "ran": 0, "failed": 0}
    caches = teacher_caches([s for s, _, _ in pending], inputs, assets_dir, threads * jobs, log) if embedded else {}
    lock, failed = threading.Lock(), []

    def one(item):
        spec, out, record = item
        ok = execute(spec, out, inputs, threads, log, record=record, cache=caches.get((spec.job, spec.overrides)))
        with lock:
            if not ok:
                failed.append(spec)
            log(f"{'done' if ok else 'FAILED'}: {spec.name} seed {spec.seed}")
            if ok and on_done is not None:
                on_done(spec)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, pending))
    return {"done": len(todo) - len(failed), "ran": len(pending), "failed": len(failed)}
