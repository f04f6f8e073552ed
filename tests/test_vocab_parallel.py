"""The vocab-parallel loss in real gloo groups of 2 and 3 processes against the single-process float64 loss:
values and gradients of every method, uneven shards, padded vocab rows, masked tokens, bf16 and fp32 inputs; the
fused chunked output-layer path with uneven token counts per rank; the teacher top-k mode."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from pipeline.loss import divergences as L
from pipeline.loss import vocab_parallel as VP
from tests.dist_utils import run_workers

WIDTH, REAL_V = 23, 20  # logits are 23 wide; columns 20..22 are padded output rows
CASES = [
    ("fkl", {}), ("rkl", {}), ("tvd", {}), ("gjsd", {"beta": 0.3}), ("skl", {"alpha": 0.1}), ("srkl", {"alpha": 0.1}),
    ("alpha_divergence", {"alpha": 0.5}), ("ab_divergence", {}),
    ("amid", {}), ("amid", {"alpha": -3.0, "lam": 0.3, "divergence": "kl", "order": "qr"}),
    ("amid", {"alpha": 1.0, "lam": 0.2, "divergence": "kl", "order": "rq"}),
    ("amid", {"alpha": 2.0, "lam": 0.6, "divergence": "kl", "order": "rp"}),
    ("amid", {"alpha": 0.7, "lam": 0.5, "divergence": "alpha", "order": "pr"}),
    ("taid", {"t": 0.6}), ("atkd", {}), ("atkd", {"reverse": True, "hard_fraction": 0.3}),
]


def _inputs(seed: int, dtype=torch.float64, B=2, T=5):
    g = torch.Generator().manual_seed(seed)
    zt = 3 * torch.randn(B, T, WIDTH, generator=g, dtype=torch.float64)
    zs = 0.5 * zt + 3 * torch.randn(B, T, WIDTH, generator=g, dtype=torch.float64)
    zt, zs = zt.to(dtype).double(), zs.to(dtype).double()  # the reference sees exactly the rounded inputs
    targets = torch.randint(0, REAL_V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    return zt, zs, targets, mask


def _pad_mask(z):
    return z.masked_fill(torch.arange(z.shape[-1]) >= REAL_V, -math.inf)


def _reference(loss_fn, zs, zt, **kw):
    zs = zs.clone().requires_grad_(True)
    v = loss_fn(_pad_mask(zs), _pad_mask(zt), **kw)
    (g,) = torch.autograd.grad(v.sum(), zs)
    return v.detach(), g


def _check_sharded(rank, world, dtype):
    group = dist.group.WORLD
    start, end = VP.shard_range(WIDTH, rank, world)
    for i, (name, opts) in enumerate(CASES):
        zt, zs, targets, mask = _inputs(100 + i, dtype)
        loss_fn = L.make_loss(name, **opts)
        v_ref, g_ref = _reference(loss_fn, zs, zt, mask=mask, targets=targets)
        shard = zs[..., start:end].to(dtype).requires_grad_(True)
        v = VP.sharded_loss(loss_fn, shard, zt[..., start:end].to(dtype), group=group, vocab_start=start,
                            vocab_size=REAL_V, mask=mask, targets=targets)
        v.sum().backward()
        assert v.dtype == torch.float32, name
        torch.testing.assert_close(v.double(), v_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} {opts}: {m}")
        # the gradient of a bf16 leaf is itself bf16: equal to the reference up to bf16 rounding (8 mantissa bits)
        rtol = 1e-5 if dtype == torch.float32 else 2 ** -8
        torch.testing.assert_close(shard.grad.double(), g_ref[..., start:end], rtol=rtol, atol=1e-5,
                                   msg=lambda m: f"{name} {opts} grad: {m}")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sharded_loss_matches_single_process(world, dtype):
    run_workers(_check_sharded, world, dtype)


def test_shard_range_covers_the_vocabulary_unevenly():
    for V, P in [(23, 2), (23, 3), (5, 4), (151_936, 7)]:
        ranges = [VP.shard_range(V, r, P) for r in range(P)]
        assert ranges[0][0] == 0 and ranges[-1][1] == V
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert [e - s for s, e in ranges] == [t.numel() for t in torch.arange(V).chunk(P)] + [0] * (
            P - len(torch.arange(V).chunk(P)))
    with pytest.raises(ValueError):
        VP.shard_range(10, 2, 2)


# ----------------------------------------------------------------------------------------------------------------
# fused output layer + loss
# ----------------------------------------------------------------------------------------------------------------
HS, HT = 8, 12
TOKENS_PER_RANK = {1: [9], 2: [7, 2], 3: [6, 0, 4]}  # uneven, one rank with no tokens at all


def _fused_problem(world, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(TOKENS_PER_RANK[world])
    hs = torch.randn(n, HS, generator=g, dtype=torch.float64)
    ht = torch.randn(n, HT, generator=g, dtype=torch.float64)
    ws = torch.randn(WIDTH, HS, generator=g, dtype=torch.float64)
    wt = 1.5 * torch.randn(WIDTH, HT, generator=g, dtype=torch.float64)
    valid = torch.rand(n, generator=g) > 0.25
    valid[0] = True
    weight = valid.double() / valid.sum()
    targets = torch.randint(0, REAL_V, (n,), generator=g)
    owner = torch.repeat_interleave(torch.arange(world), torch.tensor(TOKENS_PER_RANK[world]))
    return hs, ht, ws, wt, weight, targets, owner


def _fused_reference(loss_fn, world, seed, ce_weight=0.0):
    hs, ht, ws, wt, weight, targets, owner = _fused_problem(world, seed)
    hs, ws = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    zs, zt = _pad_mask(hs @ ws.t()), _pad_mask(ht @ wt.t())
    per_tok = loss_fn(zs, zt, mask=weight != 0, targets=targets, groups=owner)  # ATKD's scope: each rank's batch
    per_tok = per_tok + ce_weight * (torch.logsumexp(zs, -1) - zs.gather(-1, targets[:, None])[:, 0])
    loss = (per_tok * weight).sum()
    loss.backward()
    agree = (zs.argmax(-1) == zt.argmax(-1)).double()
    return loss.detach(), hs.grad, ws.grad, (agree * (weight != 0)).sum()


def _check_fused(rank, world, cases):
    group = dist.group.WORLD if world > 1 else None
    start, end = VP.shard_range(WIDTH, rank, world)
    counts = TOKENS_PER_RANK[world]
    r0, r1 = sum(counts[:rank]), sum(counts[:rank + 1])
    for i, case in enumerate(cases):
        name, opts, ce = case if len(case) == 3 else (*case, 0.0)
        loss_fn = L.make_loss(name, **opts)
        ref_loss, ref_gh, ref_gw, ref_agree = _fused_reference(loss_fn, world, i, ce)
        hs, ht, ws, wt, weight, targets, _ = _fused_problem(world, seed=i)
        my_hs = hs[r0:r1].float().requires_grad_(True)
        my_ws = ws[start:end].float().requires_grad_(True)
        stats = torch.zeros(2)
        loss = VP.fused_linear_loss(loss_fn, my_hs, ht[r0:r1].float(), my_ws, wt[start:end].float(),
                                    token_weight=weight[r0:r1].float(), targets=targets[r0:r1], group=group,
                                    vocab_start=start, vocab_size=REAL_V, chunk_size=2, ce_weight=ce, stats=stats)
        loss.backward()
        # every rank of the group scores all the group's rows: the counts are replicated, not shares
        assert stats.tolist() == [ref_agree.item(), (weight != 0).sum().item()], (name, stats, ref_agree)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(my_hs.grad.double(), ref_gh[r0:r1], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name} hidden grad: {m}")
        torch.testing.assert_close(my_ws.grad.double(), ref_gw[start:end], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name} weight grad: {m}")


FUSED_CASES = [("fkl", {}), ("amid", {}), ("amid", {"alpha": -1.0, "divergence": "kl", "order": "qr"}),
               ("gjsd", {}), ("srkl", {}), ("tvd", {}), ("taid", {"t": 0.5}), ("atkd", {})]
# every method, and the label cross-entropy term: the fused loss adds up per-rank shares of each total, which only
# works if no method adds a value every rank holds whole (ATKD's binary TKD) without `ops.share`
FUSED_ALL = CASES + [("amid", {}, 0.7), ("atkd", {}, 0.5), ("taid", {"t": 0.3, "form": "ce"})]


def test_fused_single_process_matches_reference():
    _check_fused(0, 1, FUSED_CASES)


@pytest.mark.parametrize("world", [2, 3])
def test_fused_uneven_token_counts_match_reference_and_never_hang(world):
    # rank 1 of 3 has no tokens at all: it must still join every collective (same chunk count), or this times out
    run_workers(_check_fused, world, FUSED_ALL if world == 3 else FUSED_CASES, timeout=180)


def test_fused_memory_is_flat_in_tokens():
    """The autograd graph keeps nothing of size N x V: the saved state is the [N, H] and [Vp, H] gradients."""
    loss_fn = L.make_loss("amid")
    saved = {}
    for n in (64, 512):
        hs = torch.randn(n, HS, requires_grad=True)
        ws = torch.randn(4000, HS, requires_grad=True)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            loss = VP.fused_linear_loss(loss_fn, hs, torch.randn(n, HT), ws, torch.randn(4000, HT),
                                        token_weight=torch.full((n,), 1.0 / n), chunk_size=32)
        loss.backward()
        saved[n] = max(sizes + [0])
        assert torch.isfinite(hs.grad).all() and torch.isfinite(ws.grad).all()
    assert saved[512] < 64 * 4000  # nothing like one chunk of logits survives to backward


# ----------------------------------------------------------------------------------------------------------------
# teacher top-k + leftover bucket
# ----------------------------------------------------------------------------------------------------------------
K = 5


def _topk_reference(loss_fn, zs, zt, mask, targets):
    zs = zs.clone().requires_grad_(True)
    lp = torch.log_softmax(_pad_mask(zt), -1)
    lq = torch.log_softmax(_pad_mask(zs), -1)
    top_lp, ids = lp.topk(K, -1)
    top_lq = lq.gather(-1, ids)
    bucket = lambda x: torch.log1p(-x.exp().sum(-1, keepdim=True))  # noqa: E731
    t_k1, s_k1 = torch.cat([top_lp, bucket(top_lp)], -1), torch.cat([top_lq, bucket(top_lq)], -1)
    hit = ids == targets.unsqueeze(-1)
    tg = torch.where(hit.any(-1), hit.long().argmax(-1), torch.full_like(targets, K))
    v = loss_fn(s_k1, t_k1, mask=mask, targets=tg)
    (g,) = torch.autograd.grad(v.sum(), zs)
    return v.detach(), g, top_lp, ids


def _check_topk(rank, world):
    group = dist.group.WORLD if world > 1 else None
    start, end = VP.shard_range(WIDTH, rank, world)
    for i, (name, opts) in enumerate([("fkl", {}), ("amid", {}), ("rkl", {}), ("atkd", {})]):
        zt, zs, targets, mask = _inputs(300 + i)
        loss_fn = L.make_loss(name, **opts)
        v_ref, g_ref, top_lp, ids = _topk_reference(loss_fn, zs, zt, mask, targets)
        shard = zs[..., start:end].float().requires_grad_(True)
        v = VP.topk_loss(loss_fn, shard, top_lp.float(), ids, group=group, vocab_start=start, vocab_size=REAL_V,
                         mask=mask, targets=targets)
        v.sum().backward()
        torch.testing.assert_close(v.double(), v_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(shard.grad.double(), g_ref[..., start:end], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name} grad: {m}")


def test_topk_single_process():
    _check_topk(0, 1)


def test_topk_two_processes():
    run_workers(_check_topk, 2)


def test_topk_with_k_equal_vocab_is_the_full_loss():
    zt, zs, targets, mask = _inputs(7)
    zt, zs = zt[..., :REAL_V], zs[..., :REAL_V]
    loss_fn = L.make_loss("fkl")
    top_lp, ids = VP.topk_teacher(zt, REAL_V)
    v = VP.topk_loss(loss_fn, zs, top_lp, ids, mask=mask)
    torch.testing.assert_close(v, loss_fn(zs, zt, mask=mask), rtol=1e-6, atol=1e-6)


def test_fused_compiled_matches_eager():
    """compile=True (Inductor-fused chunk loss, padded last chunk) gives the eager values and gradients: a mixture
    loss and ATKD's top/bottom split (each compile costs ~20 s on a cold cache, so not every mixture loss)."""
    for name, opts in [("amid", {}), ("atkd", {})]:
        loss_fn = L.make_loss(name, **opts)
        hs, ht, ws, wt, weight, targets, _ = _fused_problem(1, seed=5)
        outs = []
        for compile in (False, True):
            h, w = hs.float().requires_grad_(True), ws.float().requires_grad_(True)
            loss = VP.fused_linear_loss(loss_fn, h, ht.float(), w, wt.float(), token_weight=weight.float(),
                                        targets=targets, vocab_size=REAL_V, chunk_size=4, compile=compile)
            loss.backward()
            outs.append((loss.detach(), h.grad, w.grad))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# collectives per chunk
# ----------------------------------------------------------------------------------------------------------------
def _count_collectives(rank, world, limits):
    calls = []
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"):
        orig = getattr(dist, kind)
        setattr(dist, kind, lambda *a, _o=orig, _k=kind, **k: calls.append(_k) or _o(*a, **k))
    g = torch.Generator().manual_seed(rank)
    start, end = VP.shard_range(WIDTH, rank, world)
    ws, wt = torch.randn(end - start, HS, requires_grad=True), torch.randn(end - start, HT)
    for name, opts, stats, limit in limits:
        per_chunks = {}
        for rows in (8, 16):  # 16 vs 32 gathered rows in chunks of 4: 4 more chunks
            hs = torch.randn(rows, HS, generator=g, requires_grad=True)
            calls.clear()
            loss = VP.fused_linear_loss(L.make_loss(name, **opts), hs, torch.randn(rows, HT, generator=g), ws, wt,
                                        token_weight=torch.full((rows,), 0.01), targets=torch.zeros(rows).long(),
                                        group=dist.group.WORLD, vocab_start=start, chunk_size=4, n_max=rows,
                                        stats=torch.zeros(2) if stats else None)
            loss.backward()
            per_chunks[rows] = len(calls)
        per_chunk = (per_chunks[16] - per_chunks[8]) / 4
        assert per_chunk == limit, (name, opts, stats, per_chunk, limit)


def test_collectives_per_chunk():
    """Collectives one loss chunk costs (forward and backward), counted in a real group of 2: one gather per round of
    normalisers, one all-reduce per normaliser a gradient goes through, none for the final vocabulary sum; the
    agreement metric adds one gather."""
    run_workers(_count_collectives, 2, [
        ("fkl", {}, False, 2), ("rkl", {}, False, 2), ("fkl", {}, True, 3),
        ("amid", {}, False, 3),                                             # two nested normalisers, one backward round
        ("amid", {"alpha": -1.0, "divergence": "kl"}, False, 2),            # the arithmetic mixture is normalised
        ("taid", {"t": 0.5}, False, 3),                                     # its target is detached: no 2nd backward
    ])


def _compiled_sharded(rank, world):
    """The cluster config's loss.compile: true with the vocabulary split over ranks (the per-chunk loss, its
    normalisers' all-gathers inside what torch.compile runs): the eager values and gradients."""
    loss_fn = L.make_loss("amid")
    g = torch.Generator().manual_seed(11)
    hs, ht = torch.randn(10, HS, generator=g), torch.randn(10, HT, generator=g)
    ws_full, wt_full = torch.randn(WIDTH, HS, generator=g), torch.randn(WIDTH, HT, generator=g)
    start, end = VP.shard_range(WIDTH, rank, world)
    rows = slice(rank * 5, rank * 5 + 5)  # each rank its own tokens
    outs = []
    for compile in (False, True):
        h, w = hs[rows].clone().requires_grad_(True), ws_full[start:end].clone().requires_grad_(True)
        loss = VP.fused_linear_loss(loss_fn, h, ht[rows], w, wt_full[start:end], token_weight=torch.full((5,), 0.1),
                                    group=dist.group.WORLD, vocab_start=start, chunk_size=4, n_max=5,
                                    compile=compile)
        loss.backward()
        outs.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_compiled_matches_eager_in_two_processes():
    run_workers(_compiled_sharded, 2, timeout=300)
