"""What checking every read costs, at the demo's size: the token store's and the offline top-k cache's chunk
checksums per training step, against the same reads unchecked and against the step itself.

    .venv/bin/python bench/integrity_bench.py          (make bench-integrity; about a minute here)

The demo's shapes: SmolLM2-135M-Instruct (30 layers) teaching a 6-layer student of its width, micro-batches of 8
sequences of 128 tokens. Measured in one process:
- a step's reads from a token store of random tokens (8 random blocks), checked (integrity.CheckedFile: the covering
  64 KiB chunks, crc32 each, and the vocabulary bound) and unchecked (plain pread of the same bytes);
- a step's reads from an offline top-k cache (k = 64) the same two ways;
- the step: the teacher's forward and the student's forward and backward on one micro-batch (random weights of the
  demo's shapes; no optimizer, so the step is underestimated and the share overestimated);
- start-up, once per run: opening the store and the teacher's sampled content hash on a checkpoint of its size.
The last line is JSON.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

# SmolLM2-135M-Instruct's config (what pipeline.assets converts); the demo's student keeps 6 of its 30 layers
TEACHER = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)
STUDENT = dict(TEACHER, num_hidden_layers=6)
SEQ, BATCH, K, TOKENS = 128, 8, 64, 4_000_000


def best(fn, repeat: int) -> float:
    """Median seconds of `fn` over `repeat` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> int:
    from transformers import AutoConfig, AutoModelForCausalLM
    from pipeline.data import token_store as S
    from pipeline.run import integrity
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    work = tempfile.mkdtemp(prefix="integrity_bench_")
    # a store of random tokens, written by the real writer (digests, chunk checksums)
    store_dir = os.path.join(work, "store")
    os.makedirs(store_dir)
    docs = [list(rng.integers(0, TEACHER["vocab_size"], 1000)) for _ in range(TOKENS // 1000)]
    meta = S.write_shard(store_dir, 0, docs, S.token_dtype(TEACHER["vocab_size"]), 0)
    header = {"kind": "text", "tokenizer": "bench", "eos_id": 0, "vocab_size": TEACHER["vocab_size"],
              "dtype": S.token_dtype(TEACHER["vocab_size"]).name, "source": {}, "shard_count": 1}
    S.write_index(store_dir, header, 1)
    t0 = time.perf_counter()
    store = S.TokenStore(store_dir)
    open_s = time.perf_counter() - t0
    blocks = store.blocks(SEQ)
    raw_fd = os.open(os.path.join(store_dir, meta["file"]), os.O_RDONLY)
    item = store.dtype.itemsize
    picks = [torch.from_numpy(rng.integers(0, len(blocks), BATCH)) for _ in range(64)]
    it = iter(range(10**9))

    def checked_store():
        blocks[picks[next(it) % 64]]

    def raw_store():
        for r in picks[next(it) % 64].tolist():
            np.frombuffer(os.pread(raw_fd, SEQ * item, r * SEQ * item), dtype=store.dtype).astype(np.int64)

    store_checked, store_raw = best(checked_store, 200), best(raw_store, 200)
    # an offline top-k cache file of one chunk of 256 blocks, read a step's rows at a time
    per = (SEQ - 1) * K
    lp = rng.standard_normal(256 * per).astype(np.float16).tobytes()
    path = os.path.join(work, "chunk.lp")
    with open(path, "wb") as f:
        f.write(lp)
    cached = integrity.CheckedFile(path, integrity.chunk_sums(lp), len(lp))
    raw_lp = os.open(path, os.O_RDONLY)
    rows = [rng.integers(0, 256, BATCH).tolist() for _ in range(64)]

    def checked_cache():
        for r in rows[next(it) % 64]:  # the log-probs and (at the same size in uint16) the ids: twice
            for _ in range(2):
                np.frombuffer(cached.pread(per * 2, r * per * 2), dtype=np.float16)

    def raw_cache():
        for r in rows[next(it) % 64]:
            for _ in range(2):
                np.frombuffer(os.pread(raw_lp, per * 2, r * per * 2), dtype=np.float16)

    cache_checked, cache_raw = best(checked_cache, 200), best(raw_cache, 200)
    # the step it is measured against
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TEACHER)).eval()
    student = AutoModelForCausalLM.from_config(AutoConfig.for_model(**STUDENT))
    ids = torch.randint(0, TEACHER["vocab_size"], (BATCH, SEQ))

    def step():
        with torch.no_grad():
            t = teacher(ids).logits
        s = student(ids).logits
        (s.float().log_softmax(-1) * t.float().softmax(-1)).sum(-1).mean().neg().backward()

    step_s = best(step, 3)
    # start-up: the teacher's sampled content hash on a checkpoint of its size (fp32, as the demo stores it)
    teacher.save_pretrained(os.path.join(work, "teacher"))
    t0 = time.perf_counter()
    integrity.weights_fingerprint(os.path.join(work, "teacher"))
    identity_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    integrity.weights_fingerprint(os.path.join(work, "teacher"), full=True)
    identity_full_s = time.perf_counter() - t0

    check_s = (store_checked - store_raw) + (cache_checked - cache_raw)
    print(f"store reads per step:  checked {store_checked * 1e3:.3f} ms, unchecked {store_raw * 1e3:.3f} ms")
    print(f"top-k cache per step:  checked {cache_checked * 1e3:.3f} ms, unchecked {cache_raw * 1e3:.3f} ms")
    print(f"step (forward + backward, no optimizer): {step_s * 1e3:.0f} ms")
    print(f"checks per step: {check_s * 1e3:.3f} ms = {check_s / step_s:.3%} of the step")
    print(f"start-up: store open {open_s * 1e3:.1f} ms ({TOKENS:,} tokens); teacher content hash {identity_s * 1e3:.1f} "
          f"ms sampled, {identity_full_s:.2f} s in full")
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"store_read_ms_checked": store_checked * 1e3, "store_read_ms_unchecked": store_raw * 1e3,
                      "cache_read_ms_checked": cache_checked * 1e3, "cache_read_ms_unchecked": cache_raw * 1e3,
                      "step_ms": step_s * 1e3, "check_share_of_step": check_s / step_s,
                      "store_open_ms": open_s * 1e3, "teacher_identity_ms": identity_s * 1e3,
                      "teacher_identity_full_s": identity_full_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
