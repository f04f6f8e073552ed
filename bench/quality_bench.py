"""Does AMiD work here? Reruns the method study's headline comparison and AMiD's alpha ablation on the embedded pair
(pipeline.study with bench/study/headline.yaml and alpha.yaml), writes the tables and figures to docs/results/, and
ends with one JSON line:

    {"methods": [...], "rouge_l": {...}, "heldout_fkl": {...}, "heldout_rkl": {...}, "seeds": N,
     "amid_rank_rouge_l": R, "alpha_trend_spearman": S, "entropy_rouge_l_spearman": E, "minutes": M}

    python bench/quality_bench.py [--jobs 2] [--threads 1] [--out runs/study] [--docs docs/results]
    python bench/quality_bench.py --steps 4 --seeds 1 --out runs/study_smoke --docs runs/study_smoke/docs   (smoke)

Finished runs are reused (a rerun after an interruption continues where it stopped), and each is recorded in
DOCS/GRID/ledger/ (pipeline.study's ledger: commit it, and a rerun on another machine runs only what is missing).
Both grids run in one pool, seed by seed (every run of seed 0, then of seed 1, ...), the tables rewritten after
each run.
R: AMiD's rank by mean sampled ROUGE-L among the headline methods (1 = best); S: Spearman correlation of alpha with
ROUGE-L over every (alpha, seed) of the KL(p, r) ablation (the paper's trend is negative: more negative alpha is
better); E: Spearman correlation of the headline students' entropy on the references with their sampled ROUGE-L
over every (run, seed) (how much of the sampled ranking is sharpness).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.study import grid as study_grid, report as study_report, runner  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="threads per run")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--docs", default="docs/results")
    ap.add_argument("--steps", type=int, help="override the grids' steps (a smoke run)")
    ap.add_argument("--seeds", type=int, help="override the grids' seeds")
    args = ap.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or (args.seeds is not None and args.seeds < 1) \
            or args.jobs < 1 or args.threads < 1:
        print("--steps, --seeds, --jobs and --threads must be >= 1", file=sys.stderr)
        return 2
    t0 = time.time()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    grids = {}
    for name in ("headline", "alpha"):
        grid = study_grid.load_grid(os.path.join(HERE, "study", name + ".yaml"))
        if args.steps or args.seeds:
            runs = [dataclasses.replace(r, steps=args.steps or r.steps) for r in grid.runs
                    if args.seeds is None or r.seed < args.seeds]
            grid = dataclasses.replace(grid, runs=runs)
        grids[name] = grid
    out = {name: os.path.join(args.out, name) for name in grids}
    record = {name: os.path.join(args.docs, name, "ledger") for name in grids}  # the committed ledgers
    reports = {}

    def rewrite(spec=None):  # the tables and figures, from every result so far (ledger included)
        for name, grid in grids.items():
            reports[name] = study_report.report(grid, out[name], os.path.join(args.docs, name), record[name])

    # one pool over both grids, seed-major (every run of seed 0, then of seed 1, ...), the tables rewritten after
    # each run: a bench cut short leaves every finished run in the ledgers and in docs/ (the next machine runs only
    # the rest), and a grid's odd last run of a seed shares the cores with the next run rather than an idle core
    counts = runner.run_grids([(grids[name], out[name], record[name]) for name in grids], jobs=args.jobs,
                             threads=args.threads, log=log, on_done=rewrite)
    if counts["failed"]:
        log(f"{counts['failed']} run(s) failed; see the study.log files under {args.out}")
        return 1
    if not reports:  # nothing ran (each finished run already rewrote them, the last with every result)
        rewrite()
    for name in grids:
        print(f"## {name}\n{reports[name]['table']}", file=sys.stderr)
    head = reports["headline"]["summary"]
    methods = list(head)
    rouge = {m: head[m]["rouge_l"][0] for m in methods}
    ranking = sorted(methods, key=lambda m: -rouge[m])
    trend = reports["alpha"]["alpha_trend"]
    result = {"methods": methods, "rouge_l": {m: round(v, 3) for m, v in rouge.items()},
              "heldout_fkl": {m: round(head[m]["heldout_fkl"][0], 4) for m in methods},
              "heldout_rkl": {m: round(head[m]["heldout_rkl"][0], 4) for m in methods},
              "seeds": min(head[m]["seeds"] for m in methods),
              "amid_rank_rouge_l": ranking.index("amid") + 1 if "amid" in ranking else None,
              "alpha_trend_spearman": round(next(iter(trend.values()))["spearman"], 3) if trend else None,
              "entropy_rouge_l_spearman": (round(sharp["spearman"], 3)
                                           if (sharp := reports["headline"]["entropy_vs_rouge_l"]) else None),
              "minutes": round((time.time() - t0) / 60, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
