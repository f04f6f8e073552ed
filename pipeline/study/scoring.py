"""Scoring finished runs (in a subprocess, so with the run's thread budget): the held-out evaluation, the entropy
backfill of older results and the temperature diagnostic."""
from __future__ import annotations

import json
import math
import os

import torch
from transformers import AutoModelForCausalLM

from pipeline import config as C, evaluate
from pipeline.models import build as M
from pipeline.study.grid import EVAL_DEFAULTS, RESULT, Grid, record_path, recorded, run_dir, status
from pipeline.study.runner import Inputs, prepare_assets, write_json


def evaluate_run(d: str, config: str, overrides: list[str], ev: dict) -> dict:
    """A chat job: evaluate.instruct_scores on data.eval_files' prompts; a text job: held-out KL, agreement and
    perplexity on 32 sequences of data.eval_files (else the tail of the training data). Plus the run's curves."""
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
            write_json(local_path, {**local, "student_entropy": got["entropy"]})
        if entry is not None:
            p = record_path(record, spec)
            write_json(p, {**json.load(open(p)), "result": {**entry, "student_entropy": got["entropy"]}})
        log(f"{spec.name} seed {spec.seed}: student_entropy {got['entropy']:.4f}")
        done.append(f"{spec.name} seed{spec.seed}")
    return done


def temperatures(grid: Grid, out: str, names: list[str], seed: int, temps: list[float], *, assets_dir: str,
                 log=print) -> dict:
    """A diagnostic beside the protocol: ROUGE-L of the finished runs' students (training seed `seed`) answering the
    held-out prompts sampled at each temperature, with the evaluation's first sampling seed, so temperature 1
    repeats the first of a result's rouge_l_seeds. {run: {temperature: ROUGE-L}}."""
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
        table[name] = {t: evaluate.rouge_l(evaluate.answers(student, tok, prompts, spec.eval["max_new_tokens"],
                                                            temperature=t, seed=first_seed),
                                           refs) for t in temps}
        log(f"{name}: " + ", ".join(f"T={t}: {v:.2f}" for t, v in table[name].items()))
    return table
