"""The distributed distillation loss: vocabulary-sharded logits, chunked over tokens, never the full logits.

Legend: N tokens, Nk this rank's tokens, H hidden size (Hs student, Ht teacher), V vocab, Vp = this rank's shard of
the vocabulary rows [start, start + Vp). P ranks in `group`; group=None is the single-process path (no collectives).

How the gradients stay exact (shared/research/peers.md §2.4: a right loss value proves nothing about gradients):
every per-token statistic over the vocabulary is a local sum followed by an autograd-aware SUM all-reduce
(`_AllReduceSum`, whose backward all-reduces the incoming gradient), and the loss that comes out is replicated on
every rank. Each rank then backpropagates that replicated loss; `_replicated` divides its incoming gradient by P, so
the sum over ranks of the backward contributions is exactly one copy of the true gradient. Shifts for logsumexp are
detached MAX all-reduces (constants for the gradient). The formulas themselves live once, in losses.py.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from pipeline.loss import divergences as losses

NEG_INF = float("-inf")


def _world(group) -> int:
    return 1 if group is None else _group_size(group)


def _rank(group) -> int:
    return 0 if group is None else _group_rank(group)


# Collectives and group queries stay outside torch.compile (loss.compile): Dynamo cannot trace a ProcessGroup
# argument, so each is a graph break and runs eagerly, while the elementwise work between them is still compiled.
# Without a group (one shard) none of them is called and the chunk loss compiles whole.
@torch.compiler.disable
def _group_size(group) -> int:
    return dist.get_world_size(group)


@torch.compiler.disable
def _group_rank(group) -> int:
    return dist.get_rank(group)


@torch.compiler.disable
def _all_reduce(t: Tensor, group) -> None:
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


@torch.compiler.disable
def _all_gather(parts: list, t: Tensor, group) -> None:
    dist.all_gather(parts, t, group=group)


def shard_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, end) of a vocabulary of `vocab_size` owned by `rank`: torch.chunk's split (the first shards get
    ceil(V / P) rows), which is also how FSDP2 shards dim 0, so an lm_head sharded by FSDP lines up."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a group of {world_size}")
    per = math.ceil(vocab_size / world_size)
    start = min(rank * per, vocab_size)
    return start, min(start + per, vocab_size)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        y = x.clone()
        _all_reduce(y, group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = grad.contiguous().clone()
        _all_reduce(g, ctx.group)
        return g, None


class _Replicated(torch.autograd.Function):
    """Identity forward; backward divides by P because every rank backpropagates the same replicated value."""

    @staticmethod
    def forward(ctx, x: Tensor, world: int) -> Tensor:
        ctx.world = world
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad / ctx.world, None


def replicated(x: Tensor, group) -> Tensor:
    """Mark a value that every rank of `group` computed identically from all-reduced statistics."""
    world = _world(group)
    return x if world == 1 or not x.requires_grad else _Replicated.apply(x, world)


class _GroupLogSumExp(torch.autograd.Function):
    """Row logsumexp of each x over the vocabulary split across `group`, in ONE all-gather of every rank's local
    (max, sum of exp) pairs (max-then-sum would take two rounds). Backward: the upstream gradient is each rank's
    part of d loss / d lse, so one all-reduce (of all the xs that need a gradient) makes it whole; then
    d lse / dx = softmax, local."""

    @staticmethod
    def forward(ctx, group, *xs: Tensor) -> tuple[Tensor, ...]:
        m = torch.stack([x.amax(-1) for x in xs])                              # [k, ...], -inf for a dead shard
        shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = torch.stack([torch.exp(x - c.unsqueeze(-1)).sum(-1) for x, c in zip(xs, shift)])
        local = torch.stack([m, s]).contiguous()
        parts = [torch.empty_like(local) for _ in range(_world(group))]
        _all_gather(parts, local, group)
        m_all, s_all = torch.stack(parts).unbind(1)                            # [P, k, ...] each
        top = m_all.amax(0)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        # exp(-inf - top) = 0 for a dead shard, whose sum is 0 too
        lse = top + torch.log((s_all * torch.exp(m_all - top)).sum(0))
        ctx.group = group
        ctx.save_for_backward(lse, *xs)
        out = tuple(t.clone() for t in lse.unbind(0))
        # a constant's normaliser (the teacher's) stays a constant: nothing downstream of it runs a backward round
        ctx.mark_non_differentiable(*[o for i, o in enumerate(out) if not ctx.needs_input_grad[i + 1]])
        return out

    @staticmethod
    def backward(ctx, *grads: Tensor):
        lse, *xs = ctx.saved_tensors
        need = [i for i, x in enumerate(xs) if ctx.needs_input_grad[i + 1]]
        total = torch.stack([grads[i] if grads[i] is not None else torch.zeros_like(lse[i]) for i in need])
        _all_reduce(total, ctx.group)
        out = [None] * len(xs)
        for j, i in enumerate(need):
            row = lse[i].unsqueeze(-1)
            prob = torch.where(torch.isfinite(row), torch.exp(xs[i] - row), torch.zeros_like(xs[i]))
            out[i] = total[j].unsqueeze(-1) * prob
        return (None, *out)


class _SumShares(torch.autograd.Function):
    """The replicated sum of every rank's share of a value; backward hands each rank the replicated gradient (the
    shares' sum depends on each share with weight 1, and every rank backpropagates the same upstream value)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        y = x.clone()
        _all_reduce(y, group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class ShardedVocab:
    """losses.py's reduction interface over a vocabulary split across `group`: this rank holds the columns
    [start, start + width). Tensors passed to one call are reduced in ONE collective (stacked), so a round of
    per-token scalars costs one collective whatever the number of statistics.

    partial_totals=True: `total` returns this rank's share (no collective in either pass) and `share` divides a
    replicated value by the group size, so the loss is a share too; the caller sums the shares once (the fused
    loss: once per call, not per chunk). False: totals are all-reduced and the loss is replicated."""

    def __init__(self, group, start: int, partial_totals: bool = False):
        self.group = group
        self.start = start
        self.partial = partial_totals and _world(group) > 1

    def sum(self, *xs: Tensor) -> tuple[Tensor, ...]:
        if _world(self.group) == 1:  # nothing to batch; stacking reductions also defeats Inductor's fusion (2.7x)
            return tuple(x.sum(-1) for x in xs)
        local = torch.cat([x.sum(-1, keepdim=True) for x in xs], -1)  # [..., k]: one all-reduce for k statistics
        return tuple(_AllReduceSum.apply(local, self.group).unbind(-1))

    def total(self, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(x.sum(-1) for x in xs) if self.partial else self.sum(*xs)

    def share(self, x: Tensor) -> Tensor:
        return x / _world(self.group) if self.partial else x

    def reduce(self, x: Tensor) -> Tensor:
        if _world(self.group) == 1:
            return x
        y = x.contiguous().clone()
        _all_reduce(y, self.group)
        return y

    def logsumexp(self, *xs: Tensor) -> tuple[Tensor, ...]:
        if _world(self.group) == 1:
            return losses.LOCAL.logsumexp(*xs)
        return _GroupLogSumExp.apply(self.group, *xs)

    def gather(self, x: Tensor) -> Tensor:
        """Every rank's per-row statistics x [..., k], stacked [P, ..., k] (no gradient: metrics)."""
        if _world(self.group) == 1:
            return x.unsqueeze(0)
        parts = [torch.empty_like(x) for _ in range(_world(self.group))]
        _all_gather(parts, x.detach().contiguous(), self.group)
        return torch.stack(parts)

    def column_ids(self, width: int, device: torch.device) -> Tensor:
        return torch.arange(self.start, self.start + width, device=device)


def mask_padded_columns(logits: Tensor, start: int, vocab_size: int | None) -> Tensor:
    """-inf in the columns whose global id is >= the real vocabulary size (padded output-layer rows), in both
    models: those tokens do not exist, and the losses treat -inf columns as zero mass with finite gradients."""
    if vocab_size is None or start + logits.shape[-1] <= vocab_size:
        return logits
    ids = torch.arange(start, start + logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= vocab_size, NEG_INF)


def sharded_loss(loss_fn: Callable[..., Tensor], student_shard: Tensor, teacher_shard: Tensor, *, group,
                 vocab_start: int, vocab_size: int | None = None, **kwargs) -> Tensor:
    """Per-token loss [...] from vocab-sharded logits [..., Vp]; replicated on every rank of `group`.
    `loss_fn` comes from losses.make_loss; kwargs (mask, targets, per-step overrides) pass through."""
    ops = ShardedVocab(group, vocab_start)
    zs = mask_padded_columns(student_shard, vocab_start, vocab_size)
    zt = mask_padded_columns(teacher_shard, vocab_start, vocab_size)
    return replicated(loss_fn(zs, zt, ops=ops, **kwargs), group)


# ----------------------------------------------------------------------------------------------------------------
# Teacher top-k: the teacher keeps its k largest log-probs plus one bucket for the leftover mass
# ----------------------------------------------------------------------------------------------------------------
def topk_teacher(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(log-probs [..., k], ids [..., k]) of the teacher's k most likely tokens, as stored offline. Normalised
    over the full vocabulary, so the leftover mass 1 - sum(exp) is known to the loss."""
    lp = torch.log_softmax(losses.upcast(teacher_logits), -1)
    return torch.topk(lp, k, dim=-1)


def _log1mexp_sum(lk: Tensor) -> Tensor:
    """log(1 - sum exp(lk)) over the last dim, exact when the k entries hold almost all of the mass."""
    lse = torch.logsumexp(lk, -1)
    # log(-expm1(x)) is exact for x near 0 (almost all mass in the top-k); clamp keeps it finite at exactly 0
    return torch.log(-torch.expm1(lse.clamp_max(-1e-30)))


def topk_loss(loss_fn: Callable[..., Tensor], student_shard: Tensor, teacher_logprobs: Tensor,
              teacher_ids: Tensor, *, group=None, vocab_start: int = 0, vocab_size: int | None = None,
              mask: Tensor | None = None, **kwargs) -> Tensor:
    """Any loss on the (k+1)-way distributions: the teacher's top-k tokens plus one bucket for the rest of the
    vocabulary, for teacher and student alike (ModelOpt / NeMo-RL's residual-mass treatment, exact normalisation).
    The student's log-probs at the teacher's ids are gathered from the vocab shards with one SUM round."""
    ops = ShardedVocab(group, vocab_start)
    zs = mask_padded_columns(losses.upcast(student_shard), vocab_start, vocab_size)
    if mask is not None:
        zs = torch.where(mask.unsqueeze(-1), zs, 0.0)
    (lq,) = losses.log_normalize(zs, ops=ops)
    local = (teacher_ids >= vocab_start) & (teacher_ids < vocab_start + zs.shape[-1])
    idx = (teacher_ids - vocab_start).clamp(0, zs.shape[-1] - 1)
    picked = torch.where(local, lq.gather(-1, idx), torch.zeros_like(teacher_logprobs, dtype=lq.dtype))
    if _world(group) > 1:
        picked = _AllReduceSum.apply(picked, group)
    lt = losses.upcast(teacher_logprobs)
    student_k1 = torch.cat([picked, _log1mexp_sum(picked).unsqueeze(-1)], -1)
    teacher_k1 = torch.cat([lt, _log1mexp_sum(lt).unsqueeze(-1)], -1)
    if "targets" in kwargs and kwargs["targets"] is not None:  # ATKD: target id -> its top-k slot, else the bucket
        tg = kwargs["targets"].unsqueeze(-1)
        hit = teacher_ids == tg
        kwargs["targets"] = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(tg[..., 0], lt.shape[-1]))
    return replicated(loss_fn(student_k1, teacher_k1, mask=mask, **kwargs), group)


# ----------------------------------------------------------------------------------------------------------------
# The fused output layer + loss: chunked over tokens, gradients computed in the forward pass
# ----------------------------------------------------------------------------------------------------------------
def _gather_tokens(x: Tensor, n_max: int, group) -> Tensor:
    """All ranks' rows of x [Nk, ...] padded to n_max -> [P * n_max, ...] (gloo has no uneven all_gather)."""
    pad = x.new_zeros((n_max - x.shape[0],) + tuple(x.shape[1:]))
    x = torch.cat([x, pad]).contiguous()
    if _world(group) == 1:
        return x
    out = [torch.empty_like(x) for _ in range(_world(group))]
    _all_gather(out, x, group)
    return torch.cat(out)


def _sum_to_owners(x: Tensor, n_max: int, group) -> Tensor:
    """Sum the per-rank partial gradients of all gathered tokens [P * n_max, H] and keep this rank's rows."""
    if _world(group) > 1:
        if dist.get_backend(group) == "nccl":
            out = x.new_empty((n_max,) + tuple(x.shape[1:]))
            dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
            return out
        dist.all_reduce(x, group=group)  # gloo has no reduce_scatter: reduce everything, keep our slice
    r = _rank(group)
    return x[r * n_max:(r + 1) * n_max]


@dataclass(frozen=True)
class LossSpec:
    """Everything about one fused-loss call that is not a tensor."""
    loss_fn: Callable[..., Tensor]
    group: object = None             # the vocab-parallel group (a shard group); None: one rank, no collectives
    vocab_start: int = 0             # first vocabulary row of this rank's output-layer shards
    vocab_size: int | None = None    # real vocabulary: columns at or beyond it are masked to -inf
    chunk_size: int = 1024
    compile: bool = False
    ce_weight: float = 0.0
    precision: str = "highest"       # loss.matmul_precision
    overrides: tuple = ()            # per-step method values as (name, value) pairs, e.g. TAID's t

    @property
    def world(self) -> int:
        return _world(self.group)


def chunk_rows(memory_mb: float, vocab_shard: int, copies: int = 8) -> int:
    """Rows per loss chunk so that `copies` fp32 [rows, vocab_shard] buffers (both models' logits, log-probs, the
    method's intermediates and the logits' gradient) fit in memory_mb; a multiple of 64, at least 64."""
    rows = int(memory_mb * 2**20 / (4 * copies * max(vocab_shard, 1)))
    return max(64, rows // 64 * 64)


class _Matmul:
    """The loss's output-layer matmuls at loss.matmul_precision. highest: fp32. high: TF32 on CUDA (CPUs have no
    TF32: fp32). bf16: operands rounded to bf16, products accumulated and returned in fp32; on CUDA the bf16 GEMM
    with an fp32 output, on CPUs an fp32 GEMM of the rounded operands (the same numbers: a product of two bf16
    values is exact in fp32)."""

    def __init__(self, precision: str, device: torch.device):
        self.precision, self.cuda = precision, device.type == "cuda"

    def operand(self, x: Tensor) -> Tensor:
        x = losses.upcast(x)
        if self.precision != "bf16":
            return x
        return x.bfloat16() if self.cuda else x.bfloat16().float()

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        if not self.cuda or self.precision == "highest":
            return a @ b
        if self.precision == "high":
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return a @ b
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without the bf16 -> fp32 GEMM
            return (a @ b).float()

    def add_to(self, out: Tensor, a: Tensor, b: Tensor) -> None:
        """out += a @ b, in place when the operands are fp32 (no [Vp, H] temporary per chunk)."""
        if a.dtype == torch.float32 and (not self.cuda or self.precision == "highest"):
            out.addmm_(a, b)
        else:
            out.add_(self(a, b))


def _rows(x: Tensor, c0: int, c1: int, n: int) -> Tensor:
    """Rows [c0, c1) of x, zero-padded to n rows (compile's one static chunk shape)."""
    part = x[c0:c1]
    if part.shape[0] == n:
        return part
    return torch.cat([part, part.new_zeros((n - part.shape[0],) + tuple(part.shape[1:]))])


def group_max_rows(nk: int, group, device) -> int:
    """The most rows any rank of `group` holds (one MAX all-reduce and one host read). The training step avoids
    this call: it learns every micro-batch's sizes with its one per-step exchange and passes n_max."""
    if _world(group) == 1:
        return nk
    sizes = torch.tensor([nk], dtype=torch.long, device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    return int(sizes.item())


def _gather_rows(spec: LossSpec, n_max: int, *xs: Tensor) -> list[Tensor]:
    """Step 1, gather tokens: every rank of the group gets every rank's rows (padded to n_max, zero weight), which
    is what makes the vocabulary split a pure loss-side split."""
    return [_gather_tokens(x, n_max, spec.group) for x in xs]


def _plan_chunks(spec: LossSpec, rows: int) -> list[tuple[int, int]]:
    """Step 2, plan chunks: [c0, c1) over the gathered rows. Sizes are known on the host (no data-dependent
    count), so every rank runs the same chunks and the same collectives."""
    return [(c0, min(c0 + spec.chunk_size, rows)) for c0 in range(0, rows, spec.chunk_size)]


@torch.no_grad()
def _teacher_logits(spec: LossSpec, mm: _Matmul, h: Tensor, wt_op: Tensor) -> Tensor:
    """The teacher's logits [c, Vp] of rows h at loss.matmul_precision, padded columns at -inf."""
    return mask_padded_columns(mm(mm.operand(h), wt_op), spec.vocab_start, spec.vocab_size)


@dataclass
class _Pass:
    """What every chunk of one call shares: the spec, the vocabulary reductions, the matmul at the chosen precision,
    both output layers as matmul operands (prepared once per call, not per chunk), whether gradients are wanted,
    and the chunk loss (compiled or not)."""
    spec: LossSpec
    ops: ShardedVocab
    mm: _Matmul
    ws_op: Tensor
    wt_op: Tensor
    needs_grad: bool
    chunk_fn: Callable[..., Tensor]


@dataclass
class _Chunk:
    """One chunk's rows: the student's hidden states (a matmul operand), the teacher's logits, the token weights
    and targets, and the method's per-token overrides."""
    h: Tensor
    zt: Tensor
    w: Tensor
    targets: Tensor
    kw: dict


def _pre_pass(p: _Pass, ht: Tensor, tg: Tensor, valid: Tensor, groups: Tensor, *, n_groups: int, chunks) -> dict:
    """A method's teacher-only pass over all tokens (ATKD's hard/easy split needs whole scopes)."""
    pre = p.spec.loss_fn.teacher_pre_pass
    stat = torch.zeros(ht.shape[0], device=ht.device)
    with torch.no_grad():
        for c0, c1 in chunks:
            (lp,) = losses.log_normalize(_teacher_logits(p.spec, p.mm, ht[c0:c1], p.wt_op), ops=p.ops)
            stat[c0:c1] = pre.token_stat(lp, tg[c0:c1], p.ops)
    return pre.overrides(stat, valid, groups, n_groups)


def _chunk_gradient(p: _Pass, c: _Chunk):
    """Step 3, one chunk: the student's logits, this rank's share of the weighted loss sum, and the gradient of the
    whole loss with respect to this rank's logits (each rank backpropagates its own share; the normalisers'
    backward all-reduces make the gradient whole)."""
    with torch.enable_grad():
        zs = p.mm(c.h, p.ws_op).requires_grad_(p.needs_grad)
        value = p.chunk_fn(zs, c.zt, c.w, c.targets, p.ops, c.kw)
        g_z = torch.autograd.grad(value, zs)[0] if p.needs_grad else None
    return value.detach(), zs.detach(), g_z


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs: Tensor, ht: Tensor, ws: Tensor, wt: Tensor, weight: Tensor, targets: Tensor,
                groups: Tensor, spec: LossSpec, n_max: int, n_groups: int, stats: Tensor | None):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        nk, dev = hs.shape[0], hs.device
        all_hs, all_ht, all_w, all_tg, all_gr = _gather_rows(
            spec, n_max, hs.detach(), ht.detach(), weight.detach().float(), targets, groups)
        rows = all_hs.shape[0]
        # scope ids are per rank: rank r's ids live above rank r-1's (n_groups bounds every rank's ids)
        all_gr = all_gr + torch.arange(rows, device=dev) // max(n_max, 1) * n_groups
        chunks = _plan_chunks(spec, rows)
        mm = _Matmul(spec.precision, dev)
        # shares of the totals: a chunk's last vocabulary sum costs no collective; the shares add up once, below
        p = _Pass(spec, ShardedVocab(spec.group, spec.vocab_start, partial_totals=True), mm,
                  mm.operand(ws.detach()).t(), mm.operand(wt).t(), needs_grad,
                  _compiled_chunk(spec) if spec.compile else functools.partial(_chunk_loss, spec=spec))
        # matmul outputs are finite unless padded columns are masked: then -inf checks are not needed (no host sync)
        finite = spec.vocab_size is None or spec.vocab_start + ws.shape[0] <= spec.vocab_size
        with losses.finite_logits() if finite else contextlib.nullcontext():
            per_token = {}
            if spec.loss_fn.teacher_pre_pass is not None:
                per_token = _pre_pass(p, all_ht, all_tg, all_w != 0, all_gr, n_groups=n_groups * spec.world,
                                      chunks=chunks)
            total = torch.zeros((), dtype=torch.float64, device=dev)
            grad_all_h = torch.zeros(all_hs.shape, dtype=torch.float32, device=dev) if needs_grad else None
            grad_ws = torch.zeros(ws.shape, dtype=torch.float32, device=dev) if needs_grad else None
            for c0, c1 in chunks:
                n = spec.chunk_size if spec.compile else c1 - c0  # compile: one static shape, zero-weight padding
                kw = dict(spec.overrides)
                kw.update({k: tuple(_rows(t, c0, c1, n) for t in v) for k, v in per_token.items()})
                c = _Chunk(mm.operand(_rows(all_hs, c0, c1, n)), _teacher_logits(spec, mm, _rows(all_ht, c0, c1, n),
                                                                                 p.wt_op),
                           _rows(all_w, c0, c1, n), _rows(all_tg, c0, c1, n), kw)
                value, zs, g_z = _chunk_gradient(p, c)
                total += value.double()
                if stats is not None:  # on the device: no host read per chunk
                    real = (c.w != 0).float()
                    agree = losses.top1_agreement(mask_padded_columns(zs, spec.vocab_start, spec.vocab_size), c.zt,
                                                  p.ops)
                    stats.add_(torch.stack([(agree * real).sum(), real.sum()]))
                if needs_grad:
                    g_op = mm.operand(g_z)
                    grad_all_h[c0:c1] = mm(g_op, p.ws_op.t())[: c1 - c0]
                    mm.add_to(grad_ws, g_op.t(), c.h)
                del zs, c, g_z
        if needs_grad:
            ctx.save_for_backward(_sum_to_owners(grad_all_h, n_max, spec.group)[:nk], grad_ws)
        ctx.dtypes = (hs.dtype, ws.dtype)
        return total.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # gradients were computed in forward for a unit upstream gradient; the loss is replicated, so grad_out is
        # the same on every rank.
        gh = (grad_h * grad_out).to(ctx.dtypes[0])
        gw = (grad_w * grad_out).to(ctx.dtypes[1])
        return (gh, None, gw) + (None,) * 8


def _chunk_loss(zs: Tensor, zt: Tensor, w: Tensor, targets: Tensor, ops, kw: dict, *, spec: LossSpec) -> Tensor:
    """sum_n w_n (loss_n + spec.ce_weight CE_n) for one chunk of logits [c, Vp]."""
    zs = mask_padded_columns(zs, spec.vocab_start, spec.vocab_size)
    per_tok = spec.loss_fn(zs, zt, targets=targets, ops=ops, **kw)
    if spec.ce_weight:
        per_tok = per_tok + spec.ce_weight * losses.cross_entropy(zs, targets, ops)
    return (per_tok * w.to(per_tok.dtype)).sum()


def _compiled_chunk(spec: LossSpec):
    """torch.compile of the chunk loss, cached on the loss callable (per vocabulary split and CE weight): Inductor
    fuses the ~20 elementwise passes of a mixture loss (3x faster on CPU here); collectives stay eager between the
    compiled pieces."""
    cache = spec.loss_fn.__dict__.setdefault("_compiled_chunks", {})
    key = (spec.vocab_start, spec.vocab_size, spec.ce_weight)
    if key not in cache:
        cache[key] = torch.compile(functools.partial(_chunk_loss, spec=spec), dynamic=False)
    return cache[key]


def fused_linear_loss(loss_fn: Callable[..., Tensor], student_hidden: Tensor, teacher_hidden: Tensor,
                      student_weight: Tensor, teacher_weight: Tensor, *, token_weight: Tensor,
                      targets: Tensor | None = None, groups: Tensor | None = None, n_groups: int | None = None,
                      group=None, vocab_start: int = 0, vocab_size: int | None = None, chunk_size: int = 1024,
                      compile: bool = False, ce_weight: float = 0.0, precision: str = "highest",
                      n_max: int | None = None, stats: Tensor | None = None, **overrides) -> Tensor:
    """sum over all ranks' tokens of token_weight * loss, from hidden states and vocab-sharded output layers.

    student_hidden [Nk, Hs], teacher_hidden [Nk, Ht]: this rank's own tokens (Nk may differ between ranks).
    student_weight [Vp, Hs], teacher_weight [Vp, Ht]: this rank's rows [vocab_start, vocab_start + Vp).
    token_weight [Nk]: e.g. 1 / (global valid-token count) on valid tokens, 0 on prompt / padding. Every row is
    computed, so callers drop rows they do not need (the training step keeps loss tokens only, found on the host).
    targets [Nk] (ATKD, ce_weight), groups [Nk] (ATKD's scope ids, below n_groups; default one group).
    n_max: the most rows any rank of `group` passes (None: found with one collective and a host read).

    Returns the replicated scalar. Its backward gives this rank the exact gradient for its own hidden states and
    for its weight rows (teacher inputs get none). Logits exist one chunk at a time ([chunk, Vp] fp32, a few
    copies), so extra memory is O(chunk x Vp + N x H), flat in N: the gradients are computed in the forward pass
    (Liger-style), which also spares the recompute. compile=True runs each chunk's loss through torch.compile
    (one static shape: the last chunk is padded with zero-weight rows). ce_weight adds that multiple of the label
    cross-entropy (targets) per token. precision: loss.matmul_precision. `stats`, a device tensor [2], accumulates
    (teacher-student top-1 matches, tokens) without a host read. Under data parallelism the caller must account
    for the data-parallel gradient average (each rank already holds the gradient of the *global* loss)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    nk = student_hidden.shape[0]
    if teacher_hidden.shape[0] != nk or token_weight.shape != (nk,):
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)}, teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} and token_weight {tuple(token_weight.shape)} must all "
                         f"have this rank's {nk} tokens first")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher output-layer shards have {student_weight.shape[0]} and "
                         f"{teacher_weight.shape[0]} rows: both must hold the same vocabulary rows")
    if loss_fn.needs_targets and targets is None:
        raise ValueError(f"{loss_fn.method} needs the target token ids (targets=...)")
    dev = student_hidden.device
    if targets is None:
        targets = torch.zeros(nk, dtype=torch.long, device=dev)
    if groups is None:
        groups, n_groups = torch.zeros(nk, dtype=torch.long, device=dev), 1
    elif n_groups is None:
        n_groups = int(groups.max().item()) + 1 if groups.numel() else 1
    if n_max is None:
        n_max = group_max_rows(nk, group, dev)
    spec = LossSpec(loss_fn, group, vocab_start, vocab_size, chunk_size, compile, ce_weight, precision,
                    tuple(overrides.items()))
    share = _FusedLinearLoss.apply(student_hidden, teacher_hidden, student_weight, teacher_weight, token_weight,
                                   targets, groups, spec, n_max, n_groups, stats)
    return share if spec.world == 1 else _SumShares.apply(share, group)


# ----------------------------------------------------------------------------------------------------------------
# The output layer + loss against a stored teacher top-k (loss.offline_teacher): no teacher model at all
# ----------------------------------------------------------------------------------------------------------------
def gather_shards(x: Tensor, rows_per_rank: int, group) -> Tensor:
    """Every rank's rows of x [Nk, ...] (Nk <= rows_per_rank), padded to rows_per_rank and stacked in rank order
    [P * rows_per_rank, ...]; differentiable: backward sums every rank's gradient of the rows to their owner."""
    return x if _world(group) == 1 else _GatherTokens.apply(x, rows_per_rank, group)


class _GatherTokens(torch.autograd.Function):
    """All ranks' rows padded to n_max ([P * n_max, ...]); backward sums every rank's gradient of the rows back to
    the rank that owns them."""

    @staticmethod
    def forward(ctx, x: Tensor, n_max: int, group) -> Tensor:
        ctx.n_max, ctx.group, ctx.nk = n_max, group, x.shape[0]
        return _gather_tokens(x, n_max, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _sum_to_owners(grad.contiguous().clone(), ctx.n_max, ctx.group)[: ctx.nk], None, None


def _topk_chunk(h: Tensor, w: Tensor, lt: Tensor, ids: Tensor, weight: Tensor, targets, *, loss_fn, group,
                vocab_start: int, vocab_size, overrides: dict) -> Tensor:
    zs = losses.upcast(h) @ losses.upcast(w).t()
    kw = dict(overrides)
    if targets is not None:
        kw["targets"] = targets
    per_tok = topk_loss(loss_fn, zs, lt, ids, group=group, vocab_start=vocab_start, vocab_size=vocab_size, **kw)
    return (per_tok * weight).sum()


def fused_topk_loss(loss_fn: Callable[..., Tensor], student_hidden: Tensor, student_weight: Tensor,
                    teacher_logprobs: Tensor, teacher_ids: Tensor, *, token_weight: Tensor,
                    targets: Tensor | None = None, group=None, vocab_start: int = 0, vocab_size: int | None = None,
                    chunk_size: int = 1024, n_max: int | None = None, **overrides) -> Tensor:
    """sum over all ranks' tokens of token_weight * loss against the teacher's stored top-k (topk_loss: k entries
    plus one bucket for the rest of the vocabulary), from the student's hidden states and its vocab-sharded output
    layer. student_hidden [Nk, Hs]; teacher_logprobs / teacher_ids [Nk, k]; token_weight [Nk]. The same contract as
    fused_linear_loss (replicated value; each rank gets the gradient of the global loss for its own tokens and its
    rows; every row is computed; n_max as there). Chunks run under activation checkpointing, so memory stays
    O(chunk x Vp) in N; the recomputation repeats each chunk's collectives in the same order on every rank."""
    nk = student_hidden.shape[0]
    if teacher_logprobs.shape[0] != nk or teacher_ids.shape != teacher_logprobs.shape or token_weight.shape != (nk,):
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)}, teacher top-k "
                         f"{tuple(teacher_logprobs.shape)} / {tuple(teacher_ids.shape)} and token_weight "
                         f"{tuple(token_weight.shape)} must all have this rank's {nk} tokens first")
    if n_max is None:
        n_max = group_max_rows(nk, group, student_hidden.device)
    all_h = _GatherTokens.apply(student_hidden, n_max, group)
    all_lt = _gather_tokens(losses.upcast(teacher_logprobs), n_max, group)  # fp16 in the cache: fp32 maths
    all_ids = _gather_tokens(teacher_ids, n_max, group)
    all_w = _gather_tokens(losses.upcast(token_weight.detach()), n_max, group)
    all_tg = _gather_tokens(targets, n_max, group) if targets is not None else None
    # padding rows (weight 0) get a proper top-k distribution (uniform over k + 1): all-zero log-probs would put
    # mass k in the top-k and a NaN in the bucket, which 0 x NaN carries into the weight's gradient
    k = all_lt.shape[-1]
    all_lt = torch.where((all_w != 0).unsqueeze(-1), all_lt, -math.log(k + 1))
    total = losses.upcast(student_hidden.new_zeros(()))
    for c0 in range(0, all_h.shape[0], chunk_size):  # sizes known on the host: the same chunks on every rank
        c1 = c0 + chunk_size
        total = total + checkpoint(_topk_chunk, all_h[c0:c1], student_weight, all_lt[c0:c1], all_ids[c0:c1],
                                   all_w[c0:c1], all_tg[c0:c1] if all_tg is not None else None, loss_fn=loss_fn,
                                   group=group, vocab_start=vocab_start, vocab_size=vocab_size, overrides=overrides,
                                   use_reentrant=False)
    return total
