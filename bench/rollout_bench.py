"""Rollout throughput under ZeRO-3: plain HF `generate()` on the ZeRO-3 model (every decoding step all-gathers every
layer, TRL #3858's slow path) against the pipeline's rollouts (pipeline.rollout.generate, and the vLLM engine of
pipeline.vllm_rollout where vLLM is installed), on the same student and the same prompts, 2 gloo ranks on CPU, in
one run.

    .venv/bin/python bench/rollout_bench.py                  # default: 16-layer 13.6M-parameter student, 4 x 64 tokens
    .venv/bin/python bench/rollout_bench.py --layers 8 --batch 8
    .venv/bin/python bench/rollout_bench.py --pair embedded  # the embedded pair's student (SmolLM2, 6 layers, 69M)

Rows: plain generate (synced_gpus=True, KV cache on), ours with gather-once (the default whenever the model fits),
ours with per-step gathering (the lockstep fallback for models that do not fit), and the vLLM engine with the
student's weights pushed from the ZeRO-3 shards in every call (as after each optimiser step in training). Every row
generates exactly batch x new-tokens tokens per rank (no EOS stop), after one warm-up call. Tokens/s count all ranks'
tokens; a rollout's time is the slowest rank's. The last line is JSON: {"rollout_speedup": ours once / plain,
"vllm_speedup": vLLM / plain, "vllm_vs_gather_once": vLLM / ours once, ...}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _student_config(args) -> dict:
    return {"model_type": "llama", "vocab_size": args.vocab, "hidden_size": args.hidden,
            "intermediate_size": args.hidden * 8 // 3, "num_hidden_layers": args.layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": False}


def _timed(fn, group, repeats: int) -> float:
    """Seconds per call of the slowest rank (after one warm-up call)."""
    import torch.distributed as dist
    fn()
    dist.barrier(group)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    t = torch.tensor([(time.perf_counter() - t0) / repeats])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def worker(rank: int, world: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(max(1, args.threads // world))
    import deepspeed
    import torch.distributed as dist
    from pipeline import config as C
    from pipeline.models import build as M
    from pipeline.rollout import hf as rollout, vllm as vllm_rollout
    from pipeline.parallel.distributed import make_layout
    from pipeline.parallel.backends import deepspeed_config, parallelize
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800))
    group = dist.group.WORLD
    student_conf = _student_config(args)
    cfg = C.load_config(os.path.join(REPO, "pipeline/configs/debug_onpolicy.yaml"), [
        f"--model.student_config={json.dumps(student_conf)}", f"--train.micro_batch_size={args.batch}",
        "--train.grad_accum=1", "--parallel.backend=deepspeed", "--rollout.temperature=1.0"])
    for key in ("ds_student_config", "ds_teacher_config"):
        setattr(cfg.parallel, key, os.path.join(REPO, getattr(cfg.parallel, key)))
    cfg.run_dir = os.path.join(args.workdir, "run")
    cfg.data.seq_len, cfg.data.max_prompt_len = args.prompt_len + args.new_tokens, args.prompt_len
    cfg.rollout.vllm_kv_cache_mb = 256
    g = torch.Generator().manual_seed(100 + rank)
    prompts = torch.randint(1, args.vocab, (args.batch, args.prompt_len), generator=g)
    N = args.new_tokens

    def build():
        if args.pair == "embedded":
            from transformers import AutoModelForCausalLM
            return AutoModelForCausalLM.from_pretrained(args.student_dir, dtype=torch.float32)
        return M.build_model(None, student_conf, "float32", 0)

    # plain: the HF model (its own output layer) under ZeRO-3, generate() with synced_gpus as HF requires
    plain_model = build().eval()
    params = sum(p.numel() for p in plain_model.parameters())
    engine, *_ = deepspeed.initialize(
        model=plain_model, config=deepspeed_config(cfg.parallel.ds_student_config, cfg, world, train=False))

    def plain():
        with torch.no_grad():
            ids = engine.module.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                         max_new_tokens=N, min_new_tokens=N, do_sample=True, top_p=1.0,
                                         temperature=1.0, synced_gpus=True, pad_token_id=0)
        assert ids.shape[1] == args.prompt_len + N

    # ours: the pipeline's models (ZeRO-3 body, vocab-sharded output layer) and rollout.generate
    student = build()
    teacher = build().eval().requires_grad_(False)  # not used here; parallelize places one
    engine_conf = vllm_rollout.engine_config(student)
    models = parallelize(student, teacher, args.vocab, cfg, make_layout())
    rows = prompts.tolist()

    def ours(gather):
        rc = C.RolloutConfig(gather=gather, temperature=1.0)

        def fn():
            out_rows, info = rollout.generate(models, "student", rows, rc=rc, max_new=N, eos_id=None, pad_id=0,
                                              seed=rank, group=group)
            assert info["mode"] == gather and all(len(r) == N for r in out_rows)
        return fn

    rows_timed = [("plain generate (per-token gathers)", plain), ("ours, gather once", ours("once")),
                  ("ours, per-step gathers (lockstep)", ours("per_step"))]
    pushes = []
    if vllm_rollout.import_error() is None:
        vengine = vllm_rollout.start(engine_conf, args.vocab, cfg, "student", rank)
        calls = iter(range(10 ** 6))

        def vllm_fn():
            # a new version each call: the weights are pushed from the ZeRO-3 shards every time, as in training
            out_rows, info = vllm_rollout.generate(vengine, models, "student", rows, version=next(calls), max_new=N,
                                                   eos_id=None, temperature=1.0, top_p=1.0, seed=rank)
            assert all(len(r) == N for r in out_rows)
            pushes.append(info["gather_seconds"])
        rows_timed.append(("vLLM engine, weights pushed each call", vllm_fn))
    results = {}
    for name, fn in rows_timed:
        results[name] = _timed(fn, group, args.repeats)
    results["_params"] = params
    if pushes:
        results["_push_seconds"] = sum(pushes[1:]) / max(len(pushes) - 1, 1)  # after the warm-up call
    if rank == 0:
        out.put(results)
    dist.barrier(group)
    if vllm_rollout.import_error() is None:
        vllm_rollout.shutdown({"student": vengine})  # the process group goes with it
    else:
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4, help="prompts per rank")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pair", choices=("tiny", "embedded"), default="tiny",
                    help="tiny: a random Llama of the sizes above; embedded: the demo's 6-layer SmolLM2 student")
    ap.add_argument("--assets", default="runs/assets", help="where the embedded pair is (built there if missing)")
    args = ap.parse_args(argv)
    if min(args.layers, args.hidden, args.vocab, args.batch, args.prompt_len, args.new_tokens, args.repeats) < 1:
        ap.error("sizes must be positive")
    import tempfile
    import torch.multiprocessing as mp
    args.workdir = tempfile.mkdtemp(prefix="rollout_bench_")
    if args.pair == "embedded":
        from transformers import AutoConfig
        from pipeline import assets
        from pipeline.demo import STUDENT_LAYERS
        teacher_dir = assets.teacher_checkpoint(args.assets)
        args.student_dir = assets.student_from_teacher(teacher_dir, os.path.join(args.assets, "student-init"),
                                                       STUDENT_LAYERS)
        conf = AutoConfig.from_pretrained(args.student_dir)
        args.layers, args.hidden, args.vocab = conf.num_hidden_layers, conf.hidden_size, conf.vocab_size
    world = 2
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    import queue
    while True:  # a rank that dies ends the benchmark instead of leaving it waiting
        try:
            results = out.get(timeout=5)
            break
        except queue.Empty:
            if any(p.exitcode for p in procs):
                for p in procs:
                    p.kill()
                print("a rank failed", file=sys.stderr)
                return 1
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        print("a rank failed", file=sys.stderr)
        return 1
    params, push = results.pop("_params"), results.pop("_push_seconds", None)
    tokens = world * args.batch * args.new_tokens
    base = results["plain generate (per-token gathers)"]
    print(f"\n## rollout under ZeRO-3, {world} gloo ranks on CPU: student {args.layers} layers, hidden {args.hidden}, "
          f"vocab {args.vocab} ({params / 1e6:.1f}M parameters); {args.batch} prompts x {args.new_tokens} new tokens "
          f"per rank\n")
    print("| rollout | seconds | tokens/s | vs plain |\n|---|---|---|---|")
    for name, sec in results.items():
        print(f"| {name} | {sec:.3f} | {tokens / sec:.1f} | {base / sec:.2f}x |")
    once, step = results["ours, gather once"], results["ours, per-step gathers (lockstep)"]
    vllm = results.get("vLLM engine, weights pushed each call")
    extra = {} if vllm is None else {"vllm_speedup": round(base / vllm, 2), "vllm_vs_gather_once": round(once / vllm, 2),
                                     "vllm_push_s": round(push, 3)}
    print(json.dumps({"pair": args.pair, "rollout_speedup": round(base / once, 2), **extra,
                      "per_step_vs_plain": round(base / step, 2),
                      "tokens_per_s": {k: round(tokens / v, 1) for k, v in results.items()},
                      "params_m": round(params / 1e6, 2), "layers": args.layers, "hidden": args.hidden,
                      "vocab": args.vocab, "batch_per_rank": args.batch, "new_tokens": args.new_tokens}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
