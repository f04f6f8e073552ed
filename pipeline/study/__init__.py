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
