"""Tokenise a corpus once into a token store (pipeline/token_store.py) that training then reads with data.store.

    python -m pipeline.prepare --config run.yaml [--out DIR] [--workers N] [--shards N] [--task I --tasks N]
    python -m pipeline.prepare --config run.yaml [--out DIR] --verify      (hash a finished store in full)

Packed text (data.kind text) or instruction examples (data.kind chat: prompt and response tokens per example, as
data.tokenize_example makes them, with the prompt lengths for the loss masks). The documents are data.files (or
data.dataset) of the config, tokenised with its tokenizer (model.tokenizer_path,
else the teacher's directory). --out defaults to data.store. The corpus is split into --shards contiguous ranges of
documents (default: one per 50,000 documents, at least --workers); --workers processes tokenise one shard at a time.
Interrupted, it redoes only the shards that were not finished; a store made with another tokenizer or from other
data is refused. On a cluster, a Slurm array can share the shards: `--task $SLURM_ARRAY_TASK_ID --tasks N` does
shards I, I+N, ...; whichever task finishes the last shard writes the index (slurm/prepare_array.sbatch).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time

from pipeline import cli, config as C
from pipeline.data import batches as data, token_store as S
from pipeline.models.build import load_tokenizer
from pipeline.run.integrity import CorruptData

HEADER = "header.json"
_WORK: dict = {}  # what the forked workers inherit: the documents, the tokenizer, the shard ranges


def _tokenize_shard(i: int) -> tuple[int, int]:
    w = _WORK
    a, b = w["ranges"][i]
    tok = w["tokenizer"]
    lists, prompt_lens = [], None
    if w["chat"] is None:  # packed text: each document's tokens and EOS, exactly as data.pack_blocks
        field = w["text_field"]
        for s in range(a, b, 1000):
            texts = [data.text_cell(t, field, s + j) for j, t in enumerate(w["docs"][s:min(s + 1000, b)][field])]
            ids = tok(texts, add_special_tokens=False)["input_ids"]
            lists.extend(x + [tok.eos_token_id] for x, t in zip(ids, texts) if t)
    else:  # instruction data: prompt + response tokens per example (data.tokenize_example), prompt lengths aside
        d, layout, prompt_lens = w["chat"], w["layout"], []
        for j in range(a, b):
            ex = data.tokenize_example(w["docs"][j], tok, d, layout, j)
            if ex is not None and ex[0] and ex[1]:
                lists.append(ex[0] + ex[1])
                prompt_lens.append(len(ex[0]))
    meta = S.write_shard(w["out"], i, lists, w["dtype"], a, prompt_lens)
    return i, meta["tokens"]


def prepare(cfg: C.Config, out: str, *, workers: int = 1, shards: int | None = None, task: int = 0, tasks: int = 1,
            log=print) -> dict | None:
    """Build (or finish) the store at `out`; returns its index, or None while other array tasks still have shards
    to do."""
    d = cfg.data
    tokenizer = load_tokenizer(cfg)
    chat = d.kind == "chat"
    docs = data.load_documents(dataclasses.replace(d, streaming=False, store=None, text_field=None if chat else
                                                   d.text_field))
    n = len(docs)
    if n == 0:
        raise ValueError("data.files hold no documents")
    source = {"files": [os.path.abspath(f) for f in C.resolve_files(d.files)] if d.files else None, "dataset": d.dataset,
              "text_field": d.text_field, "max_documents": d.max_documents, "documents": n}
    if chat:  # what tokenize_example's output depends on: a training run with other values is refused
        source["chat"] = {k: getattr(d, k) for k in S.CHAT_FIELDS}
    header = {"kind": d.kind, "tokenizer": S.tokenizer_fingerprint(tokenizer), "eos_id": tokenizer.eos_token_id,
              "vocab_size": len(tokenizer), "dtype": S.token_dtype(len(tokenizer)).name, "source": source,
              "shard_count": shards or max(workers, -(-n // 50_000))}
    os.makedirs(out, exist_ok=True)
    header_path = os.path.join(out, HEADER)
    if os.path.exists(header_path):
        with open(header_path) as f:
            old = json.load(f)
        if old["tokenizer"] != header["tokenizer"]:
            raise S.StoreError(f"{out} holds a store made with another tokenizer: choose another --out (or delete "
                               f"it)")
        if old["source"] != source:
            raise S.StoreError(f"{out} holds a store made from other data ({old['source']}): choose another --out "
                               f"(or delete it)")
        header["shard_count"] = old["shard_count"]  # resuming: the split it started with
    else:
        S.write_atomic(header_path, json.dumps(header, indent=1))
    count = header["shard_count"]
    ranges = [(i * n // count, (i + 1) * n // count) for i in range(count)]
    todo = [i for i in range(count) if i % tasks == task and S.shard_done(out, i) is None]
    log(f"prepare: {n} documents -> {count} shards in {out}; {len(todo)} to do here, {workers} worker(s)")
    _WORK.update(docs=docs, tokenizer=tokenizer, text_field=d.text_field, dtype=S.token_dtype(len(tokenizer)),
                 out=out, ranges=ranges, chat=d if chat else None,
                 layout=data.chat_layout(docs, d) if chat else None)
    t0, tokens = time.time(), 0
    if workers > 1 and len(todo) > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; tokenizers' pool and fork clash
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.imap_unordered(_tokenize_shard, todo)
            tokens = _progress(results, len(todo), t0, log)
    else:
        tokens = _progress(map(_tokenize_shard, todo), len(todo), t0, log)
    index = S.write_index(out, header, count)
    if index and chat and index["documents"] == 0:
        raise ValueError(f"data.files: none of the {n} rows has both a non-empty prompt and a non-empty response")
    elapsed = time.time() - t0
    log(f"prepare: {tokens} tokens tokenised in {elapsed:.1f} s ({tokens / max(elapsed, 1e-9):,.0f} tokens/s)"
        + ("; store complete" if index else "; other tasks still have shards to do"))
    return index


def _progress(results, total: int, t0: float, log) -> int:
    tokens = 0
    for done, (_, n) in enumerate(results, 1):
        tokens += n
        rate = tokens / max(time.time() - t0, 1e-9)
        log(f"prepare: shard {done}/{total} done, {tokens:,} tokens, {rate:,.0f} tokens/s")
    return tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", help="store directory (default: data.store of the config)")
    ap.add_argument("--workers", type=cli.positive_int, default=os.cpu_count() or 1)
    ap.add_argument("--shards", type=cli.positive_int, default=None)
    ap.add_argument("--task", type=cli.count, default=0, help="this array task's index (shards task, task + tasks, ...)")
    ap.add_argument("--tasks", type=cli.positive_int, default=1, help="how many array tasks share the shards")
    ap.add_argument("--verify", action="store_true",
                    help="hash every file of the finished store against the digests recorded when it was written "
                         "(reads it all); exit 1 naming what differs")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = C.load_config(args.config, overrides)
        out = args.out or cfg.data.store
        if not out:
            raise ValueError("where to write the store: pass --out DIR or set data.store")
        if args.verify:
            try:
                bad = S.TokenStore(out).verify()
            except CorruptData as e:
                bad = [str(e)]
            print("\n".join(f"differs: {b}" for b in bad) or f"{out}: every file matches its digest",
                  file=sys.stderr)
            return 1 if bad else 0
        if not 0 <= args.task < args.tasks:
            raise ValueError(f"--task {args.task} must be in [0, --tasks {args.tasks})")
        prepare(cfg, out, workers=args.workers, shards=args.shards, task=args.task, tasks=args.tasks,
                log=lambda m: print(m, file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
