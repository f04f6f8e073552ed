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
import json
import os
import sys

import torch
import yaml

from pipeline.study.grid import EVAL_DEFAULTS, RESULT, default_out, grid_name, load_grid
from pipeline.study.report import report
from pipeline.study.runner import run_grids, select
from pipeline.study.scoring import backfill, evaluate_run, temperatures


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


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return ap


def _evaluate(args, rest: list[str]) -> dict:
    """`evaluate` (a run's own subprocess): its result.json, written atomically."""
    overrides = [a for a in rest if a != "--"]
    result = evaluate_run(args.run_dir, args.config, overrides, {**EVAL_DEFAULTS, **json.loads(args.eval)})
    with open(os.path.join(args.run_dir, RESULT + ".tmp"), "w") as f:
        json.dump(result, f, indent=1)
    os.replace(os.path.join(args.run_dir, RESULT + ".tmp"), os.path.join(args.run_dir, RESULT))
    return {k: v for k, v in result.items() if k not in ("curves", "sample")}


def _temperatures(args, grid, out: str, log) -> dict:
    try:
        temps = [float(x) for x in args.temperatures.split(",")]
    except ValueError:
        raise ValueError(f"--temperatures {args.temperatures!r}: give comma-separated numbers, e.g. 1.0,0.7,0.5") \
            from None
    if any(x <= 0 for x in temps):
        raise ValueError("--temperatures must be positive (0 would be greedy, which results already hold)")
    return temperatures(grid, out, args.runs.split(","), args.seed, temps, assets_dir=args.assets, log=log)


def main(argv=None) -> int:
    args, rest = _parser().parse_known_args(argv)
    if args.cmd == "evaluate":
        print(json.dumps(_evaluate(args, rest)))
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
    try:
        if args.cmd == "backfill":
            torch.set_num_threads(max(1, args.threads))
            print(json.dumps({"completed": backfill(grid, out, args.record, args.assets, log)}))
        elif args.cmd == "temperatures":
            print(json.dumps(_temperatures(args, grid, out, log)))
        else:
            print(report(grid, out, args.docs, args.record)["table"])
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    return 0
