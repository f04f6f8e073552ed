"""Method studies on the embedded pair: a grid of methods x options x seeds from a file, every run through
pipeline.train, evaluated on the instruction task's held-out prompts (pipeline.instruct_task), collected into one
table and figures. A run whose result exists is skipped; an interrupted run resumes from its last checkpoint.

    python -m pipeline.study run GRID.yaml [--out runs/study/GRID] [--jobs 2] [--threads 1] [--only a,b] [--seeds 1,2]
    python -m pipeline.study run A.yaml B.yaml --record 'docs/results/{grid}/ledger'   # one pool, seed-major
    python -m pipeline.study report --out runs/study/GRID [--docs docs/results/GRID]
    python -m pipeline.study temperatures GRID --runs fkl,amid [--seed 0] [--temperatures 1.0,0.7,0.5]
    python -m pipeline.study backfill GRID [--out runs/study/GRID] [--record LEDGER]

A grid file (relative paths are relative to the repository):

    job: pipeline/configs/study_offpolicy.yaml   # the training config every run starts from
    steps: 120                                   # optimiser steps per run
    seeds: 3                                     # training seeds 0 .. seeds-1 (data order and initial sampling)
    eval: {sample_seeds: 5, kl_prompts: 64, max_new_tokens: 64}
    overrides: [--optim.lr=5e-4]                 # for every run (pipeline.train's --section.key=value)
    embedded_pair: true                          # point the job at the embedded pair and the instruction task
                                                 # (false: the job config and overrides name models and data)
    runs:                                        # name: {method, options, overrides, tags, init}
      fkl: {method: fkl}
      amid_kl_a-5: {method: amid, options: {alpha: -5, lam: 0.1, divergence: kl}, tags: {alpha: -5, family: kl}}
      # a warm start: begin from the final student of another grid's run of the same seed (finished on this
      # machine, in `out`, default runs/study/GRID); that run's identity is part of this one's
      amid_warm: {method: amid, init: {grid: bench/study/headline.yaml, run: fkl}}

Each run writes RUN_DIR = OUT/NAME/seedS (the training run directory) and RUN_DIR/result.json; `report` writes
results.md / results.json and PNGs of the learning curves and (for runs tagged with `alpha`) ROUGE-L against alpha.

`temperatures` is a diagnostic beside the protocol: ROUGE-L of finished runs' students sampled at other temperatures
(the evaluation's first sampling seed, so temperature 1 repeats a result's first rouge_l_seeds value). `backfill`
adds the student's entropy on the references to results recorded before the evaluation measured it (from the runs'
students on this machine, after checking that the recorded held-out KLs come back).

`--record DIR` (bench/quality_bench.py: docs/results/GRID/ledger) also keeps each finished run's identity and result in
DIR/NAME/seedS.json, a ledger meant to be committed: a run recorded there with the same identity is done on any
machine, so a study too long for one sitting grows run by run across machines, and its tables are rebuilt from the
ledger alone.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace

import yaml

from pipeline import assets, config as C
from pipeline.loss import divergences as losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT, SPEC = "result.json", "spec.json"
EVAL_DEFAULTS = {"sample_seeds": 5, "kl_prompts": 64, "max_new_tokens": 64}


@dataclass(frozen=True, eq=False)
class RunSpec:
    name: str
    seed: int
    method: str
    options: dict
    overrides: tuple[str, ...]
    steps: int
    job: str
    tags: dict = field(default_factory=dict)
    eval: dict = field(default_factory=lambda: dict(EVAL_DEFAULTS))
    init: RunSpec | None = None
    """The run (of another grid, the same seed) whose final student this one starts from, instead of the job's."""
    init_out: str | None = None
    """Where that grid's runs are (its student: run_dir(init_out, init)/student)."""

    def key(self, inputs: dict | None = None) -> dict:
        """What makes two runs the same run (a finished result is reused only for an equal key): the training and
        the evaluation that produced the result; `inputs`: the prepared models and data (their paths and the data
        files' digests); a warm-started run's starting run, by its own key."""
        key = {"method": self.method, "options": self.options, "overrides": list(self.overrides),
               "steps": self.steps, "seed": self.seed, "job": open(self.job).read(), "eval": self.eval,
               "inputs": inputs or {}}
        if self.init is not None:  # only then: the keys of runs recorded before warm starts existed stay valid
            key["init"] = self.init.key(inputs)
        return key


@dataclass(frozen=True)
class Grid:
    runs: list[RunSpec]
    embedded_pair: bool = True


def _path(p: str, base: str) -> str:
    return p if os.path.isabs(p) else os.path.join(base, p)


def grid_name(grid_path: str) -> str:
    """A grid's name: its file's name without .yaml (runs/study/NAME, the {grid} of `run`'s --out and --record)."""
    return os.path.splitext(os.path.basename(grid_path))[0]


def default_out(grid_path: str) -> str:
    """Where a grid's runs go unless told: runs/study/GRID."""
    return os.path.join("runs", "study", grid_name(grid_path))


def _init_of(path: str, name: str, init, seeds: int, embedded_pair: bool, chain: tuple) -> dict:
    """{seed: (the starting run's RunSpec, its grid's out directory)} for a run's `init: {grid, run[, out]}`."""
    if not isinstance(init, dict) or not {"grid", "run"} <= set(init) or set(init) - {"grid", "run", "out"}:
        raise ValueError(f"{path}: run {name!r}: init takes {{grid: GRID.yaml, run: NAME, out: DIR (default "
                         f"runs/study/GRID)}}: the run whose final student this one starts from")
    base_path = _path(init["grid"], REPO)
    if os.path.abspath(base_path) in chain:
        raise ValueError(f"{path}: run {name!r}: init names {init['grid']}, which starts from this grid: a cycle")
    base = load_grid(base_path, chain)
    if base.embedded_pair != embedded_pair:
        raise ValueError(f"{path}: run {name!r}: {init['grid']} has embedded_pair {base.embedded_pair}, this grid "
                         f"{embedded_pair}: a student is continued on the inputs it was trained on")
    runs = {s.seed: s for s in base.runs if s.name == init["run"]}
    if not runs:
        raise ValueError(f"{path}: run {name!r}: {init['grid']} has no run {init['run']!r}")
    if len(runs) < seeds:
        raise ValueError(f"{path}: run {name!r}: {init['grid']} runs {init['run']!r} with {len(runs)} seed(s), "
                         f"this grid needs {seeds}")
    out = init.get("out") or default_out(base_path)
    return {seed: (spec, out) for seed, spec in runs.items()}


def load_grid(path: str, _chain: tuple = ()) -> Grid:
    """The grid file, checked before anything runs: a ValueError names the run and the field to fix."""
    if not os.path.isfile(path):
        raise ValueError(f"grid file {path!r} does not exist")
    g = C.read_yaml(path) or {}  # a key given twice is an error, as in a config
    unknown = set(g) - {"job", "steps", "seeds", "eval", "overrides", "runs", "embedded_pair"}
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}")
    for f in ("job", "steps", "seeds", "runs"):
        if f not in g:
            raise ValueError(f"{path}: `{f}` is required")
    job = _path(g["job"], REPO)
    if not os.path.exists(job):
        raise ValueError(f"{path}: job {g['job']!r} does not exist")
    if not isinstance(g["steps"], int) or g["steps"] < 1 or not isinstance(g["seeds"], int) or g["seeds"] < 1:
        raise ValueError(f"{path}: steps and seeds must be positive integers")
    ev = {**EVAL_DEFAULTS, **(g.get("eval") or {})}
    if set(ev) != set(EVAL_DEFAULTS):
        raise ValueError(f"{path}: eval takes {sorted(EVAL_DEFAULTS)}, got {sorted(ev)}")
    embedded_pair = g.get("embedded_pair", True)
    if not isinstance(embedded_pair, bool):
        raise ValueError(f"{path}: embedded_pair must be true or false")
    runs = []
    for name, r in (g["runs"] or {}).items():
        r = r or {}
        bad = set(r) - {"method", "options", "overrides", "tags", "init"}
        if bad or "method" not in r:
            raise ValueError(f"{path}: run {name!r} needs `method` and takes options, overrides, tags, init (got "
                             f"{sorted(r)})")
        try:
            losses.resolve_options(r["method"], r.get("options") or {})
        except ValueError as e:
            raise ValueError(f"{path}: run {name!r}: {e}") from None
        overrides = tuple(g.get("overrides") or []) + tuple(r.get("overrides") or [])
        init = {} if r.get("init") is None else _init_of(path, name, r["init"], g["seeds"], embedded_pair,
                                                          _chain + (os.path.abspath(path),))
        for seed in range(g["seeds"]):
            base, base_out = init.get(seed, (None, None))
            runs.append(RunSpec(name, seed, r["method"], dict(r.get("options") or {}), overrides, g["steps"], job,
                                dict(r.get("tags") or {}), ev, base, base_out))
    if not runs:
        raise ValueError(f"{path}: no runs")
    return Grid(runs, embedded_pair)


def run_dir(out: str, spec: RunSpec) -> str:
    return os.path.join(out, spec.name, f"seed{spec.seed}")


def init_student(spec: RunSpec) -> str:
    """The student a warm-started run starts from."""
    return os.path.join(run_dir(spec.init_out, spec.init), "student")


def record_path(record: str, spec: RunSpec) -> str:
    return os.path.join(record, spec.name, f"seed{spec.seed}.json")


def recorded(record: str | None, spec: RunSpec, inputs: dict | None = None) -> dict | None:
    """The ledger's result of this exact spec, None when the ledger has none; one of a different spec is an error
    (its grid, job config or prepared inputs changed since)."""
    p = record_path(record, spec) if record else None
    if p is None or not os.path.exists(p):
        return None
    entry = json.load(open(p))
    if entry["key"] != spec.key(inputs):
        raise ValueError(f"{p} records a run of a different spec (the grid, the job config or the prepared data "
                         f"changed): delete it (or the whole ledger) to rerun")
    return entry["result"]


def status(out: str, spec: RunSpec, inputs: dict | None = None, record: str | None = None) -> str:
    """done (a result for this exact spec, in the run directory or the ledger), partial (started: resumes), new; a
    result or start for a different spec is an error rather than a silent mix."""
    if recorded(record, spec, inputs) is not None:
        return "done"
    d = run_dir(out, spec)
    if os.path.exists(os.path.join(d, SPEC)):
        if json.load(open(os.path.join(d, SPEC))) != spec.key(inputs):
            raise ValueError(f"{d} holds a run of a different spec (the grid or the job config changed): use another "
                             f"--out or delete that directory")
        return "done" if os.path.exists(os.path.join(d, RESULT)) else "partial"
    return "new"


@dataclass(frozen=True)
class Inputs:
    """What every run of a grid is pointed at: pipeline.train overrides and the data files among them."""
    overrides: tuple[str, ...] = ()
    data_files: tuple[str, ...] = ()

    def identity(self) -> dict:
        """The overrides and a digest of each data file (a rebuilt task is a different input)."""
        import hashlib
        digests = {f: hashlib.sha256(open(f, "rb").read()).hexdigest()[:16] for f in self.data_files}
        return {"paths": list(self.overrides), "data": digests} if self.overrides else {}


def prepare_assets(assets_dir: str, log) -> Inputs:
    """The embedded teacher, the student initialised from its layers and the instruction task, and the
    pipeline.train overrides that point the job at them (cached: seconds once built)."""
    from pipeline import demo, instruct_task
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
    import hashlib
    import torch
    from pipeline import teacher_cache as TC
    from pipeline.models import build as M
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


def _write_json(path: str, obj) -> None:
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


def execute(spec: RunSpec, out: str, inputs: Inputs, threads: int, log, record: str | None = None,
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
    _write_json(os.path.join(d, RESULT), result)
    if record:
        _write_json(record_path(record, spec), {"key": key, "result": result})
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
        ok = execute(spec, out, inputs, threads, log, record, caches.get((spec.job, spec.overrides)))
        with lock:
            if not ok:
                failed.append(spec)
            log(f"{'done' if ok else 'FAILED'}: {spec.name} seed {spec.seed}")
            if ok and on_done is not None:
                on_done(spec)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, pending))
    return {"done": len(todo) - len(failed), "ran": len(pending), "failed": len(failed)}


# --------------------------------------------------------------------------------------------------------------
# Evaluation of one run (a subprocess, so it runs with the run's thread budget)
# --------------------------------------------------------------------------------------------------------------
def evaluate_run(d: str, config: str, overrides: list[str], ev: dict) -> dict:
    """A chat job: evaluate.instruct_scores on data.eval_files' prompts; a text job: held-out KL, agreement and
    perplexity on 32 sequences of data.eval_files (else the tail of the training data). Plus the run's curves."""
    from pipeline import evaluate
    cfg = C.load_config(config, overrides)
    if cfg.data.kind == "chat":
        student, teacher, tokenizer, rows = _chat_eval_inputs(d, cfg)
        scores = evaluate.instruct_scores(student, teacher, tokenizer, rows, cfg.data, **ev)
    else:
        scores = evaluate.evaluate_checkpoint(os.path.join(d, "student"), cfg, 32)
    curves = {}
    if os.path.exists(os.path.join(d, "eval.tsv")):
        names = ["kl", "kl_student_answers", "answer_len", "ce"]
        for line in open(os.path.join(d, "eval.tsv")).read().splitlines():
            step, *vals = line.split("\t")
            curves[step] = dict(zip(names, map(float, vals)))  # str keys, as JSON keeps them
    return {**scores, "curves": curves}


def _chat_eval_inputs(d: str, cfg, with_teacher: bool = True):
    """The finished run's student, the job's teacher (None without `with_teacher`) and tokenizer, and the held-out
    {prompt, response} rows."""
    import torch
    from transformers import AutoModelForCausalLM
    from pipeline.models import build as M
    student = AutoModelForCausalLM.from_pretrained(os.path.join(d, "student"), dtype=torch.float32).eval()
    teacher = M.build_model(cfg.model.teacher_path, cfg.model.teacher_config, "float32",
                            cfg.model.init_seed + 1).eval() if with_teacher else None
    rows = [json.loads(line) for f in cfg.data.eval_files for line in open(f)]
    return student, teacher, M.load_tokenizer(cfg), rows


def backfill(grid: Grid, out: str, record: str | None, assets_dir: str, log=print) -> list[str]:
    """Adds `student_entropy` (which the evaluation records since after the first runs were recorded) to finished
    chat-job results that lack it, from each run's student on this machine, in its run directory's result and in the
    ledger `record`. The references' divergences are recomputed as the evaluation computes them; a recorded held-out
    KL or agreement that does not come back is an error and nothing of that run is written. Returns the runs
    completed ("name seedS"); a run without its student here is logged and left as it is."""
    from pipeline import evaluate
    inputs = prepare_assets(assets_dir, log) if grid.embedded_pair else Inputs()
    identity, done = inputs.identity(), []
    for spec in grid.runs:
        d = run_dir(out, spec)
        local_path = os.path.join(d, RESULT)
        local = json.load(open(local_path)) if status(out, spec, identity) == "done" else None
        entry = recorded(record, spec, identity)  # a stale entry is an error, as everywhere
        res = entry if entry is not None else local
        if res is None or (all("student_entropy" in r for r in (entry, local) if r is not None)):
            continue
        cfg = C.load_config(spec.job, [*inputs.overrides, *spec.overrides])
        if cfg.data.kind != "chat":
            continue
        if not os.path.isdir(os.path.join(d, "student")):
            log(f"{spec.name} seed {spec.seed}: no student under {d} on this machine; left without student_entropy")
            continue
        student, teacher, tokenizer, rows = _chat_eval_inputs(d, cfg)
        n = min({**EVAL_DEFAULTS, **spec.eval}["kl_prompts"], len(rows))
        got = evaluate.pair_divergences(student, teacher, tokenizer, [r["prompt"] for r in rows[:n]],
                                        [r["response"] for r in rows[:n]], cfg.data)
        for key, ours in evaluate.ON_REFERENCES.items():
            if key == "student_entropy" and key not in res:
                continue                     # what the backfill adds (a recorded one is checked like the rest)
            if not math.isclose(res[key], got[ours], rel_tol=1e-4, abs_tol=1e-6):
                raise ValueError(f"{spec.name} seed {spec.seed}: {key} recomputed from {d}/student is {got[ours]:.6g}, "
                                 f"recorded {res[key]:.6g}: not the recorded run's student; nothing written")
        if local is not None:
            _write_json(local_path, {**local, "student_entropy": got["entropy"]})
        if entry is not None:
            p = record_path(record, spec)
            _write_json(p, {**json.load(open(p)), "result": {**entry, "student_entropy": got["entropy"]}})
        log(f"{spec.name} seed {spec.seed}: student_entropy {got['entropy']:.4f}")
        done.append(f"{spec.name} seed{spec.seed}")
    return done


def temperatures(grid: Grid, out: str, names: list[str], seed: int, temps: list[float], assets_dir: str,
                 log=print) -> dict:
    """A diagnostic beside the protocol: ROUGE-L of the finished runs' students (training seed `seed`) answering the
    held-out prompts sampled at each temperature, with the evaluation's first sampling seed, so temperature 1
    repeats the first of a result's rouge_l_seeds. {run: {temperature: ROUGE-L}}."""
    from pipeline import evaluate
    specs = {s.name: s for s in grid.runs if s.seed == seed and s.name in names}
    missing = [n for n in names if n not in specs or not os.path.isdir(os.path.join(run_dir(out, specs[n]), "student"))]
    if missing:
        raise ValueError(f"no finished student of {missing} with training seed {seed} under {out}")
    inputs = prepare_assets(assets_dir, log) if grid.embedded_pair else Inputs()
    table, first_seed = {}, evaluate.sampling_seeds(1)[0]
    for name in names:
        spec = specs[name]
        cfg = C.load_config(spec.job, [*inputs.overrides, *spec.overrides])
        student, _, tok, rows = _chat_eval_inputs(run_dir(out, spec), cfg, with_teacher=False)
        prompts, refs = [r["prompt"] for r in rows], [r["response"] for r in rows]
        table[name] = {t: evaluate.rouge_l(evaluate.answers(student, tok, prompts, spec.eval["max_new_tokens"], t, first_seed),
                                           refs) for t in temps}
        log(f"{name}: " + ", ".join(f"T={t}: {v:.2f}" for t, v in table[name].items()))
    return table


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
# (key, column, digits); a table shows the ones every run has (chat jobs: all but held-out KL and perplexity, the
# entropy once every run was evaluated since it was added; text jobs: held-out KL, agreement, perplexity)
METRICS = [("rouge_l", "ROUGE-L (sampled, mean of seeds)", 2), ("rouge_l_greedy", "ROUGE-L (greedy)", 2),
           ("heldout_fkl", "held-out KL(p‖q)", 3), ("heldout_rkl", "held-out KL(q‖p)", 3),
           ("own_answers_fkl", "KL(p‖q) on own answers", 3), ("kl_to_teacher", "held-out KL", 3),
           ("top1_agreement", "top-1 agreement", 3), ("student_entropy", "student entropy on references (nats)", 3),
           ("perplexity", "perplexity", 1)]


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def spearman(xs: list[float], ys: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / den if den else float("nan")


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (p > 0.5) by bisection on its CDF, the density integrated with Simpson's rule (no scipy
    here); df 1 and 2 have closed forms the tests compare against."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, n: int = 4000) -> float:
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired(results: dict[str, list[dict]], key: str = "rouge_l") -> dict:
    """Every run against the grid's first run (the headline grid's: AMiD), paired by training seed (the same data
    order, so the luck the seeds share drops out of the spread): per run the seeds both have, the mean and sample std
    of run - reference, its 95% t-interval (None with one seed) and how many seeds the run is better in."""
    names = [n for n in results if all(key in r for r in results[n])]
    if len(names) < 2:
        return {}
    ref = {r["seed"]: r[key] for r in results[names[0]]}
    runs = {}
    for name in names[1:]:
        d = [r[key] - ref[r["seed"]] for r in results[name] if r["seed"] in ref]
        if d:
            m, sd = mean_std(d)
            half = t_quantile(0.975, len(d) - 1) * sd / math.sqrt(len(d)) if len(d) > 1 else None
            runs[name] = {"seeds": len(d), "mean": m, "std": sd, "ci95": None if half is None else (m - half, m + half),
                          "better": sum(x > 0 for x in d)}
    return {"reference": names[0], "metric": key, "runs": runs}


def paired_table(p: dict) -> str:
    ref, col = p["reference"], dict((k, c) for k, c, _ in METRICS)[p["metric"]]
    lines = [f"Paired by training seed against {ref}: {col} of the run minus {ref}'s\n",
             f"| run | seeds | difference (mean ± std) | 95% interval | seeds better than {ref} |", "|---|---|---|---|---|"]
    for name, r in p["runs"].items():
        ci = "—" if r["ci95"] is None else f"{r['ci95'][0]:+.2f} to {r['ci95'][1]:+.2f}"
        # one seed has no spread: a "± 0.00" there would read as a measured one
        spread = f" ± {r['std']:.2f}" if r["seeds"] > 1 else ""
        lines.append(f"| {name} | {r['seeds']} | {r['mean']:+.2f}{spread} | {ci} | {r['better']} of {r['seeds']} |")
    return "\n".join(lines) + "\n"


def collect(grid: Grid, out: str, record: str | None = None) -> dict[str, list[dict]]:
    """{run name: [result of each finished seed]} in grid order: from the ledger `record` when given (only entries
    of the grid's current specs: a stale one is an error), else from the run directories under `out`."""
    results: dict[str, list[dict]] = {}
    identity = None
    for s in grid.runs:
        if record:
            if identity is None and os.path.exists(record_path(record, s)):
                identity = json.load(open(record_path(record, s)))["key"]["inputs"]
            res = recorded(record, s, identity)
        else:
            p = os.path.join(run_dir(out, s), RESULT)
            res = json.load(open(p)) if os.path.exists(p) else None
        if res is not None:
            results.setdefault(s.name, []).append({**res, "tags": s.tags, "seed": s.seed})
    return results


def _metrics(results: dict[str, list[dict]]) -> list[tuple[str, str, int]]:
    return [m for m in METRICS if all(m[0] in r for runs in results.values() for r in runs)]


def summary(results: dict[str, list[dict]]) -> dict:
    return {name: {k: mean_std([r[k] for r in runs]) for k, _, _ in _metrics(results)} | {"seeds": len(runs)}
            for name, runs in results.items()}


def table(results: dict[str, list[dict]]) -> str:
    s, metrics = summary(results), _metrics(results)
    lines = ["| run | seeds | " + " | ".join(m[1] for m in metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, row in s.items():
        # one seed has no spread to show
        cells = [f"{row[k][0]:.{dg}f}" + (f" ± {row[k][1]:.{dg}f}" if row["seeds"] > 1 else "")
                 for k, _, dg in metrics]
        lines.append(f"| {name} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def alpha_trend(results: dict[str, list[dict]]) -> dict:
    """For runs tagged with `alpha` (grouped by their `family` tag): alpha, ROUGE-L mean/std, and the rank
    correlation of alpha with ROUGE-L over every (run, seed)."""
    fams: dict[str, dict] = {}
    for name, runs in results.items():
        tags = runs[0]["tags"]
        if "alpha" in tags and all("rouge_l" in r for r in runs):
            f = fams.setdefault(str(tags.get("family", "alpha")), {"points": [], "xs": [], "ys": []})
            f["points"].append((float(tags["alpha"]), *mean_std([r["rouge_l"] for r in runs])))
            f["xs"] += [float(tags["alpha"])] * len(runs)
            f["ys"] += [r["rouge_l"] for r in runs]
    return {k: {"points": sorted(v["points"]), "spearman": spearman(v["xs"], v["ys"])} for k, v in fams.items()}


def entropy_vs_rouge(results: dict[str, list[dict]]) -> dict | None:
    """Rank correlation of the student's entropy on the references with sampled ROUGE-L over every (run, seed) that
    has both: how much of a sampled ranking is the students' sharpness (at temperature 1 a flat student pays for
    every unlikely token it samples). None below 3 results."""
    pts = [(r["student_entropy"], r["rouge_l"]) for runs in results.values() for r in runs
           if "student_entropy" in r and "rouge_l" in r]
    if len(pts) < 3:
        return None
    return {"spearman": spearman([e for e, _ in pts], [v for _, v in pts]), "results": len(pts)}


def run_time(results: dict[str, list[dict]]) -> dict | None:
    """Minutes of training and of evaluation per run (mean, min, max) over the results that recorded them in one go
    (a resumed run's recorded time is only its last part); None when none did."""
    legs = [r["seconds"] for runs in results.values() for r in runs
            if "seconds" in r and not r["seconds"]["resumed"]]
    if not legs:
        return None
    stats = lambda xs: (sum(xs) / len(xs), min(xs), max(xs))  # noqa: E731
    cost = {"runs": len(legs), "threads": sorted({leg["threads"] for leg in legs}),
            **{k: stats([leg[k] / 60 for leg in legs]) for k in ("train", "evaluate")}}
    # CPU minutes only where every leg has them (results recorded before the runner measured them lack them), so
    # that both figures cover the same runs
    if all("train_cpu" in leg for leg in legs):
        cost.update({k: stats([leg[k] / 60 for leg in legs]) for k in ("train_cpu", "evaluate_cpu")})
    return cost


def plots(results: dict[str, list[dict]], docs: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in results.items():
        steps = sorted(set.intersection(*(set(r["curves"]) for r in runs)), key=int)
        for ax, key in zip(axes, ("kl", "kl_student_answers")):
            if steps and all(key in r["curves"][s] for r in runs for s in steps):
                ax.plot([int(s) for s in steps], [sum(r["curves"][s][key] for r in runs) / len(runs) for s in steps],
                        marker=".", label=name)
    for ax, title in zip(axes, ("held-out KL(p‖q) (chat: on the references)", "KL(p‖q) on the student's greedy answers")):
        ax.set_xlabel("optimiser step")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    written.append(os.path.join(docs, "curves.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    trend = alpha_trend(results)
    if trend:
        fig, ax = plt.subplots(figsize=(6, 4))
        for fam, t in trend.items():
            xs, ms, ss = zip(*t["points"])
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=f"{fam} (Spearman {t['spearman']:.2f})")
        ax.set_xlabel("alpha")
        ax.set_ylabel("ROUGE-L (sampled, mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(os.path.join(docs, "alpha_trend.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def report(grid: Grid, out: str, docs: str | None = None, record: str | None = None) -> dict:
    results = collect(grid, out, record)
    docs = docs or out
    os.makedirs(docs, exist_ok=True)
    md = table(results)
    trend = alpha_trend(results)
    # sampled (the protocol) and greedy: the two readings the verdict weighs; a text job has neither
    pairs = {k: p for k in ("rouge_l", "rouge_l_greedy") if (p := paired(results, k))}
    with open(os.path.join(docs, "results.md"), "w") as f:
        f.write(f"{grid.runs[0].steps} steps per run; mean ± sample std over training seeds\n\n{md}")
        for p in pairs.values():
            f.write("\n" + paired_table(p))
        for fam, t in trend.items():
            f.write(f"\nalpha trend ({fam}): Spearman(alpha, ROUGE-L) = {t['spearman']:.3f}\n")
        if sharp := entropy_vs_rouge(results):
            f.write(f"\nSpearman(student entropy on the references, sampled ROUGE-L) over {sharp['results']} results "
                    f"(every run and seed) = {sharp['spearman']:.3f}\n")
        if cost := run_time(results):
            threads = "/".join(map(str, cost["threads"]))
            runs = f"{cost['runs']} run" + ("s" if cost["runs"] != 1 else "")
            minutes = lambda k: f"{cost[k][0]:.1f} ({cost[k][1]:.1f}-{cost[k][2]:.1f})"  # noqa: E731  mean (min-max)
            f.write(f"\nRun time over the {runs} that recorded it in one go ({threads} thread(s) a run), "
                    f"minutes mean (min-max): training {minutes('train')}, evaluation {minutes('evaluate')}")
            if "train_cpu" in cost:
                f.write(f"; CPU minutes (user + system): training {minutes('train_cpu')}, "
                        f"evaluation {minutes('evaluate_cpu')}")
            f.write("\n")
    summ = summary(results)
    per_seed = {name: [{k: v for k, v in r.items() if k != "curves"} for r in runs] for name, runs in results.items()}
    with open(os.path.join(docs, "results.json"), "w") as f:
        json.dump({"summary": summ, "paired": pairs, "alpha_trend": trend, "entropy_vs_rouge_l": sharp,
                   "run_time_minutes": cost, "runs": per_seed}, f, indent=1)
    plots(results, docs)
    return {"summary": summ, "paired": pairs, "alpha_trend": trend, "entropy_vs_rouge_l": sharp, "table": md}


def _run(args, log) -> int:
    """`run GRID [GRID ...]`: the grids' unfinished runs in one pool, then each grid's table."""
    def per_grid(template, path, default):
        if template is None:
            return default
        if len(args.grid) > 1 and "{grid}" not in template:
            raise ValueError(f"{template!r}: with several grids, give a path with {{grid}} in it (the grid file's "
                             f"name without .yaml), e.g. docs/results/{{grid}}/ledger")
        return template.replace("{grid}", grid_name(path))

    try:
        if args.jobs < 1 or args.threads < 1:
            raise ValueError("--jobs and --threads must be >= 1")
        if args.seeds and not all(x.strip().isdigit() for x in args.seeds.split(",")):
            raise ValueError(f"--seeds {args.seeds!r}: give comma-separated training seeds, e.g. 1,2")
        seeds = {int(x) for x in args.seeds.split(",")} if args.seeds else None
        only = set(args.only.split(",")) if args.only else None
        outs = [per_grid(args.out, p, default_out(p)) for p in args.grid]
        records = [per_grid(args.record, p, None) for p in args.grid]
        if len(set(outs)) < len(outs):
            raise ValueError(f"two grids would share the run directory {outs}: give --out a {{grid}}")
        try:
            grids = [load_grid(p) for p in args.grid]
        except (ValueError, OSError, yaml.YAMLError) as err:
            raise ValueError(f"grid error: {err}") from err
        selected = select(grids, only, seeds)
        counts = run_grids(list(zip(selected, outs, records)), jobs=args.jobs, threads=args.threads,
                           assets_dir=args.assets, log=log)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    for grid, out, record in zip(grids, outs, records):
        print(report(grid, out, record=record)["table"])
    print(json.dumps(counts))
    return 1 if counts["failed"] else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one or several grids (several: one pool, seed-major across them)")
    r.add_argument("grid", nargs="+")
    r.add_argument("--out", help="default runs/study/GRID; with several grids, a path with {grid} in it")
    r.add_argument("--jobs", type=int, default=1, help="runs at a time")
    r.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)), help="threads per run")
    r.add_argument("--only", help="comma-separated run names")
    r.add_argument("--seeds", help="comma-separated training seeds (e.g. a grid split across machines, or a warm "
                                   "start whose starting students are here for some seeds only)")
    r.add_argument("--assets", default="runs/assets")
    r.add_argument("--record", help="the ledger of finished runs (see above); with several grids, a path with {grid} "
                                    "in it, e.g. docs/results/{grid}/ledger")
    p = sub.add_parser("report")
    p.add_argument("grid")
    p.add_argument("--out")
    p.add_argument("--record", help="build the tables from this ledger instead of the run directories")
    p.add_argument("--docs", help="where the table and figures go (default: --out)")
    t = sub.add_parser("temperatures", help="ROUGE-L of finished runs' students sampled at other temperatures")
    t.add_argument("grid")
    t.add_argument("--out")
    t.add_argument("--runs", required=True, help="comma-separated run names")
    t.add_argument("--seed", type=int, default=0, help="the training seed whose students answer")
    t.add_argument("--temperatures", default="1.0,0.7,0.5")
    t.add_argument("--assets", default="runs/assets")
    b = sub.add_parser("backfill", help="add student_entropy to results recorded before the evaluation measured it")
    b.add_argument("grid")
    b.add_argument("--out")
    b.add_argument("--record", help="the ledger to complete too")
    b.add_argument("--assets", default="runs/assets")
    b.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("evaluate")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--config", required=True)
    e.add_argument("--eval", default="{}")
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "evaluate":
        overrides = [a for a in rest if a != "--"]
        result = evaluate_run(args.run_dir, args.config, overrides, {**EVAL_DEFAULTS, **json.loads(args.eval)})
        with open(os.path.join(args.run_dir, RESULT + ".tmp"), "w") as f:
            json.dump(result, f, indent=1)
        os.replace(os.path.join(args.run_dir, RESULT + ".tmp"), os.path.join(args.run_dir, RESULT))
        print(json.dumps({k: v for k, v in result.items() if k not in ("curves", "sample")}))
        return 0
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.cmd == "run":
        return _run(args, log)
    try:
        grid = load_grid(args.grid)
    except (ValueError, OSError, yaml.YAMLError) as err:
        print(f"grid error: {err}", file=sys.stderr)
        return 2
    out = args.out or default_out(args.grid)
    if args.cmd == "backfill":
        import torch
        torch.set_num_threads(max(1, args.threads))
        try:
            done = backfill(grid, out, args.record, args.assets, log)
        except ValueError as err:
            print(err, file=sys.stderr)
            return 2
        print(json.dumps({"completed": done}))
        return 0
    if args.cmd == "temperatures":
        try:
            temps = [float(x) for x in args.temperatures.split(",")]
        except ValueError:
            print(f"--temperatures {args.temperatures!r}: give comma-separated numbers, e.g. 1.0,0.7,0.5",
                  file=sys.stderr)
            return 2
        try:
            if any(x <= 0 for x in temps):
                raise ValueError("--temperatures must be positive (0 would be greedy, which results already hold)")
            table = temperatures(grid, out, args.runs.split(","), args.seed, temps, args.assets, log)
        except ValueError as err:
            print(err, file=sys.stderr)
            return 2
        print(json.dumps(table))
        return 0
    try:
        rep = report(grid, out, args.docs, args.record)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    print(rep["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
