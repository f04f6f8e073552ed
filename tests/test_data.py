"""Packed token streams: per-rank layout, resumable positions, streaming equals in-memory packing, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from pipeline import data
from pipeline.config import DataConfig

TOK = Path(__file__).resolve().parents[1] / "pipeline/configs/assets/tiny_tokenizer"


@pytest.fixture
def corpus(tmp_path):
    f = tmp_path / "docs.jsonl"
    with open(f, "w") as out:
        for i in range(60):
            out.write(json.dumps({"text": f"document {i}: " + "the quick brown fox jumps over the lazy dog " * 3}) + "\n")
    return f


def test_streaming_packs_like_in_memory_and_resumes_exactly(corpus):
    tok = AutoTokenizer.from_pretrained(TOK)
    blocks = data.pack_blocks(data.load_documents(DataConfig(files=[str(corpus)], seq_len=16)), tok, "text", 16)
    docs = data.load_documents(DataConfig(files=[str(corpus)], seq_len=16, streaming=True))
    stream = [data.StreamingBatches(docs, tok, "text", 16, 2, r, 2) for r in (0, 1)]
    first = [s.next() for s in stream]
    # global micro-batch 0 = blocks 0..3: rank 0 takes rows 0-1, rank 1 rows 2-3
    assert torch.equal(first[0], blocks[0:2]) and torch.equal(first[1], blocks[2:4])
    for _ in range(3):
        stream[0].next()
    state = stream[0].state_dict()
    expected = stream[0].next()
    resumed = data.StreamingBatches(docs, tok, "text", 16, 2, 0, 2)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next(), expected)


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
