"""A study's grid: the runs it holds (method, options, seed, job), read from a grid file, and where each run's
directory and ledger entry live and whether it is done."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from pipeline import config as C
from pipeline.loss import divergences as losses

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
