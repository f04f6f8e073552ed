"""Packed token streams: per-rank layout, resumable positions, streaming equals in-memory packing, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from pipeline.data import batches as data
from pipeline.config import DataConfig

TOK = Path(__file__).resolve().parents[1] / "pipeline/configs/assets/tiny_tokenizer"


@pytest.fixture
def corpus(tmp_path):
    f = tmp_path / "docs.jsonl"
    with open(f, "w") as out:
        for i in range(60):
            out.write(json.dumps({"text": f"document {i}: " + "the quick brown fox jumps over the lazy dog " * 3}) + "\n")
    return f


def test_streaming_ranks_read_only_their_documents_and_resume_without_replay(corpus):
    tok = AutoTokenizer.from_pretrained(TOK)
    full = data.load_documents(DataConfig(files=[str(corpus)], seq_len=16))
    docs = data.load_documents(DataConfig(files=[str(corpus)], seq_len=16, streaming=True))
    stream = [data.StreamingBatches(docs, tok, "text", 16, 2, rank=r, world=2) for r in (0, 1)]
    for r in (0, 1):  # rank r packs documents r, r + 2, ...: exactly the in-memory packing of those
        mine = data.pack_blocks(full.select(range(r, len(full), 2)), tok, "text", 16)
        got = torch.cat([stream[r].next() for _ in range(4)])
        assert torch.equal(got, mine[:8])
    total = sum(len(tok(t["text"])["input_ids"]) + 1 for t in full)
    assert stream[0].tokens_read < 0.6 * total  # its share, not the whole stream
    state = stream[0].state_dict()
    expected = [stream[0].next() for _ in range(30)]  # on past the end of the stream (a new epoch)
    resumed = data.StreamingBatches(docs, tok, "text", 16, 2, rank=0, world=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next(), e) for e in expected)
    assert resumed.tokens_read < 16 * 2 * 30 + 50  # what the 30 batches needed (a document at most more): no replay


def test_in_memory_batches_resume_and_partition_ranks(corpus):
    tok = AutoTokenizer.from_pretrained(TOK)
    blocks = data.pack_blocks(data.load_documents(DataConfig(files=[str(corpus)], seq_len=16)), tok, "text", 16)
    ranks = [data.PackedBatches(blocks, 3, r, 2, seed=1) for r in (0, 1)]
    one = data.PackedBatches(blocks, 6, 0, 1, seed=1)
    for _ in range(blocks.shape[0] // 6 + 2):  # across an epoch boundary
        assert torch.equal(torch.cat([r.next() for r in ranks]), one.next())
    state = ranks[0].state_dict()
    expected = ranks[0].next()
    again = data.PackedBatches(blocks, 3, 0, 2, seed=1)
    again.load_state_dict(state)
    assert torch.equal(again.next(), expected)
    with pytest.raises(ValueError, match="micro-batch needs"):
        data.PackedBatches(blocks[:3], 2, 0, 2, seed=0)


def test_missing_text_column_names_the_field(corpus):
    with pytest.raises(ValueError, match="data.text_field"):
        data.load_documents(DataConfig(files=[str(corpus)], text_field="body"))
