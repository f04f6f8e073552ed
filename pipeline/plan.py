"""Memory and time per GPU for a config on N nodes x G GPUs, from the model configs alone (built on the meta device:
no weights, no data), before anything is queued.

    python -m pipeline.plan --config X.yaml --nodes 4 --gpus-per-node 8 [--gpu-memory-gb 80] [--section.key=value]

The layout is the one pipeline.train builds: shard groups of parallel.shard_group_size ranks (default: a node), the
teacher placed by parallel.teacher (auto: replicated when it takes at most teacher_replicate_fraction of a GPU).
Estimates, not measurements: the assumptions (GPU memory, peak FLOP/s and the share of it reached, intra- and
inter-node bandwidth) are options and are printed with the table. bench/scale_bench.py measures the per-rank
communication these formulas count, on CPUs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass

from pipeline import cli, config as C
from pipeline.models import build as M
from pipeline.parallel.backends import is_tied, teacher_placement
from pipeline.parallel.distributed import Layout
from pipeline.rollout import hf as rollout
from pipeline.rollout.vllm import engine_bytes

GIB = 2**30


@dataclass
class Shapes:
    params: int         # all parameters, the output layer included (once, when tied)
    head: int           # output-layer parameters (V x H)
    hidden: int
    layers: int
    vocab: int
    tied: bool
    largest_layer: int  # parameters of the largest decoder block

    @property
    def body(self) -> int:
        """What the backend shards: everything but the output layer, which becomes the vocab-sharded head (a tied
        model's input embedding is that same matrix, parallelize.TiedEmbedding, so it leaves the body too)."""
        return self.params - self.head


def shapes(m, who: str) -> Shapes:
    model = M.meta_model(m, who)
    hf = model.config
    head = model.get_output_embeddings().weight
    tied = is_tied(model)
    blocks = [b for b in model.modules() if type(b).__name__ in set(model._no_split_modules or [])]
    return Shapes(sum(p.numel() for p in model.parameters()), head.numel(), hf.hidden_size, hf.num_hidden_layers,
                  head.shape[0], tied, max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0))


def estimate(cfg, s: Shapes, t: Shapes | None, nodes: int, gpus: int, a) -> dict:
    """GiB per GPU by item and seconds per step by part (compute, intra-node, inter-node)."""
    W = nodes * gpus
    S = cfg.parallel.shard_group_size or gpus  # config.validate checked that it divides W
    lay = Layout(W, S, 0, 0)
    mem, placement = memory(cfg, s, t, lay, a)
    time, loss_bytes = step_time(cfg, s, t, lay, placement, nodes=nodes, gpus=gpus, a=a)
    return {"world": W, "shard": S, "replicas": W // S, "teacher": placement, "memory": mem, "time": time,
            "tokens_per_step": cfg.train.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum * W,
            "loss_bytes_per_rank": loss_bytes}


def memory(cfg, s: Shapes, t: Shapes | None, lay: Layout, a) -> tuple[dict, str]:
    """Bytes per GPU by item, and where the teacher is placed."""
    W, S = lay.world, lay.shard_size
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    tr = cfg.train
    tokens = tr.micro_batch_size * cfg.data.seq_len          # per micro-batch and rank
    ds = cfg.parallel.backend == "deepspeed"
    body = s.body
    # student: bf16/fp32 weights, fp32 master + AdamW moments (12 bytes, skipped when the weights are fp32 already)
    # and fp32 gradients; DeepSpeed shards the optimizer over every rank (hpZ keeps a second weight copy / S),
    # FSDP2 HSDP inside the group
    opt_bytes = 8 + (4 if b == 2 else 0)
    mem = {}
    if ds:
        mem["student weights"] = body * b / W + (body * b / S if 1 < S < W else 0)
        mem["student grads + optimizer"] = body * (4 + opt_bytes) / W
    else:
        mem["student weights"] = body * b / S
        mem["student grads + optimizer"] = body * (4 + opt_bytes) / S
    mem["gathered blocks (2 in flight)"] = 2 * s.largest_layer * b
    act = (2 if tr.activation_checkpointing else 67) * s.hidden * s.layers * tokens  # bytes; 67 H measured here
    mem["student activations"] = act
    # grow with the sequence too: with checkpointing one layer is recomputed (its full working set) in backward;
    # the teacher's forward holds one layer's working set at a time (priced as a training layer's: an upper bound).
    # Attention itself is linear in the length with flash / memory-efficient kernels (GPUs), assumed here.
    if tr.activation_checkpointing:
        mem["student layer recomputed in backward"] = 67 * s.hidden * tokens
    if t is not None:
        mem["teacher forward: one layer's working set"] = 67 * t.hidden * tokens
    if s.tied:  # parallelize.TiedEmbedding gathers the whole fp32 table for the lookup, and its gradient
        mem["tied embedding: gathered table + gradient"] = 2 * s.head * 4
    head_rows = s.vocab / S
    mem["output layers (student fp32 + AdamW, teacher)"] = head_rows * s.hidden * 16 + (
        head_rows * t.hidden * b if t else 0)
    placement = "none"
    if t is not None:
        tb = t.body * b
        placement, _ = teacher_placement(cfg.parallel.teacher, tb, lay, cfg.parallel.teacher_replicate_fraction,
                                         memory=a.gpu_memory_gb * GIB)
        mem[f"teacher ({placement})"] = {"replicate": tb, "shard_group": tb / S + (tb / W if ds else 0),
                                        "shard": tb / W}[placement]
        mem["teacher gathered block"] = 0 if placement == "replicate" else t.largest_layer * b
    h_sum = s.hidden + (t.hidden if t else 0)
    # every rank of the group holds the group's hidden states (model dtype) and their fp32 gradient
    mem["loss: gathered hidden states + gradient"] = S * tokens * (h_sum * b + s.hidden * 4)
    mem["loss: chunk working set"] = cfg.loss.chunk_memory_mb * 2**20 if cfg.loss.chunk_size is None else \
        8 * 4 * cfg.loss.chunk_size * head_rows
    mem["CUDA context + NCCL buffers (assumed)"] = a.runtime_gb * GIB
    r = cfg.rollout
    generating = {} if cfg.data.kind != "chat" else {
        who: m for who, m in (("student", s), ("teacher", t)) if m is not None and who in rollout.generating(cfg)}
    if generating and r.engine != "hf":  # auto is vLLM on GPU nodes (environment.yml installs it)
        engines = sum(engine_bytes(m.params, cfg.model.dtype, r.vllm_kv_cache_mb) for m in generating.values())
        if r.vllm_sleep:  # asleep while training, awake while the activations and loss buffers are released
            transient = act + mem["loss: gathered hidden states + gradient"] + mem["loss: chunk working set"]
            mem["vLLM engines (awake, beyond released training buffers)"] = max(0, engines - transient)
        else:
            mem["vLLM engines (always awake)"] = engines
    elif "student" in generating:
        mem["rollout replica (gather once)"] = s.params * b
    return mem, placement


def step_time(cfg, s: Shapes, t: Shapes | None, lay: Layout, placement: str, *, nodes: int, gpus: int,
              a) -> tuple[dict, float]:
    """Seconds per step by part (compute, intra-node, inter-node), and the loss's bytes per rank and step."""
    W, S = lay.world, lay.shard_size
    R = W // S
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    tr = cfg.train
    tokens = tr.micro_batch_size * cfg.data.seq_len
    ds = cfg.parallel.backend == "deepspeed"
    body, head_rows, h_sum = s.body, s.vocab / S, s.hidden + (t.hidden if t else 0)
    # time: 6 FLOPs per parameter and token for the student (8 with recomputation), 2 for the teacher forward, the
    # loss's output-layer matmuls (2 forward per model, 4 for the student's gradients), all at mfu x peak
    flops = tokens * tr.grad_accum * ((8 if tr.activation_checkpointing else 6) * body + (2 * t.body if t else 0)
                                      + 2 * s.vocab * h_sum + 4 * s.vocab * s.hidden)
    # causal attention's scores and weighted sum: 2 T^2 H per layer and sequence forward (x3 with the backward, x4
    # with recomputation); what makes long sequences cost more per token
    T, seqs = cfg.data.seq_len, tr.micro_batch_size * tr.grad_accum
    flops += seqs * 2 * T * T * ((4 if tr.activation_checkpointing else 3) * s.hidden * s.layers
                                 + (t.hidden * t.layers if t else 0))
    intra = inter = 0.0
    ga = tr.grad_accum
    # the loss: all-gather of the group's hidden states (+ weight, target, scope id per token), reduce-scatter of
    # their fp32 gradient; across nodes only when a shard group spans nodes
    loss_bytes = ga * (S - 1) * tokens * (h_sum * b + 20 + s.hidden * 4)
    if S > gpus:
        inter += loss_bytes
    else:
        intra += loss_bytes
    if ds:  # ZeRO-3: forward gathers over the world; backward too, or inside the group with hpZ; gradients
        # reduce-scatter over the world
        inter += ga * body * b * (W - 1) / W
        if 1 < S < W:
            intra += ga * body * b * (S - 1) / S
        else:
            inter += ga * body * b * (W - 1) / W
        inter += ga * body * 4 * (W - 1) / W
    else:   # HSDP: gathers and reduce-scatter in the group, one all-reduce of the shard across groups per step
        intra += ga * (2 * body * b + body * 4) * (S - 1) / S
        inter += 2 * (R - 1) / R * body * 4 / S
    if R > 1:
        inter += 2 * (R - 1) / R * head_rows * s.hidden * 4  # the output layer's rows, across the replicas
    if t is not None and placement != "replicate":
        share = (S - 1) / S if placement == "shard_group" else (W - 1) / W
        if placement == "shard" and nodes > 1:
            inter += ga * t.body * b * share
        else:
            intra += ga * t.body * b * share
    time = {"compute": flops / (a.tflops * 1e12 * a.mfu), "intra-node": intra / (a.intra_gbs * 1e9),
            "inter-node": inter / (a.inter_gbs * 1e9) if nodes > 1 else 0.0}
    return time, loss_bytes


def report(e: dict, a) -> str:
    lines = [f"{e['world']} GPUs = {e['replicas']} replica group(s) x {e['shard']} (shard group); teacher: "
             f"{e['teacher']}", "", f"{'memory per GPU':52s} {'GiB':>8s}"]
    for k, v in e["memory"].items():
        lines.append(f"  {k:50s} {v / GIB:8.2f}")
    total = sum(e["memory"].values())
    lines.append(f"  {'total':50s} {total / GIB:8.2f}  of {a.gpu_memory_gb:.0f}"
                 + ("  <- DOES NOT FIT" if total > a.gpu_memory_gb * GIB else ""))
    lines += ["", f"{'time per step (no overlap assumed)':52s} {'s':>8s}"]
    for k, v in e["time"].items():
        lines.append(f"  {k:50s} {v:8.3f}")
    step = sum(e["time"].values())
    lines.append(f"  {'total':50s} {step:8.3f}  ({e['tokens_per_step'] / step:,.0f} tokens/s)")
    lines += ["", f"assumptions: {a.gpu_memory_gb:.0f} GiB and {a.tflops:.0f} TFLOP/s peak per GPU at {a.mfu:.0%} "
              f"of it; {a.intra_gbs:.0f} GB/s inside a node, {a.inter_gbs:.0f} GB/s per GPU across nodes; "
              f"{a.runtime_gb:.1f} GiB for the CUDA context and NCCL"]
    return "\n".join(lines)


def fit_table(cfg, s: Shapes, t: Shapes | None, lengths: list[int], a) -> str:
    """GiB per GPU and tokens/s at each sequence length, one sequence per micro-batch (the step's other settings as
    configured): a projection from the shapes, as the breakdown is."""
    lines = [f"projection: one sequence per micro-batch, grad_accum {cfg.train.grad_accum}, activation checkpointing "
             f"{'on' if cfg.train.activation_checkpointing else 'off'}, {a.nodes} x {a.gpus_per_node} GPUs of "
             f"{a.gpu_memory_gb:.0f} GiB", "", f"{'tokens per sequence':>20s} {'GiB per GPU':>12s} {'fits':>5s} "
             f"{'tokens/s':>12s}  largest item"]
    for n in lengths:
        c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=n),
                                train=dataclasses.replace(cfg.train, micro_batch_size=1))
        e = estimate(c, s, t, a.nodes, a.gpus_per_node, a)
        total, step = sum(e["memory"].values()), sum(e["time"].values())
        big = max(e["memory"], key=e["memory"].get)
        lines.append(f"{n:>20,d} {total / GIB:>12.1f} {'yes' if total <= a.gpu_memory_gb * GIB else 'NO':>5s} "
                     f"{e['tokens_per_step'] / step:>12,.0f}  {big} ({e['memory'][big] / GIB:.1f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=cli.positive_int, required=True)
    ap.add_argument("--gpus-per-node", type=cli.positive_int, required=True)
    ap.add_argument("--gpu-memory-gb", type=cli.positive_float, default=80.0, help="usable memory per GPU (H100: 80)")
    ap.add_argument("--tflops", type=cli.positive_float, default=989.0, help="peak dense bf16 TFLOP/s per GPU (H100 SXM: 989)")
    ap.add_argument("--mfu", type=cli.fraction, default=0.4, help="the share of the peak reached")
    ap.add_argument("--intra-gbs", type=cli.positive_float, default=300.0, help="GB/s per GPU inside a node (NVLink, bus)")
    ap.add_argument("--inter-gbs", type=cli.positive_float, default=40.0, help="GB/s per GPU across nodes (400 Gb/s IB: ~40)")
    ap.add_argument("--runtime-gb", type=cli.nonnegative_float, default=1.5,
                    help="GiB per GPU for the CUDA context (~0.5) and NCCL's communicator buffers (~1 for a few groups)")
    ap.add_argument("--seq-lens", help="comma-separated sequence lengths (e.g. 8192,16384,32768): a fit table, one "
                                       "sequence per micro-batch, instead of the breakdown (a projection)")
    ap.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    a, overrides = ap.parse_known_args(argv)
    try:
        cfg = C.load_config(a.config, overrides, data_files=False)
        C.validate(cfg, world_size=a.nodes * a.gpus_per_node, data_files=False)
        m = cfg.model
        s = shapes(m, "student")
        t = shapes(m, "teacher") if M.loads_teacher(cfg) else None
        e = estimate(cfg, s, t, a.nodes, a.gpus_per_node, a)
        lengths = [cli.positive_int(x) for x in a.seq_lens.split(",")] if a.seq_lens else []
    except (ValueError, OSError, argparse.ArgumentTypeError) as err:
        print(f"plan error: {err}", file=sys.stderr)
        return 2
    if lengths:
        print(fit_table(cfg, s, t, lengths, a))
        return 0
    if a.json:
        print(json.dumps({**e, "memory_gib": {k: v / GIB for k, v in e["memory"].items()}}))
    else:
        print(report(e, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
