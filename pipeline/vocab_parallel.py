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

import functools
import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline import losses

NEG_INF = float("-inf")


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


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
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
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


class ShardedVocab:
    """losses.py's reduction interface over a vocabulary split across `group`: this rank holds the columns
    [start, start + width). Tensors passed to one call are reduced in ONE collective (stacked), so a round of
    per-token scalars costs one all-reduce whatever the number of statistics."""

    def __init__(self, group, start: int):
        self.group = group
        self.start = start

    def sum(self, *xs: Tensor) -> tuple[Tensor, ...]:
        if _world(self.group) == 1:  # nothing to batch; stacking reductions also defeats Inductor's fusion (2.7x)
            return tuple(x.sum(-1) for x in xs)
        local = torch.cat([x.sum(-1, keepdim=True) for x in xs], -1)  # [..., k]: one all-reduce for k statistics
        return tuple(_AllReduceSum.apply(local, self.group).unbind(-1))

    def max(self, *xs: Tensor) -> tuple[Tensor, ...]:
        if _world(self.group) == 1:
            return tuple(x.detach().amax(-1) for x in xs)
        local = torch.cat([x.detach().amax(-1, keepdim=True) for x in xs], -1)
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.group)
        return tuple(local.unbind(-1))

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
    dist.all_gather(out, x, group=group)
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


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs: Tensor, ht: Tensor, ws: Tensor, wt: Tensor, weight: Tensor, targets: Tensor,
                groups: Tensor, loss_fn, group, vocab_start: int, vocab_size, chunk_size: int, overrides: dict,
                compile: bool, ce_weight: float, stats: dict | None):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        world = _world(group)
        nk = hs.shape[0]
        if world > 1:
            sizes = torch.tensor([nk], dtype=torch.long, device=hs.device)
            dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
            n_max = int(sizes.item())
        else:
            n_max = nk
        # every rank sees every token (this is what makes the vocab split a pure loss-side split over the
        # data-parallel group); masked positions (weight 0) are dropped before the output layer.
        all_hs = _gather_tokens(hs.detach(), n_max, group)
        all_ht = _gather_tokens(ht.detach(), n_max, group)
        all_w = _gather_tokens(weight.detach().float(), n_max, group)
        all_tg = _gather_tokens(targets, n_max, group)
        all_gr = _gather_tokens(groups, n_max, group)
        # ATKD scope ids are per rank: make them distinct across ranks (ids of rank r live above rank r-1's)
        owner = torch.arange(all_gr.numel(), device=all_gr.device) // max(n_max, 1)
        all_gr = all_gr + owner * (int(all_gr.max().item()) + 1 if all_gr.numel() else 0)
        keep = torch.nonzero(all_w != 0).squeeze(-1)  # identical on every rank: same chunk count everywhere
        n_keep = keep.numel()
        chunk_fn = _compiled_chunk(loss_fn) if compile else functools.partial(_chunk_loss, loss_fn)
        ops = ShardedVocab(group, vocab_start)
        is_atkd = loss_fn.method == "atkd"

        def logits(h, w, idx):
            z = losses.upcast(h[idx]) @ losses.upcast(w).t()
            return mask_padded_columns(z, vocab_start, vocab_size)

        token_weights = None
        if is_atkd:  # the hard/easy split needs the whole scope: one teacher-only pass for 1 - p_g first
            unc = torch.zeros(keep.numel(), device=hs.device)
            with torch.no_grad():
                for c0 in range(0, keep.numel(), chunk_size):
                    sel = keep[c0:c0 + chunk_size]
                    (lp,) = losses.log_normalize(logits(all_ht, wt, sel), ops=ops)
                    unc[c0:c0 + chunk_size] = losses.atkd_uncertainty(lp, all_tg[sel], ops)
            o = loss_fn.options
            token_weights = losses.atkd_token_weights(
                unc, torch.ones_like(unc, dtype=torch.bool), all_gr[keep], lam=o["lam"],
                hard_fraction=o["hard_fraction"], normalize=o["normalize"])

        if compile and n_keep % chunk_size:
            # one static shape for the compiled chunk: pad the last chunk with zero-weight copies of a real row
            keep = torch.cat([keep, keep[:1].expand(chunk_size - n_keep % chunk_size)])
        total = torch.zeros((), dtype=torch.float64, device=hs.device)
        grad_all_h = torch.zeros(all_hs.shape, dtype=torch.float32, device=hs.device) if needs_grad else None
        grad_ws = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if needs_grad else None
        for c0 in range(0, keep.numel(), chunk_size):
            sel = keep[c0:c0 + chunk_size]
            w_c = all_w[sel]
            if c0 + chunk_size > n_keep:  # the padded tail (compile only) carries no weight
                w_c = torch.where(torch.arange(sel.numel(), device=w_c.device) < n_keep - c0, w_c, 0.0)
            with torch.no_grad():
                zt = logits(all_ht, wt, sel)
            h_c = losses.upcast(all_hs[sel])
            with torch.enable_grad():
                zs = (h_c @ losses.upcast(ws).t()).requires_grad_(needs_grad)
                kw = dict(overrides)
                if is_atkd:
                    kw["token_weights"] = tuple(_pad_to(w[c0:c0 + chunk_size], sel.numel()) for w in token_weights)
                chunk_loss = chunk_fn(zs, zt, w_c, all_tg[sel], ops, vocab_start, vocab_size, ce_weight, kw)
                if needs_grad:
                    # the replicated-loss rule: each rank backpropagates 1/P of the same value
                    (g_z,) = torch.autograd.grad(chunk_loss / world, zs)
            total += chunk_loss.detach().double()
            if stats is not None:
                real = w_c != 0
                agree = losses.top1_agreement(mask_padded_columns(zs.detach(), vocab_start, vocab_size), zt, ops)
                stats["agree"] = stats.get("agree", 0.0) + float(agree[real].sum())
                stats["tokens"] = stats.get("tokens", 0.0) + float(real.sum())
            if needs_grad:
                grad_all_h.index_add_(0, sel, g_z @ losses.upcast(ws))
                grad_ws.addmm_(g_z.t(), h_c)  # in place: no [Vp, H] temporary per chunk
            del zs, zt
        if needs_grad:
            ctx.save_for_backward(_sum_to_owners(grad_all_h, n_max, group)[:nk], grad_ws)
        ctx.dtypes = (hs.dtype, ws.dtype)
        return total.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # gradients were computed in forward for a unit upstream gradient; the loss is replicated, so grad_out is
        # the same on every rank.
        gh = (grad_h * grad_out).to(ctx.dtypes[0])
        gw = (grad_w * grad_out).to(ctx.dtypes[1])
        return (gh, None, gw) + (None,) * 13


def _pad_to(x: Tensor, n: int) -> Tensor:
    return x if x.numel() == n else torch.cat([x, x.new_zeros(n - x.numel())])


def _chunk_loss(loss_fn, zs: Tensor, zt: Tensor, w: Tensor, targets: Tensor, ops, vocab_start: int, vocab_size,
                ce_weight: float, kw: dict) -> Tensor:
    """sum_n w_n (loss_n + ce_weight CE_n) for one chunk of logits [c, Vp]."""
    zs = mask_padded_columns(zs, vocab_start, vocab_size)
    per_tok = loss_fn(zs, zt, targets=targets, ops=ops, **kw)
    if ce_weight:
        per_tok = per_tok + ce_weight * losses.cross_entropy(zs, targets, ops)
    return (per_tok * w.to(per_tok.dtype)).sum()


def _compiled_chunk(loss_fn):
    """torch.compile of the chunk loss, cached on the loss callable: Inductor fuses the ~20 elementwise passes of a
    mixture loss (3x faster on CPU here); collectives stay eager between the compiled pieces."""
    if getattr(loss_fn, "_compiled_chunk", None) is None:
        loss_fn._compiled_chunk = torch.compile(functools.partial(_chunk_loss, loss_fn), dynamic=False)
    return loss_fn._compiled_chunk


def fused_linear_loss(loss_fn: Callable[..., Tensor], student_hidden: Tensor, teacher_hidden: Tensor,
                      student_weight: Tensor, teacher_weight: Tensor, *, token_weight: Tensor,
                      targets: Tensor | None = None, groups: Tensor | None = None, group=None, vocab_start: int = 0,
                      vocab_size: int | None = None, chunk_size: int = 1024, compile: bool = False,
                      ce_weight: float = 0.0, stats: dict | None = None, **overrides) -> Tensor:
    """sum over all ranks' tokens of token_weight * loss, from hidden states and vocab-sharded output layers.

    student_hidden [Nk, Hs], teacher_hidden [Nk, Ht]: this rank's own tokens (Nk may differ between ranks).
    student_weight [Vp, Hs], teacher_weight [Vp, Ht]: this rank's rows [vocab_start, vocab_start + Vp).
    token_weight [Nk]: e.g. 1 / (global valid-token count) on valid tokens, 0 on prompt / padding (dropped before
    the output layer). targets [Nk] (ATKD), groups [Nk] (ATKD's scope ids; default one group).

    Returns the replicated scalar. Its backward gives this rank the exact gradient for its own hidden states and
    for its weight rows (teacher inputs get none). Logits exist one chunk at a time ([chunk, Vp] fp32, a few
    copies), so extra memory is O(chunk x Vp + N x H), flat in N: the gradients are computed in the forward pass
    (Liger-style), which also spares the recompute. compile=True runs each chunk's loss through torch.compile
    (one static shape: the last chunk is padded with zero-weight rows). ce_weight adds that multiple of the label
    cross-entropy (targets) per token. `stats`, if given, accumulates 'agree' (teacher-student top-1 matches) and
    'tokens'. Under data parallelism the caller must account for the
    data-parallel gradient average (each rank already holds the gradient of the *global* loss)."""
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
    if loss_fn.method == "atkd" and targets is None:
        raise ValueError("atkd needs the target token ids (targets=...)")
    if targets is None:
        targets = torch.zeros(nk, dtype=torch.long, device=student_hidden.device)
    if groups is None:
        groups = torch.zeros(nk, dtype=torch.long, device=student_hidden.device)
    return _FusedLinearLoss.apply(student_hidden, teacher_hidden, student_weight, teacher_weight, token_weight,
                                  targets, groups, loss_fn, group, vocab_start, vocab_size, chunk_size, overrides,
                                  compile, ce_weight, stats)


# ----------------------------------------------------------------------------------------------------------------
# The output layer + loss against a stored teacher top-k (loss.offline_teacher): no teacher model at all
# ----------------------------------------------------------------------------------------------------------------
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


def _topk_chunk(h: Tensor, w: Tensor, lt: Tensor, ids: Tensor, weight: Tensor, targets, loss_fn, group,
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
                    chunk_size: int = 1024, **overrides) -> Tensor:
    """sum over all ranks' tokens of token_weight * loss against the teacher's stored top-k (topk_loss: k entries
    plus one bucket for the rest of the vocabulary), from the student's hidden states and its vocab-sharded output
    layer. student_hidden [Nk, Hs]; teacher_logprobs / teacher_ids [Nk, k]; token_weight [Nk]. The same contract as
    fused_linear_loss (replicated value; each rank gets the gradient of the global loss for its own tokens and its
    rows). Chunks run under activation checkpointing, so memory stays O(chunk x Vp) in N; the recomputation
    repeats each chunk's collectives in the same order on every rank."""
    from torch.utils.checkpoint import checkpoint
    nk = student_hidden.shape[0]
    if teacher_logprobs.shape[0] != nk or teacher_ids.shape != teacher_logprobs.shape or token_weight.shape != (nk,):
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)}, teacher top-k "
                         f"{tuple(teacher_logprobs.shape)} / {tuple(teacher_ids.shape)} and token_weight "
                         f"{tuple(token_weight.shape)} must all have this rank's {nk} tokens first")
    n_max = nk
    if _world(group) > 1:
        sizes = torch.tensor([nk], dtype=torch.long, device=student_hidden.device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
        n_max = int(sizes.item())  # one host read per micro-batch: the padded gather needs the size
    all_h = _GatherTokens.apply(student_hidden, n_max, group)
    all_lt = _gather_tokens(losses.upcast(teacher_logprobs), n_max, group)  # fp16 in the cache: fp32 maths
    all_ids = _gather_tokens(teacher_ids, n_max, group)
    all_w = _gather_tokens(losses.upcast(token_weight.detach()), n_max, group)
    all_tg = _gather_tokens(targets, n_max, group) if targets is not None else None
    keep = torch.nonzero(all_w != 0).squeeze(-1)  # identical on every rank: same chunk count everywhere
    total = losses.upcast(student_hidden.new_zeros(()))
    for c0 in range(0, keep.numel(), chunk_size):
        sel = keep[c0:c0 + chunk_size]
        total = total + checkpoint(_topk_chunk, all_h[sel], student_weight, all_lt[sel], all_ids[sel], all_w[sel],
                                   all_tg[sel] if all_tg is not None else None, loss_fn, group, vocab_start,
                                   vocab_size, overrides, use_reentrant=False)
    return total
