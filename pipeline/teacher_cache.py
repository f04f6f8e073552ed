"""The teacher's final hidden states at the response positions of an instruction dataset, computed once, so that
distilling many students on the same off-policy data (a method study, a seed or learning-rate sweep) never runs the
teacher's forward on those responses again: `loss.teacher_cache: DIR`.

    python -m pipeline.teacher_cache --config run.yaml --out DIR [--batch 8] [--section.key=value ...]

Exact, unlike the top-k cache of pipeline.precompute_teacher: the loss applies the teacher's output layer to the
stored hidden states as it would to fresh ones (the whole vocabulary, every method), only the teacher's body is
skipped, and the states are computed by the function training uses (parallelize.frozen_forward on the headless
teacher). The teacher is still loaded: generations (on-policy, replay, teacher-written steps) and held-out
evaluations need it, and the steps on such data run it as usual.

An example is found by a digest of its token ids (prompt + response), so any order, sharding or subset of the data
finds its rows, and an example that tokenises differently (another data.seq_len, max_prompt_len, chat template) is
missing rather than silently wrong: pipeline.train checks every training example before the first step.
DIR/index.json: what it was computed from, the files' digests and the cache's fingerprint; DIR/hidden.npy: float32
[response tokens, hidden], every read checked against DIR/hidden.sums (crc32 per 64 KiB); DIR/rows.json:
{digest: [offset, length]}. Computed on one process (the study-sized sets it is for take minutes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch
from torch import Tensor

from pipeline import cli, config as C
from pipeline.data import batches as data
from pipeline.data.teacher_topk import teacher_identity
from pipeline.data.token_store import write_atomic
from pipeline.models import build as M
from pipeline.parallel.backends import causal_without_mask_reads, frozen_forward
from pipeline.run import integrity

INDEX, HIDDEN, ROWS, SUMS = "index.json", "hidden.npy", "rows.json", "hidden.sums"
FORMAT = 2  # 2: checksums of every file, the teacher known by content


def digest(prompt, response) -> str:
    """The key of one tokenised example."""
    return hashlib.sha256(np.asarray(list(prompt) + [-1] + list(response), dtype=np.int64).tobytes()).hexdigest()[:24]


def identity(cfg) -> dict:
    """What the states depend on besides the examples: the teacher (data.teacher_topk.teacher_identity: its weights by
    content, or its config and init seed) and the dtype it runs in."""
    return {"teacher": teacher_identity(cfg), "dtype": cfg.model.dtype}


def fingerprint(cfg, examples: list) -> dict:
    """What a cache of `examples` holds: the teacher's identity and a digest of every example's tokens."""
    return {**identity(cfg), "examples": hashlib.sha256("".join(digest(p, r) for p, r in examples).encode())
            .hexdigest()[:24]}


def examples_of(cfg, tokenizer) -> list:
    """What a run's cache should hold: every training example and the held-out examples the run's evaluations
    score (data.eval_files' first data.eval_blocks; their teacher-forced KL then skips the teacher too)."""
    d = cfg.data
    held = data.load_examples(d, tokenizer, files=d.eval_files, what="data.eval_files")[: d.eval_blocks] \
        if d.eval_files else []
    return data.load_examples(d, tokenizer) + held


def build(cfg, examples: list, out: str, batch: int = 8, log=print) -> str:
    """Compute the cache of `examples` (data.load_examples' (prompt ids, response ids)) under `out`; reused when
    it holds exactly these examples for this teacher."""
    want = fingerprint(cfg, examples)
    index_path = os.path.join(out, INDEX)
    if os.path.exists(index_path) and {k: v for k, v in json.load(open(index_path)).items() if k in want} == want:
        return out
    os.makedirs(out, exist_ok=True)
    if os.path.exists(index_path):  # a cache of other examples: unfinished until the new index is written
        os.remove(index_path)
    m = cfg.model
    teacher = M.build_model(m.teacher_path, m.teacher_config, m.dtype, m.init_seed + 1).eval().requires_grad_(False)
    M.detach_head(teacher, copy=False)
    causal_without_mask_reads(teacher)
    hidden = int(teacher.config.hidden_size)
    total = sum(len(r) for _, r in examples)
    states = np.lib.format.open_memmap(os.path.join(out, HIDDEN + ".tmp.npy"), mode="w+", dtype=np.float32,
                                       shape=(total, hidden))
    rows, offset = {}, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            part = examples[i:i + batch]
            b = data.collate([p for p, _ in part], [r for _, r in part], 0)
            attn = None if bool(b.attention_mask.all()) else b.attention_mask[:, :-1]  # as train_step passes it
            h = frozen_forward(teacher, b.tokens[:, :-1], attn)                           # [B, T-1, H]
            for j, (p, r) in enumerate(part):
                states[offset:offset + len(r)] = h[j, len(p) - 1:len(p) - 1 + len(r)].float().numpy()
                rows[digest(p, r)] = [offset, len(r)]
                offset += len(r)
            log(f"teacher cache: {min(i + batch, len(examples))}/{len(examples)} examples")
    states.flush()
    del states
    # checksums of what was written, read back once: every later read of the states is checked against them
    tmp = os.path.join(out, HIDDEN + ".tmp.npy")
    sums, whole = [], hashlib.sha256()
    with open(tmp, "rb") as f:
        while block := f.read(integrity.CHUNK * 256):
            sums.append(integrity.chunk_sums(block))
            whole.update(block)
    sums = np.concatenate(sums).tobytes()
    os.replace(tmp, os.path.join(out, HIDDEN))
    rows_json = json.dumps(rows).encode()
    write_atomic(os.path.join(out, ROWS), rows_json)
    write_atomic(os.path.join(out, SUMS), sums)
    files = {HIDDEN: {"bytes": os.path.getsize(os.path.join(out, HIDDEN)), "sha256": whole.hexdigest()},
             ROWS: {"sha256": integrity.sha256(rows_json)}, SUMS: {"sha256": integrity.sha256(sums)}}
    index = {**want, "format": FORMAT, "hidden_size": hidden, "tokens": total, "n_examples": len(examples),
             "files": files, "fingerprint": integrity.combine({**want, "files": files})}
    write_atomic(index_path, json.dumps(index, indent=1))  # last: marks the cache whole
    return out


class TeacherHidden:
    """Reader of a finished cache: the stored states of a micro-batch's examples, in the loss rows' order."""

    def __init__(self, path: str):
        index_path = os.path.join(path, INDEX)
        if not os.path.isfile(index_path):
            raise ValueError(f"loss.teacher_cache: {path!r} is not a finished teacher cache (no {INDEX}); run "
                             f"python -m pipeline.teacher_cache --config ... --out {path}")
        self.path, self.index = path, json.load(open(index_path))
        if self.index.get("format") != FORMAT:
            raise ValueError(f"loss.teacher_cache: {path} has format {self.index.get('format')}, this version reads "
                             f"{FORMAT} (content checksums): compute it again with python -m pipeline.teacher_cache")
        self.fingerprint = self.index["fingerprint"]
        files = self.index["files"]
        self.rows = json.loads(integrity.check_whole(os.path.join(path, ROWS), files[ROWS]["sha256"], "the cache"))
        sums = np.frombuffer(integrity.check_whole(os.path.join(path, SUMS), files[SUMS]["sha256"], "the cache"),
                             dtype=np.uint32)
        hidden_path = os.path.join(path, HIDDEN)
        self.states = integrity.CheckedFile(hidden_path, sums, files[HIDDEN]["bytes"])
        self.offset = np.load(hidden_path, mmap_mode="r").offset  # where the array starts, past the .npy header

    def check(self, cfg, examples: list, hidden_size: int) -> None:
        """ValueError naming the fix unless the cache was computed for this teacher, dtype and every example."""
        mine = identity(cfg)
        bad = [k for k in mine if self.index.get(k) != mine[k]]
        if bad or self.index["hidden_size"] != hidden_size:
            raise ValueError(f"loss.teacher_cache {self.path!r} was computed for another teacher or dtype "
                             f"({', '.join(bad) or 'hidden size'} differ): recompute it with python -m "
                             f"pipeline.teacher_cache for this config")
        missing = sum(digest(p, r) not in self.rows for p, r in examples)
        if missing:
            raise ValueError(f"loss.teacher_cache {self.path!r} lacks {missing} of the {len(examples)} training "
                             f"examples (other data, or data.seq_len / max_prompt_len / the chat template changed "
                             f"how they tokenise): recompute it with python -m pipeline.teacher_cache for this config")

    def holds(self, pairs: list) -> bool:
        return all(digest(p, r) in self.rows for p, r in pairs)

    def states_of(self, pairs: list) -> Tensor:
        """[response tokens of every pair, hidden] float32, pair after pair (collate's loss rows, in order)."""
        row = 4 * self.index["hidden_size"]
        parts = [np.frombuffer(self.states.pread(n * row, self.offset + o * row), dtype=np.float32)
                 for o, n in (self.rows[digest(p, r)] for p, r in pairs)]
        return torch.from_numpy(np.concatenate(parts).reshape(-1, self.index["hidden_size"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=cli.positive_int, default=8)
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = C.load_config(args.config, overrides)
        if cfg.data.kind != "chat" or cfg.data.store:
            raise ValueError("the teacher cache is for instruction data from data.files (data.kind chat, no "
                             "data.store)")
        examples = examples_of(cfg, M.load_tokenizer(cfg))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    build(cfg, examples, args.out, args.batch, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({"cache": args.out, "examples": len(examples)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
