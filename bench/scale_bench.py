"""Weak scaling of one training step: the debug pair at 1, 2 and 4 processes with the same per-rank batch, FSDP2.

    python bench/scale_bench.py            (make bench-scale; about 3 minutes here)

Per rank and step (median over the measured steps, mean over ranks): bytes each rank moves per collective kind
(bus bytes as nccl-tests count them: all_reduce 2(P-1)/P n, all_gather / reduce_scatter / all_to_all (P-1)/P n,
broadcast n), how many collectives, of which the loss path's (the fused output layer + loss), host synchronisations
(distributed.SyncCounter: scalar reads, data-dependent shapes, explicit host_read()s) and the peak resident memory the
run added above the process's footprint after start-up. Layouts: 1 process; 2 in one group; 4 in two groups of 2
(the 2-D layout); 4 in one group of 4 (the old layout, for contrast). Ends with one JSON line:
loss_comm_bytes_growth (per-rank loss-path bytes, 4 in groups of 2 over 2 in one group), host_syncs_per_step (the
most over all layouts and over a run with 3x the micro-batches and 32x the chunks), peak_memory_growth (4 over 1).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
COMMON = ["--data.seq_len=64", "--train.micro_batch_size=2", "--logging.tensorboard=false",
          "--logging.progress=false", "--checkpoint.every=0", "--checkpoint.export=false", "--train.steps=100"]


def _bus_bytes(kind: str, nbytes: int, world: int) -> float:
    if world <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (world - 1) / world * nbytes
    if kind == "broadcast":
        return float(nbytes)
    return (world - 1) / world * nbytes


def _instrument(stats: dict, region: list):
    """Wrap torch.distributed's collectives (module attributes, looked up by every caller at call time) to add
    their bus bytes to stats[(region, kind)]."""
    import torch.distributed as dist

    import inspect

    def nbytes(t) -> int:
        if isinstance(t, (list, tuple)):
            return sum(nbytes(x) for x in t)
        return t.numel() * t.element_size() if hasattr(t, "numel") else 0

    for kind in ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
                 "reduce_scatter_single", "broadcast", "all_to_all_single"):
        if not hasattr(dist, kind):
            continue
        original = getattr(dist, kind)
        signature = inspect.signature(original)

        def wrapped(*args, _orig=original, _kind=kind, _sig=signature, **kwargs):
            a = _sig.bind(*args, **kwargs).arguments  # callers pass tensors by position or by name
            group = a.get("group")
            world = dist.get_world_size(group) if group is not None else dist.get_world_size()
            tensors = [v for k, v in a.items() if k != "group" and (hasattr(v, "numel") or isinstance(v, list))]
            size = max(nbytes(t) for t in tensors) if tensors else 0  # the larger side (gathered / reduced)
            key = (region[0], _kind)
            n, b = stats.get(key, (0, 0.0))
            stats[key] = (n + 1, b + _bus_bytes(_kind, size, world))
            return _orig(*args, **kwargs)
        setattr(dist, kind, wrapped)


def worker(args) -> None:
    import resource
    import torch
    sys.path.insert(0, REPO)
    os.chdir(REPO)
    from pipeline import config as C, train
    from pipeline.parallel import distributed
    torch.set_num_threads(1)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "fsdp2" if nproc > 1 else "none"
    cfg = C.load_config("pipeline/configs/debug_cpu.yaml", COMMON + [
        f"--run_dir={args.out}/run", f"--parallel.backend={backend}", f"--parallel.shard_group_size={args.shard}",
        f"--train.grad_accum={args.grad_accum}", f"--loss.chunk_size={args.chunk}"])
    dist_ctx = distributed.init(require_group=nproc > 1)
    C.validate(cfg, world_size=dist_ctx.world)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = train.Run(cfg, dist_ctx)
    stats, region = {}, ["other"]
    _instrument(stats, region)

    def in_loss(fn):
        def call(*a, **k):
            region[0] = "loss"
            try:
                return fn(*a, **k)
            finally:
                region[0] = "other"
        return call
    train.fused_linear_loss = in_loss(train.fused_linear_loss)  # the loss's backward has no collectives
    rows = []
    for step in range(args.warmup + args.steps):
        stats.clear()
        with distributed.SyncCounter() as syncs:
            train.train_step(run, stats_wanted=True)
        if step >= args.warmup:
            rows.append({"syncs": syncs.count, "comm": {f"{r}/{k}": v for (r, k), v in stats.items()}})
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024
    with open(os.path.join(args.out, f"rank{dist_ctx.rank}.json"), "w") as f:
        json.dump({"steps": rows, "peak_added_mb": peak_mb}, f)
    distributed.barrier(dist_ctx.group)


def launch(nproc: int, shard: int, grad_accum: int = 2, chunk: int = 256, steps: int = 4) -> dict:
    out = tempfile.mkdtemp(prefix=f"scale{nproc}x{shard}_")
    me = [os.path.abspath(__file__), "--worker", "--out", out, "--shard", str(shard), "--grad-accum",
          str(grad_accum), "--chunk", str(chunk), "--steps", str(steps)]
    from pipeline.parallel.distributed import free_port
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
           + me
           if nproc > 1 else [sys.executable] + me)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-4000:]}")
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(nproc)]

    def per_rank_step(metric):  # mean over ranks of the median over steps
        return statistics.mean(statistics.median(metric(s) for s in r["steps"]) for r in ranks)

    kinds = sorted({k for r in ranks for s in r["steps"] for k in s["comm"]})
    comm = {k: {"calls": per_rank_step(lambda s, k=k: s["comm"].get(k, (0, 0))[0]),
                "bytes": per_rank_step(lambda s, k=k: s["comm"].get(k, (0, 0))[1])} for k in kinds}
    return {"nproc": nproc, "shard": shard, "grad_accum": grad_accum, "chunk": chunk,
            "syncs": max(s["syncs"] for r in ranks for s in r["steps"]),
            "loss_bytes": sum(v["bytes"] for k, v in comm.items() if k.startswith("loss/")),
            "loss_calls": sum(v["calls"] for k, v in comm.items() if k.startswith("loss/")),
            "all_bytes": sum(v["bytes"] for v in comm.values()), "all_calls": sum(v["calls"] for v in comm.values()),
            "peak_added_mb": statistics.mean(r["peak_added_mb"] for r in ranks), "comm": comm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    ap.add_argument("--shard", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    runs = {"1": launch(1, 1), "2 (1 group)": launch(2, 2), "4 (2 groups of 2)": launch(4, 2),
            "4 (1 group of 4)": launch(4, 4), "2, 3x micro-batches, chunk 8": launch(2, 2, grad_accum=6, chunk=8)}
    print(f"{'processes':32s} {'loss MB/rank':>12s} {'loss calls':>10s} {'all MB/rank':>11s} {'all calls':>9s} "
          f"{'host syncs':>10s} {'peak MB':>8s}")
    for name, r in runs.items():
        print(f"{name:32s} {r['loss_bytes'] / 1e6:12.3f} {r['loss_calls']:10.0f} {r['all_bytes'] / 1e6:11.3f} "
              f"{r['all_calls']:9.0f} {r['syncs']:10d} {r['peak_added_mb']:8.1f}")
    print("\nper collective kind, 4 processes in 2 groups of 2 (calls, MB per rank per step):")
    for k, v in runs["4 (2 groups of 2)"]["comm"].items():
        print(f"  {k:36s} {v['calls']:6.0f} {v['bytes'] / 1e6:10.3f}")
    syncs = [r["syncs"] for r in runs.values()]
    print(json.dumps({
        "loss_comm_bytes_growth": round(runs["4 (2 groups of 2)"]["loss_bytes"] / runs["2 (1 group)"]["loss_bytes"], 4),
        "loss_comm_bytes_growth_one_group": round(runs["4 (1 group of 4)"]["loss_bytes"]
                                                  / runs["2 (1 group)"]["loss_bytes"], 4),
        "host_syncs_per_step": max(syncs),
        # the same with 3x the micro-batches and 32x the chunks (one process has no sizes to exchange: one fewer)
        "host_syncs_constant": runs["2 (1 group)"]["syncs"] == runs["2, 3x micro-batches, chunk 8"]["syncs"],
        "peak_memory_growth": round(runs["4 (2 groups of 2)"]["peak_added_mb"] / runs["1"]["peak_added_mb"], 4),
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "comm"} for k, v in runs.items()}}))


if __name__ == "__main__":
    main()
