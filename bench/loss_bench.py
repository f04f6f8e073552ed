"""Distillation-loss benchmark: our fused chunked loss against our naive full-logits loss and the CPU peers, side by
side in one process on the same inputs (hidden states -> output layers -> generalized JSD, forward + backward).

    make bench                                   # default grid, ends with one JSON line for N = 4096
    .venv-bench/bin/python bench/loss_bench.py --tokens 1024,2048,4096,8192
    .venv-bench/bin/python bench/loss_bench.py --world-size 2   # per-rank loss memory, vocab split over 2 ranks
                                                               # (eager chunk loss; --compile for the compiled one)

Rows: `ours` (pipeline.vocab_parallel.fused_linear_loss), `naive` (the same loss on full [N, V] logits),
`trl` (TRL's GKDTrainer.generalized_jsd_loss on full logits), `liger` (LigerFusedLinearJSDLoss(compiled=False), its
pure-PyTorch chunked loss), and `limit`: the bare output-layer matmuls (teacher fwd, student fwd + bwd), chunked the
same way, which any exact loss must pay. `ours` runs the chunk loss through torch.compile (compiled once in the
warm-up); `ours_eager` is the same without it.

All rows run side by side in one process on the same inputs. Time: one fwd+bwd after a warm-up. Memory: the peak
RSS above the level before the call, sampled every millisecond by a thread. The process re-executes itself with
glibc's mmap threshold fixed at 1 MiB, so every large buffer is its own mmap, returned when freed, and RSS follows
the live tensors (by default glibc keeps freed buffers on its heap and a later row would reuse an earlier row's
memory). That allocator also turned out to be the fastest one here for every row: MALLOC_MMAP_MAX_=0 (heap
reuse) made all rows about 3x slower.
Implementations whose projected peak (measured bytes per token x vocab cell, which is constant for a path that
never chunks) does not fit in the machine's available memory are skipped and the projection is printed, marked
"projected".
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time

import torch

from pipeline.loss import divergences as L
from pipeline.loss import vocab_parallel as VP

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a thread (torch ops release the GIL)."""

    def __enter__(self):
        gc.collect()
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())
        self.extra = self.peak - self.base


def make_inputs(n, V, hs_dim, ht_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = (torch.randn(n, hs_dim, generator=g) / hs_dim ** 0.5).requires_grad_(True)
    ht = torch.randn(n, ht_dim, generator=g) / ht_dim ** 0.5
    ws = (2.0 * torch.randn(V, hs_dim, generator=g)).requires_grad_(True)
    wt = 3.0 * torch.randn(V, ht_dim, generator=g)
    return hs, ht, ws, wt


LOSS_FNS = {}  # one loss callable per method, so its compiled chunk is reused across calls


def run_ours(hs, ht, ws, wt, chunk, method="gjsd", group=None, start=0, compile=True):
    loss_fn = LOSS_FNS.setdefault(method, L.make_loss(method))
    n = hs.shape[0]
    loss = VP.fused_linear_loss(loss_fn, hs, ht, ws, wt, token_weight=torch.full((n,), 1.0 / n), chunk_size=chunk,
                                group=group, vocab_start=start, compile=compile)
    loss.backward()
    return loss.item()


def run_naive(hs, ht, ws, wt, chunk, method="gjsd"):
    zs = hs @ ws.t()
    with torch.no_grad():
        zt = ht @ wt.t()
    loss = L.make_loss(method)(zs, zt).mean()
    loss.backward()
    return loss.item()


def run_trl(hs, ht, ws, wt, chunk):
    from trl.experimental.gkd import GKDTrainer
    zs = hs @ ws.t()
    with torch.no_grad():
        zt = ht @ wt.t()
    # batchmean divides by dim 0: tokens as the batch gives the per-token mean like the others
    loss = GKDTrainer.generalized_jsd_loss(zs.unsqueeze(1), zt.unsqueeze(1), beta=0.5)
    loss.backward()
    return loss.item()


def run_liger(hs, ht, ws, wt, chunk):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=False,
                                 chunk_size=chunk)
    labels = torch.zeros(hs.shape[0], dtype=torch.long)
    loss = fn(hs, ws, ht, wt, labels)
    loss.backward()
    return loss.item()


def run_limit(hs, ht, ws, wt, chunk):
    """The output-layer FLOPs of one exact step: teacher logits, student logits, d/dh and d/dW of the student."""
    with torch.no_grad():
        gw = torch.zeros_like(ws)
        gh = torch.empty_like(hs)
        for c0 in range(0, hs.shape[0], chunk):
            h = hs[c0:c0 + chunk]
            ht[c0:c0 + chunk] @ wt.t()
            z = h @ ws.t()  # stands in for dL/dz: same shape, same matmuls
            gh[c0:c0 + chunk] = z @ ws
            gw.addmm_(z.t(), h)
    return 0.0


IMPLS = {"ours": run_ours, "ours_eager": lambda *a: run_ours(*a, compile=False), "naive": run_naive, "trl": run_trl, "liger": run_liger, "limit": run_limit}
UNCHUNKED = {"naive", "trl"}  # their memory is linear in N x V: projectable from one measurement


def measure(name, n, args, inputs):
    hs, ht, ws, wt = inputs
    hs.grad = ws.grad = None
    with PeakRSS() as m:
        t0 = time.perf_counter()
        value = IMPLS[name](hs, ht, ws, wt, args.chunk)
        sec = time.perf_counter() - t0
    hs.grad = ws.grad = None
    return {"impl": name, "N": n, "seconds": sec, "peak_gb": m.extra / 1e9, "loss": value, "measured": True}


def check_agreement(args):
    """Same inputs, small N: all implementations compute the same generalized JSD (beta = 0.5)."""
    inputs = make_inputs(64, 4096, 64, 96, seed=1)
    vals = {}
    for name in ("ours", "naive", "trl", "liger"):
        try:
            vals[name] = IMPLS[name](*inputs, 16)
        except ImportError as e:
            print(f"# {name} unavailable: {e}", file=sys.stderr)
    ref = vals["naive"]
    for name, v in vals.items():
        if abs(v - ref) > 1e-4 * abs(ref):
            raise SystemExit(f"{name} loss {v} disagrees with the naive loss {ref}: not the same objective")
    print("# agreement at N=64, V=4096: " + ", ".join(f"{k}={v:.6f}" for k, v in vals.items()))
    return set(vals)


def main_single(args):
    """Every implementation side by side in this process, on the same inputs."""
    torch.set_num_threads(args.threads)
    have = check_agreement(args)
    impls = [i for i in args.impls.split(",") if i in have or i in ("limit", "ours_eager")]
    rows = []
    per_cell = {}
    for n in args.tokens:
        inputs = make_inputs(n, args.vocab, args.hs, args.ht)
        IMPLS["ours"](*make_inputs(min(n, 2 * args.chunk), args.vocab, args.hs, args.ht), args.chunk)  # warm-up
        for name in impls:
            cells = n * args.vocab
            if name in UNCHUNKED and name in per_cell:
                need = per_cell[name] * cells
                if need > 0.8 * available():
                    rows.append({"impl": name, "N": n, "seconds": None, "peak_gb": need / 1e9, "loss": None,
                                 "measured": False})
                    print(f"# {name} N={n}: skipped, projected peak {need / 1e9:.1f} GB "
                          f"> 80% of the {available() / 1e9:.1f} GB available", flush=True)
                    continue
            r = measure(name, n, args, inputs)
            if name in UNCHUNKED:
                per_cell[name] = r["peak_gb"] * 1e9 / cells
            rows.append(r)
            print(f"# {name:10s} N={n:5d}  {r['seconds']:8.2f} s  peak +{r['peak_gb']:7.2f} GB", flush=True)
        del inputs
        gc.collect()
    print_table(rows, args)
    n_json = 4096 if 4096 in args.tokens else args.tokens[-1]
    get = lambda impl: next((r for r in rows if r["impl"] == impl and r["N"] == n_json), None)  # noqa: E731
    ours, naive, limit, liger = get("ours"), get("naive"), get("limit"), get("liger")
    print(json.dumps({
        "N": n_json,
        "memory_ratio_vs_naive": naive["peak_gb"] / ours["peak_gb"] if naive else None,
        "naive_memory_measured": bool(naive and naive["measured"]),
        "time_ratio_vs_limit": ours["seconds"] / limit["seconds"] if limit else None,
        "time_ratio_vs_liger": ours["seconds"] / liger["seconds"] if liger and liger["seconds"] else None,
    }))


def print_table(rows, args):
    print(f"\n## V={args.vocab}, Hs={args.hs}, Ht={args.ht}, chunk={args.chunk}, fp32, {args.threads} threads "
          f"(generalized JSD, beta=0.5; forward + backward)\n")
    print("| impl | N | time (s) | extra peak (GB) | time / ours | memory / ours |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ours = next(o for o in rows if o["impl"] == "ours" and o["N"] == r["N"])
        t = f"{r['seconds']:.2f}" if r["seconds"] is not None else "–"
        tr = f"{r['seconds'] / ours['seconds']:.2f}" if r["seconds"] is not None else "–"
        mem = f"{r['peak_gb']:.2f}" + ("" if r["measured"] else " (projected)")
        print(f"| {r['impl']} | {r['N']} | {t} | {mem} | {tr} | {r['peak_gb'] / ours['peak_gb']:.1f} |")


def _worker(rank, world, args, out):
    torch.set_num_threads(max(1, args.threads // world))
    group = torch.distributed.group.WORLD
    start, end = VP.shard_range(args.vocab, rank, world)
    for n in args.tokens:
        hs, ht, ws, wt = make_inputs(n, args.vocab, args.hs, args.ht)
        my = slice(rank * n // world, (rank + 1) * n // world)  # data parallel: each rank owns N / P tokens
        h_s, h_t = hs[my].detach().requires_grad_(True), ht[my]
        w_s, w_t = ws[start:end].detach().requires_grad_(True), wt[start:end]
        compile = args.compile
        run_ours(h_s, h_t, w_s, w_t, args.chunk, group=group, start=start, compile=compile)  # warm-up
        h_s.grad = w_s.grad = None
        with PeakRSS() as m:
            t0 = time.perf_counter()
            run_ours(h_s, h_t, w_s, w_t, args.chunk, group=group, start=start, compile=compile)
            sec = time.perf_counter() - t0
        out.put((rank, n, m.extra / 1e9, sec))


def main_world(args):
    """Per-rank memory of the vocab-parallel loss with the vocabulary split over `world` gloo processes, next to
    the same loss in one process."""
    import torch.multiprocessing as mp
    from tests.dist_utils import free_port  # noqa: the launcher helper is shared with the tests
    torch.set_num_threads(args.threads)
    single = {}
    for n in args.tokens:
        inputs = make_inputs(n, args.vocab, args.hs, args.ht)
        name = "ours" if args.compile else "ours_eager"
        IMPLS[name](*make_inputs(min(n, 2 * args.chunk), args.vocab, args.hs, args.ht), args.chunk)
        single[n] = measure(name, n, args, inputs)
        del inputs
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()

    procs = [ctx.Process(target=_world_entry, args=(r, args.world_size, port, args, out))
             for r in range(args.world_size)]
    for p in procs:
        p.start()
    results = [out.get(timeout=1800) for _ in range(args.world_size * len(args.tokens))]
    for p in procs:
        p.join()
    print(f"\n## vocab split over {args.world_size} ranks (V={args.vocab}, chunk={args.chunk}): per-rank loss memory\n")
    print("| N | 1 rank (GB) | per rank, max (GB) | ratio |")
    print("|---|---|---|---|")
    ratios = {}
    for n in args.tokens:
        per = max(r[2] for r in results if r[1] == n)
        ratios[n] = per / single[n]["peak_gb"]
        print(f"| {n} | {single[n]['peak_gb']:.2f} | {per:.2f} | {ratios[n]:.2f} |")
    print(json.dumps({"world_size": args.world_size, "per_rank_memory_ratio": ratios}))


def _world_entry(rank, world, port, args, out):
    import datetime
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(minutes=30))
    try:
        _worker(rank, world, args, out)
    finally:
        torch.distributed.destroy_process_group()


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1024,2048,4096", help="comma-separated N (default 1024,2048,4096)")
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hs", type=int, default=896, help="student hidden size")
    ap.add_argument("--ht", type=int, default=1536, help="teacher hidden size")
    ap.add_argument("--chunk", type=int, default=256, help="token chunk size, ours and Liger alike")
    ap.add_argument("--impls", default="limit,ours,liger,naive,trl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--compile", action="store_true",
                    help="--world-size mode: the compiled chunk loss (default: eager, the pipeline's default)")
    args = ap.parse_args(argv)
    args.tokens = [int(x) for x in args.tokens.split(",")]
    if min(args.tokens) < 1 or args.chunk < 1 or args.world_size < 1:
        ap.error("--tokens, --chunk and --world-size must be positive")
    return args


ALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}

if __name__ == "__main__":
    if any(os.environ.get(k) != v for k, v in ALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **ALLOC_ENV})
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    a = parse()
    main_world(a) if a.world_size > 1 else main_single(a)
