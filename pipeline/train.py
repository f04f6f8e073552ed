"""Distillation of a trainable student from a frozen teacher in the same processes: packed text (pretraining-style,
data.kind = text) or instruction data (data.kind = chat) with on-policy generations mixed in (rollout section).

    torchrun --nproc-per-node 2 -m pipeline.train --config pipeline/configs/debug_cpu.yaml [--section.key=value ...]
    torchrun --nproc-per-node 2 -m pipeline.train --config pipeline/configs/debug_onpolicy.yaml

Build everything (config validated first, then data, then models), then a plain loop around train_step().
Shapes: B micro-batch, T sequence length, H hidden size, N = B (T - 1) predicted positions.
"""
from __future__ import annotations

from pipeline.run import signals

if __name__ == "__main__":  # before the slow imports below: a SIGUSR1 / SIGTERM during start-up is a stop request
    signals.install()

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402

import torch  # noqa: E402

from pipeline import config as C  # noqa: E402
from pipeline.data import batches as data, remote_teacher  # noqa: E402
from pipeline.loss import divergences as losses  # noqa: E402
from pipeline.parallel import distributed  # noqa: E402
from pipeline.rollout import hf as rollout, vllm as vllm_rollout  # noqa: E402
from pipeline.run import checkpoint, integrity, rundir  # noqa: E402
from pipeline.run.metrics import Metrics, Progress  # noqa: E402
from pipeline.loss.vocab_parallel import chunk_rows, fused_linear_loss, fused_topk_loss  # noqa: E402
from pipeline.models import build as M  # noqa: E402
from pipeline.parallel.backends import full_numel, parallelize  # noqa: E402
from pipeline.teacher_cache import TeacherHidden  # noqa: E402

EXIT_INPUT = 2      # the config, the data or the run directory needs a fix (said in the message); nothing lost
EXIT_NONFINITE = 3  # too many consecutive non-finite steps; the last good state was checkpointed
EXIT_TEACHER = 4    # the served teacher stopped answering; the state before the failed step was checkpointed


@dataclass
class LoopState:
    """The loop's own counters, checkpointed with the rest (a Stateful)."""
    step: int = 0
    skipped: int = 0              # steps whose update was skipped (non-finite loss or gradient), in total
    consecutive_skips: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": self.skipped, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, s: dict) -> None:
        # the run of consecutive skips is counted per launch: a relaunch (say with a lower optim.lr) starts afresh
        self.step, self.skipped, self.consecutive_skips = int(s["step"]), int(s["skipped"]), 0


class NonFiniteStop(RuntimeError):
    pass


def parse_fault(spec: str | None) -> tuple[int, int] | None:
    """PIPELINE_FAULT=nan@STEP:RANK (fault-injection for the tests and for drills): rank RANK's token weights are
    NaN in step STEP, which makes the global loss and every gradient NaN as a real overflow would."""
    if not spec:
        return None
    kind, _, where = spec.partition("@")
    step, _, rank = where.partition(":")
    if kind != "nan" or not step.isdigit() or not rank.isdigit():
        raise ValueError(f"PIPELINE_FAULT={spec!r}: use nan@STEP:RANK")
    return int(step), int(rank)


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
        self.cfg, self.dist = cfg, dist_ctx
        self.score_pool = concurrent.futures.ThreadPoolExecutor(max(1, cfg.loss.remote.prefetch),
                                                                thread_name_prefix="teacher")
        engine = vllm_rollout.resolve(cfg.rollout.engine) if cfg.data.kind == "chat" else "hf"
        self.tokenizer = M.load_tokenizer(cfg)
        self.document_end = data.document_end(cfg, self.tokenizer)  # packed text: documents end with this token
        M.preflight(cfg, self.tokenizer)  # model configs and tokenizers, before any data or weights load
        self.teacher_server = None  # loss.teacher remote: checked before any data or weights load
        if cfg.loss.teacher == "remote":
            self.teacher_server = remote_teacher.connect(
                cfg, self.tokenizer, run_dir=cfg.run_dir, is_main=dist_ctx.is_main,
                log=lambda m: _say(dist_ctx, m))
        self.batches = data.make_batches(cfg, self.tokenizer, dist_ctx.rank, dist_ctx.world,
                                         teacher=self.teacher_server)
        self.inputs = integrity.input_fingerprints(cfg)  # what the checkpoints record: a resume needs the same
        # held-out data too is read before any model loads, so a bad file fails fast
        self.eval_data = None  # this rank's held-out blocks [n, seq_len] (text) or (prompt, response) pairs (chat)
        if cfg.data.eval_files and (cfg.train.eval_every or cfg.rollout.adaptive_every):
            self.eval_data = _heldout(cfg, self.tokenizer, dist_ctx)
        student, teacher, self.vocab = M.build_models(cfg, self.tokenizer)
        self.student_config = student.config
        self.teacher_cache = None  # loss.teacher_cache: checked against every training example before any step
        if cfg.loss.teacher_cache:
            self.teacher_cache = TeacherHidden(cfg.loss.teacher_cache)
            self.teacher_cache.check(cfg, self.batches.blocks, int(teacher.config.hidden_size))
        wanted = rollout.generating(cfg) if engine == "vllm" else set()
        users = {who: (vllm_rollout.engine_config(model), full_numel(model))
                 for who, model in (("student", student), ("teacher", teacher)) if who in wanted}
        for conf, _ in users.values():
            vllm_rollout.check_supported(conf)  # before the models are sharded
        shard, why = distributed.shard_size_for(dist_ctx.world, cfg.parallel.shard_group_size)
        self.layout = distributed.make_layout(shard)  # the trivial layout without a process group
        self.models = parallelize(student, teacher, self.vocab, cfg, self.layout,
                                  log=lambda m: _say(dist_ctx, f"{m}; shard group from {why}") if dist_ctx.is_main
                                  else None)
        # one vLLM engine per generating model, started before the first step so that a failure to start is an
        # input error, not a crash mid-run; alive until training ends (shutting one down ends the process group)
        self.engines = {who: vllm_rollout.start(conf, self.vocab, cfg, who, dist_ctx.rank, params)
                        for who, (conf, params) in users.items()}
        heads = self.models.heads
        self.chunk_size = cfg.loss.chunk_size or chunk_rows(cfg.loss.chunk_memory_mb, heads.end - heads.start)
        lc = cfg.loss
        options = dict(lc.options)
        if lc.method == "taid":
            options["form"] = lc.taid.signal  # the value that drives t; the gradient is the same either way
        self.loss_fn = losses.make_loss(lc.method, **options)
        t = lc.taid
        self.taid = (losses.TaidSchedule(cfg.train.steps, t.t_start, t.t_end, t.alpha, t.beta, t.adaptive)
                     if lc.method == "taid" else None)
        self.loop = LoopState()
        self.fault = parse_fault(os.environ.get("PIPELINE_FAULT"))
        self.pad_id = M.pad_id(self.tokenizer)
        # who decodes how: one interface (rollout.hf.Generator), vLLM where an engine started, else the HF loop
        self.generators = {who: vllm_rollout.VllmGenerator(self.engines[who], self.models, who) if who in self.engines
                           else rollout.HFGenerator(self.models, who, cfg.rollout, self.pad_id, dist_ctx.group)
                           for who in ("student", "teacher")}
        r = cfg.rollout
        self.rollout_seed = cfg.train.seed if r.seed is None else r.seed
        self.replay = rollout.ReplayBuffer(r.replay_capacity)
        self.schedule = (rollout.AdaptiveSchedule(r.adaptive_init, r.adaptive_step, r.adaptive_eps, r.replay_schedule)
                         if r.schedule == "adaptive" else None)
        self.metrics = Metrics(os.path.join(cfg.run_dir, "tb"), dist_ctx.is_main and cfg.logging.tensorboard)
        # everything a checkpoint carries besides the model bodies: save, load and verification iterate over this
        self.state: dict[str, checkpoint.Stateful] = {
            "loop": self.loop, "data": self.batches, "heads": self.models.heads, "rng": checkpoint.RngState(),
            "replay": self.replay}
        if self.taid is not None:
            self.state["taid"] = self.taid
        if self.schedule is not None:
            self.state["schedule"] = self.schedule

    @property
    def step(self) -> int:
        return self.loop.step

    def method_overrides(self) -> dict:
        lc = self.cfg.loss
        if self.taid is not None:
            return {"t": self.taid.t}
        if lc.lam_end is not None:
            lam0 = self.loss_fn.options["lam"]
            return {"lam": losses.scheduled_value(lam0, lc.lam_end, self.step, self.cfg.train.steps)}
        return {}

    def max_new_tokens(self) -> int:
        d = self.cfg.data
        return self.cfg.rollout.max_new_tokens or d.seq_len - d.max_prompt_len


def _heldout(cfg: C.Config, tokenizer, dist_ctx):
    d = cfg.data
    if d.kind == "chat":
        examples = data.load_examples(d, tokenizer, files=d.eval_files, what="data.eval_files")[: d.eval_blocks]
    else:
        held = dataclasses.replace(d, files=d.eval_files, streaming=False, max_documents=None)
        examples = data.pack_blocks(data.load_documents(held, "data.eval_files"), tokenizer, held.text_field,
                                    held.seq_len)
        examples = examples[: d.eval_blocks]
    if len(examples) < dist_ctx.world:
        raise ValueError(f"data.eval_files hold {len(examples)} usable held-out sequences, fewer than the "
                         f"{dist_ctx.world} ranks (each evaluates a share)")
    return examples[dist_ctx.rank::dist_ctx.world]


def generate(run: Run, who: str, prompts: list, *, seed: int, eos_id: int | None,
             temperature: float | None = None) -> tuple[list, dict]:
    """`who`'s completions for this rank's prompts on the run's engine (collective: every rank calls it together)."""
    r = run.cfg.rollout
    sampling = rollout.Sampling(run.max_new_tokens(), eos_id, r.temperature if temperature is None else temperature,
                                r.top_p, seed)
    # the student's weights change with every optimiser step; the frozen teacher's never do
    return run.generators[who].generate(prompts, sampling, version=run.step if who == "student" else 0)


def step_batches(run: Run) -> tuple[list, dict]:
    """This rank's train.grad_accum micro-batches for the step and what they came from. chat: the step's source is
    drawn from (seed, step), identically on every rank, and all of the step's prompts go into one rollout."""
    cfg = run.cfg
    if cfg.data.kind == "text":
        blocks = [run.batches.next() for _ in range(cfg.train.grad_accum)]
        with distributed.host_data():  # the documents are found in the host's copy of the tokens
            return [data.text_batch(b, run.document_end) for b in blocks], {}
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
        completions, stats = generate(
            run, source, prompts, eos_id=None if r.ignore_eos else run.tokenizer.eos_token_id,
            seed=rollout.step_seed(run.rollout_seed, run.step, 1_000 + run.dist.rank))
        info.update(stats)
        pairs = list(zip(prompts, completions))
    B = cfg.train.micro_batch_size
    batches, parts = [], []  # each micro-batch and its examples in the order its loss rows hold them
    for i in range(0, len(pairs), B):
        part = pairs[i:i + B]
        if cfg.data.padding_free:
            b, order = data.collate_packed([p for p, _ in part], [c for _, c in part], run.pad_id, cfg.data.seq_len)
            part = [part[j] for j in order]
        else:
            b = data.collate([p for p, _ in part], [c for _, c in part], run.pad_id)
        batches.append(b)
        parts.append(part)
    if run.teacher_server is not None:  # every micro-batch's rows in flight at once; the server batches them
        batches = list(run.score_pool.map(run.teacher_server.score_batch, batches))
    if source == "student" and r.replay_capacity:  # after the scores: a failed step leaves the buffer as it was
        run.replay.push(pairs)
    if source == "dataset" and run.teacher_cache is not None:  # every rank alike: the step's source is shared
        batches = [dataclasses.replace(b, teacher_hidden=run.teacher_cache.states_of(part))
                   for b, part in zip(batches, parts)]
    info["response_len"] = sum(len(c) for _, c in pairs) / len(pairs)
    return batches, info


@dataclass
class MicroPlan:
    """What the host knows about one micro-batch before it reaches the device: the loss rows (positions with a
    target the loss is taken on) and whether any position is padding. Built from the CPU tensors the data path
    produced, so planning the step costs no device-to-host read."""
    rows: torch.Tensor | None  # indices of the loss rows in the flattened [B * (T-1)] positions; None: all of them
    n_rows: int
    padded: bool
    row_documents: list | None = None  # packed examples: each row's first sequence id
    n_sequences: int = 0


def plan_micro(mb: data.Batch) -> MicroPlan:
    mask = mb.loss_mask.reshape(-1).bool()
    n = int(mask.sum())
    plan = MicroPlan(None if n == mask.numel() else torch.nonzero(mask).squeeze(-1), n,
                     not bool(mb.attention_mask.all()))
    if mb.documents is not None:  # sequences per row (packed examples; a row's padding counts as one, never a target)
        per_row = (mb.documents.max(1).values + 1).tolist()
        plan.row_documents = [sum(per_row[:r]) for r in range(len(per_row))]
        plan.n_sequences = sum(per_row)
    return plan


def step_sizes(plans: list[MicroPlan] | None, run: Run) -> tuple[float, list[int]]:
    """(the step's loss-token count over every rank, for each micro-batch the most loss rows any rank of this shard
    group holds): one all-gather of this rank's row counts over the world and one host read, the step's first.
    plans None: this rank has no batches (its teacher server failed); every rank then gets a count of -1."""
    if run.dist.group is None:
        return (-1.0, []) if plans is None else (float(max(sum(p.n_rows for p in plans), 1)), [p.n_rows for p in plans])
    rows = [-1] * run.cfg.train.grad_accum if plans is None else [p.n_rows for p in plans]
    mine = torch.tensor(rows, dtype=torch.long, device=run.dist.device)
    parts = [torch.empty_like(mine) for _ in range(run.dist.world)]
    torch.distributed.all_gather(parts, mine, group=run.dist.group)
    table = distributed.host_read(torch.stack(parts))  # [world][micro-batches]
    lay = run.layout
    group_rows = table[lay.replica_rank * lay.shard_size:(lay.replica_rank + 1) * lay.shard_size]
    if any(n < 0 for row in table for n in row):
        return -1.0, []
    return float(max(sum(map(sum, table)), 1)), [max(col) for col in zip(*group_rows)]


# the step's scalars in the order train_step packs them for its one all-reduce and its one host read
STEP_SCALARS = ("head_sq", "loss", "nonfinite", "agree", "tokens", "stop", "requeue", "body_norm")


def train_step(run: Run, stats_wanted: bool = True) -> dict:
    """One optimiser step over train.grad_accum micro-batches; returns the scalars to log. Two host reads in all
    (the step's sizes, and the end-of-step values), however many micro-batches and loss chunks there are."""
    models, dev = run.models, run.dist.device
    t0 = time.perf_counter()
    lr = lr_at(run.step, run.cfg.optim, run.cfg.train.steps)
    models.set_lr(lr)
    data_state, lost = (run.batches.state_dict() if run.teacher_server else None), None
    try:
        micro, info = step_batches(run)
    except remote_teacher.TeacherUnavailable as e:  # the step never happened: its data is read again on resume
        run.batches.load_state_dict(data_state)
        micro, info, lost = [], {}, e
    with distributed.host_data():
        plans = None if lost else [plan_micro(mb) for mb in micro]  # on the host, before the batches move
        positions = sum(mb.tokens.numel() for mb in micro) / max(sum(int(mb.attention_mask.sum()) for mb in micro), 1)
    micro = [mb.to(dev) for mb in micro]  # built on the CPU; a no-op there
    t_data = time.perf_counter() - t0
    # the denominator is the number of loss tokens over the whole step and every rank: token-mean losses then do
    # not depend on how the batch was split across micro-batches and ranks (nor on padding)
    count, n_max = step_sizes(plans, run)
    if count < 0:  # every rank alike, through the step's first host read
        raise lost or remote_teacher.TeacherUnavailable("another rank's teacher server stopped answering (its "
                                                        "message says which)")
    overrides = run.method_overrides()
    poison = run.fault is not None and run.fault == (run.step + 1, run.dist.rank)
    total = torch.zeros((), device=dev)  # this shard group's share of the global loss, kept on the device
    stats = torch.zeros(2, device=dev) if stats_wanted else None  # (top-1 agreements, tokens)
    for mb, plan, rows_max in zip(micro, plans, n_max):
        loss = micro_loss(run, mb, plan, rows_max, (float("nan") if poison else 1.0) / count, stats=stats,
                          overrides=overrides)
        # DeepSpeed / FSDP average body gradients over ranks, but each rank already holds the gradient of the
        # global loss for its tokens: scale up here, the heads scale their (never averaged) gradient back down
        models.backward(loss * run.dist.world)
        total += loss.detach()
    v = update(run, total, stats)
    elapsed = time.perf_counter() - t0
    scalars = {"loss/total": v["loss"], "lr": lr, "grad_norm/body": v["body_norm"],
               "grad_norm/head": math.sqrt(v["head_sq"]), "train/skipped_steps": run.loop.skipped,
               "tokens_per_s": count / elapsed, "time/step_s": elapsed,
               "agreement/top1": v["agree"] / v["tokens"] if v["tokens"] else None,
               "method/t": run.taid.t if run.taid else None, "method/lam": overrides.get("lam"),
               "memory/peak_gb": _peak_memory_gb(),
               # text: how long the step waited for its batches, and how much this rank has read (store / stream)
               "data/wait_s": t_data if run.cfg.data.kind == "text" else None,
               "data/tokens_read": getattr(run.batches, "tokens_read", None),
               # chat: positions through the models per real (prompt or response) token: 1 is no padding at all
               "data/positions_per_token": positions if run.cfg.data.kind == "chat" else None,
               "_stop": signals.REQUEUE if v["requeue"] else signals.STOP if v["stop"] else 0}
    if info:
        _log_rollout(run, info, int(count))
        generated = "seconds" in info
        scalars.update({
            "rollout/source": rollout.SOURCES.index(info["source"]), "rollout/response_len": info["response_len"],
            "rollout/generation_share": t_data / elapsed,
            "rollout/train_tokens_per_s": count / (elapsed - t_data),
            "rollout/generated_tokens_per_s": info["tokens"] / info["seconds"] if generated else None,
            "rollout/gather_once": float(info["mode"] == "once") if generated else None,
            "rollout/adaptive_threshold": run.schedule.threshold if run.schedule else None})
    return scalars


def micro_loss(run: Run, mb, plan, rows_max, weight: float, *, stats, overrides: dict):
    """One micro-batch's share of the global loss (a 0-d tensor on the device): the student's body, then the
    fused loss against the teacher's output layer, its cached states or its stored top-k. `weight`: each loss
    token's weight (1 / the step's token count); `stats` (or None) accumulates (top-1 agreements, tokens)."""
    cfg, models, heads, dev = run.cfg, run.models, run.models.heads, run.dist.device
    group = run.layout.shard_group
    inputs, targets, docs = mb.tokens[:, :-1], mb.tokens[:, 1:], data.input_documents(mb)
    attn = mb.attention_mask[:, :-1] if plan.padded else None  # None: no padding (nothing for HF to check)
    hs = models.student_hidden(inputs, attn, docs)                     # [B, T-1, Hs]
    n = targets.numel()
    rows = None if plan.rows is None else data.to_device(plan.rows, dev)
    keep = (lambda x: x) if rows is None else (lambda x: x.index_select(0, rows))
    weight = torch.full((plan.n_rows,), weight, device=dev)
    if mb.teacher_logprobs is not None:  # loss.offline_teacher: the stored top-k [B, T-1, k], no teacher model
        k = mb.teacher_logprobs.shape[-1]
        return fused_topk_loss(
            run.loss_fn, keep(hs.reshape(n, -1)), heads.student, keep(mb.teacher_logprobs.reshape(n, k)),
            keep(mb.teacher_ids.reshape(n, k)), token_weight=weight, group=group,
            vocab_start=heads.start, chunk_size=run.chunk_size, n_max=rows_max, **overrides)
    if mb.teacher_hidden is not None:  # loss.teacher_cache: the stored states of exactly the loss rows
        ht_rows = mb.teacher_hidden.to(hs.dtype)
    else:
        ht_rows = keep(models.teacher_hidden(inputs, attn, docs).reshape(n, -1))  # [rows, Ht]
    groups, n_groups = sequences(inputs, docs if cfg.data.kind == "chat" else None, plan)  # ATKD's per-sequence scope
    return fused_linear_loss(
        run.loss_fn, keep(hs.reshape(n, -1)), ht_rows, heads.student, heads.teacher,
        token_weight=weight, targets=keep(targets.reshape(n)), groups=keep(groups),
        n_groups=n_groups, group=group, vocab_start=heads.start, chunk_size=run.chunk_size,
        compile=cfg.loss.compile, ce_weight=cfg.loss.ce_weight, precision=cfg.loss.matmul_precision,
        n_max=rows_max, stats=stats, **overrides)


def sequences(inputs, docs, plan: MicroPlan) -> tuple[torch.Tensor, int]:
    """(each input position's sequence [B * (T-1)], how many): a row, or with packed examples (docs) an example;
    the count comes from the host-side plan."""
    B, T = inputs.shape
    if docs is None:
        return torch.arange(B, device=inputs.device).repeat_interleave(T), B
    offsets = torch.as_tensor(plan.row_documents, device=inputs.device)  # each row's first sequence id
    return (docs + offsets[:, None]).reshape(-1), plan.n_sequences


def update(run: Run, total, stats) -> dict:
    """The step's end: one all-reduce of scalars and ONE host read decide the update; then the optimisers step (or
    skip, on every rank alike) and the loop's counters move. Returns the step's values by name (STEP_SCALARS, with
    `loss` the global loss and `body_norm` the norm that was clipped)."""
    cfg, models, heads, dev = run.cfg, run.models, run.models.heads, run.dist.device
    # The scalars: the output layer's squared gradient norm, the loss, whether it was finite, the metric counts and
    # any rank's stop request (values replicated inside a shard group count 1/S). With the body's norm they are read
    # in one host read: a bad step is skipped on every rank alike (no update, optimizer state untouched).
    request = signals.local_request()
    s = float(run.layout.shard_size)
    flags = torch.cat([heads.local_grad_sq(), (total / s).reshape(1), (~torch.isfinite(total)).float().reshape(1),
                       (stats if stats is not None else torch.zeros(2, device=dev)) / s,
                       torch.tensor([float(request == signals.STOP), float(request == signals.REQUEUE)], device=dev)])
    distributed.all_reduce_sum(flags, run.dist.group)
    body = models.grad_norm()
    v = dict(zip(STEP_SCALARS, distributed.host_read(
        torch.cat([flags, (body if body is not None else flags.new_zeros(())).reshape(1)]))))
    skip = v["nonfinite"] > 0 or not math.isfinite(v["head_sq"]) or not math.isfinite(v["body_norm"])
    # optim.clip_scope global: one norm over body and output layer (the body's backend adds the head's share)
    both = cfg.optim.clip_scope == "global"
    stepped_norm, skipped = models.step(skip, head_sq=flags[:1] if both else None)
    if stepped_norm is not None:
        v["body_norm"] = stepped_norm
    heads.step(cfg.optim.grad_clip, flags[:1] + v["body_norm"] ** 2 if both else flags[:1], skipped)
    run.loop.step += 1
    if skipped:
        run.loop.skipped += 1
        run.loop.consecutive_skips += 1
    else:
        run.loop.consecutive_skips = 0
        if run.taid is not None:
            run.taid.update(v["loss"])  # identical on every rank: the global loss
    return v


def _log_rollout(run: Run, info: dict, loss_tokens: int) -> None:
    """run_dir/rollouts_rank{r}.jsonl: per step, where this rank's data came from and, for generations, how long
    each was and how the rollout ran (the global loss-token count is the same line on every rank)."""
    keep = ("source", "mode", "lengths", "decode_steps", "seconds", "gather_seconds")
    line = {"step": run.step, "loss_tokens": loss_tokens, **{k: info[k] for k in keep if k in info}}
    with open(os.path.join(run.cfg.run_dir, f"rollouts_rank{run.dist.rank}.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


@torch.no_grad()
def heldout_kl(run: Run, batch: data.Batch, with_ce: bool = False, teacher_rows: torch.Tensor | None = None):
    """Token-mean KL(teacher || student) over the loss tokens of this rank's share of a held-out set (global: every
    rank returns the same number); with_ce: (KL, the student's cross-entropy on the batch's tokens). teacher_rows:
    the teacher's stored states of the batch's loss rows, in order (loss.teacher_cache): its body is skipped."""
    heads = run.models.heads
    batch = batch.to(run.dist.device)
    count = torch.tensor([float(batch.loss_mask.sum())], device=run.dist.device)
    distributed.all_reduce_sum(count, run.dist.group)
    inputs, attn, docs = batch.tokens[:, :-1], batch.attention_mask[:, :-1], data.input_documents(batch)
    n = inputs.numel()
    hs, weight = run.models.student_hidden(inputs, attn, docs).reshape(n, -1), batch.loss_mask.reshape(n).float()
    targets = batch.tokens[:, 1:].reshape(n)
    if teacher_rows is None:
        ht = run.models.teacher_hidden(inputs, attn, docs).reshape(n, -1)
    else:  # only the loss rows are scored (the others weigh 0 either way)
        rows = batch.loss_mask.reshape(n).nonzero().squeeze(1)
        hs, weight, targets, ht = hs[rows], weight[rows], targets[rows], teacher_rows.to(hs.device, hs.dtype)
    args = (losses.make_loss("fkl"), hs, ht, heads.student.detach(), heads.teacher)
    kw = dict(token_weight=weight / count.clamp(min=1.0), targets=targets, group=run.layout.shard_group,
              vocab_start=heads.start, chunk_size=run.chunk_size, precision=run.cfg.loss.matmul_precision)
    # each shard group computes its share of the global value; the world sum (over 1/S copies) is the value
    values = torch.stack([fused_linear_loss(*args, **kw)] + ([fused_linear_loss(*args, ce_weight=1.0, **kw)]
                                                            if with_ce else [])) / run.layout.shard_size
    kl, *rest = distributed.all_reduce_sum(values, run.dist.group).tolist()
    return (kl, rest[0] - kl) if with_ce else kl


def evaluate_heldout(run: Run, with_answers: bool = True) -> dict:
    """text: KL over the held-out blocks. chat: KL and the student's cross-entropy on the held-out responses
    (teacher-forced), and (`with_answers`) KL on the student's own greedy answers to the held-out prompts (the
    divergence the on-policy job is meant to shrink)."""
    if run.cfg.data.kind == "text":
        with distributed.host_data():
            batch = data.text_batch(run.eval_data, run.document_end)
        return {"eval/kl": heldout_kl(run, batch)}
    pairs = run.eval_data
    prompts = [p for p, _ in pairs]
    cache = run.teacher_cache  # a cache without the held-out examples (built before they were added) runs the teacher
    stored = cache.states_of(pairs) if cache is not None and cache.holds(pairs) else None
    kl, ce = heldout_kl(run, data.collate(prompts, [r for _, r in pairs], run.pad_id), with_ce=True,
                        teacher_rows=stored)
    if not with_answers:
        return {"eval/kl": kl, "eval/ce": ce}
    out = {"eval/kl": kl}
    answers, _ = generate(run, "student", prompts, eos_id=run.tokenizer.eos_token_id, seed=0, temperature=0.0)
    out["eval/kl_student_answers"] = heldout_kl(run, data.collate(prompts, answers, run.pad_id))
    out["eval/answer_len"] = sum(len(a) for a in answers) / len(answers)
    out["eval/ce"] = ce
    return out


def _log_eval(run: Run) -> None:
    """The held-out evaluation due at this step, if any: every train.eval_every steps the whole one (into eval.tsv and
    the metrics); else, every rollout.adaptive_every steps, only the cross-entropy the adaptive schedule follows
    (into the metrics). The schedule takes the cross-entropy at its own measurement steps only."""
    every, adaptive_every = run.cfg.train.eval_every, run.cfg.rollout.adaptive_every
    full = bool(every) and run.step % every == 0
    measure = run.schedule is not None and (run.step % adaptive_every == 0 if adaptive_every else full)
    if not (full or measure):
        return
    values = evaluate_heldout(run, with_answers=full)
    if measure:  # DistiLLM's statistic: the student's held-out cross-entropy on dataset responses
        run.schedule.update(values["eval/ce"])
    run.metrics.log(run.step, values)
    if full and run.dist.is_main:  # step, held-out KL[, KL on the student's own answers, their mean length, CE]
        with open(os.path.join(run.cfg.run_dir, "eval.tsv"), "a") as f:
            f.write("\t".join([str(run.step)] + [repr(v) for v in values.values()]) + "\n")


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB


def requeue_slurm_job() -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        subprocess.run(["scontrol", "requeue", job], check=False)
        print(f"preempted: checkpoint written, job {job} requeued", file=sys.stderr)


def _write_summary(run_dir, dist_ctx, step, losses_seen, digest_before, digest_after) -> None:
    """run_dir/summary_rank{r}.json: where the run ended and whether this rank's teacher shard stayed unchanged."""
    with open(os.path.join(run_dir, f"summary_rank{dist_ctx.rank}.json"), "w") as f:
        json.dump({"step": step, "losses": losses_seen, "teacher_digest_before": digest_before,
                   "teacher_digest_after": digest_after}, f)


def _save(run: Run, dist_ctx) -> None:
    cfg = run.cfg
    # rank 0 writes the manifest and renames alone; the others wait for it at a barrier
    with distributed.timeout_scope(cfg.safety.save_timeout_s, cfg.safety.collective_timeout_s):
        checkpoint.save(cfg.run_dir, run.step, run.models, run.state, dist_ctx, keep_last=cfg.checkpoint.keep_last,
                        config=C.to_dict(cfg), fingerprint=C.fingerprint(C.to_dict(cfg), dist_ctx.world),
                        inputs=run.inputs)


def _say(dist_ctx, msg: str) -> None:
    prefix = f"[rank {dist_ctx.rank}] " if dist_ctx is not None and dist_ctx.world > 1 else ""
    print(prefix + msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    """Exit codes: 0 done (or stopped by a signal with a checkpoint written), 2 the input needs a fix (config, data,
    run directory, a served teacher that is not this run's; the message says what, nothing on disk was lost), 3 too
    many consecutive non-finite steps, 4 the served teacher stopped answering (checkpointed: relaunch), 1 any
    other failure (a collective timed out, no checkpoint verifies, a crash)."""
    signals.install()  # again, for callers that import this module instead of running it
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config; any field can be overridden as --section.key=v")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = C.load_config(args.config, overrides)  # every check that needs no model or data, before either loads
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_INPUT
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        dist_ctx = distributed.init(require_group=cfg.parallel.backend != "none",
                                    timeout_s=cfg.safety.startup_timeout_s)
    except ValueError as e:  # the environment (ranks, GPUs) needs a fix
        print(f"launch error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except distributed.RendezvousError as e:
        print(f"launch error: {e}", file=sys.stderr)
        return 1
    C.resolve_for_device(cfg, torch.cuda.is_available())
    lock = rundir.RunLock(cfg.run_dir)
    try:
        return _run(cfg, dist_ctx, lock, sys.argv[1:] if argv is None else list(argv))
    except ValueError as e:  # config vs world size, run directory, data, model configs: the message says the fix
        _say(dist_ctx, f"error: {e}")
        return EXIT_INPUT
    except NonFiniteStop as e:
        _say(dist_ctx, f"error: {e}")
        return EXIT_NONFINITE
    except remote_teacher.TeacherUnavailable as e:
        _say(dist_ctx, f"error: {e}")
        return EXIT_TEACHER
    except (checkpoint.CheckpointError, integrity.CorruptData) as e:
        _say(dist_ctx, f"error: {e}")
        return 1
    except RuntimeError as e:  # DistError, or the plain RuntimeError gloo raises from inside a module's forward
        if not distributed.is_comm_failure(e):
            raise
        _say(dist_ctx, f"error: a collective failed or timed out (bound: safety.collective_timeout_s = "
                       f"{cfg.safety.collective_timeout_s:.0f} s; safety.startup_timeout_s while loading): another "
                       f"rank stopped, hung or died. {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return 1
    finally:
        lock.release()


def _start(cfg: C.Config, dist_ctx: distributed.Dist, lock: rundir.RunLock, argv: list[str]) -> tuple[Run, str | None]:
    """Validate, lock and prepare the run directory, build the run and resume it from its newest valid checkpoint:
    (the run, the checkpoint it resumed from or None)."""
    C.validate(cfg, world_size=dist_ctx.world)
    if cfg.rollout.engine == "vllm":  # before anything is written or loaded
        vllm_rollout.require()
    # one run per run directory: rank 0 holds the lock; every rank learns whether it got it
    failure = None
    if dist_ctx.is_main:
        try:
            lock.acquire()
        except rundir.RunDirError as e:
            failure = str(e)
    if distributed.any_rank(failure is not None, dist_ctx.group):
        raise rundir.RunDirError(failure or "rank 0 could not lock the run directory (its message says why)")
    first_choice, changes = rundir.prepare(cfg, dist_ctx.world, dist_ctx.is_main)
    distributed.barrier(dist_ctx.group)  # rank 0 may have cleared the directory (checkpoint.overwrite)
    torch.manual_seed(cfg.train.seed + dist_ctx.rank)
    run = Run(cfg, dist_ctx)
    # models are loaded: from now on a rank that stops is an error on the others within the collective bound
    distributed.set_timeout(cfg.safety.collective_timeout_s)
    resumed = None
    if cfg.checkpoint.resume:
        def check(path):  # a fallback checkpoint must be resumable too
            if path != first_choice and (manifest := checkpoint.read_manifest(path)) is not None:
                changes.update(rundir.check_resumable(manifest, cfg, dist_ctx.world, path))
        resumed = checkpoint.load_newest_valid(cfg.run_dir, run.models, run.state, dist_ctx, log=checkpoint.warn,
                                               before_load=check)
    if dist_ctx.is_main:
        if resumed:
            print(f"resumed from {resumed} at step {run.step}", file=sys.stderr)
        rundir.record_start(cfg, dist_ctx.world, dist_ctx.source, resumed_from=resumed, start_step=run.step,
                            changes=changes, argv=argv)
    return run, resumed


def _record_step(run: Run, scalars: dict, logged: bool, progress: Progress) -> None:
    """A finished step's logs (metrics, progress, the run's losses.tsv), and the stop after too many non-finite
    steps in a row (checkpointed first)."""
    cfg, dist_ctx = run.cfg, run.dist
    if logged or run.loop.consecutive_skips:
        run.metrics.log(run.step, scalars)
    progress.update(run.step, loss=scalars["loss/total"], lr=scalars["lr"], tok_s=round(scalars["tokens_per_s"]))
    if dist_ctx.is_main:  # one line per step in the run's log: what the tests and the tools read back
        with open(os.path.join(cfg.run_dir, "losses.tsv"), "a") as f:
            f.write(f"{run.step}\t{scalars['loss/total']!r}\n")
    if not run.loop.consecutive_skips:
        return
    if dist_ctx.is_main:
        print(f"step {run.step}: non-finite loss or gradient norm (loss {scalars['loss/total']}): update "
              f"skipped ({run.loop.consecutive_skips} in a row, {run.loop.skipped} in all)", file=sys.stderr)
    if run.loop.consecutive_skips > cfg.safety.max_consecutive_skips:
        _save(run, dist_ctx)  # the state is the last good one (skipped steps change no weight)
        raise NonFiniteStop(
            f"{run.loop.consecutive_skips} consecutive steps had a non-finite loss or gradient (limit "
            f"safety.max_consecutive_skips = {cfg.safety.max_consecutive_skips}); stopped at step "
            f"{run.step}. The last good weights are in checkpoint step_{run.step:08d}, nothing non-finite "
            f"was written. Lower optim.lr (or check the data and the teacher), then relaunch to resume")


def _run(cfg: C.Config, dist_ctx: distributed.Dist, lock: rundir.RunLock, argv: list[str]) -> int:
    run, resumed = _start(cfg, dist_ctx, lock, argv)
    start = run.step
    progress = Progress(cfg.train.steps, dist_ctx.is_main and cfg.logging.progress, start)
    digest_before = run.models.teacher_state_digest()
    losses_seen = []
    end = cfg.train.stop_after or cfg.train.steps
    last_saved = start
    if run.eval_data is not None and run.step == 0:
        _log_eval(run)
    # every rank learns whether any rank was asked to stop: here once, then in each step's one all-reduce
    stop = int(distributed.max_over_ranks(signals.local_request(), dist_ctx.group))
    while run.step < end and not stop:
        logged = (run.step + 1) % cfg.train.log_every == 0 or run.step + 1 == cfg.train.steps
        try:
            scalars = train_step(run, stats_wanted=logged)
        except remote_teacher.TeacherUnavailable as e:
            if run.step != last_saved:
                _save(run, dist_ctx)  # the state before the failed step: a relaunch resumes exactly there
            raise remote_teacher.TeacherUnavailable(
                f"{e}. Step {run.step} is checkpointed in {cfg.run_dir}: relaunch the same command once the server "
                f"answers again to resume") from None
        stop = scalars.pop("_stop")
        losses_seen.append(scalars["loss/total"])
        _record_step(run, scalars, logged, progress)
        if run.eval_data is not None:
            _log_eval(run)
        every = cfg.checkpoint.every
        if every and run.step % every == 0:
            _save(run, dist_ctx)
            last_saved = run.step
    progress.close()
    wrote = run.step != start  # then a checkpoint of this launch holds run.step (saved in the loop, or now)
    if run.step != last_saved:
        _save(run, dist_ctx)
    if stop:
        if dist_ctx.is_main:
            what = ("checkpoint written" if wrote else
                    "the checkpoint it resumed from holds this step" if resumed else
                    "stopped before the first step, nothing to checkpoint")
            print(f"stopped by a signal at step {run.step}: {what}", file=sys.stderr)
            if stop == signals.REQUEUE:
                requeue_slurm_job()
        run.metrics.close()
        distributed.barrier(dist_ctx.group)
        return 0
    _write_summary(cfg.run_dir, dist_ctx, run.step, losses_seen, digest_before, run.models.teacher_state_digest())
    if cfg.checkpoint.export and run.step == cfg.train.steps:
        with distributed.timeout_scope(cfg.safety.save_timeout_s, cfg.safety.collective_timeout_s):
            out = checkpoint.export_student(os.path.join(cfg.run_dir, "student"), run.models, run.student_config,
                                            run.tokenizer, dist_ctx)
        if out:
            print(f"exported the student to {out}", file=sys.stderr)
    run.metrics.close()
    distributed.barrier(dist_ctx.group)
    if run.engines:
        vllm_rollout.shutdown(run.engines)  # the process group goes with them
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
