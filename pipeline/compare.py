"""Compare distillation methods at the same budget: every method at its default options with every seed, through
pipeline.study's runner (each run is pipeline.train; finished runs are skipped, interrupted ones resume), evaluated
on held-out data, with a results table (mean and spread over seeds, markdown) and a PNG of the held-out curves.

    python -m pipeline.compare --methods amid,taid,atkd,fkl,rkl,gjsd,skl --seeds 3 [--steps 60] [--out runs/compare]
        [--config CONFIG] [-- --section.key=value ...]

Without --config it runs on the embedded default pair (pipeline.demo's teacher, student and text, prepared once):
held-out KL, teacher top-1 agreement and perplexity on an unseen play. For generation quality (ROUGE-L) on
instructions, and options or grids beyond defaults, use pipeline.study with a grid file.
"""
from __future__ import annotations

import argparse
import os
import sys

from pipeline import demo
from pipeline.loss import divergences as losses
from pipeline.study import grid as study_grid, report as study_report, runner


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="amid,taid,atkd,fkl,rkl,gjsd,skl")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--config", help="a training config; default: the embedded default pair (pipeline/configs/demo.yaml)")
    ap.add_argument("--assets", default="runs/assets", help="where the default pair is prepared")
    args, overrides = ap.parse_known_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in losses.METHODS]
    if bad or args.seeds < 1 or args.steps < 1:
        print(f"--methods must name methods of {sorted(losses.METHODS)} (bad: {bad}); --seeds and --steps >= 1",
              file=sys.stderr)
        return 2
    inputs, config = runner.Inputs(), args.config
    if config is None:
        teacher, student, train_file, held_file, _ = demo.prepare(args.assets, os.path.join(args.out, "data"))
        config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")
        inputs = runner.Inputs((f"--model.teacher_path={teacher}", f"--model.student_path={student}",
                               f"--data.files=[{train_file}]", f"--data.eval_files=[{held_file}]"),
                              (train_file, held_file))
    extra = (f"--train.eval_every={args.eval_every}", *[o for o in overrides if o != "--"])
    runs = [study_grid.RunSpec(m, seed, m, {}, extra, args.steps, os.path.abspath(config))
            for m in methods for seed in range(args.seeds)]
    grid = study_grid.Grid(runs, embedded_pair=False)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        counts = runner.run_grid(grid, args.out, threads=os.cpu_count() or 1, inputs=inputs, log=log)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    rep = study_report.report(grid, args.out)
    print(rep["table"])
    print(f"table: {args.out}/results.md  plot: {args.out}/curves.png", file=sys.stderr)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
