"""Compare distillation methods at the same budget: train each method with each seed through pipeline.train,
evaluate each student on held-out data, and write a results table (mean and spread over seeds, markdown) and a PNG of
the held-out KL curves.

    python -m pipeline.compare --methods amid,taid,atkd,fkl,rkl,gjsd,skl --seeds 3 [--steps 60] [--out runs/compare]
        [--config CONFIG] [-- --section.key=value ...]

Without --config it runs on the embedded default pair (pipeline.demo's teacher, student and data, prepared once).
Each method runs with its default options (README); every run shares the config, steps, data and seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

from pipeline import losses


def _read_tsv(path: str) -> dict[int, float]:
    if not os.path.exists(path):
        return {}
    return {int(s): float(v) for s, v in (line.split("\t") for line in open(path).read().splitlines())}


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def table(results: dict) -> str:
    """Markdown: one row per method, mean ± sample std over seeds of each metric."""
    metrics = [("kl_to_teacher", "held-out KL", 3), ("top1_agreement", "top-1 agreement", 3),
               ("perplexity", "perplexity", 1), ("rouge_l", "ROUGE-L", 1)]
    metrics = [m for m in metrics if all(m[0] in r for runs in results.values() for r in runs)]
    lines = ["| method | seeds | " + " | ".join(m[1] for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for method, runs in results.items():
        cells = []
        for key, _, digits in metrics:
            m, s = mean_std([r[key] for r in runs])
            cells.append(f"{m:.{digits}f} ± {s:.{digits}f}")
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict, path: str) -> None:
    """Held-out KL against step, mean over seeds per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, per_seed in curves.items():
        steps = sorted(set.intersection(*(set(c) for c in per_seed)))
        if steps:
            ax.plot(steps, [sum(c[s] for c in per_seed) / len(per_seed) for s in steps], marker="o", label=method)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("held-out KL(teacher || student)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="amid,taid,atkd,fkl,rkl,gjsd,skl")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--config", help="a training config; default: the embedded default pair (pipeline/configs/demo.yaml)")
    ap.add_argument("--assets", default="runs/assets", help="where the default pair is prepared")
    ap.add_argument("--rouge", action=argparse.BooleanOptionalAction, default=True,
                    help="ROUGE-L of greedy answers to the held-out prompts (default pair only)")
    args, overrides = ap.parse_known_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in losses.METHODS]
    if bad or args.seeds < 1 or args.steps < 1:
        print(f"--methods must name methods of {sorted(losses.METHODS)} (bad: {bad}); --seeds and --steps >= 1",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    extra, prompts = [], None
    config = args.config
    if config is None:
        from pipeline import demo
        teacher, student, train_file, held_file, rows = demo.prepare(args.assets, os.path.join(args.out, "data"))
        config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")
        extra = [f"--model.teacher_path={teacher}", f"--model.student_path={student}",
                 f"--data.files=[{train_file}]", f"--data.eval_files=[{held_file}]"]
        held = rows[-demo.HELD_OUT_PROMPTS:]
        prompts = ([r["prompt"] for r in held], [r["response"] for r in held]) if args.rouge else None

    results, curves = {}, {}
    for method in methods:
        for seed in range(args.seeds):
            run_dir = os.path.join(args.out, method, f"seed{seed}")
            cmd = [sys.executable, "-m", "pipeline.train", "--config", config, f"--run_dir={run_dir}",
                   f"--loss.method={method}", "--loss.options={}", f"--train.steps={args.steps}",
                   f"--train.seed={seed}", f"--data.shuffle_seed={seed}", f"--train.eval_every={args.eval_every}",
                   "--logging.progress=false", "--checkpoint.keep_last=1", *extra, *overrides]
            print(f"== {method} seed {seed}", file=sys.stderr, flush=True)
            if subprocess.run(cmd).returncode:
                print(f"{method} seed {seed} failed; see {run_dir}", file=sys.stderr)
                return 1
            scores = evaluate_run(run_dir, config, extra + list(overrides), prompts)
            results.setdefault(method, []).append(scores)
            curves.setdefault(method, []).append(_read_tsv(os.path.join(run_dir, "eval.tsv")))
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
    md = table(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"{args.steps} steps per run, {args.seeds} seed(s); mean ± std over seeds\n\n" + md)
    plot(curves, os.path.join(args.out, "curves.png"))
    print(md)
    print(f"table: {args.out}/results.md  plot: {args.out}/curves.png", file=sys.stderr)
    return 0


def evaluate_run(run_dir: str, config: str, overrides: list[str], prompts) -> dict:
    """Held-out metrics of the run's exported student on 32 held-out sequences (and ROUGE-L with prompts)."""
    from pipeline import config as C, evaluate
    return evaluate.evaluate_checkpoint(os.path.join(run_dir, "student"), C.load_config(config, overrides), 32, prompts)


if __name__ == "__main__":
    sys.exit(main())
