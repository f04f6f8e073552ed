"""Distillation of a trainable student from a frozen teacher in the same processes: packed text (pretraining-style,
data.kind = text) or instruction data (data.kind = chat) with on-policy generations mixed in (rollout section).

    torchrun --nproc-per-node 2 -m pipeline.train --config pipeline/configs/debug_cpu.yaml [--section.key=value ...]
    torchrun --nproc-per-node 2 -m pipeline.train --config pipeline/configs/debug_onpolicy.yaml

Build everything (config validated first, then data, then models), then a plain loop around train_step().
Shapes: B micro-batch, T sequence length, H hidden size, N = B (T - 1) predicted positions.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from pipeline import checkpoint, config as C, data, distributed, losses, rollout
from pipeline.metrics import Metrics, Progress
from pipeline.vocab_parallel import fused_linear_loss


def lr_at(step: int, o: C.OptimConfig, total: int) -> float:
    """Linear warm-up to optim.lr, then cosine / linear / constant decay to optim.min_lr at the last step."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    frac = (step - o.warmup_steps) / max(total - o.warmup_steps, 1)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if o.schedule == "cosine" else 1 - frac
    return o.min_lr + (o.lr - o.min_lr) * decay


class Run:
    """What the loop needs, built once: no behaviour beyond holding things (the loop is the functions below)."""

    def __init__(self, cfg: C.Config, dist_ctx: distributed.Dist):
        from pipeline import models as M
        from pipeline.parallelize import parallelize
        self.cfg, self.dist = cfg, dist_ctx
        self.tokenizer = M.load_tokenizer(cfg)
        self.batches = data.make_batches(cfg, self.tokenizer, dist_ctx.rank, dist_ctx.world)
        # held-out data too is read before any model loads, so a bad file fails fast
        self.eval_data = None  # this rank's held-out blocks [n, seq_len] (text) or (prompt, response) pairs (chat)
        if cfg.data.eval_files and cfg.train.eval_every:
            self.eval_data = _heldout(cfg, self.tokenizer, dist_ctx)
        student, teacher, self.vocab = M.build_models(cfg, self.tokenizer)
        self.student_config = student.config
        self.models = parallelize(student, teacher, self.vocab, cfg, dist_ctx.group)
        lc = cfg.loss
        options = dict(lc.options)
        if lc.method == "taid":
            options["form"] = lc.taid.signal  # the value that drives t; the gradient is the same either way
        self.loss_fn = losses.make_loss(lc.method, **options)
        t = lc.taid
        self.taid = (losses.TaidSchedule(cfg.train.steps, t.t_start, t.t_end, t.alpha, t.beta, t.adaptive)
                     if lc.method == "taid" else None)
        self.step = 0
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        r = cfg.rollout
        self.rollout_seed = cfg.train.seed if r.seed is None else r.seed
        self.replay = rollout.ReplayBuffer(r.replay_capacity)
        self.schedule = (rollout.AdaptiveSchedule(r.adaptive_init, r.adaptive_step, r.adaptive_eps, r.replay_schedule)
                         if r.schedule == "adaptive" else None)
        self.metrics = Metrics(os.path.join(cfg.run_dir, "tb"), dist_ctx.is_main and cfg.logging.tensorboard)

    def method_overrides(self) -> dict:
        lc = self.cfg.loss
        if self.taid is not None:
            return {"t": self.taid.t}
        if lc.lam_end is not None:
            lam0 = self.loss_fn.options["lam"]
            return {"lam": losses.scheduled_value(lam0, lc.lam_end, self.step, self.cfg.train.steps)}
        return {}

    def extra_state(self) -> dict:
        return {"data": self.batches.state_dict(), "taid": self.taid.state_dict() if self.taid else None,
                "replay": self.replay.state_dict(), "schedule": self.schedule.state_dict() if self.schedule else None}

    def max_new_tokens(self) -> int:
        d = self.cfg.data
        return self.cfg.rollout.max_new_tokens or d.seq_len - d.max_prompt_len


def _heldout(cfg: C.Config, tokenizer, dist_ctx):
    import dataclasses
    d = cfg.data
    if d.kind == "chat":
        examples = data.load_examples(d, tokenizer, files=d.eval_files)[: d.eval_blocks]
    else:
        held = dataclasses.replace(d, files=d.eval_files, streaming=False, max_documents=None)
        examples = data.pack_blocks(data.load_documents(held), tokenizer, held.text_field, held.seq_len)
        examples = examples[: d.eval_blocks]
    if len(examples) < dist_ctx.world:
        raise ValueError(f"data.eval_files hold {len(examples)} usable held-out sequences, fewer than the "
                         f"{dist_ctx.world} ranks (each evaluates a share)")
    return examples[dist_ctx.rank::dist_ctx.world]


def step_batches(run: Run) -> tuple[list, dict]:
    """This rank's train.grad_accum micro-batches for the step and what they came from. chat: the step's source is
    drawn from (seed, step), identically on every rank, and all of the step's prompts go into one rollout."""
    cfg = run.cfg
    if cfg.data.kind == "text":
        return [data.text_batch(run.batches.next()) for _ in range(cfg.train.grad_accum)], {}
    r = cfg.rollout
    examples = run.batches.next()
    if run.schedule is not None:
        source = run.schedule.choose(run.rollout_seed, run.step, cfg.train.steps, len(run.replay) >= r.replay_capacity)
    else:
        source = rollout.choose_source(run.rollout_seed, run.step, r.student_fraction, r.teacher_fraction,
                                       r.replay_ratio, len(run.replay) >= len(examples))
    info = {"source": source}
    if source == "dataset":
        pairs = examples
    elif source == "replay":
        g = torch.Generator().manual_seed(rollout.step_seed(run.rollout_seed, run.step, 1 + run.dist.rank))
        pairs = run.replay.sample(len(examples), g)
    else:
        prompts = [p for p, _ in examples]
        completions, stats = rollout.generate(
            run.models, source, prompts, rc=r, max_new=run.max_new_tokens(), eos_id=run.tokenizer.eos_token_id,
            pad_id=run.pad_id, seed=rollout.step_seed(run.rollout_seed, run.step, 1_000 + run.dist.rank),
            group=run.dist.group)
        info.update(stats)
        pairs = list(zip(prompts, completions))
        if source == "student" and r.replay_capacity:
            run.replay.push(pairs)
    B = cfg.train.micro_batch_size
    batches = [data.collate([p for p, _ in pairs[i:i + B]], [c for _, c in pairs[i:i + B]], run.pad_id)
               for i in range(0, len(pairs), B)]
    info["response_len"] = sum(len(c) for _, c in pairs) / len(pairs)
    return batches, info


def train_step(run: Run) -> dict:
    """One optimiser step over train.grad_accum micro-batches; returns the scalars to log."""
    cfg, models, heads, group, world = run.cfg, run.models, run.models.heads, run.dist.group, run.dist.world
    t0 = time.perf_counter()
    lr = lr_at(run.step, cfg.optim, cfg.train.steps)
    models.set_lr(lr)
    micro, info = step_batches(run)
    micro = [mb.to(run.dist.device) for mb in micro]  # built on the CPU; a no-op there
    t_data = time.perf_counter() - t0
    # the denominator is the number of loss tokens over the whole step and every rank: token-mean losses then do
    # not depend on how the batch was split across micro-batches and ranks (nor on padding)
    count = torch.tensor([float(sum(mb.loss_mask.sum() for mb in micro))], device=run.dist.device)
    distributed.all_reduce_sum(count, group)
    count.clamp_(min=1.0)
    overrides = run.method_overrides()
    total, stats = 0.0, {"agree": 0.0, "tokens": 0.0}
    for mb in micro:
        inputs, targets, attn = mb.tokens[:, :-1], mb.tokens[:, 1:], mb.attention_mask[:, :-1]
        hs = run.models.student_hidden(inputs, attn)                       # [B, T-1, Hs]
        ht = run.models.teacher_hidden(inputs, attn)                       # [B, T-1, Ht]
        n = targets.numel()
        # ATKD's per-sequence scope
        groups = torch.arange(inputs.shape[0], device=inputs.device).repeat_interleave(inputs.shape[1])
        loss = fused_linear_loss(
            run.loss_fn, hs.reshape(n, -1), ht.reshape(n, -1), heads.student, heads.teacher,
            token_weight=mb.loss_mask.reshape(n).float() / count, targets=targets.reshape(n), groups=groups,
            group=group, vocab_start=heads.start, chunk_size=cfg.loss.chunk_size, compile=cfg.loss.compile,
            ce_weight=cfg.loss.ce_weight, stats=stats, **overrides)
        # DeepSpeed / FSDP average body gradients over ranks, but each rank already holds the gradient of the
        # global loss for its tokens: scale up here, the heads scale their (never averaged) gradient back down
        models.backward(loss * world)
        total += float(loss.detach())
    body_norm = models.step()
    head_norm = heads.step(cfg.optim.grad_clip)
    run.step += 1
    if run.taid is not None:
        run.taid.update(total)  # identical on every rank: `total` is the replicated global loss
    elapsed = time.perf_counter() - t0
    scalars = {"loss/total": total, "lr": lr, "grad_norm/body": body_norm, "grad_norm/head": head_norm,
               "tokens_per_s": float(count) / elapsed, "agreement/top1": stats["agree"] / max(stats["tokens"], 1),
               "method/t": run.taid.t if run.taid else None, "method/lam": overrides.get("lam"),
               "memory/peak_gb": _peak_memory_gb()}
    if info:
        _log_rollout(run, info, int(count))
        generated = "seconds" in info
        scalars.update({
            "rollout/source": rollout.SOURCES.index(info["source"]), "rollout/response_len": info["response_len"],
            "rollout/generation_share": t_data / elapsed,
            "rollout/train_tokens_per_s": float(count) / (elapsed - t_data),
            "rollout/generated_tokens_per_s": info["tokens"] / info["seconds"] if generated else None,
            "rollout/gather_once": float(info["mode"] == "once") if generated else None,
            "rollout/adaptive_threshold": run.schedule.threshold if run.schedule else None})
    return scalars


def _log_rollout(run: Run, info: dict, loss_tokens: int) -> None:
    """run_dir/rollouts_rank{r}.jsonl: per step, where this rank's data came from and, for generations, how long
    each was and how the rollout ran (the global loss-token count is the same line on every rank)."""
    import json
    keep = ("source", "mode", "lengths", "decode_steps", "seconds", "gather_seconds")
    line = {"step": run.step, "loss_tokens": loss_tokens, **{k: info[k] for k in keep if k in info}}
    with open(os.path.join(run.cfg.run_dir, f"rollouts_rank{run.dist.rank}.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


@torch.no_grad()
def heldout_kl(run: Run, batch: data.Batch, with_ce: bool = False):
    """Token-mean KL(teacher || student) over the loss tokens of this rank's share of a held-out set (global: every
    rank returns the same number); with_ce: (KL, the student's cross-entropy on the batch's tokens)."""
    heads = run.models.heads
    batch = batch.to(run.dist.device)
    count = torch.tensor([float(batch.loss_mask.sum())], device=run.dist.device)
    distributed.all_reduce_sum(count, run.dist.group)
    inputs, attn = batch.tokens[:, :-1], batch.attention_mask[:, :-1]
    hs, ht = run.models.student_hidden(inputs, attn), run.models.teacher_hidden(inputs, attn)
    n = inputs.numel()
    args = (losses.make_loss("fkl"), hs.reshape(n, -1), ht.reshape(n, -1), heads.student.detach(), heads.teacher)
    kw = dict(token_weight=batch.loss_mask.reshape(n).float() / count.clamp(min=1.0),
              targets=batch.tokens[:, 1:].reshape(n), group=run.dist.group, vocab_start=heads.start,
              chunk_size=run.cfg.loss.chunk_size)
    kl = float(fused_linear_loss(*args, **kw))
    if not with_ce:
        return kl
    return kl, float(fused_linear_loss(*args, ce_weight=1.0, **kw)) - kl


def evaluate_heldout(run: Run) -> dict:
    """text: KL over the held-out blocks. chat: KL and the student's cross-entropy on the held-out responses
    (teacher-forced), and KL on the student's own greedy answers to the held-out prompts (the divergence the
    on-policy job is meant to shrink)."""
    if run.cfg.data.kind == "text":
        return {"eval/kl": heldout_kl(run, data.text_batch(run.eval_data))}
    pairs = run.eval_data
    prompts = [p for p, _ in pairs]
    kl, ce = heldout_kl(run, data.collate(prompts, [r for _, r in pairs], run.pad_id), with_ce=True)
    out = {"eval/kl": kl}
    answers, _ = rollout.generate(run.models, "student", prompts, rc=run.cfg.rollout, max_new=run.max_new_tokens(),
                                  eos_id=run.tokenizer.eos_token_id, pad_id=run.pad_id, seed=0,
                                  group=run.dist.group, temperature=0.0)
    out["eval/kl_student_answers"] = heldout_kl(run, data.collate(prompts, answers, run.pad_id))
    out["eval/answer_len"] = sum(len(a) for a in answers) / len(answers)
    out["eval/ce"] = ce
    return out


def _log_eval(run: Run) -> None:
    values = evaluate_heldout(run)
    if run.schedule is not None:  # DistiLLM's statistic: the student's held-out cross-entropy on dataset responses
        run.schedule.update(values["eval/ce"])
    run.metrics.log(run.step, values)
    if run.dist.is_main:  # step, held-out KL[, KL on the student's own answers, their mean length, held-out CE]
        with open(os.path.join(run.cfg.run_dir, "eval.tsv"), "a") as f:
            f.write("\t".join([str(run.step)] + [repr(v) for v in values.values()]) + "\n")


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB


class Preemption:
    """SIGUSR1 (Slurm's `--signal=USR1@secs` before the time limit, or `scancel --signal=USR1`) asks the run to
    stop: ranks may receive it at different steps, so after every step they agree with one MAX all-reduce of a
    flag, then all of them checkpoint at the same step and leave; rank 0 requeues the Slurm job."""

    def __init__(self):
        import signal
        self.flag = False
        signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self, group) -> bool:
        return distributed.any_rank(self.flag, group)


def requeue_slurm_job() -> None:
    import subprocess
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        subprocess.run(["scontrol", "requeue", job], check=False)
        print(f"preempted: checkpoint written, job {job} requeued", file=sys.stderr)


def _write_summary(run_dir, dist_ctx, step, losses_seen, digest_before, digest_after) -> None:
    """run_dir/summary_rank{r}.json: where the run ended and whether this rank's teacher shard stayed unchanged."""
    import json
    with open(os.path.join(run_dir, f"summary_rank{dist_ctx.rank}.json"), "w") as f:
        json.dump({"step": step, "losses": losses_seen, "teacher_digest_before": digest_before,
                   "teacher_digest_after": digest_after}, f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config; any field can be overridden as --section.key=v")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = C.load_config(args.config, overrides)  # every check that needs no model or data, before either loads
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist_ctx = distributed.init(require_group=cfg.parallel.backend != "none")
    C.validate(cfg, world_size=dist_ctx.world)
    torch.manual_seed(cfg.train.seed + dist_ctx.rank)
    if dist_ctx.is_main:
        C.save_resolved(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    run = Run(cfg, dist_ctx)
    start = 0
    resume_from = checkpoint.latest(cfg.run_dir) if cfg.checkpoint.resume else None
    if resume_from:
        state = checkpoint.load(resume_from, run.models, dist_ctx)
        run.batches.load_state_dict(state["data"])
        run.replay.load_state_dict(state.get("replay") or {"items": []})
        if run.schedule is not None:
            run.schedule.load_state_dict(state["schedule"])
        if run.taid is not None:
            run.taid.load_state_dict(state["taid"])
        run.step = start = state["step"]
        if dist_ctx.is_main:
            print(f"resumed from {resume_from} at step {start}", file=sys.stderr)
    progress = Progress(cfg.train.steps, dist_ctx.is_main and cfg.logging.progress, start)
    digest_before = run.models.teacher_state_digest()
    losses_seen = []
    end = cfg.train.stop_after or cfg.train.steps
    preemption = Preemption()
    preempted = False
    if run.eval_data is not None and run.step == 0:
        _log_eval(run)
    while run.step < end:
        scalars = train_step(run)
        losses_seen.append(scalars["loss/total"])
        if run.step % cfg.train.log_every == 0 or run.step == cfg.train.steps:
            run.metrics.log(run.step, scalars)
        progress.update(run.step, loss=scalars["loss/total"], lr=scalars["lr"],
                        tok_s=round(scalars["tokens_per_s"]))
        if dist_ctx.is_main:  # one line per step in the run's log: what the tests and the tools read back
            with open(os.path.join(cfg.run_dir, "losses.tsv"), "a") as f:
                f.write(f"{run.step}\t{scalars['loss/total']!r}\n")
        if run.eval_data is not None and run.step % cfg.train.eval_every == 0:
            _log_eval(run)
        preempted = preemption.requested(dist_ctx.group)
        every = cfg.checkpoint.every
        if (every and run.step % every == 0) or run.step == end or preempted:
            checkpoint.save(cfg.run_dir, run.step, run.models, run.extra_state(), dist_ctx, cfg.checkpoint.keep_last)
        if preempted:
            break
    progress.close()
    if preempted:
        if dist_ctx.is_main:
            requeue_slurm_job()
        run.metrics.close()
        distributed.barrier(dist_ctx.group)
        return 0
    _write_summary(cfg.run_dir, dist_ctx, run.step, losses_seen, digest_before, run.models.teacher_state_digest())
    if cfg.checkpoint.export and run.step == cfg.train.steps:
        out = checkpoint.export_student(os.path.join(cfg.run_dir, "student"), run.models, run.student_config,
                                        run.tokenizer, dist_ctx)
        if out:
            print(f"exported the student to {out}", file=sys.stderr)
    run.metrics.close()
    distributed.barrier(dist_ctx.group)
    return 0


if __name__ == "__main__":
    sys.exit(main())
