"""Independent float64 references, written from the definitions in probability space (no log-space tricks, no
shared code with pipeline.losses). Slow and straightforward on purpose."""
from __future__ import annotations

import math

import torch


def probs(z):
    return torch.softmax(z.double(), -1)


def kl(a, b):
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def mixture(p, q, alpha, lam):
    """r = normalise((lam p^s + (1-lam) q^s)^(1/s)), s = (1-alpha)/2; geometric at alpha = 1."""
    if lam == 1:
        return p
    if lam == 0:
        return q
    s = (1 - alpha) / 2
    if s == 0:
        rt = p ** lam * q ** (1 - lam)
    else:
        rt = (lam * p ** s + (1 - lam) * q ** s) ** (1 / s)
    return rt / rt.sum(-1, keepdim=True)


def gjsd(p, q, beta):
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def tvd(p, q):
    return 0.5 * (p - q).abs().sum(-1)


def amari(p, q, alpha):
    if alpha == -1:
        return kl(p, q)
    if alpha == 1:
        return kl(q, p)
    return 4 / (1 - alpha ** 2) * ((1 - alpha) / 2 * p + (1 + alpha) / 2 * q
                                   - p ** ((1 - alpha) / 2) * q ** ((1 + alpha) / 2)).sum(-1)


def ab(x, y, a, b):
    return -((x ** a * y ** b) - a / (a + b) * x ** (a + b) - b / (a + b) * y ** (a + b)).sum(-1) / (a * b)


def amid(zt, zs, alpha, lam, divergence, order, ab_ab=(0.2, 0.7)):
    p, q = probs(zt), probs(zs)
    r = mixture(p, q, alpha, lam)
    d = {"p": p, "q": q, "r": r}
    x, y = d[order[0]], d[order[1]]
    if divergence == "kl":
        return kl(x, y)
    return ab(x, y, *ab_ab)


def taid(zt, zs, t):
    pt = torch.softmax((1 - t) * zs.double().detach() + t * zt.double(), -1)
    return kl(pt, probs(zs))


def atkd(zt, zs, targets, mask, lam=0.2, hard_fraction=0.5, keep_unc=False, reverse=False):
    """Per-sequence ATKD with group means, token by token. zt, zs: [B, T, V]; returns per-token values whose
    per-sequence token mean is the ATKD loss of that sequence."""
    B, T, V = zt.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    p_all, q_all = probs(zt), probs(zs)
    for b in range(B):
        tkd, dkd, unc = {}, {}, {}
        for t in range(T):
            if not mask[b, t]:
                continue
            p, q, g = p_all[b, t], q_all[b, t], int(targets[b, t])
            x, y = (q, p) if reverse else (p, q)
            keep = torch.arange(V) != g
            bx = torch.stack([x[g], 1 - x[g]])
            by = torch.stack([y[g], 1 - y[g]])
            tkd[t] = kl(bx, by)
            dkd[t] = kl(x[keep] / x[keep].sum(), y[keep] / y[keep].sum())
            unc[t] = 1 - p[g]
            if keep_unc:
                dkd[t] = (1 - x[g]) * dkd[t]
        valid = sorted(tkd)
        if not valid:
            continue
        k = math.ceil(hard_fraction * len(valid) - 1e-9)
        ranked = sorted(valid, key=lambda t: (-float(unc[t]), t))
        hard, easy = ranked[:k], ranked[k:]
        n = len(valid)
        for t in hard:
            out[b, t] = (1 - lam) * (tkd[t] + dkd[t]) * n / len(hard)
        for t in easy:
            out[b, t] = lam * dkd[t] * n / len(easy)
    return out


def method(name, zs, zt, targets=None, mask=None, **o):
    """Per-token float64 reference for pipeline.losses.distillation_loss(name, ...)."""
    p, q = probs(zt), probs(zs)
    if name == "fkl":
        v = kl(p, q)
    elif name == "rkl":
        v = kl(q, p)
    elif name == "tvd":
        v = tvd(p, q)
    elif name == "gjsd":
        v = gjsd(p, q, o.get("beta", 0.5))
    elif name == "skl":
        a = o.get("alpha", 0.1)
        v = kl(p, a * p + (1 - a) * q)
    elif name == "srkl":
        a = o.get("alpha", 0.1)
        v = kl(q, (1 - a) * p + a * q)
    elif name == "alpha_divergence":
        v = amari(p, q, o.get("alpha", 0.5))
    elif name == "ab_divergence":
        v = ab(p, q, o.get("alpha", 0.2), o.get("beta", 0.7))
    elif name == "amid":
        v = amid(zt, zs, o.get("alpha", 0.5), o.get("lam", 0.1), o.get("divergence", "ab"), o.get("order", "pr"))
    elif name == "taid":
        v = taid(zt, zs, o.get("t", 0.4))
    elif name == "atkd":
        v = atkd(zt, zs, targets, mask, **o)
    else:
        raise KeyError(name)
    if mask is not None:
        v = torch.where(mask, v, torch.zeros_like(v))
    return v
