"""Document masking of packed text (data.document_mask): each position attends only inside its own document and
positions restart with each document, so a packed row computes exactly what its documents would alone (float64,
values and gradients), in training (1 and 2 ranks, both backends) and in the offline teacher's top-k."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline import evaluate
from pipeline.data import batches as data
from pipeline.models import build as M
from pipeline.parallel import backends
from pipeline.precompute_teacher import teacher_topk
from pipeline.loss.vocab_parallel import topk_teacher
from tests.test_faults import loss_lines, ok, run

EOS = 0
CONF = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _rows(seed: int, B: int = 3, T: int = 24, ends: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, 64, (B, T), generator=g)
    for b in range(B):  # some documents end inside the row, some rows hold one document, one ends on position 0
        for t in torch.randint(0, T, (ends if b < B - 1 else 0,), generator=g).tolist():
            rows[b, t] = EOS
    rows[0, 0] = EOS
    return rows


def _split(row: list[int]) -> list[list[int]]:
    docs, cur = [], []
    for t in row:
        cur.append(t)
        if t == EOS:
            docs.append(cur)
            cur = []
    return docs + ([cur] if cur else [])


@pytest.mark.parametrize("seed", range(5))
def test_documents_and_their_positions(seed):
    """A document ends with (and includes) EOS; positions count from 0 inside each document; a batch whose rows are
    one document each needs no mask (None)."""
    rows = _rows(seed)
    docs = data.documents(rows, EOS)
    pos = M.document_positions(docs)
    for b in range(rows.shape[0]):
        parts = _split(rows[b].tolist())
        assert docs[b].tolist() == [i for i, d in enumerate(parts) for _ in d]
        assert pos[b].tolist() == [p for d in parts for p in range(len(d))]
    assert data.documents(torch.tensor([[5, 6, 7, EOS], [1, 2, 3, 4]]), EOS) is None  # an end only at the last


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**CONF, attn_implementation="sdpa")).double()
    m.lm_head = torch.nn.Identity()  # as the pipeline runs bodies: hidden states out, the fused loss does the rest
    backends.causal_without_mask_reads(m)
    return m


@pytest.mark.parametrize("seed", range(3))
def test_a_packed_row_computes_what_its_documents_compute_alone(seed):
    """backends.forward with documents: every position's hidden state (float64) and every parameter's gradient of
    a weighted sum equal the same computed on each document alone, unpacked."""
    rows = _rows(seed)
    model = _model()
    w = torch.randn(*rows.shape, CONF["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    packed = backends.forward(model, rows, None, data.documents(rows, EOS))
    (packed * w).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone, start = [], 0
    total = 0.0
    for b in range(rows.shape[0]):
        start = 0
        for doc in _split(rows[b].tolist()):
            h = backends.forward(model, torch.tensor([doc]), None)[0]
            alone.append(h)
            total = total + (h * w[b, start:start + len(doc)]).sum()
            start += len(doc)
    total.backward()
    torch.testing.assert_close(packed.reshape(-1, CONF["hidden_size"]), torch.cat(alone), rtol=1e-12, atol=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-12, msg=n)
    # and it is not what the whole row computes
    assert not torch.allclose(packed, backends.forward(model, rows, None))


def test_the_offline_teachers_top_k_and_the_evaluations_states_are_each_documents_own():
    """pipeline.precompute_teacher's top-k and pipeline.evaluate's hidden states under document masking
    (transformers' packed-sequence path) equal those of each document's own forward."""
    model = LlamaForCausalLM(LlamaConfig(**CONF)).double().eval()
    rows = _rows(7)
    with torch.no_grad():
        states = evaluate.hidden_states(model, rows, torch.ones_like(rows), data.documents(rows, EOS))
        alone = [evaluate.hidden_states(model, torch.tensor([d]), None)[0] for r in rows.tolist() for d in _split(r)]
    torch.testing.assert_close(states.reshape(-1, CONF["hidden_size"]), torch.cat(alone), rtol=1e-12, atol=1e-12)
    lp, ids = teacher_topk(model, rows, 5, EOS)
    for b in range(rows.shape[0]):
        start = 0
        for doc in _split(rows[b, :-1].tolist()):
            with torch.no_grad():
                want_lp, want_ids = topk_teacher(model(input_ids=torch.tensor([doc])).logits[0], 5)
            torch.testing.assert_close(lp[b, start:start + len(doc)], want_lp, rtol=1e-12, atol=1e-12)
            assert torch.equal(ids[b, start:start + len(doc)], want_ids)
            start += len(doc)


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp2"])
def test_two_ranks_with_document_masking_equal_one_and_masking_changes_the_run(tmp_path, backend):
    """The debug job (its packed rows hold several documents): 2 ranks equal 1 process with twice the micro-batch,
    step for step; without the mask the losses differ (the mask is in force)."""
    common = ["--train.steps=4", "--checkpoint.every=0", "--checkpoint.export=false", "--data.document_mask=true"]
    ok(run(tmp_path / "two", backend, *common))
    ok(run(tmp_path / "one", "none", *common, "--train.micro_batch_size=4"))
    ok(run(tmp_path / "off", "none", *common, "--train.micro_batch_size=4", "--data.document_mask=false"))
    two, one, off = ([float(x) for _, x in loss_lines(tmp_path / d)] for d in ("two", "one", "off"))
    assert two == pytest.approx(one, rel=1e-4)
    assert all(abs(a - b) > 1e-6 * abs(b) for a, b in zip(one, off))
