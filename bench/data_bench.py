"""Data at scale: the token store against today's in-memory path, on one corpus of >= 100M tokens, in one run.

    .venv/bin/python bench/data_bench.py                      # 100M tokens (make bench-data); about 15 min here
    .venv/bin/python bench/data_bench.py --tokens 5000000 --skip-baseline     # a quick look

The corpus is generated from the Shakespeare texts the demo ships: paragraphs repeated and shuffled (seeded) into a
jsonl file until it holds --tokens tokens of the embedded SmolLM2 tokenizer (49,152 ids: a uint16 store). Measured:
- store build tokens/s (`pipeline.prepare`, --workers processes);
- today's path: what every rank pays at start-up (`data.pack_blocks`: tokenise the whole corpus in memory), time and
  peak RSS, in a fresh process;
- loader tokens/s per rank with 1, 2 and 4 reader processes sharing one global micro-batch of --batch rows (each
  reads only its rows: bytes read per rank ~ 1/P);
- resume: the time to restore a position and read the next micro-batch at step 10 and 1,000x further;
- resident memory of a reader (after the same reads) on the full store and on a 1M-token store.
The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_corpus(path: str, tokenizer, tokens: int, seed: int = 0) -> int:
    """Shakespeare paragraphs, repeated and shuffled, until about `tokens` tokens; returns the estimate."""
    from pipeline.demo import _paragraphs
    from pipeline.assets import shakespeare_files
    paras = [p for f in shakespeare_files() for p in _paragraphs(f)]
    sample = paras[:2000]
    per_char = sum(len(tokenizer(p)["input_ids"]) + 1 for p in sample) / sum(len(p) for p in sample)
    rng, total = random.Random(seed), 0
    with open(path, "w") as f:
        while total < tokens:
            rng.shuffle(paras)
            for p in paras:
                f.write(json.dumps({"text": p}) + "\n")
                total += int(len(p) * per_char) + 1
                if total >= tokens:
                    break
    return total


def _rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reader(store: str, seq_len: int, batch: int, rank: int, world: int, steps: int) -> dict:
    """One reader process: its rows of `steps` micro-batches, with the training loop's prefetch."""
    import torch
    from pipeline.data import batches as data, token_store as S
    torch.set_num_threads(1)
    s = S.TokenStore(store)
    b = data.PackedBatches(s.blocks(seq_len), batch, rank, world, seed=0, prefetch=True)
    b.next()  # warm-up (first read, the permutation)
    t0 = time.perf_counter()
    for _ in range(steps):
        b.next()
    dt = time.perf_counter() - t0
    return {"tokens_per_s": steps * batch * seq_len / dt, "bytes_read": s.bytes_read, "rss_mb": _rss_mb()}


def resume_cost(store: str, seq_len: int, batch: int, world: int, step: int) -> float:
    """Seconds to restore the position of global step `step` and read the next micro-batch (rank 0)."""
    from pipeline.data import batches as data, token_store as S
    t0 = time.perf_counter()
    b = data.PackedBatches(S.TokenStore(store).blocks(seq_len), batch, 0, world, seed=0)
    b.load_state_dict({"epoch": step // b.per_epoch, "index": step % b.per_epoch})
    b.next()
    return time.perf_counter() - t0


def baseline(corpus: str, tokenizer_dir: str, seq_len: int) -> dict:
    """Today's non-streaming path, in this (fresh) process: tokenise everything, pack in memory."""
    from transformers import AutoTokenizer
    from pipeline.data import batches as data
    from pipeline.config import DataConfig
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    t0 = time.perf_counter()
    blocks = data.pack_blocks(data.load_documents(DataConfig(files=[corpus], seq_len=seq_len)), tok, "text", seq_len)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": blocks.numel(), "tokens_per_s": blocks.numel() / dt, "rss_mb": _rss_mb()}


def _sub(fn: str, *args) -> dict:
    """Run one of this file's functions in a fresh process (clean RSS), JSON in and out."""
    code = (f"import json, sys; sys.path.insert(0, {REPO!r}); sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import data_bench as B; print(json.dumps(B.{fn}(*json.loads(sys.argv[1]))))")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def _parallel(fn: str, arglists: list) -> list[dict]:
    code = (f"import json, sys; sys.path.insert(0, {REPO!r}); sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import data_bench as B; print(json.dumps(B.{fn}(*json.loads(sys.argv[1]))))")
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(a)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for a in arglists]
    out = []
    for p in procs:
        so, se = p.communicate()
        if p.returncode:
            raise RuntimeError(se[-3000:])
        out.append(json.loads(so.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000_000)
    ap.add_argument("--workdir", default=os.path.join(REPO, "runs", "bench_data"))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32, help="global micro-batch (rows); each of P readers reads 1/P")
    ap.add_argument("--steps", type=int, default=200, help="micro-batches each reader reads")
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    from pipeline import assets, config as C, prepare as P
    from pipeline.data import token_store as S
    from transformers import AutoTokenizer
    os.makedirs(args.workdir, exist_ok=True)
    tok_dir = assets.teacher_checkpoint(os.path.join(REPO, "runs", "assets"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    corpus = os.path.join(args.workdir, f"corpus_{args.tokens}.jsonl")
    if not os.path.exists(corpus):
        make_corpus(corpus + ".tmp", tok, int(args.tokens * 1.03))  # the estimate runs ~1.5% high
        os.replace(corpus + ".tmp", corpus)
    small = os.path.join(args.workdir, "corpus_1M.jsonl")
    if not os.path.exists(small):
        make_corpus(small, tok, 1_000_000)

    def build(src, out):
        cfg = C.load_config(os.path.join(REPO, "pipeline/configs/debug_cpu.yaml"),
                            [f"--model.tokenizer_path={tok_dir}", f"--data.files=[{src}]"])
        t0 = time.perf_counter()
        index = P.prepare(cfg, out, workers=args.workers, log=lambda m: None)
        return index["tokens"], time.perf_counter() - t0

    store, small_store = os.path.join(args.workdir, f"store_{args.tokens}"), os.path.join(args.workdir, "store_1M")
    for d in (store, small_store):
        if os.path.exists(d):
            import shutil
            shutil.rmtree(d)
    tokens, build_s = build(corpus, store)
    build(small, small_store)
    print(f"store: {tokens:,} tokens in {build_s:.1f} s = {tokens / build_s:,.0f} tokens/s "
          f"({args.workers} workers); {sum(os.path.getsize(os.path.join(store, s['file'])) for s in S.TokenStore(store).index['shards']) / 1e6:.0f} MB")

    T, B = args.seq_len, args.batch
    loaders = {}
    for P_ in (1, 2, 4):
        res = _parallel("reader", [[store, T, B // P_, r, P_, args.steps] for r in range(P_)])
        loaders[P_] = {"tokens_per_s_per_rank": sum(r["tokens_per_s"] for r in res) / P_,
                       "bytes_read_per_rank": sum(r["bytes_read"] for r in res) / P_}
        print(f"loader, {P_} reader(s): {loaders[P_]['tokens_per_s_per_rank']:,.0f} tokens/s per rank, "
              f"{loaders[P_]['bytes_read_per_rank'] / 1e6:.2f} MB read per rank")
    near = min(resume_cost(store, T, B, 8, 10) for _ in range(3))
    far = min(resume_cost(store, T, B, 8, 10_000) for _ in range(3))
    print(f"resume at step 10: {near * 1e3:.1f} ms; at step 10,000: {far * 1e3:.1f} ms")
    big_rss = _sub("reader", store, T, B, 0, 1, args.steps)["rss_mb"]
    small_rss = _sub("reader", small_store, T, B, 0, 1, args.steps)["rss_mb"]
    print(f"reader RSS: {big_rss:.0f} MB ({tokens / 1e6:.0f}M-token store) vs {small_rss:.0f} MB (1M-token store)")
    result = {"tokens": tokens, "store_build_tokens_per_s": round(tokens / build_s),
              "loader_tokens_per_s_per_rank": {p: round(v["tokens_per_s_per_rank"]) for p, v in loaders.items()},
              "bytes_read_per_rank_ratio_4_over_1": round(loaders[4]["bytes_read_per_rank"] /
                                                          loaders[1]["bytes_read_per_rank"], 3),
              "resume_time_ratio_far_over_near": round(far / near, 2),
              "reader_rss_ratio_big_over_small": round(big_rss / small_rss, 3)}
    if not args.skip_baseline:
        base = _sub("baseline", corpus, tok_dir, T)
        print(f"today's path (every rank, at start-up): {base['seconds']:.1f} s to tokenise and pack "
              f"{base['tokens']:,} tokens ({base['tokens_per_s']:,.0f} tokens/s), peak RSS {base['rss_mb']:.0f} MB")
        result.update(baseline_startup_s=round(base["seconds"], 1), baseline_rss_mb=round(base["rss_mb"]),
                      store_reader_rss_mb=round(big_rss),
                      startup_speedup=round(base["seconds"] / max(resume_cost(store, T, B, 8, 10), 1e-9)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
