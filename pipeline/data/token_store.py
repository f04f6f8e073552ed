"""A token store: a corpus tokenised once into sharded binary token files plus an index, read by every rank with
positioned reads of only the rows it trains on (Megatron's indexed datasets, nanoGPT's .bin files).

    python -m pipeline.prepare --config run.yaml [--out DIR] [--workers N]     (then data.store: DIR)

Layout of DIR:
    index.json          format, dtype (uint16 when the vocabulary fits, else uint32), the tokenizer's fingerprint,
                        EOS id, per shard its file, token and document counts and file digests, and the store's
                        content fingerprint (what a checkpoint records and a resume compares)
    shard_00000.bin     raw tokens: every non-empty document's tokens followed by EOS, documents in corpus order
    shard_00000.sums    crc32 of every 64 KiB of the .bin: each read is checked (integrity.CheckedFile)
    shard_00000.docs    int64 end offset (in tokens, within the shard) of each document: the document boundaries
    shard_00000.json    the shard's counts and the sha256 of its files, written after they are fsynced: a shard is
                        done when it exists, so an interrupted prepare redoes only the shards without one

Concatenating the shards gives exactly the token stream of data.pack_blocks on the same documents, so a store-backed
run trains on the same blocks in the same order as the in-memory path. A reader holds a few integers per shard and
an open file; its memory does not grow with the corpus, and its position in the stream is (epoch, index).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket

import numpy as np
import torch
from torch import Tensor

from pipeline.run import integrity

FORMAT = 2  # 2: every file's digest and the .bin's chunk checksums recorded; content fingerprint
INDEX = "index.json"
# the data fields a chat store was tokenised with (data.tokenize_example's output depends on them)
CHAT_FIELDS = ("seq_len", "max_prompt_len", "prompt_field", "response_field", "messages_field")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides the ids: the fast tokenizer's full JSON (normaliser, pre-tokeniser, model,
    added tokens) when there is one, else the vocabulary; plus the EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}\n{tokenizer.eos_token_id}".encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(i: int) -> str:
    return f"shard_{i:05d}"


class StoreError(ValueError):
    pass


class TokenStore:
    """The packed token stream of a prepared store, read with os.pread (no mapping, so resident memory stays flat
    however much of the corpus a run reads). Counts the bytes this process read."""

    def __init__(self, path: str):
        index_path = os.path.join(path, INDEX)
        if not os.path.isfile(index_path):
            raise StoreError(f"data.store: {path!r} is not a finished token store (no {INDEX}); run "
                             f"`python -m pipeline.prepare --config ...` to build or finish it")
        try:
            with open(index_path) as f:
                self.index = json.load(f)
        except ValueError as e:
            raise StoreError(f"data.store: {index_path} is not valid JSON ({e}): prepare the store again") from None
        if self.index.get("format") != FORMAT:
            raise StoreError(f"data.store: {path} has format {self.index.get('format')}, this version reads {FORMAT} "
                             f"(content checksums): prepare it again with python -m pipeline.prepare")
        self.path = path
        self.fingerprint = self.index["fingerprint"]
        self.dtype = np.dtype(self.index["dtype"])
        counts = [s["tokens"] for s in self.index["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # token offset of each shard
        self.total = int(self.starts[-1])
        # sizes always (a truncated or replaced shard fails here), content on every read (the chunk checksums)
        self._files = []
        for i, s in enumerate(self.index["shards"]):
            base = os.path.join(path, shard_name(i))
            sums = np.frombuffer(self._small(base + ".sums", s), dtype=np.uint32)
            self._files.append(integrity.CheckedFile(base + ".bin", sums, s["tokens"] * self.dtype.itemsize))

    @staticmethod
    def _small(path: str, meta: dict) -> bytes:
        """A shard's small file (.sums, .docs, .prompt), checked whole against the digest its shard recorded."""
        if not os.path.isfile(path):
            raise StoreError(f"data.store: {path} is missing: prepare the store again")
        return integrity.check_whole(path, meta["sha256"][os.path.splitext(path)[1]], "its shard")

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self._files)

    def verify(self) -> list[str]:
        """Every file hashed in full against the digests recorded when it was written: what differs (empty: all
        match). Reads the whole store."""
        bad = []
        for i, s in enumerate(self.index["shards"]):
            for suffix, digest in s["sha256"].items():
                path = os.path.join(self.path, shard_name(i) + suffix)
                if not os.path.isfile(path) or integrity.file_sha256(path)[1] != digest:
                    bad.append(path)
        return bad

    def check_tokenizer(self, tokenizer) -> None:
        want, have = self.index["tokenizer"], tokenizer_fingerprint(tokenizer)
        if want != have:
            raise StoreError(f"data.store: {self.path} was made with another tokenizer (fingerprint {want[:12]}..., "
                             f"this run's is {have[:12]}...): prepare a store with this run's tokenizer, or point "
                             f"model.tokenizer_path at the one the store was made with")

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream (they may span shards), checked against the chunk
        checksums and the vocabulary the store was made with (integrity.CorruptData otherwise)."""
        out = np.empty(length, dtype=self.dtype)
        pos, filled = start, 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            local = pos - int(self.starts[shard])
            n = min(length - filled, int(self.starts[shard + 1]) - pos)
            raw = self._files[shard].pread(n * self.dtype.itemsize, local * self.dtype.itemsize)
            out[filled:filled + n] = np.frombuffer(raw, dtype=self.dtype)
            filled, pos, shard = filled + n, pos + n, shard + 1
        if length and int(out.max()) >= self.index["vocab_size"]:
            raise integrity.CorruptData(f"data.store: {self.path} holds token id {int(out.max())} at tokens "
                                        f"{start}-{start + length}, beyond its tokenizer's {self.index['vocab_size']}: "
                                        f"prepare the store again")
        return out

    def blocks(self, seq_len: int) -> "StoreBlocks":
        if self.index.get("kind", "text") != "text":
            raise StoreError(f"data.store: {self.path} holds instruction examples (kind chat): set data.kind chat")
        return StoreBlocks(self, seq_len)

    def examples(self, d) -> "StoreExamples":
        """The instruction examples of a chat store, checked against this run's data settings."""
        if self.index.get("kind") != "chat":
            raise StoreError(f"data.store: {self.path} holds packed text: set data.kind text")
        want = {k: getattr(d, k) for k in CHAT_FIELDS}
        have = self.index["source"]["chat"]
        bad = {k: (have[k], want[k]) for k in CHAT_FIELDS if have[k] != want[k]}
        if bad:
            raise StoreError(f"data.store: {self.path} was tokenised with other data settings: "
                             + ", ".join(f"data.{k} {a!r} there, {b!r} here" for k, (a, b) in bad.items())
                             + "; prepare it again or restore them")
        return StoreExamples(self)

    def close(self) -> None:
        for f in self._files:
            f.close()


class StoreBlocks:
    """The stream cut into blocks of seq_len tokens (the tail shorter than a block dropped), indexable by a tensor
    of block ids like the in-memory [n, seq_len] tensor it replaces."""

    def __init__(self, store: TokenStore, seq_len: int):
        self.store, self.seq_len = store, seq_len

    def __len__(self) -> int:
        return self.store.total // self.seq_len

    def __getitem__(self, rows: Tensor) -> Tensor:
        T = self.seq_len
        out = np.stack([self.store.read(int(r) * T, T) for r in rows.tolist()])
        return torch.from_numpy(out.astype(np.int64))


class StoreExamples:
    """The (prompt ids, response ids) examples of a chat store, indexable by a tensor of example ids; holds two
    int64 per example (end offset, prompt length)."""

    def __init__(self, store: TokenStore):
        self.store = store
        ends, prompts = [], []
        for i, s in enumerate(store.index["shards"]):
            base = os.path.join(store.path, shard_name(i))
            ends.append(np.frombuffer(store._small(base + ".docs", s), dtype=np.int64) + store.starts[i])
            prompts.append(np.frombuffer(store._small(base + ".prompt", s), dtype=np.int64))
        self.ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        self.prompt_lengths = np.concatenate(prompts) if prompts else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, rows: Tensor) -> list[tuple[list, list]]:
        out = []
        for r in rows.tolist():
            start = int(self.ends[r - 1]) if r else 0
            ids = self.store.read(start, int(self.ends[r]) - start).tolist()
            p = int(self.prompt_lengths[r])
            out.append((ids[:p], ids[p:]))
        return out


# --------------------------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------------------------
def write_atomic(path: str, data: bytes | str) -> None:
    """Write a whole file durably: beside it, fsynced, then renamed into place, so a reader (or a resumed prepare)
    never sees half of it. Every file of a store and of a teacher cache is written this way."""
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"  # two writers of one directory never share one
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(out: str, i: int, token_lists, dtype: np.dtype, first_document: int,
                prompt_lengths: list[int] | None = None) -> dict:
    """Write shard i from its documents' token lists (EOS already appended; for chat stores prompt + response and
    the prompt lengths); durable before its .json appears."""
    name = shard_name(i)
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    flat = np.fromiter((x for t in token_lists for x in t), dtype=dtype, count=int(lengths.sum()))
    parts = [(".bin", flat.tobytes()), (".docs", np.cumsum(lengths).tobytes())]
    parts.append((".sums", integrity.chunk_sums(parts[0][1]).tobytes()))
    if prompt_lengths is not None:
        parts.append((".prompt", np.asarray(prompt_lengths, dtype=np.int64).tobytes()))
    for suffix, data in parts:
        write_atomic(os.path.join(out, name + suffix), data)
    meta = {"file": name + ".bin", "tokens": int(flat.size), "documents": int(lengths.size),
            "first_document": first_document, "sha256": {suffix: integrity.sha256(d) for suffix, d in parts}}
    write_atomic(os.path.join(out, name + ".json"), json.dumps(meta))
    return meta


def shard_done(out: str, i: int) -> dict | None:
    try:
        with open(os.path.join(out, shard_name(i) + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_index(out: str, header: dict, n_shards: int) -> dict | None:
    """index.json once every shard is done (any caller may write it: the content is the same); None if not yet."""
    shards = [shard_done(out, i) for i in range(n_shards)]
    if any(s is None for s in shards):
        return None
    index = {**header, "format": FORMAT, "shards": shards, "tokens": sum(s["tokens"] for s in shards),
             "documents": sum(s["documents"] for s in shards)}
    # what the store holds, not where it came from: the same tokens from moved files are the same store
    index["fingerprint"] = integrity.combine({"kind": header.get("kind"), "tokenizer": header["tokenizer"],
                                             "dtype": header["dtype"], "shards": [s["sha256"] for s in shards]})
    write_atomic(os.path.join(out, INDEX), json.dumps(index, indent=1))
    return index
