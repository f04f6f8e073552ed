"""A whole training step, ours against TRL's GKDTrainer, on the embedded pair (SmolLM2-135M-Instruct -> the demo's
6-layer student, tied embeddings), one process, fp32, the machine's threads, forward KL, AdamW (lr 1e-3 constant,
betas 0.9/0.95, weight decay 0.01 on matrices, global-norm clipping at 1.0, as HF Trainer does), 8 sequences of 128
tokens per step, fed the same batches in the same order (our packing of the demo corpus; TRL gets them through a
sequential sampler and a collator that passes them through).

    make bench-e2e                              # 3 interleaved pairs per mode, 30 steps per side
    .venv-bench/bin/python bench/e2e_bench.py --steps 12 --pairs 5 --skip-onpolicy

Ours runs as users run it (python -m pipeline.train, the demo config with the overrides below); TRL in a child
process of this script. Each side reports its step times (median over steps 6..N, after warm-up), its peak RSS
(ru_maxrss of its own process) and its first-step loss. Ends with one JSON line:
{"e2e_speedup_offpolicy", "e2e_speedup_onpolicy", "e2e_speedup_pairs", "memory_ratio", "first_step_loss_rel_diff",
...}: each speedup the median over --pairs pairs of runs, ours and TRL alternating (each pair in the other order
than the last), so that the machine's drift between runs lands on both sides, with every pair's ratio beside it.

On-policy (unless --skip-onpolicy): every step samples 64 tokens (temperature 1) for each of 8 prompts, the demo's
instructions through the chat template, the same prompt ids in the same order on both sides, then trains on them
(TRL: lmbda = 1 and min_new_tokens = 64; ours: the chat job with rollout.student_fraction 1 and rollout.ignore_eos,
so both decode exactly 64 steps). Tokens per second count 8 x 128 tokens per step in both modes.
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
SEQ, BATCH, NEW = 128, 8, 64
# --data.document_mask=false: TRL attends across the documents of a packed row, so ours does too here
COMMON = ["--data.document_mask=false", "--loss.method=fkl", "--loss.options={}", "--loss.chunk_size=null",
          "--optim.lr=1e-3", "--optim.min_lr=1e-3", "--optim.warmup_steps=0", "--optim.schedule=constant",
          "--optim.weight_decay=0.01", "--optim.grad_clip=1.0", "--optim.clip_scope=global",
          "--train.micro_batch_size=8", "--train.grad_accum=1", "--checkpoint.every=0", "--checkpoint.export=false",
          "--logging.progress=false", "--train.log_every=1", "--parallel.backend=none"]


def prepare(work: str):
    """(teacher dir, student-init dir, training text jsonl): the demo's assets, built once under runs/assets."""
    from pipeline import demo
    teacher, student, train_file, _, rows = demo.prepare(os.path.join(REPO, "runs", "assets"),
                                                         os.path.join(work, "data"))
    return teacher, student, train_file, rows


def batches(cfg, steps: int) -> list:
    """What our training run reads, step by step (our packing and shuffling, rank 0 of 1): text, the token blocks;
    chat, the (prompt ids, response ids) pairs (the prompts through the tokenizer's chat template)."""
    from pipeline.models import build as M
    from pipeline.data import batches as data
    source = data.make_batches(cfg, M.load_tokenizer(cfg), 0, 1)
    out = []
    for _ in range(steps):
        b = source.next()
        out.append([list(map(list, pair)) for pair in b] if cfg.data.kind == "chat" else
                   (b if hasattr(b, "tolist") else b.tokens).tolist())
    return out


def scalars(run_dir: str, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def our_args(teacher, student, train_file, chat_file, steps: int, run_dir: str, onpolicy: bool) -> tuple:
    """(config, overrides) of our run."""
    args = [f"--model.teacher_path={teacher}", f"--model.student_path={student}", f"--train.steps={steps}",
            f"--run_dir={run_dir}", *COMMON]
    if not onpolicy:
        return "pipeline/configs/demo.yaml", args + [f"--data.files=[{train_file}]", f"--data.seq_len={SEQ}"]
    return "pipeline/configs/demo_onpolicy.yaml", args + [
        f"--data.files=[{chat_file}]", "--data.eval_files=[]", "--train.eval_every=0", f"--data.seq_len={2 * NEW}",
        f"--data.max_prompt_len={NEW}", "--rollout.student_fraction=1.0", f"--rollout.max_new_tokens={NEW}",
        "--rollout.temperature=1.0", "--rollout.top_p=1.0", "--rollout.ignore_eos=true"]


def run_ours(config: str, args: list, run_dir: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", config, *args], cwd=REPO,
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"our run failed:\n{p.stderr[-4000:]}")
    first = float(open(os.path.join(run_dir, "losses.tsv")).read().split("\n")[0].split("\t")[1])
    step_s = scalars(run_dir, "time/step_s")
    share = scalars(run_dir, "rollout/generation_share") if "onpolicy" in run_dir else {}
    return {"step_s": step_s, "peak_rss_gb": max(scalars(run_dir, "memory/peak_gb").values()), "first_loss": first,
            "gen_s": {s: v * step_s[s] for s, v in share.items()}}


# ----------------------------------------------------------------------------------------------------------------
# TRL's side (a child process: its own peak RSS)
# ----------------------------------------------------------------------------------------------------------------
def run_trl(teacher, student, blocks_file, steps: int, onpolicy: bool) -> dict:
    import resource
    import time

    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    blocks = json.load(open(blocks_file))
    rows = [row for step in blocks for row in step][: steps * BATCH]
    tok = AutoTokenizer.from_pretrained(teacher)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def collate(examples):
        if not onpolicy:
            ids = torch.tensor([e["input_ids"] for e in examples])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        # our prompts, left-padded for generate(); the dataset responses only size TRL's loss denominator
        prompts = [e["input_ids"][0] for e in examples]
        width = max(map(len, prompts))
        p_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        p_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        full = [e["input_ids"][0] + e["input_ids"][1] for e in examples]
        longest = max(map(len, full))
        ids = torch.tensor([f + [pad] * (longest - len(f)) for f in full])
        labels = torch.tensor([[-100] * len(e["input_ids"][0]) + e["input_ids"][1] +
                               [-100] * (longest - len(f)) for e, f in zip(examples, full)])
        return {"input_ids": ids, "attention_mask": (labels != -100) | (ids != pad), "labels": labels,
                "prompts": p_ids, "prompt_attention_mask": p_mask}

    times, losses, gen, fwd = [], [], [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    class Trainer(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, *args, **kwargs):
            t0 = time.perf_counter()
            loss = super().compute_loss(*args, **kwargs)  # both forwards and the loss
            losses.append(float(loss.detach()))
            fwd.append(time.perf_counter() - t0)
            return loss

        def generate_on_policy_outputs(self, *args, **kwargs):
            nonlocal gen_active
            t0, gen_active = time.perf_counter(), True
            out = GKDTrainer.generate_on_policy_outputs(*args, **kwargs)
            gen.append(time.perf_counter() - t0)
            gen_active = False
            return out

    cfg = GKDConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                    learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
                    adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, max_steps=steps, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                    lmbda=1.0 if onpolicy else 0.0, beta=0.0, temperature=1.0, max_new_tokens=NEW,
                    seq_kd=False, bf16=False, fp16=False, remove_unused_columns=False)
    models = {"student": AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
              "teacher": AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)}
    phases = {"student_forward": [], "teacher_forward": []}
    for who, m in models.items():  # forwards outside generation (generate() runs under no_grad... both do)
        m.register_forward_pre_hook(lambda mod, args, kw: setattr(mod, "_t0", time.perf_counter()),
                                    with_kwargs=True)
        m.register_forward_hook(lambda mod, args, out, who=who: None if gen_active else
                                phases[f"{who}_forward"].append(time.perf_counter() - mod._t0))
    gen_active = False
    trainer = Trainer(model=models["student"], teacher_model=models["teacher"],
                      args=cfg, train_dataset=Dataset.from_dict({"input_ids": rows}), processing_class=tok,
                      data_collator=collate, callbacks=[Clock()])
    if onpolicy:  # a fixed NEW tokens per row, as ours with rollout.ignore_eos (the same decode steps)
        trainer.generation_config.min_new_tokens = NEW
        trainer.generation_kwargs["min_new_tokens"] = NEW
    trainer.train()
    return {"step_s": dict(enumerate(times, 1)), "first_loss": losses[0], "gen_s": dict(enumerate(gen, 1)),
            "forward_loss_s": dict(enumerate(fwd, 1)),
            **{f"{k}_s": dict(enumerate(v, 1)) for k, v in phases.items()},
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def profile_ours(teacher: str, student: str, steps: int) -> None:
    """Our off-policy step's phases, timed in-process with the pipeline's own pieces (what train.train_step runs for
    one micro-batch): student body forward, teacher body forward, the fused output layers + loss (both output
    layers' matmuls, the loss and its gradients), the body's backward, the optimizer steps."""
    import time

    import torch
    from transformers import AutoModelForCausalLM
    from pipeline import config as C
    from pipeline.loss import divergences as L
    from pipeline.parallel.distributed import Layout
    from pipeline.parallel.backends import parallelize
    from pipeline.loss.vocab_parallel import chunk_rows, fused_linear_loss
    cfg = C.load_config(os.path.join(REPO, "pipeline/configs/demo.yaml"), [
        f"--model.teacher_path={teacher}", f"--model.student_path={student}", *COMMON], data_files=False)
    s = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).train()
    t = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval().requires_grad_(False)
    vocab = s.get_output_embeddings().weight.shape[0]
    models = parallelize(s, t, vocab, cfg, Layout(1, 1, 0, 0))
    heads, fn = models.heads, L.make_loss("fkl")
    chunk = chunk_rows(cfg.loss.chunk_memory_mb, vocab)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    times: dict[str, list] = {}
    for _ in range(max(steps // 3, 4)):
        t0 = time.perf_counter()

        def tick(name):
            nonlocal t0
            times.setdefault(name, []).append(time.perf_counter() - t0)
            t0 = time.perf_counter()
        hs = models.student_hidden(ids[:, :-1], None)
        tick("student body forward")
        ht = models.teacher_hidden(ids[:, :-1], None)
        tick("teacher body forward")
        n = hs.shape[0] * hs.shape[1]
        loss = fused_linear_loss(fn, hs.reshape(n, -1), ht.reshape(n, -1), heads.student, heads.teacher,
                                 token_weight=torch.full((n,), 1.0 / n), chunk_size=chunk, n_max=n)
        tick("output layers + loss (and its gradients)")
        models.backward(loss)
        tick("body backward")
        sq = heads.local_grad_sq()
        body = models.grad_norm()
        models.step(False, head_sq=sq)
        heads.step(1.0, sq + body ** 2, False)
        tick("optimizer")
    print(f"\nour off-policy step by phase (median of {len(times['optimizer']) - 1} after one warm-up, seconds; "
          f"chunk {chunk} rows):")
    for name, v in times.items():
        print(f"  {name:42s} {statistics.median(v[1:]):.2f}")


def run_trl_child(teacher, student, blocks_file, steps: int, onpolicy: bool) -> dict:
    child = subprocess.run([sys.executable, __file__, "--side", "trl", "--args", json.dumps(
        {"teacher": teacher, "student": student, "blocks_file": blocks_file, "steps": steps,
         "onpolicy": onpolicy})], cwd=REPO, capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"TRL's run failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def log_pair(mode: str, i: int, sides: dict, warm: int) -> None:
    o, t = median_after(sides["ours"]["step_s"], warm), median_after(sides["trl"]["step_s"], warm)
    print(f"{mode} pair {i}: ours {o:.2f} s, TRL {t:.2f} s per step: {t / o:.3f}x", file=sys.stderr, flush=True)


def median_after(step_s: dict, warm: int) -> float:
    return statistics.median(v for s, v in step_s.items() if int(s) > warm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    ap.add_argument("--skip-onpolicy", action="store_true")
    ap.add_argument("--pairs", type=int, default=3, help="interleaved (ours, TRL) pairs per mode; the median is "
                                                         "reported, with every pair's ratio")
    ap.add_argument("--profile", action="store_true", help="also time the phases of our step in-process")
    ap.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side == "trl":
        print(json.dumps(run_trl(**json.loads(a.args))))
        return
    work = tempfile.mkdtemp(prefix="e2e_")
    teacher, student, train_file, rows = prepare(work)
    chat_file = os.path.join(work, "chat.jsonl")  # the demo's prompts with the teacher's answers
    with open(chat_file, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n")
    from pipeline import config as C
    results, ratios = {}, {}
    for mode in ["offpolicy"] + ([] if a.skip_onpolicy else ["onpolicy"]):
        onpolicy = mode == "onpolicy"
        config, args = our_args(teacher, student, train_file, chat_file, a.steps, os.path.join(work, mode), onpolicy)
        blocks_file = os.path.join(work, f"{mode}_batches.json")
        json.dump(batches(C.load_config(os.path.join(REPO, config), args), a.steps), open(blocks_file, "w"))
        # ours and TRL alternate, pair after pair, each pair in the other order than the last: a drift of the machine
        # (thermal, neighbours) lands on both sides instead of in the ratio; the median pair is reported
        pairs = []
        for i in range(a.pairs):
            run_dir = os.path.join(work, f"{mode}{i}")
            _, args = our_args(teacher, student, train_file, chat_file, a.steps, run_dir, onpolicy)
            sides = {}
            for side in (("ours", "trl") if i % 2 == 0 else ("trl", "ours")):
                sides[side] = (run_ours(config, args, run_dir) if side == "ours" else
                               run_trl_child(teacher, student, blocks_file, a.steps, onpolicy))
            pairs.append(sides)
            log_pair(mode, i, sides, a.warmup)
        ratios[mode] = sorted(median_after(p["trl"]["step_s"], a.warmup) / median_after(p["ours"]["step_s"], a.warmup)
                              for p in pairs)
        mid = pairs[sorted(range(len(pairs)), key=lambda i: median_after(pairs[i]["trl"]["step_s"], a.warmup)
                           / median_after(pairs[i]["ours"]["step_s"], a.warmup))[len(pairs) // 2]]
        ours, trl = mid["ours"], mid["trl"]
        results[mode] = {"ours_s": median_after(ours["step_s"], a.warmup),
                         "trl_s": median_after(trl["step_s"], a.warmup),
                         "ours_gb": ours["peak_rss_gb"], "trl_gb": trl["peak_rss_gb"],
                         "ours_first": ours["first_loss"], "trl_first": trl["first_loss"],
                         "ours_gen_s": median_after(ours["gen_s"], a.warmup) if ours["gen_s"] else 0.0,
                         "trl_gen_s": median_after(trl["gen_s"], a.warmup) if trl["gen_s"] else 0.0,
                         "trl_forward_loss_s": median_after(trl["forward_loss_s"], a.warmup),
                         **{f"trl_{k}": median_after(trl[f"{k}_s"], a.warmup)
                            for k in ("student_forward", "teacher_forward")}}
    tokens = BATCH * SEQ
    print(f"\n{'':10s} {'ours tok/s':>11s} {'TRL tok/s':>10s} {'speedup':>8s} {'ours GB':>8s} {'TRL GB':>7s} "
          f"{'first loss ours / TRL':>24s}")
    for mode, r in results.items():
        print(f"{mode:10s} {tokens / r['ours_s']:11.1f} {tokens / r['trl_s']:10.1f} {r['trl_s'] / r['ours_s']:8.2f} "
              f"{r['ours_gb']:8.2f} {r['trl_gb']:7.2f} {r['ours_first']:12.6f} / {r['trl_first']:.6f}")
    print("\nTRL's step, seconds (median): generation, student forward (with its output layer), teacher forward (with "
          "its output layer), the loss, backward + optimizer")
    for mode, r in results.items():
        loss = r["trl_forward_loss_s"] - r["trl_student_forward"] - r["trl_teacher_forward"]
        rest = r["trl_s"] - r["trl_gen_s"] - r["trl_forward_loss_s"]
        print(f"{mode:10s} {r['trl_s']:.2f} = {r['trl_gen_s']:.2f} + {r['trl_student_forward']:.2f} + "
              f"{r['trl_teacher_forward']:.2f} + {loss:.2f} + {rest:.2f}   (ours: {r['ours_s']:.2f}, generation "
              f"{r['ours_gen_s']:.2f})")
    if a.profile:
        profile_ours(teacher, student, a.steps)
    off = results["offpolicy"]
    on = results.get("onpolicy")
    print(json.dumps({
        "e2e_speedup_offpolicy": round(statistics.median(ratios["offpolicy"]), 3),
        "e2e_speedup_onpolicy": round(statistics.median(ratios["onpolicy"]), 3) if on else None,
        "e2e_speedup_pairs": {m: [round(r, 3) for r in v] for m, v in ratios.items()},
        "memory_ratio": round(off["ours_gb"] / off["trl_gb"], 3),
        "first_step_loss_rel_diff": float(f"{abs(off['ours_first'] - off['trl_first']) / abs(off['trl_first']):.3g}"),
        "ours_tokens_per_s": round(tokens / off["ours_s"], 1), "trl_tokens_per_s": round(tokens / off["trl_s"], 1),
        "steps": a.steps, "warmup": a.warmup, "pairs": a.pairs}))


if __name__ == "__main__":
    main()
