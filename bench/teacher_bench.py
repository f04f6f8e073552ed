"""The served teacher (loss.teacher remote) on the embedded pair (SmolLM2-135M-Instruct served by vLLM on this
machine -> the demo's 6-layer student): does it score what the co-located teacher scores, what it costs on the wire,
and how much of a training step waits for it.

    make bench-teacher                                  # 12 steps per run
    .venv/bin/python bench/teacher_bench.py --steps 8 --k 20

1. The server (pipeline.teacher_server, vLLM's OpenAI-compatible server) against the co-located teacher (HF,
   float32) on the same 8 x 128 tokens: top-k id agreement (share of each position's k ids both have) and the largest
   log-prob difference; bytes per scored token on the wire (JSON).
2. Four training runs over the same token store, one process each, 8 x 128 tokens per step: the served teacher with
   loss.remote.prefetch 2 and 0, the co-located teacher, and an offline top-k cache (pipeline.precompute_teacher).
   Per run the median step time over steps 3..N and the share of it spent waiting for the teacher's scores
   (data/wait_s / time/step_s). Server and trainer share this machine's cores, so the wait here is an upper bound of
   a server on its own GPUs.

Ends with one JSON line: {"topk_id_agreement", "logprob_max_abs_diff", "bytes_per_token",
"teacher_wait_fraction_prefetch", "teacher_wait_fraction_no_prefetch", "step_s": {...}, ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from bench.e2e_bench import scalars  # noqa: E402  (tensorboard scalars of a run, read back)
from pipeline import config as C, demo, precompute_teacher as PT, prepare as P  # noqa: E402
from pipeline.data import remote_teacher as R, token_store as S  # noqa: E402
from pipeline.loss.vocab_parallel import topk_teacher  # noqa: E402

SEQ, BATCH = 128, 8
COMMON = ["--loss.method=fkl", "--loss.options={}", "--optim.warmup_steps=0", "--train.micro_batch_size=8",
          "--train.grad_accum=1", "--checkpoint.every=0", "--checkpoint.export=false", "--logging.progress=false",
          "--train.log_every=1", "--parallel.backend=none", f"--data.seq_len={SEQ}", "--data.max_documents=400"]


def train(args: list[str], run_dir: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "pipeline/configs/demo.yaml",
                        f"--run_dir={run_dir}", *COMMON, *args], cwd=REPO, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"training failed:\n{p.stderr[-4000:]}")
    step, wait = scalars(run_dir, "time/step_s"), scalars(run_dir, "data/wait_s")
    later = [s for s in sorted(step) if s >= 3]
    return {"step_s": statistics.median(step[s] for s in later),
            "wait_fraction": statistics.median(wait[s] / step[s] for s in later)}


def agreement(client: R.TeacherClient, teacher_dir: str, rows: torch.Tensor, k: int) -> dict:
    before = client.bytes_received
    lp, ids = client.score_block(rows)
    wire = client.bytes_received - before
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_lp, ref_ids = topk_teacher(teacher(rows).logits[:, :-1], k)
    same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids.view(-1, k), ref_ids.view(-1, k)))
    return {"topk_id_agreement": same / ids.numel(), "logprob_max_abs_diff": float((lp - ref_lp).abs().max()),
            "bytes_per_token": wire / rows[:, 1:].numel()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="teacher-bench-")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    teacher, student, train_file, _, _ = demo.prepare(os.path.join(REPO, "runs", "assets"), os.path.join(work, "data"))
    models = [f"--model.teacher_path={teacher}", f"--model.student_path={student}", f"--data.files=[{train_file}]"]
    store, cache, address = (os.path.join(work, n) for n in ("store", "topk", "teacher.addr"))
    cfg = C.load_config(os.path.join(REPO, "pipeline/configs/demo.yaml"), [*models, *COMMON, f"--data.store={store}"])
    if not os.path.exists(os.path.join(store, S.INDEX)):
        P.prepare(cfg, store, workers=1, log=lambda m: None)
    log(f"offline top-k cache of {len(S.TokenStore(store).blocks(SEQ))} blocks ...")
    PT.precompute(cfg, cache, k=args.k, batch=8, chunk=64, rank=0, world=1, log=lambda m: None)

    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline.teacher_server", "--config", "pipeline/configs/demo.yaml", *models,
         f"--data.seq_len={SEQ}", f"--loss.remote.top_k={args.k}", f"--address-file={address}", "--",
         "--enforce-eager"], cwd=REPO, stdout=open(os.path.join(work, "server.log"), "w"), stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while not os.path.exists(address):
            if server.poll() is not None:
                raise SystemExit(f"the server exited; see {work}/server.log")
            time.sleep(1.0)
        log(f"server up after {time.time() - t0:.0f} s")
        rc = C.RemoteTeacherConfig(address=address, top_k=args.k)
        url, key, _ = R.resolve(rc, 10)
        client = R.TeacherClient(rc, url=url, key=key)
        client.wait_until_up()
        rows = S.TokenStore(store).blocks(SEQ)[torch.arange(BATCH)]
        result = agreement(client, teacher, rows, args.k)
        log(json.dumps(result))
        remote = [*models, f"--data.store={store}", f"--train.steps={args.steps}", "--loss.teacher=remote",
                  f"--loss.remote.address={address}", f"--loss.remote.top_k={args.k}"]
        runs = {"remote_prefetch": train([*remote, "--loss.remote.prefetch=2"], os.path.join(work, "r2")),
                "remote_no_prefetch": train([*remote, "--loss.remote.prefetch=0"], os.path.join(work, "r0"))}
    finally:
        server.terminate()
        server.wait(timeout=60)
    local = [*models, f"--data.store={store}", f"--train.steps={args.steps}"]
    runs["colocated"] = train(local, os.path.join(work, "local"))
    runs["offline_cache"] = train([*local, f"--loss.offline_teacher={cache}"], os.path.join(work, "cache"))
    for name, r in runs.items():
        log(f"{name:20s} step {r['step_s']:.3f} s, waiting for data/teacher {100 * r['wait_fraction']:.1f}%")
    out = {**result, "teacher_wait_fraction_prefetch": runs["remote_prefetch"]["wait_fraction"],
           "teacher_wait_fraction_no_prefetch": runs["remote_no_prefetch"]["wait_fraction"],
           "step_s": {n: r["step_s"] for n, r in runs.items()},
           "step_ratio_remote_vs_colocated": runs["remote_prefetch"]["step_s"] / runs["colocated"]["step_s"],
           "k": args.k, "steps": args.steps, "tokens_per_step": SEQ * BATCH}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
