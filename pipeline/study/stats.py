"""The statistics of a study's tables, in plain Python (no scipy here): mean and spread, rank correlation, Student's t
quantiles and the paired comparison by training seed."""
from __future__ import annotations

import math


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
