"""Distillation losses as pure tensor functions: per-token values, log-space maths in float32.

Legend: ... leading token dims (B, T or N), V vocab. In the vocab-parallel path V is the local shard Vp and
`ops` is `vocab_parallel.ShardedVocab`: every reduction over the vocabulary goes through `ops` (`sum`, `total`,
`logsumexp`, `gather`), so each formula below is written once and runs unchanged on a full row or on a shard of it.

p = softmax(teacher), q = softmax(student), lp/lq their log-probabilities. Every loss returns the per-token value
(shape logits.shape[:-1], 0 where `mask` is False); the caller divides the sum by a global count of valid tokens.

Numerics (see shared/research/amid.md §1.4-1.5 and taid_atkd.md §4):
- bf16/fp16 inputs are upcast to float32 before any softmax; float64 stays float64 (reference tests, gradcheck).
- Mixtures are built from log-probabilities with log1p/expm1 (never log of a probability that may underflow).
- A column that is -inf in a distribution (padded vocab rows, top-k teachers) contributes 0·log 0 = 0; entries that
  would meet -inf - (-inf) are replaced by 0 *before* the arithmetic and restored with `where` afterwards, so no NaN
  reaches the backward of the unused branch.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import Tensor

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------------------
# Reductions over the vocabulary (the only place the vocab dimension is collapsed)
# --------------------------------------------------------------------------------------------------------------
class LocalVocab:
    """Reductions over a whole vocabulary row in this process. `vocab_parallel.ShardedVocab` has the same methods
    but reduces over a process group; passing several tensors to one call batches them into one round.

    `sum` is a reduction whose value the loss needs (a normaliser, a target's log-prob); `total` is a loss's final
    vocabulary sum, which enters the per-token value only linearly. A sharded loss may return each rank's share of
    a total (the shares add up to the value) and so skip that sum's collective in both passes; a loss that adds a
    value every rank holds whole to totals passes it through `share` first."""

    def sum(self, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(x.sum(-1) for x in xs)

    def total(self, *xs: Tensor) -> tuple[Tensor, ...]:
        return self.sum(*xs)

    def share(self, x: Tensor) -> Tensor:
        return x

    def reduce(self, x: Tensor) -> Tensor:
        """The sum over ranks of per-rank partial vocabulary sums x [k, ...], no autograd: for hand-written
        backward passes that batch several of them into one round."""
        return x

    def logsumexp(self, *xs: Tensor) -> tuple[Tensor, ...]:
        # The shift is a constant: detaching it keeps the gradient exact and the graph small; an all -inf row keeps
        # shift 0 (its logsumexp is -inf).
        out = []
        for x in xs:
            m = x.detach().amax(-1)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            out.append(m + torch.log(torch.exp(x - m.unsqueeze(-1)).sum(-1)))
        return tuple(out)

    def gather(self, x: Tensor) -> Tensor:
        """Per-row statistics [..., k] of every rank, stacked: [ranks, ..., k] (here one rank)."""
        return x.unsqueeze(0)

    def column_ids(self, width: int, device: torch.device) -> Tensor:
        """Global vocabulary ids of the local columns."""
        return torch.arange(width, device=device)


LOCAL = LocalVocab()


def upcast(x: Tensor) -> Tensor:
    """float32 for half types, float32/float64 unchanged: all log-space maths runs in at least float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def logsumexp(*xs: Tensor, ops=LOCAL) -> tuple[Tensor, ...]:
    """Row logsumexp of each x [..., V], all in one round over a sharded vocabulary."""
    return ops.logsumexp(*xs)


def log_normalize(*logits: Tensor, ops=LOCAL) -> tuple[Tensor, ...]:
    """log_softmax of each tensor over the (possibly sharded) vocabulary."""
    return tuple(z - lse.unsqueeze(-1) for z, lse in zip(logits, logsumexp(*logits, ops=ops)))


def _both_dead(la: Tensor, lb: Tensor) -> Tensor:
    return (la == NEG_INF) & (lb == NEG_INF)


# None: look for -inf (a host read); False: the caller guarantees none; True: there are some, always sanitise
_NEG_INF = contextvars.ContextVar("neg_inf", default=None)


@contextlib.contextmanager
def _neg_inf_known(present: bool | None):
    token = _NEG_INF.set(present)
    try:
        yield
    finally:
        _NEG_INF.reset(token)


def finite_logits():
    """Inside: the caller guarantees no -inf in the logits (the fused path: matmul outputs with no masked columns),
    so the -inf checks below are skipped. Each check is a host synchronisation (a device-to-host read); the fused
    loss would otherwise pay several per chunk. Functions that mask columns themselves (ATKD's decomposition) say
    so with _neg_inf_known(True)."""
    return _neg_inf_known(False)


def _has_neg_inf(*xs: Tensor) -> bool:
    """One cheap pass that lets the common case (no -inf anywhere) skip every sanitising `where`; the slow path
    issues the same collectives, so ranks taking different branches stay in lockstep. Under torch.compile the
    sanitising path is always taken: fused `where`s cost nothing there, and a data-dependent branch would split
    the graph. Under finite_logits() the check is skipped (no host read)."""
    if torch.compiler.is_compiling():
        return True
    known = _NEG_INF.get()
    if known is not None:
        return known
    return any(bool(torch.isneginf(x).any()) for x in xs)


# --------------------------------------------------------------------------------------------------------------
# The alpha-mixture assistant distribution (AMiD)
# --------------------------------------------------------------------------------------------------------------
def power_mean_log(lp: Tensor, lq: Tensor, *, alpha: float, lam: float) -> Tensor:
    """Unnormalised log r~ = (1/s) log(lam p^s + (1-lam) q^s), s = (1-alpha)/2; at alpha = 1 lam lp + (1-lam) lq.

    Stable form (amid.md §1.4): with base b the larger argument for s > 0 (the smaller for s < 0) and o the other,
    log r~ = b + log1p(w_o expm1(s (o - b))) / s. s (o - b) <= 0 so expm1 cannot overflow, and the form tends to
    the geometric mean as s -> 0 without the 1/s cancellation of the logaddexp form. Elementwise: no reductions.
    """
    if lam >= 1.0:
        return lp
    if lam <= 0.0:
        return lq
    s = (1.0 - alpha) / 2.0
    dead = None
    if _has_neg_inf(lp, lq):
        # s > 0: support is the union, dead only where both are -inf; s <= 0: the intersection.
        dead = _both_dead(lp, lq) if s > 0 else (lp == NEG_INF) | (lq == NEG_INF)
        lp, lq = torch.where(dead, 0.0, lp), torch.where(dead, 0.0, lq)
    if s == 0.0:
        u = lam * lp + (1.0 - lam) * lq
    else:
        sel = (lp >= lq) if s > 0 else (lp <= lq)
        # `where`, not maximum/minimum: at ties those split the gradient evenly, which is wrong here
        base = torch.where(sel, lp, lq)
        other = torch.where(sel, lq, lp)
        w_other = sel.to(lp.dtype) * (1.0 - 2.0 * lam) + lam  # 1 - lam where the base is p, else lam
        # a one-sided -inf (s > 0) gives other = -inf: expm1 -> -1, a finite log(w_base) / s, and zero gradient.
        u = base + torch.log1p(w_other * torch.expm1(s * (other - base))) / s
    return u if dead is None else torch.where(dead, NEG_INF, u)


def alpha_mixture_from_log_probs(lp: Tensor, lq: Tensor, *, alpha: float, lam: float, ops=LOCAL) -> Tensor:
    """Normalised log r for normalised log-probabilities lp (teacher) and lq (student)."""
    if lam >= 1.0:
        return lp
    if lam <= 0.0:
        return lq
    u = power_mean_log(lp, lq, alpha=alpha, lam=lam)
    if alpha == -1.0:  # the arithmetic mixture of two normalised distributions is normalised already
        return u
    (lse,) = logsumexp(u, ops=ops)
    return u - lse.unsqueeze(-1)


class _MixtureLogProbs(torch.autograd.Function):
    """(lp, lq, log r) from a frozen teacher's and the student's logits, with the backward of the student's AND the
    mixture's normalisers in ONE round (autograd would chain two: d/d lse(u) first, then d/d lse(z_s), each a
    vocabulary sum). With w = d u / d lq (elementwise), r = softmax(u), q = softmax(z_s) and upstream gradients
    G_r, G_q over this rank's columns, the three sums A = sum G_r, B = sum (G_q + w G_r), C = sum w r go in one
    `ops.reduce`, then d z_s = G_q + w (G_r - r A) - q (B - A C). The forward costs the usual two rounds."""

    @staticmethod
    def forward(ctx, zs: Tensor, zt: Tensor, alpha: float, lam: float, ops) -> tuple[Tensor, Tensor, Tensor]:
        lp, lq = log_normalize(zt, zs, ops=ops)
        u = power_mean_log(lp, lq, alpha=alpha, lam=lam)
        (lse,) = logsumexp(u, ops=ops)
        lr = u - lse.unsqueeze(-1)
        ctx.ops = ops
        ctx.save_for_backward(lq, lr, _mixture_weight(lp, lq, alpha=alpha, lam=lam))
        ctx.mark_non_differentiable(lp)
        return lp, lq, lr

    @staticmethod
    def backward(ctx, _g_lp, g_lq, g_lr):
        lq, lr, w = ctx.saved_tensors
        g_lq = torch.zeros_like(lq) if g_lq is None else g_lq
        g_lr = torch.zeros_like(lr) if g_lr is None else g_lr
        r, q = torch.exp(lr), torch.exp(lq)  # exp(-inf) = 0: dead columns carry no mass
        a, b, c = ctx.ops.reduce(torch.stack([g_lr.sum(-1), (g_lq + w * g_lr).sum(-1), (w * r).sum(-1)]))
        g_zs = g_lq + w * (g_lr - r * a.unsqueeze(-1)) - q * (b - a * c).unsqueeze(-1)
        return g_zs, None, None, None, None


def _mixture_weight(lp: Tensor, lq: Tensor, *, alpha: float, lam: float) -> Tensor:
    """d log r~ / d lq of power_mean_log, elementwise: (1-lam) q^s / (lam p^s + (1-lam) q^s)
    = sigmoid(log((1-lam)/lam) + s (lq - lp)); 1 - lam at s = 0; 0 in dead columns (where u is -inf)."""
    s = (1.0 - alpha) / 2.0
    dead = None
    if _has_neg_inf(lp, lq):
        dead = _both_dead(lp, lq) if s > 0 else (lp == NEG_INF) | (lq == NEG_INF)
    if s == 0.0:
        w = torch.full_like(lq, 1.0 - lam)
    else:
        # one-sided -inf (s > 0): lq - lp = +-inf gives sigmoid 1 or 0, the limits of the formula
        d = lq - lp if dead is None else torch.where(dead, 0.0, lq - lp)
        w = torch.sigmoid(math.log((1.0 - lam) / lam) + s * d)
    return w if dead is None else torch.where(dead, 0.0, w)


def mixture_log_probs(teacher_logits: Tensor, student_logits: Tensor, *, alpha: float, lam: float,
                      ops=LOCAL) -> tuple[Tensor, Tensor, Tensor]:
    """(lp, lq, log r) for AMiD: fused (_MixtureLogProbs, one backward round) when the teacher is frozen and r is a
    normalised mixture that depends on the student; autograd's chained normalisers otherwise (same values)."""
    if (teacher_logits.requires_grad or not 0.0 < lam < 1.0 or alpha == -1.0
            or not torch.is_grad_enabled() or not student_logits.requires_grad):
        lp, lq = log_normalize(teacher_logits, student_logits, ops=ops)
        return lp, lq, alpha_mixture_from_log_probs(lp, lq, alpha=alpha, lam=lam, ops=ops)
    return _MixtureLogProbs.apply(student_logits, teacher_logits, alpha, lam, ops)


def alpha_mixture_log_probs(teacher_logits: Tensor, student_logits: Tensor, *, alpha: float, lam: float,
                            ops=LOCAL) -> Tensor:
    """log r over the last dimension, r ∝ (lam p^((1-alpha)/2) + (1-lam) q^((1-alpha)/2))^(2/(1-alpha)), and
    r ∝ p^lam q^(1-lam) at alpha = 1. `lam` is the TEACHER's weight: lam = 1 gives p, lam = 0 gives q."""
    _check_unit("lam", lam)
    _check_finite("alpha", alpha)
    lp, lq = log_normalize(upcast(teacher_logits), upcast(student_logits), ops=ops)
    return alpha_mixture_from_log_probs(lp, lq, alpha=alpha, lam=lam, ops=ops)


# --------------------------------------------------------------------------------------------------------------
# Divergences between two normalised distributions given as log-probabilities (la: first argument)
# --------------------------------------------------------------------------------------------------------------
def kl(la: Tensor, lb: Tensor, ops=LOCAL) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v), with 0 log 0 = 0."""
    if not _has_neg_inf(la):
        return ops.total(torch.exp(la) * (la - lb))[0]
    live = la > NEG_INF
    la0, lb0 = torch.where(live, la, 0.0), torch.where(live, lb, 0.0)
    return ops.total(torch.where(live, torch.exp(la0) * (la0 - lb0), 0.0))[0]


def generalized_jsd(lp: Tensor, lq: Tensor, ops=LOCAL, *, beta: float = 0.5) -> Tensor:
    """GKD / TRL convention: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.
    beta = 0 is forward KL(p || q) and beta = 1 reverse KL(q || p) exactly (as TRL special-cases them)."""
    if beta <= 0.0:
        return kl(lp, lq, ops)
    if beta >= 1.0:
        return kl(lq, lp, ops)
    lm = power_mean_log(lp, lq, alpha=-1.0, lam=beta)
    return beta * kl(lp, lm, ops) + (1.0 - beta) * kl(lq, lm, ops)


def skew_kl(lp: Tensor, lq: Tensor, ops=LOCAL, *, alpha: float = 0.1) -> Tensor:
    """DistiLLM skew KL: KL(p || alpha p + (1 - alpha) q); the student is live inside the mixture."""
    return kl(lp, power_mean_log(lp, lq, alpha=-1.0, lam=alpha), ops)


def skew_reverse_kl(lp: Tensor, lq: Tensor, ops=LOCAL, *, alpha: float = 0.1) -> Tensor:
    """DistiLLM skew reverse KL: KL(q || (1 - alpha) p + alpha q)."""
    return kl(lq, power_mean_log(lp, lq, alpha=-1.0, lam=1.0 - alpha), ops)


def total_variation(la: Tensor, lb: Tensor, ops=LOCAL) -> Tensor:
    """1/2 sum_v |a_v - b_v|, in [0, 1]."""
    return 0.5 * ops.total(torch.abs(torch.exp(la) - torch.exp(lb)))[0]


def amari_alpha(la: Tensor, lb: Tensor, ops=LOCAL, *, alpha: float = 0.5) -> Tensor:
    """Amari alpha-divergence 4/(1-alpha^2) sum[(1-alpha)/2 a + (1+alpha)/2 b - a^((1-alpha)/2) b^((1+alpha)/2)];
    alpha = -1 is KL(a || b), alpha = +1 is KL(b || a).

    With x = (1-alpha)/2, y = (1+alpha)/2 (x + y = 1, 4/(1-alpha^2) = 1/(xy)) and d = lb - la, using sum a = sum b = 1:
    D = -1/(xy) sum a expm1(y d) = -1/(xy) sum b expm1(-x d). The first form is stable as y -> 0, the second as
    x -> 0, so each is used on its own half: no 0/0 cancellation near alpha = +-1."""
    x, y = (1.0 - alpha) / 2.0, (1.0 + alpha) / 2.0
    if y == 0.0:
        return kl(la, lb, ops)
    if x == 0.0:
        return kl(lb, la, ops)
    lw, lo, coef = (la, lb, y) if abs(y) <= abs(x) else (lb, la, x)
    if not _has_neg_inf(la, lb):
        return -ops.total(torch.exp(lw) * torch.expm1(coef * (lo - lw)))[0] / (x * y)
    # a term whose weight is 0 is 0 * expm1(+-inf): keep it 0 without NaN in either pass
    live = lw > NEG_INF
    lw0, lo0 = torch.where(live, lw, 0.0), torch.where(live, lo, 0.0)
    terms = torch.where(live, torch.exp(lw0) * torch.expm1(coef * (lo0 - lw0)), 0.0)
    return -ops.total(terms)[0] / (x * y)


def ab_divergence(la: Tensor, lb: Tensor, ops=LOCAL, *, alpha: float = 0.2, beta: float = 0.7) -> Tensor:
    """Alpha-beta divergence (Cichocki et al. 2011; ABKD), a = alpha, b = beta:
    -1/(ab) sum[a^a b^b - a/(a+b) a^(a+b) - b/(a+b) b^(a+b)], with its continuous limits where a, b or a+b is 0
    (a=1, b=0 is KL(a || b); a=0, b=1 is KL(b || a))."""
    a, b = alpha, beta
    dead = _both_dead(la, lb) if _has_neg_inf(la, lb) else None
    x = la if dead is None else torch.where(dead, 0.0, la)
    y = lb if dead is None else torch.where(dead, 0.0, lb)

    def total(terms: Tensor) -> Tensor:
        return ops.total(terms if dead is None else torch.where(dead, 0.0, terms))[0]

    if a == 0.0 and b == 0.0:
        return 0.5 * total((x - y) ** 2)
    if b == 0.0:
        xa = torch.exp(a * x)
        return total(xa * a * (x - y) - xa + torch.exp(a * y)) / (a * a)
    if a == 0.0:
        yb = torch.exp(b * y)
        return total(yb * b * (y - x) - yb + torch.exp(b * x)) / (b * b)
    if a + b == 0.0:
        return total(a * (y - x) + torch.expm1(a * (x - y))) / (a * a)
    s = a + b
    terms = torch.exp(a * x + b * y) - (a / s) * torch.exp(s * x) - (b / s) * torch.exp(s * y)
    return -total(terms) / (a * b)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "kl": kl, "ab": ab_divergence, "alpha": amari_alpha, "tvd": total_variation, "jsd": generalized_jsd,
}


def amid(lp: Tensor, lq: Tensor, ops=LOCAL, *, alpha: float = 0.5, lam: float = 0.1, divergence: str = "ab",
         order: str = "pr", detach_student_in_r: bool = False, div_options: dict | None = None,
         lr: Tensor | None = None) -> Tensor:
    """AMiD: divergence between the alpha-mixture assistant r and the teacher p or student q, in the literal argument
    order of the official code ('pr' = D(p || r), 'qr', 'rp', 'rq'). r is NOT detached (the gradient flows through
    r, its normaliser and q); detach_student_in_r=True gives TAID's gradient instead. `lr`: log r computed already
    (mixture_log_probs, from the logits)."""
    if lr is None:
        lr = alpha_mixture_from_log_probs(lp, lq.detach() if detach_student_in_r else lq, alpha=alpha, lam=lam,
                                          ops=ops)
    dists = {"p": lp, "q": lq, "r": lr}
    return DIVERGENCES[divergence](dists[order[0]], dists[order[1]], ops, **(div_options or {}))


# --------------------------------------------------------------------------------------------------------------
# TAID: interpolated target, adaptive t
# --------------------------------------------------------------------------------------------------------------
def taid(lp: Tensor, lq: Tensor, ops=LOCAL, *, t: float, form: str = "kl") -> Tensor:
    """KL(p_t || q), p_t = softmax((1-t) sg(z_s) + t z_t) (logit-space interpolation, student detached).
    form='ce' returns the official cross-entropy value H(p_t) + KL(p_t || q) (same gradient), which is what TAID's
    schedule is driven by."""
    a = (1.0 - t) * lq.detach() + t * lp
    (lse,) = logsumexp(a, ops=ops)
    lpt = a - lse.unsqueeze(-1)
    value = kl(lpt, lq, ops)
    if form == "ce":
        value = value - kl(lpt, torch.zeros_like(lpt), ops)  # KL(p_t || 1) = -H(p_t), so this adds H(p_t)
    return value


@dataclass
class TaidSchedule:
    """TAID's t: a linear ramp from t_start to t_end over total_steps as a floor, pushed up by a momentum of the
    relative loss decrease (taid_atkd.md §1.3). Update once per optimiser step with the loss averaged over all
    ranks, so every rank holds the same t; eval passes must not call update. Checkpoint with state_dict()."""

    total_steps: int
    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    adaptive: bool = True
    t: float = field(init=False)
    momentum: float = field(init=False, default=0.0)
    prev_loss: float | None = field(init=False, default=None)
    step: int = field(init=False, default=0)

    def __post_init__(self):
        if not 0.0 <= self.t_start < 1.0:
            raise ValueError(f"taid t_start must be in [0, 1), got {self.t_start}")
        if not 0.0 < self.t_end <= 1.0 or self.t_end < self.t_start:
            raise ValueError(f"taid t_end must be in (t_start, 1], got {self.t_end}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"taid alpha (step size of t) must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"taid beta (momentum) must be in [0, 1), got {self.beta}")
        if self.total_steps < 1:
            raise ValueError(f"taid total_steps must be >= 1, got {self.total_steps}")
        self.t = self.t_start

    def update(self, loss: float) -> float:
        """Advance one optimiser step with this step's (all-rank mean) loss value; returns the new t."""
        # the official ramp uses the global step *before* this update: the first call sits at n = 0
        n = self.step
        self.step += 1
        ramp = self.t_start + (self.t_end - self.t_start) * min(n, self.total_steps) / self.total_steps
        if not self.adaptive:
            self.t = ramp
        elif self.prev_loss is None:
            self.prev_loss = loss  # the first call only records the loss (official behaviour)
            return self.t
        else:
            # the 1e-15 of the official code is kept; the CE-form signal is bounded away from 0 anyway.
            delta = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
            self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
            step_t = self.alpha / (1.0 + math.exp(-self.momentum)) * (1.0 - self.t)
            self.t = min(self.t_end, max(ramp, self.t + step_t))
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.momentum = float(state["t"]), float(state["momentum"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
        self.step = int(state["step"])


# --------------------------------------------------------------------------------------------------------------
# ATKD: target / non-target decomposition, hard / easy tokens by teacher uncertainty
# --------------------------------------------------------------------------------------------------------------
def target_decomposition(la: Tensor, lb: Tensor, targets: Tensor, ops=LOCAL) -> tuple[Tensor, Tensor, Tensor]:
    """KL(a || b) = TKD + (1 - a_g) DKD exactly, g = target id. Returns (TKD, DKD, 1 - a_g).

    TKD = KL of the binary (a_g, 1 - a_g) vs (b_g, 1 - b_g); DKD = KL of the renormalised non-target distributions.
    Both non-target normalisers come from a logsumexp with the target column masked (one batched round), so
    log(1 - a_g) stays exact when a_g -> 1 and DKD never divides 0 by 0."""
    is_g = ops.column_ids(la.shape[-1], la.device) == targets.unsqueeze(-1)  # [..., V]
    la_g, lb_g = ops.sum(torch.where(is_g, la, torch.zeros_like(la)), torch.where(is_g, lb, torch.zeros_like(lb)))
    la_rest, lb_rest = la.masked_fill(is_g, NEG_INF), lb.masked_fill(is_g, NEG_INF)
    la_ng, lb_ng = logsumexp(la_rest, lb_rest, ops=ops)  # log(1 - a_g), log(1 - b_g)
    # binary KL with 0 log 0 = 0 on either side (a one-hot teacher has 1 - a_g = 0)
    la_bin = torch.stack([la_g, la_ng], -1)
    lb_bin = torch.stack([lb_g, lb_ng], -1)
    dead = la_ng == NEG_INF  # no non-target mass in a: DKD has weight 0, define it as 0
    la_hat = la_rest - torch.where(dead, torch.zeros_like(la_ng), la_ng).unsqueeze(-1)
    lb_hat = lb_rest - torch.where(lb_ng == NEG_INF, torch.zeros_like(lb_ng), lb_ng).unsqueeze(-1)
    with _neg_inf_known(True):  # the masked target column is -inf by construction: sanitise, never look
        tkd = ops.share(kl(la_bin, lb_bin))  # a 2-column local row, whole on every rank: added to a total
        dkd = torch.where(dead, torch.zeros_like(tkd), kl(la_hat, lb_hat, ops))
    return tkd, dkd, torch.exp(la_ng)


def hard_token_mask(unc: Tensor, valid: Tensor, groups: Tensor, hard_fraction: float,
                    n_groups: int | None = None) -> Tensor:
    """Top ceil(hard_fraction * n) valid tokens by uncertainty within each group (ties broken by position).
    unc, valid, groups: [N]. Invalid tokens are never hard and never counted."""
    n = unc.numel()
    if n == 0:
        return torch.zeros_like(valid)
    key = torch.where(valid, unc.detach().double(), torch.full((n,), NEG_INF, dtype=torch.float64, device=unc.device))
    by_unc = torch.argsort(key, descending=True, stable=True)
    order = by_unc[torch.argsort(groups[by_unc], stable=True)]  # grouped, most uncertain first within a group
    if n_groups is None:
        n_groups = int(groups.max().item()) + 1
    counts = torch.bincount(groups, minlength=n_groups)
    rank = torch.arange(n, device=unc.device) - (torch.cumsum(counts, 0) - counts)[groups[order]]
    n_valid = torch.bincount(groups, weights=valid.double(), minlength=n_groups)
    k = torch.ceil(hard_fraction * n_valid - 1e-9)
    hard = torch.zeros_like(valid)
    hard[order] = (rank < k[groups[order]]) & valid[order]
    return hard


def sequence_groups(shape: torch.Size, scope: str, device: torch.device) -> Tensor:
    """Group id per token [prod(shape)]: one group per row of the leading dims ('sequence') or one ('batch')."""
    n = math.prod(shape)
    if scope == "sequence" and len(shape) >= 2:
        return torch.arange(n // shape[-1], device=device).repeat_interleave(shape[-1])
    return torch.zeros(n, dtype=torch.long, device=device)


def atkd_token_weights(unc: Tensor, valid: Tensor, groups: Tensor, *, lam: float, hard_fraction: float,
                       normalize: str, n_groups: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-token weights (w_tkd, w_dkd) [N] so that sum(w_tkd TKD + w_dkd DKD) / n_valid is ATKD's loss.
    Hard tokens get (1-lam) on TKD + DKD, easy ones lam on DKD only; 'group_mean' rescales each group's tokens by
    n_valid / n_group within its scope (an empty group contributes 0). Needs every token of a scope at once, so the
    chunked path computes it in a separate pass over the teacher."""
    if n_groups is None:
        n_groups = int(groups.max().item()) + 1 if groups.numel() else 1
    hard = hard_token_mask(unc, valid, groups, hard_fraction, n_groups)
    easy = valid & ~hard
    dtype = unc.dtype if unc.is_floating_point() else torch.float32
    w_hard = torch.full(unc.shape, 1.0 - lam, dtype=dtype, device=unc.device)
    w_easy = torch.full(unc.shape, lam, dtype=dtype, device=unc.device)
    if normalize == "group_mean":
        def count(m):
            return torch.zeros(n_groups, dtype=dtype, device=unc.device).index_add_(0, groups, m.to(dtype))
        n_valid, n_hard, n_easy = count(valid), count(hard), count(easy)
        w_hard = w_hard * (n_valid / n_hard.clamp_min(1))[groups]
        w_easy = w_easy * (n_valid / n_easy.clamp_min(1))[groups]
    w_tkd = torch.where(hard, w_hard, torch.zeros_like(w_hard))
    w_dkd = torch.where(hard, w_hard, torch.where(easy, w_easy, torch.zeros_like(w_easy)))
    return w_tkd, w_dkd


def atkd_uncertainty(lp: Tensor, targets: Tensor, ops=LOCAL) -> Tensor:
    """The teacher's uncertainty 1 - p_g per token (detached): what splits hard from easy tokens."""
    is_g = ops.column_ids(lp.shape[-1], lp.device) == targets.unsqueeze(-1)
    (lp_g,) = ops.sum(torch.where(is_g, lp.detach(), torch.zeros_like(lp)))
    return -torch.expm1(lp_g)


def atkd(lp: Tensor, lq: Tensor, ops=LOCAL, *, targets: Tensor, mask: Tensor, lam: float = 0.2,
         hard_fraction: float = 0.5, scope: str = "sequence", normalize: str = "group_mean",
         keep_unc: bool = False, reverse: bool = False, groups: Tensor | None = None,
         token_weights: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """ATKD: lam * mean_easy[DKD] + (1 - lam) * mean_hard[TKD + DKD] (official defaults: lam 0.2, 50% hard, the
    uncertainty weight 1 - p_g dropped). Hard tokens are the most uncertain for the teacher (1 - p_g) within a
    scope: 'sequence' (each row of the leading dims), 'batch' (all tokens given) or explicit `groups` ids.

    Returned per token so that the caller's token mean reproduces the formula (see atkd_token_weights).
    keep_unc=True multiplies DKD by 1 - p_g (all hard, lam = 0: exactly forward KL). reverse=True decomposes
    KL(q || p) instead, still split by the teacher's uncertainty. `token_weights` (flattened, from
    atkd_token_weights) skips the split, for callers that see a scope in several chunks."""
    first, second = (lq, lp) if reverse else (lp, lq)
    tkd, dkd, unc_first = target_decomposition(first, second, targets, ops)
    if keep_unc:
        dkd = unc_first * dkd
    if token_weights is None:
        unc = atkd_uncertainty(lp, targets, ops) if reverse else unc_first.detach()
        if groups is None:
            groups = sequence_groups(tkd.shape, scope, tkd.device)
        token_weights = atkd_token_weights(unc.reshape(-1), mask.reshape(-1), groups.reshape(-1), lam=lam,
                                           hard_fraction=hard_fraction, normalize=normalize)
    w_tkd, w_dkd = (w.reshape(tkd.shape).to(tkd.dtype) for w in token_weights)
    return w_tkd * tkd + w_dkd * dkd


# --------------------------------------------------------------------------------------------------------------
# Label cross-entropy and agreement (the optional hard-label term, and a metric)
# --------------------------------------------------------------------------------------------------------------
def cross_entropy(student_logits: Tensor, targets: Tensor, ops=LOCAL) -> Tensor:
    """-log q_target per token (logsumexp minus the target logit; the target column found by global id). A total:
    only the rank holding the target column contributes."""
    z = upcast(student_logits)
    (lse,) = logsumexp(z, ops=ops)
    is_g = ops.column_ids(z.shape[-1], z.device) == targets.unsqueeze(-1)
    (ce,) = ops.total(torch.where(is_g, lse.unsqueeze(-1) - z, 0.0))
    return ce


@torch.no_grad()
def top1_agreement(student_logits: Tensor, teacher_logits: Tensor, ops=LOCAL) -> Tensor:
    """1.0 where the student's and the teacher's most likely tokens coincide (over the whole vocabulary; with ties,
    where some column is a maximum of both). One round: every rank's (max, max, a column holding both maxima)."""
    ms, mt = student_logits.amax(-1), teacher_logits.amax(-1)
    both = ((student_logits == ms.unsqueeze(-1)) & (teacher_logits == mt.unsqueeze(-1))).any(-1)
    dt = torch.promote_types(ms.dtype, mt.dtype)
    g = ops.gather(torch.stack([ms.to(dt), mt.to(dt), both.to(dt)], -1))  # [ranks, ..., 3]
    at_max = (g[..., 0] == g[..., 0].amax(0)) & (g[..., 1] == g[..., 1].amax(0))
    return (at_max & (g[..., 2] > 0)).any(0).float()


# --------------------------------------------------------------------------------------------------------------
# One entry point: method name + options (from config) -> loss callable
# --------------------------------------------------------------------------------------------------------------
def _check_unit(name: str, v: float) -> None:
    if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")


def _check_finite(name: str, v: float) -> None:
    if not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")


def _check_choice(name: str, v, choices) -> None:
    if v not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {v!r}")


def _check_bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false, got {v!r}")


def _validate_amid(o: dict) -> None:
    _check_finite("alpha", o["alpha"])
    _check_unit("lam", o["lam"])
    _check_choice("divergence", o["divergence"], DIVERGENCES)
    _check_choice("order", o["order"], {"pr", "qr", "rp", "rq"})
    _check_bool("detach_student_in_r", o["detach_student_in_r"])
    for k in ("ab_alpha", "ab_beta", "amari_alpha"):
        _check_finite(k, o[k])
    _check_unit("jsd_beta", o["jsd_beta"])


def _amid(lp, lq, ops, *, ab_alpha, ab_beta, amari_alpha, jsd_beta, divergence, **o):
    div_options = {"ab": {"alpha": ab_alpha, "beta": ab_beta}, "alpha": {"alpha": amari_alpha},
                   "jsd": {"beta": jsd_beta}}.get(divergence, {})
    return amid(lp, lq, ops, divergence=divergence, div_options=div_options, **o)


def _amid_log_probs(zt: Tensor, zs: Tensor, ops, o: dict) -> tuple[Tensor, Tensor, dict]:
    if o["detach_student_in_r"]:  # r holds no student gradient: the plain path has one backward round already
        return *log_normalize(zt, zs, ops=ops), {}
    lp, lq, lr = mixture_log_probs(zt, zs, alpha=o["alpha"], lam=o["lam"], ops=ops)
    return lp, lq, {"lr": lr}


def _validate_atkd(o: dict) -> None:
    _check_unit("lam", o["lam"])
    _check_unit("hard_fraction", o["hard_fraction"])
    _check_choice("scope", o["scope"], {"sequence", "batch"})
    _check_choice("normalize", o["normalize"], {"group_mean", "token_mean"})
    _check_bool("keep_unc", o["keep_unc"])
    _check_bool("reverse", o["reverse"])


@dataclass(frozen=True)
class Method:
    fn: Callable[..., Tensor]
    defaults: dict
    validate: Callable[[dict], None]
    needs_targets: bool = False
    doc: str = ""
    pre_pass: Callable[[dict], "TeacherPrePass"] | None = None
    """For methods whose per-token weights need a whole scope (ATKD): options -> the chunked path's hook."""
    log_probs: Callable[..., tuple[Tensor, Tensor, dict]] | None = None
    """(teacher logits, student logits, ops, options) -> (lp, lq, extra keyword arguments of fn), for methods that
    normalise more than p and q (AMiD's mixture); default: log_normalize."""


class TeacherPrePass(NamedTuple):
    """A teacher-only pass the chunked loss runs over all tokens before the loss chunks: `token_stat(teacher
    log-probs [c, V'], targets [c], ops) -> [c]` per chunk, then `overrides(stats [N], valid [N], groups [N],
    n_groups) -> {name: tuple of [N] tensors}`, sliced per chunk and passed to the loss as keyword arguments."""
    token_stat: Callable[..., Tensor]
    overrides: Callable[..., dict]


def _atkd_pre_pass(o: dict) -> TeacherPrePass:
    def overrides(unc, valid, groups, n_groups):
        if o["scope"] == "batch":
            groups, n_groups = torch.zeros_like(groups), 1
        return {"token_weights": atkd_token_weights(unc, valid, groups, lam=o["lam"], hard_fraction=o["hard_fraction"],
                                                    normalize=o["normalize"], n_groups=n_groups)}
    return TeacherPrePass(atkd_uncertainty, overrides)


METHODS: dict[str, Method] = {
    "fkl": Method(lambda lp, lq, ops: kl(lp, lq, ops), {}, lambda o: None, doc="KL(p || q)"),
    "rkl": Method(lambda lp, lq, ops: kl(lq, lp, ops), {}, lambda o: None, doc="KL(q || p)"),
    "tvd": Method(total_variation, {}, lambda o: None, doc="1/2 ||p - q||_1"),
    "gjsd": Method(generalized_jsd, {"beta": 0.5}, lambda o: _check_unit("beta", o["beta"]),
                   doc="beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q"),
    "skl": Method(skew_kl, {"alpha": 0.1}, lambda o: _check_unit("alpha", o["alpha"]),
                  doc="KL(p || alpha p + (1-alpha) q)"),
    "srkl": Method(skew_reverse_kl, {"alpha": 0.1}, lambda o: _check_unit("alpha", o["alpha"]),
                   doc="KL(q || (1-alpha) p + alpha q)"),
    "alpha_divergence": Method(amari_alpha, {"alpha": 0.5}, lambda o: _check_finite("alpha", o["alpha"]),
                               doc="Amari alpha-divergence D_alpha(p || q)"),
    "ab_divergence": Method(ab_divergence, {"alpha": 0.2, "beta": 0.7},
                            lambda o: (_check_finite("alpha", o["alpha"]), _check_finite("beta", o["beta"])),
                            doc="alpha-beta divergence D_AB(p || q)"),
    "amid": Method(_amid, {"alpha": 0.5, "lam": 0.1, "divergence": "ab", "order": "pr",
                           "detach_student_in_r": False, "ab_alpha": 0.2, "ab_beta": 0.7, "amari_alpha": 0.5,
                           "jsd_beta": 0.5}, _validate_amid,
                   doc="D(p or q, r), r the alpha-mixture of p (weight lam) and q", log_probs=_amid_log_probs),
    "taid": Method(taid, {"t": 0.4, "form": "kl"},
                   lambda o: (_check_unit("t", o["t"]), _check_choice("form", o["form"], {"kl", "ce"})),
                   doc="KL(p_t || q), p_t = softmax((1-t) sg(z_s) + t z_t)"),
    "atkd": Method(atkd, {"lam": 0.2, "hard_fraction": 0.5, "scope": "sequence", "normalize": "group_mean",
                          "keep_unc": False, "reverse": False}, _validate_atkd, needs_targets=True, pre_pass=_atkd_pre_pass,
                   doc="lam DKD(easy) + (1-lam) (TKD + DKD)(hard)"),
}


def resolve_options(method: str, options: dict) -> dict:
    """Defaults merged with `options`, validated: a ValueError names the method and the field to fix."""
    if method not in METHODS:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {sorted(METHODS)}")
    spec = METHODS[method]
    unknown = set(options) - set(spec.defaults) - {"temperature"}
    if unknown:
        raise ValueError(f"{method}: unknown option(s) {sorted(unknown)}; "
                         f"valid options are {sorted(spec.defaults) + ['temperature']}")
    merged = {**spec.defaults, **{k: v for k, v in options.items() if k != "temperature"}}
    try:
        spec.validate(merged)
    except ValueError as e:
        raise ValueError(f"{method}: {e}") from None
    temperature = options.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"{method}: temperature must be a positive number, got {temperature!r}")
    return {**merged, "temperature": float(temperature)}


def make_loss(method: str, **options) -> Callable[..., Tensor]:
    """Validate once (at config time) and return loss(student_logits, teacher_logits, *, mask=None, targets=None,
    ops=LOCAL, **overrides) -> per-token values. Overrides carry per-step state such as TAID's t or a scheduled
    AMiD lam; they are validated on each call."""
    resolved = resolve_options(method, options)
    spec = METHODS[method]

    def loss(student_logits: Tensor, teacher_logits: Tensor, *, mask: Tensor | None = None,
             targets: Tensor | None = None, ops=LOCAL, groups: Tensor | None = None,
             token_weights: tuple[Tensor, Tensor] | None = None, **overrides) -> Tensor:
        o = resolve_options(method, {**resolved, **overrides}) if overrides else dict(resolved)
        temperature = o.pop("temperature")
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} differ: the models must share a vocabulary "
                             f"(mask padded rows to -inf rather than slicing)")
        zs, zt = upcast(student_logits), upcast(teacher_logits)
        masked = mask is not None  # no mask (the fused path): every row counts, and no host read to find out
        if mask is None:
            mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
        elif torch.compiler.is_compiling() or not bool(mask.all()):  # masked rows may hold garbage: zero them so nothing non-finite enters the graph
            keep = mask.unsqueeze(-1)
            zs, zt = torch.where(keep, zs, 0.0), torch.where(keep, zt, 0.0)
        if temperature != 1.0:
            zs, zt = zs / temperature, zt / temperature
        lp, lq, extra = spec.log_probs(zt, zs, ops, o) if spec.log_probs else (*log_normalize(zt, zs, ops=ops), {})
        if spec.needs_targets:
            if targets is None:
                raise ValueError(f"{method} needs the target token ids (targets=...)")
            safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
            value = spec.fn(lp, lq, ops, targets=safe_targets, mask=mask, groups=groups, token_weights=token_weights,
                            **o)
        else:
            value = spec.fn(lp, lq, ops, **extra, **o)
        return torch.where(mask, value, torch.zeros_like(value)) if masked else value

    loss.method = method
    loss.options = resolved
    loss.teacher_pre_pass = spec.pre_pass(resolved) if spec.pre_pass else None
    loss.needs_targets = spec.needs_targets
    return loss


def distillation_loss(method: str, student_logits: Tensor, teacher_logits: Tensor, *, mask: Tensor | None = None,
                      targets: Tensor | None = None, ops=LOCAL, groups: Tensor | None = None, **options) -> Tensor:
    """Per-token distillation loss [...] for `method` in METHODS (0 where mask is False)."""
    return make_loss(method, **options)(student_logits, teacher_logits, mask=mask, targets=targets, ops=ops,
                                        groups=groups)


def scheduled_value(start: float, end: float, step: int, total_steps: int, kind: str = "linear") -> float:
    """A scalar schedule (e.g. AMiD's lam): constant, linear or cosine from start to end over total_steps."""
    if kind == "constant" or total_steps <= 0:
        return start
    frac = min(max(step / total_steps, 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * frac
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"schedule kind must be constant, linear or cosine, got {kind!r}")
