"""A grid's report: results collected from run directories or the ledger, the table, the paired comparisons, the
trends, the cost and the figures (results.md, results.json, PNGs)."""
from __future__ import annotations

import json
import os

from pipeline.study.grid import RESULT, Grid, recorded, record_path, run_dir
from pipeline.study.stats import mean_std, paired, spearman

# (key, column, digits); a table shows the ones every run has (chat jobs: all but held-out KL and perplexity, the
# entropy once every run was evaluated since it was added; text jobs: held-out KL, agreement, perplexity)
METRICS = [("rouge_l", "ROUGE-L (sampled, mean of seeds)", 2), ("rouge_l_greedy", "ROUGE-L (greedy)", 2),
           ("heldout_fkl", "held-out KL(p‖q)", 3), ("heldout_rkl", "held-out KL(q‖p)", 3),
           ("own_answers_fkl", "KL(p‖q) on own answers", 3), ("kl_to_teacher", "held-out KL", 3),
           ("top1_agreement", "top-1 agreement", 3), ("student_entropy", "student entropy on references (nats)", 3),
           ("perplexity", "perplexity", 1)]


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
    import matplotlib  # deferred: matplotlib is imported only when plots are drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is imported only when plots are drawn
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
