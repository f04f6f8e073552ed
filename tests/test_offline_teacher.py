"""The offline teacher: pipeline.precompute_teacher stores exactly the teacher's top-k; training against the stored
top-k equals training against the live teacher's top-k on the same batch (values and gradients), at 1 and 2 ranks;
a run with loss.offline_teacher loads no teacher and matches across backends; a cache of another setup is refused."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline import config as C, precompute_teacher as PT, prepare as P
from pipeline.data import token_store as S
from pipeline.loss import divergences as losses
from pipeline.data.teacher_topk import TeacherTopk
from pipeline.loss.vocab_parallel import fused_topk_loss, shard_range, topk_loss, topk_teacher
from tests.dist_utils import run_workers
from tests.test_faults import run, ok, loss_lines
from tests.test_train import DEBUG, REPO

TOK = str(REPO / "pipeline/configs/assets/tiny_tokenizer")
K = 16


def _cfg(store, *extra):
    return C.load_config(str(REPO / DEBUG), [f"--model.tokenizer_path={TOK}", f"--data.store={store}",
                                              f"--data.files=[{REPO}/pipeline/configs/assets/tiny_corpus.txt]",
                                              "--data.seq_len=32", *extra])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("offline")
    store, out = str(d / "store"), str(d / "teacher")
    P.prepare(_cfg(store), store, workers=1, log=lambda m: None)
    assert PT.precompute(_cfg(store), out, k=K, batch=8, chunk=100, rank=0, world=1, log=lambda m: None)
    return store, out


def _teacher(cfg):
    from pipeline.models.build import build_model
    m = cfg.model
    return build_model(m.teacher_path, m.teacher_config, m.dtype, m.init_seed + 1).eval()


def test_the_cache_holds_the_teachers_top_k(cache):
    store, out = cache
    cfg = _cfg(store)
    blocks = S.TokenStore(store).blocks(32)
    rows = torch.tensor([0, 5, 150, len(blocks) - 1])  # across chunk files
    lp, ids = TeacherTopk(out).read(rows)
    want_lp, want_ids = PT.teacher_topk(_teacher(cfg), blocks[rows], K)
    assert lp.shape == (4, 31, K) and torch.equal(ids, want_ids)
    assert torch.equal(lp, want_lp.to(torch.float16).float())
    assert (lp.exp().sum(-1) < 1).all()  # a real top-k: mass is left for the bucket


def _online_and_offline(world_rank=None):
    """The same batch two ways: the live teacher's top-k into the plain (unfused) top-k loss on full logits, and
    the fused top-k loss; returns both losses and the gradients of both."""
    torch.manual_seed(0)
    N, H, V = 40, 12, 64
    hs = torch.randn(N, H, dtype=torch.float64)
    ws = torch.randn(V, H, dtype=torch.float64) * 0.5
    zt = torch.randn(N, V, dtype=torch.float64) * 2
    lt, ids = topk_teacher(zt, K)
    weight = torch.rand(N, dtype=torch.float64) * (torch.rand(N) > 0.2)
    fn = losses.make_loss("amid", alpha=-3.0, lam=0.1, divergence="kl")
    return hs, ws, lt, ids, weight, fn


def test_stored_top_k_training_equals_live_top_k_training_values_and_gradients():
    hs, ws, lt, ids, weight, fn = _online_and_offline()
    a_h, a_w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = (topk_loss(fn, a_h @ a_w.t(), lt, ids) * weight).sum()
    ref.backward()
    b_h, b_w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    got = fused_topk_loss(fn, b_h, b_w, lt, ids, token_weight=weight, chunk_size=7)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(b_h.grad, a_h.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(b_w.grad, a_w.grad, rtol=1e-10, atol=1e-12)


def _sharded(rank, world, out):
    import torch.distributed as dist
    hs, ws, lt, ids, weight, fn = _online_and_offline()
    start, end = shard_range(ws.shape[0], rank, world)
    mine = torch.arange(rank, hs.shape[0], world)  # each rank owns a strided share of the tokens
    h = hs[mine].clone().requires_grad_()
    w = ws[start:end].clone().requires_grad_()
    loss = fused_topk_loss(fn, h, w, lt[mine], ids[mine], token_weight=weight[mine], group=dist.group.WORLD,
                           vocab_start=start, chunk_size=5)
    loss.backward()
    parts = [None] * world
    dist.all_gather_object(parts, (loss.item(), mine, h.grad, start, w.grad))
    if rank == 0:
        torch.save(parts, out)


@pytest.mark.parametrize("world", [2, 3])
def test_fused_top_k_loss_sharded_equals_one_process(tmp_path, world):
    hs, ws, lt, ids, weight, fn = _online_and_offline()
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = fused_topk_loss(fn, h, w, lt, ids, token_weight=weight, chunk_size=5)
    ref.backward()
    run_workers(_sharded, world, str(tmp_path / "out.pt"), timeout=120)
    parts = torch.load(tmp_path / "out.pt", weights_only=False)
    for value, mine, gh, start, gw in parts:
        assert value == pytest.approx(ref.item(), rel=1e-12)
        assert torch.allclose(gh, h.grad[mine], rtol=1e-10, atol=1e-12)
        assert torch.allclose(gw, w.grad[start:start + gw.shape[0]], rtol=1e-10, atol=1e-12)


def test_training_on_the_cache_loads_no_teacher_and_matches_across_backends(cache, tmp_path):
    store, out = cache
    common = [f"--data.store={store}", f"--loss.offline_teacher={out}", "--data.seq_len=32",
              "--loss.options={alpha: -3.0, lam: 0.1, divergence: kl, order: pr}", "--train.steps=6"]
    ok(run(tmp_path / "one", "none", *common, "--train.micro_batch_size=4"))
    ok(run(tmp_path / "two", "fsdp2", *common))
    one, two = dict(loss_lines(tmp_path / "one")), dict(loss_lines(tmp_path / "two"))
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for s in one:
        assert float(two[s]) == pytest.approx(float(one[s]), rel=1e-4)
    summary = json.loads((tmp_path / "two" / "summary_rank0.json").read_text())
    assert summary["teacher_digest_before"].startswith("no teacher loaded")


def test_a_cache_of_another_setup_is_refused(cache, tmp_path):
    store, out = cache
    p = run(tmp_path, "none", f"--data.store={store}", f"--loss.offline_teacher={out}", "--data.seq_len=16",
            "--train.steps=1")
    assert p.returncode == 2 and "computed for another setup" in p.stderr and "seq_len 32 there, 16 here" in p.stderr
