"""The reader of a precomputed teacher top-k cache (pipeline.precompute_teacher writes it): rows of store blocks ->
the teacher's top-k log-probabilities and ids, every read checked against the chunk checksums written with them;
and what identifies the teacher by content."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import Tensor

from pipeline import config as C
from pipeline.data import token_store as S
from pipeline.run import integrity

INDEX = "index.json"
FORMAT = 2  # 2: chunk checksums and digests, the store and the teacher known by content


def chunk_name(i: int) -> str:
    return f"chunk_{i:06d}"


def teacher_identity(cfg: C.Config) -> str:
    """What the teacher is, by content: its checkpoint's weights (integrity.weights_fingerprint: config, sizes,
    headers and sampled spans of every weight file), or for a teacher built from a config, that config and its init
    seed (which decide its weights)."""
    m = cfg.model
    if m.teacher_path:
        return integrity.weights_fingerprint(m.teacher_path)
    return integrity.combine({"config": m.teacher_config, "seed": m.init_seed + 1})


class TeacherTopk:
    """Reader of a precomputed cache: rows of blocks -> (log-probs [B, T-1, k] float32, ids [B, T-1, k] int64).
    Every read is checked against the chunk checksums written with it (integrity.CorruptData otherwise)."""

    def __init__(self, path: str):
        index_path = os.path.join(path, INDEX)
        if not os.path.isfile(index_path):
            raise S.StoreError(f"loss.offline_teacher: {path!r} is not a finished teacher cache (no {INDEX}); run "
                               f"python -m pipeline.precompute_teacher (it resumes where it stopped)")
        with open(index_path) as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT:
            raise S.StoreError(f"loss.offline_teacher: {path} has format {self.index.get('format')}, this version "
                               f"reads {FORMAT} (content checksums): compute it again with pipeline.precompute_teacher")
        self.path, self.k, self.T = path, self.index["k"], self.index["seq_len"]
        self.chunk = self.index["chunk_blocks"]
        self.id_dtype = np.dtype(self.index["id_dtype"])
        self.fingerprint = self.index["fingerprint"]
        self._files: dict[int, tuple] = {}

    def check(self, cfg: C.Config, store: S.TokenStore) -> None:
        want = {"store": store.fingerprint, "seq_len": cfg.data.seq_len, "teacher": teacher_identity(cfg),
                "document_mask": cfg.data.document_mask}
        # a cache written before document masking existed: the teacher saw whole rows
        have = {k: self.index.get(k, False) for k in want}
        bad = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        if bad:
            raise S.StoreError(f"loss.offline_teacher: {self.path} was computed for another setup: "
                               + ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in bad.items())
                               + ": compute it again with python -m pipeline.precompute_teacher for this config")

    def _open(self, c: int) -> tuple:
        if c not in self._files:
            meta, base = self.index["chunks"][c], os.path.join(self.path, chunk_name(c))
            self._files[c] = tuple(
                integrity.CheckedFile(base + ext, np.frombuffer(
                    integrity.check_whole(base + ext + ".sums", meta["sha256"][ext + ".sums"], "its chunk"),
                    dtype=np.uint32), meta["bytes"][ext])
                for ext in (".lp", ".ids"))
        return self._files[c]

    def read(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        per = (self.T - 1) * self.k
        lps, ids = [], []
        for r in rows.tolist():
            lp_file, ids_file = self._open(r // self.chunk)
            j = r % self.chunk
            lps.append(np.frombuffer(lp_file.pread(per * 2, j * per * 2), dtype=np.float16))
            ids.append(np.frombuffer(ids_file.pread(per * self.id_dtype.itemsize, j * per * self.id_dtype.itemsize),
                                     dtype=self.id_dtype))
        shape = (len(lps), self.T - 1, self.k)
        return (torch.from_numpy(np.stack(lps).astype(np.float32)).view(shape),
                torch.from_numpy(np.stack(ids).astype(np.int64)).view(shape))


class OfflineBlocks:
    """Store blocks that come with the teacher's stored top-k: indexable like StoreBlocks, returning
    (tokens [B, T], log-probs [B, T-1, k], ids [B, T-1, k])."""

    def __init__(self, blocks: S.StoreBlocks, topk: TeacherTopk):
        self.blocks, self.topk, self.store = blocks, topk, blocks.store

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, rows: Tensor):
        return (self.blocks[rows], *self.topk.read(rows))
