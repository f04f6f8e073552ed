"""HF `datasets` -> packed token streams for pretraining-style distillation.

Documents are tokenised with the shared tokenizer, joined with EOS, and cut into blocks of seq_len tokens. A global
micro-batch is micro_batch_size x world consecutive blocks of a seeded per-epoch permutation; rank r takes its
rows [r B, (r+1) B). So a run on P ranks with micro-batch B sees exactly the data of one rank with micro-batch P B,
and the position (epoch, index) is all a checkpoint needs to resume the stream exactly.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from pipeline.config import DataConfig, resolve_files

EXT_FORMAT = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".md": "text"}


def load_documents(d: DataConfig):
    """A datasets.Dataset (or IterableDataset when streaming) with a text column."""
    import datasets
    if d.files:
        files = resolve_files(d.files)
        fmt = d.format
        if fmt == "auto":
            kinds = {EXT_FORMAT.get(os.path.splitext(f)[1].lower()) for f in files}
            if None in kinds or len(kinds) != 1:
                raise ValueError(f"data.format: cannot tell the format of {files[:3]} from their extensions; "
                                 f"set data.format to json, parquet or text")
            fmt = kinds.pop()
        extra = {"sample_by": "paragraph"} if fmt == "text" else {}
        ds = datasets.load_dataset(fmt, data_files=files, split="train", streaming=d.streaming, **extra)
    else:
        ds = datasets.load_dataset(d.dataset, split="train", streaming=d.streaming)
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    if d.text_field not in columns:
        raise ValueError(f"data.text_field: no column {d.text_field!r} in the data (columns: {columns})")
    if d.max_documents is not None:
        ds = ds.take(d.max_documents) if d.streaming else ds.select(range(min(d.max_documents, len(ds))))
    return ds


def _token_stream(docs, tokenizer, text_field: str):
    eos = tokenizer.eos_token_id
    for row in docs:
        text = row[text_field]
        if text:
            yield from tokenizer(text, add_special_tokens=False)["input_ids"]
            yield eos


def pack_blocks(docs, tokenizer, text_field: str, seq_len: int) -> Tensor:
    """[num_blocks, seq_len] int64; the tail shorter than a block is dropped."""
    def tok(batch):
        ids = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [tokenizer.eos_token_id] for x, t in zip(ids, batch[text_field]) if t]}
    tokenised = docs.map(tok, batched=True, remove_columns=docs.column_names)
    flat = torch.tensor([t for ids in tokenised["ids"] for t in ids], dtype=torch.long)
    n = flat.numel() // seq_len
    return flat[: n * seq_len].view(n, seq_len)


class PackedBatches:
    """This rank's micro-batches [B, seq_len] from in-memory blocks; resumable via state_dict()."""

    def __init__(self, blocks: Tensor, micro_batch: int, rank: int, world: int, seed: int):
        per_global = micro_batch * world
        if blocks.shape[0] < per_global:
            raise ValueError(f"the data holds {blocks.shape[0]} blocks of data.seq_len tokens but one global "
                             f"micro-batch needs {per_global} (train.micro_batch_size x world size): add data or "
                             f"shorten data.seq_len")
        self.blocks, self.B, self.rank, self.world, self.seed = blocks, micro_batch, rank, world, seed
        self.per_epoch = blocks.shape[0] // per_global
        self.epoch, self.index = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.blocks.shape[0], generator=g)

    def next(self) -> Tensor:
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        start = (self.index * self.world + self.rank) * self.B
        self.index += 1
        return self.blocks[self._perm[start:start + self.B]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._perm = self._permutation(self.epoch)


class StreamingBatches:
    """The same layout over a streamed dataset, packed on the fly; resuming skips the consumed blocks."""

    def __init__(self, docs, tokenizer, text_field: str, seq_len: int, micro_batch: int, rank: int, world: int):
        self.docs, self.tok, self.field, self.seq_len = docs, tokenizer, text_field, seq_len
        self.B, self.rank, self.world = micro_batch, rank, world
        self.consumed = 0  # global micro-batches
        self._it = None

    def _blocks(self):
        buf = []
        while True:  # epochs over the stream
            for t in _token_stream(self.docs, self.tok, self.field):
                buf.append(t)
                if len(buf) == self.seq_len:
                    yield torch.tensor(buf, dtype=torch.long)
                    buf = []

    def next(self) -> Tensor:
        if self._it is None:
            self._it = self._blocks()
            for _ in range(self.consumed * self.B * self.world):
                next(self._it)
        rows = [next(self._it) for _ in range(self.B * self.world)]
        self.consumed += 1
        return torch.stack(rows[self.rank * self.B:(self.rank + 1) * self.B])

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed, self._it = int(state["consumed"]), None


def make_batches(cfg, tokenizer, rank: int, world: int):
    d = cfg.data
    docs = load_documents(d)
    if d.streaming:
        return StreamingBatches(docs, tokenizer, d.text_field, d.seq_len, cfg.train.micro_batch_size, rank, world)
    blocks = pack_blocks(docs, tokenizer, d.text_field, d.seq_len)
    return PackedBatches(blocks, cfg.train.micro_batch_size, rank, world, d.shuffle_seed)
