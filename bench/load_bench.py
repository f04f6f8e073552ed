"""Host memory and checkpoint reads of loading the teacher and the student, at 1, 2 and 4 ranks per backend.

    python bench/load_bench.py            (make bench-load; about 5 minutes here)

A Qwen2.5-0.5B-shaped teacher and student (random weights, bf16, tied embeddings, a 151,665-token tokenizer) are
written once as real safetensors checkpoints (sharded into 1 GB files, as HF writes them). Each rank then does what
pipeline.train does before its first step, build_models and parallelize, in its own process joined by gloo. Per rank:
the peak resident memory loading added (VmHWM after, less the resident memory before: the kernel's peak is reset
first) and the bytes read from the checkpoint files. On CPU ranks the shards live in host memory, so the figure is
what a GPU rank would hold in device memory plus what it staged on the host.

Layouts: FSDP2 and DeepSpeed, the teacher sharded over the ranks (parallel.teacher shard) or replicated. Ratios are
the mean per-rank figure at 4 ranks over 1 rank. Ends with one JSON line whose load_*_ratio_4_over_1 keys are
FSDP2's with a sharded teacher (the target: <= 0.35 both); every layout's ratios follow it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
QWEN05 = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
              rope_theta=1000000.0, rms_norm_eps=1e-6)
VOCAB = 151665  # Qwen2.5's tokenizer; the output layer has 151,936 rows


def write_assets(root: str) -> dict:
    """Teacher and student checkpoints and a tokenizer of Qwen2.5's size, written once under root."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    paths = {k: os.path.join(root, k) for k in ("teacher", "student", "tokenizer")}
    if not os.path.exists(os.path.join(paths["tokenizer"], "tokenizer.json")):
        tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1", pad_token="w2").save_pretrained(paths["tokenizer"])
    for seed, who in enumerate(("teacher", "student")):
        if os.path.exists(os.path.join(paths[who], "config.json")):
            continue
        conf = dict(QWEN05)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(conf.pop("model_type"), **conf),
                                                 dtype=torch.bfloat16)
        model.save_pretrained(paths[who], max_shard_size="1GB")
        del model
    return paths


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def worker(args) -> None:
    """One rank: join the group, load as pipeline.train does, report memory and bytes read as one JSON line."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from pipeline import config as C
    from pipeline.models import build as M
    from pipeline.parallel import distributed
    from pipeline.parallel.backends import parallelize
    torch.set_num_threads(1)
    d = distributed.init(require_group=True)
    paths = json.loads(args.paths)
    cfg = C.load_config("pipeline/configs/debug_cpu.yaml", [
        f"--model.teacher_path={paths['teacher']}", f"--model.student_path={paths['student']}",
        f"--model.tokenizer_path={paths['tokenizer']}", "--model.teacher_config=null", "--model.student_config=null",
        "--model.dtype=bfloat16", f"--parallel.backend={args.backend}", f"--parallel.teacher={args.teacher}",
        f"--run_dir={args.out}/run"])
    tokenizer = M.load_tokenizer(cfg)
    import deepspeed  # noqa: F401  (imported before the measurement: its import is not loading)
    torch.distributed.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the kernel's peak resident set (VmHWM) to the current one
    before, t0 = _status("VmRSS"), time.perf_counter()
    student, teacher, vocab = M.build_models(cfg, tokenizer)
    readers = [getattr(m, "source_checkpoint", None) for m in (student, teacher)]
    models = parallelize(student, teacher, vocab, cfg, distributed.make_layout(d.world))
    torch.distributed.barrier()
    seconds = time.perf_counter() - t0
    read = sum(r.bytes_read for r in readers if r is not None)
    print(json.dumps({"rank": d.rank, "rss_added": _status("VmHWM") - before, "bytes_read": read,
                      "seconds": round(seconds, 1), "rank_local": all(r is not None for r in readers)}), flush=True)
    del models


def run(paths: dict, backend: str, teacher: str, world: int, out: str) -> dict:
    port = 29500 + os.getpid() % 1000 + world
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--backend", backend, "--teacher", teacher,
                                       "--paths", json.dumps(paths), "--out", out], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rows = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        if p.returncode:
            raise RuntimeError(f"{backend}/{teacher}/{world}: a rank failed:\n{stderr[-3000:]}")
        rows.append(json.loads(stdout.strip().splitlines()[-1]))
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"rss_added": mean("rss_added"), "bytes_read": mean("bytes_read"), "seconds": max(r["seconds"] for r in rows),
            "rank_local": all(r["rank_local"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--backend")
    ap.add_argument("--teacher")
    ap.add_argument("--paths")
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "bench_load"))
    ap.add_argument("--worlds", default="1,2,4")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    paths = write_assets(os.path.join(args.out, "assets"))
    files = sum(os.path.getsize(os.path.join(paths[w], f)) for w in ("teacher", "student")
                for f in os.listdir(paths[w]) if f.endswith(".safetensors"))
    worlds = [int(w) for w in args.worlds.split(",")]
    results, summary = {}, {}
    print(f"checkpoints: {files / 2**30:.2f} GiB of safetensors (teacher + student, bf16)")
    print(f"{'backend':10} {'teacher':10} {'ranks':>5} {'RSS added / rank':>17} {'read / rank':>12} {'s':>6}")
    for backend in ("fsdp2", "deepspeed"):
        for teacher in ("shard", "replicate"):
            for world in worlds:
                r = run(paths, backend, teacher, world, args.out)
                results[(backend, teacher, world)] = r
                print(f"{backend:10} {teacher:10} {world:5d} {r['rss_added'] / 2**30:14.2f} GiB "
                      f"{r['bytes_read'] / 2**30:8.2f} GiB {r['seconds']:6.1f}", flush=True)
            lo, hi = results[(backend, teacher, worlds[0])], results[(backend, teacher, worlds[-1])]
            for k in ("rss", "bytes"):
                summary[f"{backend}_{teacher}_{k}_ratio_{worlds[-1]}_over_{worlds[0]}"] = round(
                    hi[f"{k}_added" if k == "rss" else "bytes_read"] / max(lo[f"{k}_added" if k == "rss" else
                                                                             "bytes_read"], 1), 3)
    head = {"load_rss_ratio_4_over_1": summary.get("fsdp2_shard_rss_ratio_4_over_1"),
            "load_bytes_ratio_4_over_1": summary.get("fsdp2_shard_bytes_ratio_4_over_1")}
    print(json.dumps({**head, **summary, "checkpoint_gib": round(files / 2**30, 3)}))


if __name__ == "__main__":
    main()
