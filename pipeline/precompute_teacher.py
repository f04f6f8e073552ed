"""The teacher's top-k log-probabilities over a token store, computed once and stored, so that distilling many
students (or many epochs) never runs the teacher again: training with `loss.offline_teacher: DIR` loads no teacher.

    python -m pipeline.precompute_teacher --config run.yaml --out DIR [--k 64] [--batch 8]
    torchrun --nproc-per-node 8 -m pipeline.precompute_teacher ...     (ranks share the chunks; no process group)

For every block of data.seq_len tokens of data.store, and every position that predicts a next token (seq_len - 1 of
them), the k largest log-probabilities of the teacher (normalised over the whole vocabulary, float16) and their token
ids (uint16 / uint32). The leftover mass 1 - sum(exp) stays exact in the loss (vocab_parallel.topk_loss: one bucket
for the rest of the vocabulary, for teacher and student alike). Blocks are written in chunks of --chunk blocks;
chunk c belongs to rank c mod world; a chunk is done when its .json exists, so an interrupted run redoes only the
rest, and whichever rank finishes last writes index.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import Tensor

from pipeline import cli, config as C
from pipeline.data import token_store as S
from pipeline.data.batches import documents
from pipeline.data.teacher_topk import FORMAT, INDEX, chunk_name, teacher_identity
from pipeline.loss.vocab_parallel import topk_teacher
from pipeline.models.build import build_model, document_positions, load_tokenizer
from pipeline.parallel.distributed import device, env_ranks
from pipeline.run import integrity


@torch.no_grad()
def teacher_topk(teacher, tokens: Tensor, k: int, eos_id: int | None = None) -> tuple[Tensor, Tensor]:
    """Top-k of the teacher's log-softmax (fp32) at every position but the last: ([B, T-1, k], [B, T-1, k]).
    eos_id (data.document_mask): attention inside each document, as training runs the teacher (transformers derives
    the documents from the positions, which restart with each)."""
    inputs = tokens[:, :-1]
    docs = None if eos_id is None else documents(inputs, eos_id)
    extra = {} if docs is None else {"position_ids": document_positions(docs)}
    logits = teacher(input_ids=inputs, use_cache=False, **extra).logits
    return topk_teacher(logits, k)


def precompute(cfg: C.Config, out: str, *, k: int, batch: int, chunk: int, rank: int, world: int, log=print) -> dict | None:
    d = cfg.data
    if not d.store:
        raise ValueError("pipeline.precompute_teacher reads a token store: set data.store (pipeline.prepare)")
    store = S.TokenStore(d.store)
    tokenizer = load_tokenizer(cfg)
    store.check_tokenizer(tokenizer)
    blocks = store.blocks(d.seq_len)
    n = len(blocks)
    vocab = len(tokenizer)
    if not 1 <= k <= vocab:
        raise ValueError(f"--k must be in [1, {vocab}], got {k}")
    header = {"format": FORMAT, "k": k, "seq_len": d.seq_len, "blocks": n, "chunk_blocks": chunk,
              "store": store.fingerprint, "teacher": teacher_identity(cfg), "id_dtype": S.token_dtype(vocab).name,
              "lp_dtype": "float16", "document_mask": d.document_mask}
    os.makedirs(out, exist_ok=True)
    head = os.path.join(out, "header.json")
    if os.path.exists(head):
        with open(head) as f:
            old = json.load(f)
        if old != header:
            raise ValueError(f"{out} holds a teacher cache of another setup ({ {k_: old[k_] for k_ in old if old[k_] != header.get(k_)} }): choose another --out")
    elif rank == 0:
        S.write_atomic(head, json.dumps(header, indent=1))
    m = cfg.model
    teacher = build_model(m.teacher_path, m.teacher_config, m.dtype, m.init_seed + 1).eval()
    teacher.to(device())
    eos = tokenizer.eos_token_id if d.document_mask else None
    chunks = -(-n // chunk)
    todo = [c for c in range(chunks) if c % world == rank and not os.path.exists(os.path.join(out, chunk_name(c) + ".json"))]
    log(f"precompute_teacher: {n} blocks in {chunks} chunks; rank {rank} of {world} has {len(todo)} to do")
    t0, done_blocks = time.time(), 0
    for c in todo:
        rows = torch.arange(c * chunk, min((c + 1) * chunk, n))
        lps, idss = [], []
        for b0 in range(0, len(rows), batch):
            lp, ids = teacher_topk(teacher, blocks[rows[b0:b0 + batch]].to(device()), k, eos)
            lps.append(lp.to(torch.float16).cpu().numpy())
            idss.append(ids.cpu().numpy().astype(S.token_dtype(vocab)))
        meta = {"blocks": len(rows), "bytes": {}, "sha256": {}}
        for ext, arr in ((".lp", np.concatenate(lps)), (".ids", np.concatenate(idss))):
            raw = arr.tobytes()
            sums = integrity.chunk_sums(raw).tobytes()  # beside the file, as a store's: the index stays small
            for name, data in ((ext, raw), (ext + ".sums", sums)):
                S.write_atomic(os.path.join(out, chunk_name(c) + name), data)
                meta["sha256"][name] = integrity.sha256(data)
            meta["bytes"][ext] = len(raw)
        # the done marker last, durably: an interrupted run redoes exactly the chunks without one
        S.write_atomic(os.path.join(out, chunk_name(c) + ".json"), json.dumps(meta))
        done_blocks += len(rows)
        log(f"precompute_teacher: chunk {c} done ({done_blocks * (d.seq_len - 1) / (time.time() - t0):,.0f} "
            f"positions/s)")
    if all(os.path.exists(os.path.join(out, chunk_name(c) + ".json")) for c in range(chunks)):
        metas = []
        for c in range(chunks):
            with open(os.path.join(out, chunk_name(c) + ".json")) as f:
                metas.append(json.load(f))
        index = {**header, "chunks": metas,
                 "fingerprint": integrity.combine({**header, "chunks": [m["sha256"] for m in metas]})}
        S.write_atomic(os.path.join(out, INDEX), json.dumps(index))
        return header
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", help="cache directory (default: loss.offline_teacher of the config)")
    ap.add_argument("--k", type=cli.positive_int, default=64, help="log-probs kept per position (64-256 typical)")
    ap.add_argument("--batch", type=cli.positive_int, default=8, help="blocks per teacher forward")
    ap.add_argument("--chunk", type=cli.positive_int, default=256, help="blocks per chunk file (the unit of resumption)")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = C.load_config(args.config, overrides)
        out = args.out or cfg.loss.offline_teacher
        if not out:
            raise ValueError("where to write: pass --out DIR or set loss.offline_teacher")
        rank, world, _, _ = env_ranks()
        precompute(cfg, out, k=args.k, batch=args.batch, chunk=args.chunk, rank=rank, world=world,
                   log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
