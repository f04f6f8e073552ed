"""The token store: prepare writes exactly the token stream of today's packing; 1, 2 and 4 reading processes see
the rows of one; resume is exact; another tokenizer is refused; an interrupted prepare finishes; a training run on
the store equals the in-memory run bitwise."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline import config as C, prepare as P
from pipeline.data import batches as data, token_store as S
from tests.dist_utils import launch_preloaded, run_workers
from tests.test_train import DEBUG, ENV, REPO

TOK = str(REPO / "pipeline/configs/assets/tiny_tokenizer")


def _cfg(*overrides):
    return C.load_config(str(REPO / DEBUG), [f"--model.tokenizer_path={TOK}",
                                              f"--data.files=[{REPO}/pipeline/configs/assets/tiny_corpus.txt]",
                                              *overrides])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    assert P.prepare(_cfg(), str(out), workers=2, shards=3, log=lambda m: None) is not None
    return str(out)


def test_store_holds_exactly_the_stream_of_todays_packing(store):
    from transformers import AutoTokenizer
    cfg = _cfg()
    tok = AutoTokenizer.from_pretrained(TOK)
    blocks = data.pack_blocks(data.load_documents(cfg.data), tok, "text", 64)
    s = S.TokenStore(store)
    flat = torch.from_numpy(s.read(0, s.total).astype(np.int64))
    assert s.dtype == np.uint16 and s.total >= blocks.numel()
    assert torch.equal(flat[: blocks.numel()].view_as(blocks), blocks)
    assert torch.equal(s.blocks(64)[torch.arange(len(blocks))], blocks)  # reads across shard boundaries
    ends = np.concatenate([np.fromfile(os.path.join(store, f"shard_{i:05d}.docs"), dtype=np.int64) for i in range(3)])
    assert len(ends) == s.index["documents"] and (flat[torch.from_numpy(
        np.concatenate([e + s.starts[i] for i, e in enumerate(
            np.split(ends, np.cumsum([x["documents"] for x in s.index["shards"]])[:-1]))]) - 1)] == tok.eos_token_id).all()


def test_token_dtype():
    assert S.token_dtype(49_152) == np.uint16 and S.token_dtype(65_536) == np.uint16
    assert S.token_dtype(65_537) == np.uint32 and S.token_dtype(151_936) == np.uint32


def _read_rows(rank, world, store, steps, out):
    import torch.distributed as dist
    b = data.PackedBatches(S.TokenStore(store).blocks(64), 2, rank, world, seed=3, prefetch=True)
    mine = [b.next() for _ in range(steps)]
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    if rank == 0:
        torch.save(parts, out)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_read_their_share_and_together_the_rows_of_one(store, tmp_path, world):
    steps = 7  # past an epoch boundary: 39,951 tokens / 64 = 624 blocks = 312 micro-batches of 2 ... per world
    one = data.PackedBatches(S.TokenStore(store).blocks(64), 2 * world, 0, 1, seed=3)
    ref = [one.next() for _ in range(steps)]
    run_workers(_read_rows, world, store, steps, str(tmp_path / "rows.pt"), timeout=180)
    parts = torch.load(tmp_path / "rows.pt")
    for s in range(steps):
        assert torch.equal(torch.cat([parts[r][s] for r in range(world)]), ref[s])


def test_resume_mid_epoch_is_exact_and_costs_the_same_anywhere(store):
    b = data.PackedBatches(S.TokenStore(store).blocks(16), 4, 1, 2, seed=0, prefetch=True)
    for _ in range(1500):  # several epochs in
        b.next()
    state = b.state_dict()
    want = [b.next() for _ in range(5)]
    c = data.PackedBatches(S.TokenStore(store).blocks(16), 4, 1, 2, seed=0, prefetch=True)
    c.load_state_dict(state)
    assert state["epoch"] >= 1 and all(torch.equal(x, c.next()) for x in want)


@pytest.mark.parametrize("depth", [2, 5])
def test_reading_several_micro_batches_ahead_gives_the_same_batches_and_resumes(store, depth):
    """prefetch = depth (a served teacher's requests in flight): the same rows in the same order as no prefetch,
    across epoch boundaries, and a resume from a state taken mid-flight drops what was read ahead."""
    blocks = S.TokenStore(store).blocks(64)
    plain = data.PackedBatches(blocks, 2, 1, 2, seed=4)
    ahead = data.PackedBatches(blocks, 2, 1, 2, seed=4, prefetch=depth)
    want = [plain.next() for _ in range(320)]  # 156 micro-batches per epoch here: past two boundaries
    assert all(torch.equal(w, ahead.next()) for w in want[:200])
    state = ahead.state_dict()
    assert len(ahead._ahead) == depth
    again = data.PackedBatches(blocks, 2, 1, 2, seed=4, prefetch=depth)
    again.load_state_dict(state)
    assert all(torch.equal(w, again.next()) and torch.equal(w, ahead.next()) for w in want[200:])


def test_a_store_of_another_tokenizer_is_refused(store, tmp_path):
    from transformers import AutoTokenizer
    other = AutoTokenizer.from_pretrained(TOK)
    other.add_tokens(["<new>"])
    with pytest.raises(S.StoreError, match="another tokenizer"):
        S.TokenStore(store).check_tokenizer(other)
    other.save_pretrained(tmp_path / "tok")
    with pytest.raises(S.StoreError, match="another tokenizer"):
        P.prepare(_cfg(f"--model.tokenizer_path={tmp_path}/tok"), store, log=lambda m: None)


def test_an_interrupted_prepare_does_only_the_rest(tmp_path):
    out = tmp_path / "store"
    P.prepare(_cfg(), str(out), workers=1, shards=4, task=0, tasks=2, log=lambda m: None)  # "array task 0"
    assert not (out / "index.json").exists() and (out / "shard_00002.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_0000[02].*")}
    (out / "shard_00003.bin").write_bytes(b"partial")  # killed mid-shard: no .json
    index = P.prepare(_cfg(), str(out), workers=2, shards=4, log=lambda m: None)
    assert index is not None and len(index["shards"]) == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_0000[02].*")} == done  # not redone
    whole = tmp_path / "whole"
    P.prepare(_cfg(), str(whole), workers=1, shards=1, log=lambda m: None)
    a, b = S.TokenStore(str(out)), S.TokenStore(str(whole))
    assert a.total == b.total and np.array_equal(a.read(0, a.total), b.read(0, b.total))


def test_training_on_the_store_equals_the_in_memory_run_and_resumes_exactly(store, tmp_path):
    def losses(run_dir, *extra):
        p = launch_preloaded(["--config", DEBUG, f"--run_dir={run_dir}", "--parallel.backend=none",
                              "--train.steps=6", "--logging.progress=false", "--checkpoint.export=false", *extra],
                             1, ENV, REPO, 300)
        assert p.returncode == 0, p.stderr[-3000:]
        return (run_dir / "losses.tsv").read_text()
    straight = losses(tmp_path / "store", f"--data.store={store}")
    assert losses(tmp_path / "mem") == straight
    losses(tmp_path / "resumed", f"--data.store={store}", "--train.stop_after=3")  # mid-epoch
    assert losses(tmp_path / "resumed", f"--data.store={store}") == straight


ONPOLICY = "pipeline/configs/debug_onpolicy.yaml"


def test_chat_store_holds_the_examples_and_trains_like_in_memory(tmp_path):
    from transformers import AutoTokenizer
    cfg = C.load_config(str(REPO / ONPOLICY), [])
    out = tmp_path / "chat"
    index = P.prepare(cfg, str(out), workers=2, shards=3, log=lambda m: None)
    assert index["kind"] == "chat"
    tok = AutoTokenizer.from_pretrained(REPO / "pipeline/configs/assets/tiny_tokenizer")
    want = data.load_examples(cfg.data, tok)
    got = S.TokenStore(str(out)).examples(cfg.data)[torch.arange(len(want))]
    assert got == [(list(p), list(r)) for p, r in want]
    with pytest.raises(S.StoreError, match="data.max_prompt_len 24 there, 16 here"):
        S.TokenStore(str(out)).examples(C.load_config(str(REPO / ONPOLICY), ["--data.max_prompt_len=16"]).data)

    def losses(run_dir, *extra):
        p = launch_preloaded(["--config", ONPOLICY, f"--run_dir={run_dir}", "--parallel.backend=none",
                              "--train.steps=4", "--train.eval_every=0", "--logging.progress=false",
                              "--checkpoint.export=false", *extra], 1, ENV, REPO, 300)
        assert p.returncode == 0, p.stderr[-3000:]
        return (run_dir / "losses.tsv").read_text()
    assert losses(tmp_path / "mem") == losses(tmp_path / "store", f"--data.store={out}")
