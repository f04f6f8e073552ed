"""Long sequences and no wasted tokens, on the embedded pair (SmolLM2-135M-Instruct -> the demo's 6-layer student,
its real 49,152-token vocabulary), one process, fp32.

    make bench-long                                      # lengths 1k, 2k, 4k, ... up to 64k; TRL beside ours
    .venv-bench/bin/python bench/long_bench.py --max-tokens 8192 --skip-trl

1. Memory: one sequence of T tokens (one document of the demo's text, so no mask: causal attention), one full
   training step (forward, loss, backward, optimizer with its state allocated), the peak RSS of the run's own process: ours as users run
   it (python -m pipeline.train, activation checkpointing, the chunked vocab-parallel loss) and TRL's GKDTrainer (a
   child process, forward KL, the same pair). T doubles from 1k until a run fails (or passes --memory-gb of RSS, where
   it is stopped) or passes --max-tokens. Both models' configs are copied with max_position_embeddings raised to the
   longest T (the positions past the trained 8k are meaningless to the models, not to the memory).
2. Padding: the on-policy demo job (the instruction task's prompts, the teacher's answers and the student's own
   generations, whose lengths spread as real data does), padded against padding-free (data.padding_free): positions
   through the models per real token (tensorboard's data/positions_per_token) and the median step time.

Ends with one JSON line: {"longest_tokens_ours", "longest_tokens_trl", "memory_slope_mb_per_1k_tokens",
"padding_free_speedup", "positions_per_real_token_padded", "positions_per_real_token_padding_free", ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.e2e_bench import scalars  # noqa: E402  (tensorboard scalars of a run, read back)


def run_limited(cmd: list[str], limit_gb: float, env: dict | None = None) -> tuple[int, float, float, str]:
    """(exit code, peak RSS GB of the process, seconds, stderr tail); stopped with SIGKILL past `limit_gb` (exit
    -9): what an out-of-memory kill would do, without taking this machine down."""
    t0 = time.time()
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=env)
    killed = []

    def watch():
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
            except (OSError, StopIteration):
                break
            if rss > limit_gb * 2 ** 20:
                killed.append(rss)
                proc.kill()
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err.seek(0)
    tail = err.read().decode(errors="replace")[-600:]
    return proc.returncode, usage.ru_maxrss / 2 ** 20, time.time() - t0, ("stopped past the bound" if killed else tail)


def long_models(teacher: str, student: str, positions: int, out: str) -> tuple[str, str]:
    """Copies of both checkpoints (weights linked) whose configs take `positions` positions."""
    made = []
    for src, name in ((teacher, "teacher"), (student, "student")):
        dst = os.path.join(out, name)
        os.makedirs(dst, exist_ok=True)
        for f in os.listdir(src):
            if f != "config.json" and not os.path.exists(os.path.join(dst, f)):
                os.symlink(os.path.join(src, f), os.path.join(dst, f))
        conf = json.load(open(os.path.join(src, "config.json")))
        conf["max_position_embeddings"] = positions
        json.dump(conf, open(os.path.join(dst, "config.json"), "w"))
        made.append(dst)
    return made[0], made[1]


def one_document(train_file: str, out: str, tokens: int) -> str:
    """A jsonl of one document at least `tokens` long: the demo's training text joined."""
    text = " ".join(json.loads(line)["text"] for line in open(train_file))
    while len(text) < 6 * tokens:
        text += " " + text
    with open(out, "w") as f:
        f.write(json.dumps({"text": text}) + "\n")
    return out


def ours(teacher, student, doc, T, run_dir, limit_gb) -> dict:
    cmd = [sys.executable, "-m", "pipeline.train", "--config", "pipeline/configs/demo.yaml", f"--run_dir={run_dir}",
           f"--model.teacher_path={teacher}", f"--model.student_path={student}", f"--data.files=[{doc}]",
           f"--data.seq_len={T}", "--train.micro_batch_size=1", "--train.grad_accum=1", "--train.steps=1",
           "--train.activation_checkpointing=true", "--loss.method=fkl", "--loss.options={}",
           "--checkpoint.every=0", "--checkpoint.export=false", "--logging.progress=false", "--parallel.backend=none"]
    rc, rss, secs, why = run_limited(cmd, limit_gb)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"ok": rc == 0, "peak_rss_gb": round(rss, 3), "seconds": round(secs, 1), **({} if rc == 0 else {"why": why})}


def trl_child(teacher: str, student: str, doc: str, T: int) -> None:
    """TRL's GKDTrainer, one sequence of T tokens, one step (run as a child: its own peak RSS)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    tok = AutoTokenizer.from_pretrained(teacher)
    ids = tok(json.loads(open(doc).readline())["text"])["input_ids"][:T]
    cfg = GKDConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, max_steps=1, learning_rate=1e-4,
                    save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, lmbda=0.0, beta=0.0,
                    gradient_checkpointing=True, bf16=False, fp16=False, remove_unused_columns=False)

    def collate(examples):
        x = torch.tensor([e["input_ids"] for e in examples])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
                         teacher_model=AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32), args=cfg,
                         train_dataset=Dataset.from_dict({"input_ids": [ids]}), processing_class=tok,
                         data_collator=collate)
    trainer.train()


def trl(teacher, student, doc, T, limit_gb) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", "trl", "--args",
           json.dumps({"teacher": teacher, "student": student, "doc": doc, "T": T})]
    rc, rss, secs, why = run_limited(cmd, limit_gb)
    return {"ok": rc == 0, "peak_rss_gb": round(rss, 3), "seconds": round(secs, 1), **({} if rc == 0 else {"why": why})}


def padding(teacher, student, chat_file, steps: int, work: str) -> dict:
    """The on-policy demo job, padded and padding-free: positions per real token and the median step time."""
    out = {}
    for name, flag in (("padded", "false"), ("padding_free", "true")):
        run_dir = os.path.join(work, f"pad_{name}")
        cmd = [sys.executable, "-m", "pipeline.train", "--config", "pipeline/configs/demo_onpolicy.yaml",
               f"--run_dir={run_dir}", f"--model.teacher_path={teacher}", f"--model.student_path={student}",
               f"--data.files=[{chat_file}]", "--data.eval_files=[]", "--train.eval_every=0",
               f"--train.steps={steps}", "--train.log_every=1", "--checkpoint.every=0", "--checkpoint.export=false",
               "--logging.progress=false", f"--data.padding_free={flag}", "--rollout.engine=hf"]
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"the on-policy run failed:\n{p.stderr[-3000:]}")
        step, pos = scalars(run_dir, "time/step_s"), scalars(run_dir, "data/positions_per_token")
        out[name] = {"step_s": statistics.median(step[s] for s in step if s > 2),
                     "positions_per_token": statistics.mean(pos.values())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--memory-gb", type=float, default=20.0, help="RSS past which a run counts as failed")
    ap.add_argument("--padding-steps", type=int, default=12)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side == "trl":
        trl_child(**json.loads(a.args))
        return 0
    from pipeline import demo
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    work = tempfile.mkdtemp(prefix="long-bench-")
    teacher, student, train_file, _, rows = demo.prepare(os.path.join(REPO, "runs", "assets"),
                                                        os.path.join(work, "data"))
    lt, ls = long_models(teacher, student, a.max_tokens + 1, os.path.join(work, "models"))
    doc = one_document(train_file, os.path.join(work, "doc.jsonl"), a.max_tokens + 1)
    lengths, T = [], a.min_tokens
    while T <= a.max_tokens:
        lengths.append(T)
        T *= 2
    memory = {"ours": {}, "trl": {}}
    for side in ["ours"] + ([] if a.skip_trl else ["trl"]):
        for T in lengths:
            r = (ours(lt, ls, doc, T, os.path.join(work, f"run{T}"), a.memory_gb) if side == "ours" else
                 trl(lt, ls, doc, T, a.memory_gb))
            memory[side][T] = r
            log(f"{side:5s} {T:6d} tokens: {'ok ' if r['ok'] else 'FAILED'} peak RSS {r['peak_rss_gb']:.2f} GB, "
                f"{r['seconds']:.0f} s" + ("" if r["ok"] else f" ({r['why'][-200:]})"))
            if not r["ok"]:
                break
    longest = {s: max([T for T, r in m.items() if r["ok"]], default=0) for s, m in memory.items()}
    ok_ours = [(T, r["peak_rss_gb"]) for T, r in memory["ours"].items() if r["ok"]]
    # the growth of our peak RSS per 1k tokens, between the shortest and the longest length that ran
    slope = ((ok_ours[-1][1] - ok_ours[0][1]) * 1024 / ((ok_ours[-1][0] - ok_ours[0][0]) / 1024)
             if len(ok_ours) > 1 else None)
    chat_file = os.path.join(work, "chat.jsonl")
    with open(chat_file, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n")
    pad = padding(teacher, student, chat_file, a.padding_steps, work)
    log(f"padding: {json.dumps(pad)}")
    print(json.dumps({
        "longest_tokens_ours": longest["ours"], "longest_tokens_trl": None if a.skip_trl else longest["trl"],
        "memory_slope_mb_per_1k_tokens": None if slope is None else round(slope, 1),
        "padding_free_speedup": round(pad["padded"]["step_s"] / pad["padding_free"]["step_s"], 3),
        "positions_per_real_token_padded": round(pad["padded"]["positions_per_token"], 3),
        "positions_per_real_token_padding_free": round(pad["padding_free"]["positions_per_token"], 3),
        "memory_gb": {s: {T: r["peak_rss_gb"] for T, r in m.items()} for s, m in memory.items()},
        "memory_bound_gb": a.memory_gb, "padding": pad}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
