"""The one place parallelism touches the models: DeepSpeed ZeRO-3, PyTorch FSDP2, or none (one process).

Both models lose their output layer first (models.detach_head): the bodies return hidden states and are sharded by
the backend; the output layers are split by vocabulary rows inside the shard group (OutputHeads) and replicated
across groups, which is what the vocab-parallel loss consumes. So no backend ever gathers a full output-layer
weight, and no rank holds full-vocab logits. The 2-D layout (distributed.Layout): the student is sharded inside the
shard group (FSDP2: HSDP on the (replicate, shard) mesh; DeepSpeed: ZeRO-3 with the hpZ secondary partition in the
group); the teacher is placed by parallel.teacher. The three backends look alike through the small `Models`
protocol that train.py uses.

Gradient scale: the fused loss gives every rank the gradient of its shard group's share of the *global* loss for
its own tokens (exact: no other group sees them) and for its own head rows (a partial sum: the replicas of those rows
saw other tokens). DeepSpeed and FSDP average body gradients over all ranks, so train.py backpropagates loss x world
size; OutputHeads sums its rows' gradients over the replicas and divides by the same factor.
"""
from __future__ import annotations

import contextvars
import hashlib
import math
import os
from typing import Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import and_masks, causal_mask_function, packed_sequence_mask_function, sdpa_mask

from pipeline.config import read_deepspeed_json
from pipeline.loss.vocab_parallel import gather_shards, shard_range
from pipeline.models import build as M, loading
from pipeline.parallel.distributed import device, Layout, ranks_per_node


class Models(Protocol):
    heads: "OutputHeads"

    def student_hidden(self, input_ids: Tensor, attention_mask: Tensor, documents: Tensor | None = None) -> Tensor: ...
    def teacher_hidden(self, input_ids: Tensor, attention_mask: Tensor, documents: Tensor | None = None) -> Tensor: ...
    def set_lr(self, lr: float) -> None: ...
    def backward(self, loss: Tensor) -> None: ...
    def grad_norm(self) -> Tensor | None: ...
    def step(self, skip: bool, head_sq: Tensor | None = None) -> tuple[float | None, bool]: ...
    def local_state_is_finite(self) -> Tensor: ...
    def save(self, path: str) -> None: ...
    def load(self, path: str) -> None: ...
    def teacher_state_digest(self) -> str: ...
    def full_weights(self, who: str): ...


class OutputHeads:
    """This rank's rows [start, end) of both output layers, split inside the shard group and replicated across
    groups, over the real vocabulary only: padded rows beyond the tokenizer's size are dropped rather than masked
    (they are never a target and never predicted). The student's rows are an fp32 master parameter with their own
    AdamW (the same hyper-parameters and schedule as the body); replicas stay identical because they apply the same
    all-reduced gradient."""

    def __init__(self, student_w: Tensor, teacher_w: Tensor, vocab_size: int, layout: Layout, optim_cfg, *,
                 device: torch.device | str = "cpu", tied: bool = False):
        self.tied = tied  # the student's input embedding is these rows too (TiedEmbedding)
        self.group, self.replica_group = layout.shard_group, layout.replica_group
        self.world, self.replicas = layout.world, layout.replicas  # the loss scale; copies of each row
        self.shard_size = layout.shard_size
        self.start, self.end = shard_range(vocab_size, layout.shard_rank, layout.shard_size)
        self.student = nn.Parameter(student_w[self.start:self.end].float().clone().to(device))
        self.teacher = None
        if teacher_w is not None:  # frozen: all rows (one shard) stay the teacher's own tensor, shared when tied
            rows = teacher_w[self.start:self.end]
            self.teacher = (rows if rows.shape[0] == teacher_w.shape[0] else rows.clone()).to(device)
        self.vocab_size = vocab_size
        self.optimizer = build_adamw([self.student], optim_cfg)

    def local_grad_sq(self) -> Tensor:
        """Sum the rows' gradient over the replicas (one all-reduce in the replica group), undo the world-size loss
        scale; return this rank's share of the squared gradient norm [1]: its rows' squared norm over the number
        of replicas holding them, so the caller's SUM over all ranks (the step's one all-reduce) is the norm."""
        g = self.student.grad
        if g is None:
            return torch.zeros(1, device=self.student.device)
        if self.replicas > 1:
            dist.all_reduce(g, group=self.replica_group)
        if self.world > 1:
            g.div_(self.world)
        return (g.float().pow(2).sum() / self.replicas).reshape(1)

    def step(self, max_norm: float, global_sq: Tensor, skip: bool) -> Tensor:
        """Clip by the norm over all ranks' rows and update, or drop the gradient when the step is skipped (the
        optimizer state stays untouched). Returns the norm (a device scalar)."""
        norm = global_sq.sqrt().reshape(())
        if not skip and self.student.grad is not None:
            if max_norm > 0:  # min(1, c / norm) as a tensor: no host read
                self.student.grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict:
        return {"student": self.student.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "start": self.start, "end": self.end}

    def load_state_dict(self, state: dict) -> None:
        if (state["start"], state["end"]) != (self.start, self.end):
            raise ValueError(f"checkpoint holds output-layer rows {state['start']}:{state['end']} but this rank "
                             f"owns {self.start}:{self.end}: resume with the same number of ranks")
        with torch.no_grad():
            self.student.copy_(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])

    def gather_student(self, dtype: torch.dtype) -> Tensor | None:
        """The student's full output layer [V, H] in `dtype` on the first rank of each shard group (rank 0 writes
        the export), None on the others: one gather, so no other rank holds the whole matrix."""
        rows = self.student.detach().to(dtype)
        if self.shard_size == 1:
            return rows.clone()
        per = math.ceil(self.vocab_size / self.shard_size)
        local = torch.zeros(per, rows.shape[1], dtype=dtype, device=rows.device)
        local[: self.end - self.start] = rows
        first = dist.get_rank(self.group) == 0
        out = [torch.empty_like(local) for _ in range(self.shard_size)] if first else None
        dist.gather(local, out, group=self.group, group_dst=0)
        return torch.cat(out)[: self.vocab_size] if first else None

    def full_weight(self, shard: Tensor) -> Tensor:
        """[V, H] from every rank's rows of `shard` (self.student or self.teacher): one all-gather in the shard
        group."""
        if self.shard_size == 1:
            return shard.detach().clone()
        per = math.ceil(self.vocab_size / self.shard_size)
        local = torch.zeros(per, shard.shape[1], dtype=shard.dtype, device=shard.device)
        local[: self.end - self.start] = shard.detach()
        out = [torch.empty_like(local) for _ in range(self.shard_size)]
        dist.all_gather(out, local, group=self.group)
        return torch.cat(out)[: self.vocab_size]


class TiedEmbedding(nn.Module):
    """A tied student's input embedding, read from its vocab-sharded output layer (OutputHeads.student): one matrix,
    both gradients, one AdamW state, exported tied. The lookup gathers the group's rows (what FSDP or ZeRO-3 do for
    an embedding they shard); backward sums every rank's row gradients to the rows' owners, and the replicas sum
    theirs with the output layer's gradient (OutputHeads.local_grad_sq). It registers no parameter, so no backend
    wraps or shards the matrix a second time."""

    def __init__(self, heads: OutputHeads, dtype: torch.dtype):
        super().__init__()
        self.heads, self.dtype = heads, dtype

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.heads
        table = gather_shards(h.student, math.ceil(h.vocab_size / h.shard_size), h.group)[: h.vocab_size]
        return nn.functional.embedding(input_ids, table).to(self.dtype)


def is_tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


_UNPADDED = contextvars.ContextVar("unpadded", default=False)
_DOCUMENTS: contextvars.ContextVar = contextvars.ContextVar("documents", default=None)


def _causal_mask(*args, **kwargs):
    """transformers' sdpa mask, except for batches the caller knows have no padding: then no mask (sdpa runs with
    is_causal), without transformers reading the padding mask back to the host to find that out (a device sync per
    forward). Packed documents (data.document_mask): causal and inside each document, from the document indices the
    data path built on the host (transformers would derive them from the positions with a host read)."""
    docs = _DOCUMENTS.get()
    if docs is not None:
        kwargs["mask_function"] = and_masks(kwargs.get("mask_function", causal_mask_function),
                                            packed_sequence_mask_function(docs))
        kwargs["allow_is_causal_skip"] = False
        return sdpa_mask(*args, **kwargs)
    return None if _UNPADDED.get() else sdpa_mask(*args, **kwargs)


def causal_without_mask_reads(model: nn.Module) -> None:
    """Switch an sdpa model to the same attention under the name 'pipeline_sdpa', whose mask function is
    _causal_mask (registered with transformers once)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register("pipeline_sdpa", sdpa_attention_forward)
    AttentionMaskInterface.register("pipeline_sdpa", _causal_mask)
    model.set_attn_implementation("pipeline_sdpa")


def forward(model, input_ids, attention_mask, documents=None) -> Tensor:
    """The model's final hidden states (its output layer is an Identity, so the HF output's "logits" are they).
    attention_mask None: the batch has no padding (known on the host). documents [B, T] (packed text with
    data.document_mask): each position's document; attention stays inside it and positions restart with it."""
    if documents is not None:
        token = _DOCUMENTS.set(documents)
        try:
            return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         position_ids=M.document_positions(documents), use_cache=False).logits
        finally:
            _DOCUMENTS.reset(token)
    if attention_mask is not None:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    token = _UNPADDED.set(True)
    try:  # a mask of ones keeps transformers from deriving packed-sequence ids from the positions (another read)
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits
    finally:
        _UNPADDED.reset(token)


def full_numel(model: nn.Module) -> int:
    """Elements of the unsharded model (ZeRO-3 keeps the full size in ds_numel; DTensors report it as numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


@torch.no_grad()
def full_state_dict(model: nn.Module, bucket_numel: int = 1 << 26) -> dict:
    """Every parameter and persistent buffer of a (possibly sharded) body, unsharded, on every rank (the rollout's
    local replica). Collective: all ranks call it together."""
    out, copy = {}, _gathered(model)
    for name, t in iter_full_state(model, bucket_numel):
        out[name] = t.clone() if copy else t  # ZeRO-3's tensors are views of a bucket released after it
    return out


def _gathered(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


@torch.no_grad()
def iter_full_state(model: nn.Module, bucket_numel: int = 1 << 26):
    """(name, full tensor) for every parameter and persistent buffer, gathered as it goes: ZeRO-3 gathers buckets
    of up to bucket_numel elements per call (few collectives, bounded transient memory) and a yielded tensor is
    only valid until the next one is asked for (use it or copy it); FSDP2 gathers each DTensor; an unsharded model
    yields its own tensors. Collective: every rank must consume the whole iterator, in the same order."""
    params = list(model.named_parameters())
    if _gathered(model):
        import deepspeed  # deferred: DeepSpeed is imported only when the deepspeed backend runs
        bucket, size = [], 0
        for i, (name, p) in enumerate(params):
            bucket.append((name, p))
            size += p.ds_numel
            if size >= bucket_numel or i == len(params) - 1:
                with deepspeed.zero.GatheredParameters([q for _, q in bucket], modifier_rank=None):
                    for n, q in bucket:
                        yield n, q.detach()
                bucket, size = [], 0
    else:
        for name, p in params:
            yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
    for name, b in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if leaf not in model.get_submodule(owner)._non_persistent_buffers_set:  # e.g. rotary caches: rebuilt
            yield name, b


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_adamw(params, o) -> torch.optim.AdamW:
    """The one AdamW of the pipeline (body and output layer): optim.lr, betas, weight_decay, on matrices only unless
    optim.decay_norms_and_biases (1-D parameters are norm weights and biases; the check reads the global shape, so
    it holds for FSDP2's DTensors, and DeepSpeed gets the groups before it flattens anything). The fused kernel (CPU
    and CUDA): one pass over each tensor, and its step counters live on the device, so a step reads nothing back to
    the host (the for-loop AdamW reads every parameter's step count with .item())."""
    params = [p for p in params if p.requires_grad]
    if o.decay_norms_and_biases or not o.weight_decay:
        groups = [{"params": params, "weight_decay": o.weight_decay}]
    else:
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), fused=True)


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _finite_local(tensors) -> Tensor:
    """A device bool: every element of these local tensors is finite (no host read)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t.numel()]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def _set_lr(optimizer, lr: float) -> None:
    for gr in optimizer.param_groups:
        gr["lr"] = lr


def _with_head(body_norm: Tensor, head_sq: Tensor) -> Tensor:
    """sqrt(body_norm^2 + head_sq) as a plain device scalar (FSDP2's norm is a DTensor: made whole first)."""
    body = _full(body_norm)
    return (body.float() ** 2 + head_sq.reshape(()).to(body.device)).sqrt()


def _local_shard(p: Tensor) -> Tensor:
    if hasattr(p, "ds_tensor"):  # ZeRO-3 partition
        return p.ds_tensor
    if hasattr(p, "to_local"):   # FSDP2 DTensor
        return p.to_local()
    return p


# ----------------------------------------------------------------------------------------------------------------
# What every backend does alike: free functions over (student, teacher, heads)
# ----------------------------------------------------------------------------------------------------------------
def teacher_state_digest(teacher, heads: OutputHeads) -> str:
    """sha256 of this rank's share of the teacher (its shards and head rows): no gather, cheap at any size."""
    if teacher is None:
        return "no teacher loaded (loss.offline_teacher or loss.teacher remote)"
    return _digest([_local_shard(p) for p in teacher.parameters()] + [heads.teacher])


def state_is_finite(student, heads: OutputHeads) -> Tensor:
    """This rank's share of the trainable state (body shards, output-layer rows) is finite: checked before every
    checkpoint and export, so a non-finite state is never written."""
    return _finite_local([_local_shard(p) for p in student.parameters()] + [heads.student])


@torch.no_grad()
def frozen_forward(teacher, input_ids, attention_mask, documents=None) -> Tensor:
    h = forward(teacher, input_ids, attention_mask, documents)
    if hasattr(teacher, "reshard"):
        # FSDP2 keeps the root's parameters gathered after forward, expecting a backward; the frozen teacher has
        # none, so free them now (also makes the local shards what teacher_state_digest reads)
        teacher.reshard()
    return h


# ----------------------------------------------------------------------------------------------------------------
# Plain torch modules: one process (the reference every backend is tested against) and FSDP2
# ----------------------------------------------------------------------------------------------------------------
def apply_fsdp2(student, teacher, cfg, layout: Layout, placement: str) -> None:
    """FSDP2 in place: the student as HSDP on the layout's (replicate, shard) mesh (plain FSDP when there is one
    group); the teacher (no optimizer) placed by `placement`."""
    bf16 = torch.bfloat16 in (M.DTYPES[cfg.model.dtype], M.DTYPES[cfg.parallel.fsdp_param_dtype])
    if bf16:
        # bf16 compute, fp32 masters: the sharded parameters (and so AdamW's state) stay fp32, FSDP2 gathers them
        # as bf16 for the forward and backward (a bf16 AdamW loses updates smaller than 2^-8 of a weight)
        student.float()
    student_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32,
                                      reduce_dtype=M.DTYPES[cfg.parallel.fsdp_reduce_dtype])
    apply_fsdp(student, layout.mesh if layout.replicas > 1 else layout.mesh["shard"], student_mp)
    if teacher is None:
        return
    # the frozen teacher computes in bf16 whenever the student does (a bf16 model, or bf16 gathers asked for): an
    # fp32 forward of a sharded bf16 teacher would upcast every gathered block for no gain
    mp = MixedPrecisionPolicy(param_dtype=student_mp.param_dtype, reduce_dtype=M.DTYPES[cfg.parallel.fsdp_reduce_dtype])
    if placement == "replicate":
        if not loading.is_empty(teacher):  # an empty one is read onto the device after sharding the student
            teacher.to(device())
    elif placement == "shard_group" or layout.replicas == 1:
        apply_fsdp(teacher, layout.mesh["shard"], mp)
    else:  # shard over every rank: a 1-D mesh of the world
        apply_fsdp(teacher, init_device_mesh(device().type, (layout.world,)), mp)


def apply_fsdp(model: nn.Module, mesh, mp) -> None:
    """fully_shard every decoder block, then the root (a 1-D mesh: FSDP; a 2-D (replicate, shard) mesh: HSDP)."""
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


# what both Models implementations do alike, given to each as its method
def _teacher_digest(models) -> str:
    return teacher_state_digest(models.teacher, models.heads)


def _set_lrs(models, lr: float) -> None:
    _set_lr(models.optimizer, lr)
    _set_lr(models.heads.optimizer, lr)


def _local_state_is_finite(models) -> Tensor:
    return state_is_finite(models.student, models.heads)


def _full_weights(models, who: str):
    """Models.full_weights: `who`'s body ('student' / 'teacher') unsharded, as its HF model names its weights
    (iter_full_state: collective; a tensor is valid until the next is asked for)."""
    return iter_full_state(models.student if who == "student" else models.teacher)


class TorchModels:
    """Plain torch modules with torch's AdamW: unsharded (backend none) or sharded in place by apply_fsdp2
    (`sharded`: checkpoints then go through torch.distributed.checkpoint, each rank writing its shards)."""

    def __init__(self, student, teacher, heads: OutputHeads, cfg, sharded: bool = False):
        self.student, self.teacher, self.heads, self.cfg, self.sharded = student, teacher, heads, cfg, sharded
        self.optimizer = build_adamw(student.parameters(), cfg.optim)
        self._raw_norm = None

    def student_hidden(self, input_ids, attention_mask, documents=None):
        return forward(self.student, input_ids, attention_mask, documents)

    def teacher_hidden(self, input_ids, attention_mask, documents=None):
        return frozen_forward(self.teacher, input_ids, attention_mask, documents)

    teacher_state_digest, set_lr = _teacher_digest, _set_lrs

    def backward(self, loss):
        loss.backward()

    def grad_norm(self) -> Tensor:
        """The body's global gradient norm, a device scalar (no host read; FSDP2 reduces its partial sums over the
        ranks here, so every rank gets the same value)."""
        params = [p for p in self.student.parameters() if p.grad is not None]
        self._raw_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        return _full(self._raw_norm)

    def step(self, skip: bool, head_sq: Tensor | None = None) -> tuple[None, bool]:
        """Clip and update the body unless `skip` (decided by the caller from the step's one host read: a
        non-finite loss, output-layer or body gradient norm on any rank); then the gradients are dropped and the
        optimizer state stays untouched. head_sq: the output layer's squared gradient norm, for one clipping norm
        over both (optim.clip_scope global). Returns (None: the norm is grad_norm()'s, skipped)."""
        if self._raw_norm is None:
            self.grad_norm()
        raw, self._raw_norm = self._raw_norm, None
        params = [p for p in self.student.parameters() if p.grad is not None]
        if not skip and params:
            if self.cfg.optim.grad_clip > 0:
                norm = raw if head_sq is None else _with_head(raw, head_sq)
                torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optim.grad_clip, norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None, skip

    full_weights = _full_weights

    local_state_is_finite = _local_state_is_finite

    def save(self, path):
        if self.sharded:
            dcp.save(self._dcp_state(), checkpoint_id=os.path.join(path, "body"))
            return
        torch.save({"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict()},
                   os.path.join(path, "body.pt"))

    def load(self, path):
        if self.sharded:
            state = self._dcp_state()
            dcp.load(state, checkpoint_id=os.path.join(path, "body"))
            set_state_dict(self.student, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
            return
        state = torch.load(os.path.join(path, "body.pt"), weights_only=False, map_location=device())
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])

    def _dcp_state(self):
        model_sd, optim_sd = get_state_dict(self.student, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3
# ----------------------------------------------------------------------------------------------------------------
def deepspeed_config(path: str, cfg, world: int, *, train: bool, hpz: int = 1) -> dict:
    """The JSON (checked by config.read_deepspeed_json) with the batch sizes, clipping and precision filled from the
    pipeline config; hpz > 1 keeps a secondary weight partition inside groups of that many ranks (ZeRO++ hpZ), so
    the backward's gathers (and every forward of a frozen model after its first) stay inside the group."""
    ds = read_deepspeed_json(path)
    tr = cfg.train
    ds.update(train_micro_batch_size_per_gpu=tr.micro_batch_size,
              gradient_accumulation_steps=tr.grad_accum if train else 1,
              train_batch_size=tr.micro_batch_size * (tr.grad_accum if train else 1) * world)
    if train:
        ds["gradient_clipping"] = cfg.optim.grad_clip
        ds["zero_allow_untested_optimizer"] = True
        # ZeRO-3 reduces gradients in the model's dtype unless told otherwise: bf16 sums over hundreds of ranks
        # lose the small contributions. fp32 unless the JSON chose.
        ds.setdefault("communication_data_type", "fp32")
        offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
        if offload.get("device") in ("cpu", "nvme"):
            # ZeRO-Offload steps the fp32 partitions on the host: DeepSpeed refuses any optimizer but its own CPU
            # Adam unless told otherwise, and ours (torch's fused AdamW, which runs on CPU tensors too) is the one
            # that carries the pipeline's parameter groups and the step veto
            ds.setdefault("zero_force_ds_cpu_optimizer", False)
    if hpz > 1:
        ds.setdefault("zero_optimization", {})["zero_hpz_partition_size"] = hpz
    for k in ("optimizer", "scheduler"):
        ds.pop(k, None)
    ds["bf16"] = {"enabled": cfg.model.dtype == "bfloat16"}
    return ds


def init_deepspeed(student, teacher, cfg, layout: Layout, placement: str):
    """(student engine, teacher engine or None, teacher module): the ZeRO-3 student engine (torch AdamW inside; hpZ
    inside the shard group) and the teacher placed by `placement`: a ZeRO-3 inference engine (no optimizer) over
    every rank or with hpZ in the group, or a plain replica on the device (no engine)."""
    import deepspeed  # deferred: DeepSpeed is imported only when the deepspeed backend runs
    if device().type == "cpu":
        # DeepSpeed's CPU shared-memory all-reduce serves tensor-parallel inference only, which this pipeline never
        # uses; left on, every fresh machine JIT-compiles it (about a minute of both cores here) on first init
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    world, p = layout.world, cfg.parallel
    hpz = layout.shard_size if 1 < layout.shard_size < world else 1
    ds = deepspeed_config(p.ds_student_config, cfg, world, train=True, hpz=hpz)
    if loading.is_empty(student):
        loading.load_zero3(student, device(), ds)
    engine, *_ = deepspeed.initialize(model=student, optimizer=build_adamw(student.parameters(), cfg.optim), config=ds)
    if teacher is None or placement == "replicate":
        return engine, None, teacher.to(device()) if teacher is not None else None
    ds = deepspeed_config(p.ds_teacher_config, cfg, world, train=False, hpz=hpz if placement == "shard_group" else 1)
    if loading.is_empty(teacher):
        loading.load_zero3(teacher, device(), ds)
    teacher_engine, *_ = deepspeed.initialize(model=teacher, config=ds)
    teacher_engine.eval()
    return engine, teacher_engine, teacher_engine.module


class DeepSpeedModels:
    """The engines of init_deepspeed behind the Models protocol."""

    def __init__(self, engine, teacher_engine, teacher, heads: OutputHeads, cfg):
        self.engine, self.teacher_engine, self.heads, self.cfg = engine, teacher_engine, heads, cfg
        self.student, self.teacher, self.optimizer = engine.module, teacher, engine.optimizer

    def student_hidden(self, input_ids, attention_mask, documents=None):
        return forward(self.engine, input_ids, attention_mask, documents)

    def teacher_hidden(self, input_ids, attention_mask, documents=None):
        return frozen_forward(self.teacher_engine if self.teacher_engine is not None else self.teacher, input_ids,
                              attention_mask, documents)

    teacher_state_digest, set_lr = _teacher_digest, _set_lrs

    def backward(self, loss):
        # the token weights already divide by the count over the whole accumulation window
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # bookkeeping only; the update waits for step() at the boundary

    def grad_norm(self) -> None:
        return None  # DeepSpeed computes (and checks) the body's norm inside its own step

    def step(self, skip: bool, head_sq: Tensor | None = None) -> tuple[float, bool]:
        """The boundary engine.step(): DeepSpeed clips and updates, and skips by itself when the body's gradient
        norm is non-finite (zero_optimization stage 3 checks it for every dtype). When the caller's decision is to
        skip although the body is finite, the inner AdamW step is vetoed for this one call, so parameters and
        optimizer state stay untouched either way. head_sq: as TorchModels.step; DeepSpeed computes the body's norm
        inside its step, so its clipping call sees the output layer's share added (for this call only)."""
        zero, inner = self.engine.optimizer, self.engine.optimizer.optimizer
        if skip:
            inner.step = lambda *args, **kwargs: None  # instance attribute shadows AdamW.step for this call only
        if head_sq is not None and getattr(zero, "clip_grad", 0) > 0:
            clip = type(zero).unscale_and_clip_grads  # (sub_group, norm x loss scale): norm over body and head

            def with_head(sub_group_id, total_norm, _zero=zero):
                return clip(_zero, sub_group_id, _with_head(total_norm, head_sq * _zero.loss_scale ** 2))
            zero.unscale_and_clip_grads = with_head
        try:
            self.engine.step()
        finally:
            if skip:
                del inner.step
            zero.__dict__.pop("unscale_and_clip_grads", None)
        skipped = skip or bool(getattr(self.engine.optimizer, "overflow", False))
        norm = self.engine.get_global_grad_norm()  # DeepSpeed's own value (it read it to check for overflow)
        return (float("inf") if skipped or norm is None else float(norm)), skipped

    full_weights = _full_weights

    local_state_is_finite = _local_state_is_finite

    def save(self, path):
        self.engine.save_checkpoint(os.path.join(path, "body"), tag="state", save_latest=False)

    def load(self, path):
        self.engine.load_checkpoint(os.path.join(path, "body"), tag="state", load_optimizer_states=True,
                                    load_lr_scheduler_states=False)


def rank_memory_bytes() -> int:
    """Memory one rank may count on: its GPU's, or on CPUs the host's divided by the ranks on this node."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    per_node, _ = ranks_per_node()
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(per_node or 1, 1)


def teacher_placement(requested: str, teacher_bytes: int, layout: Layout, fraction: float,
                      memory: int | None = None) -> tuple[str, str]:
    """(placement, why) for parallel.teacher; auto replicates a teacher whose full copy takes at most `fraction` of
    a rank's memory, else shards it inside the shard group."""
    if layout.world == 1:
        return "replicate", "one rank"
    if requested != "auto":
        return requested, "parallel.teacher"
    memory = rank_memory_bytes() if memory is None else memory
    share = teacher_bytes / max(memory, 1)
    why = (f"auto: a full teacher copy is {teacher_bytes / 2**30:.2f} GiB, {share:.1%} of a rank's "
           f"{memory / 2**30:.0f} GiB (parallel.teacher_replicate_fraction = {fraction})")
    return ("replicate" if share <= fraction else "shard_group"), why


def parallelize(student, teacher, vocab_size: int, cfg, layout: Layout, log=None) -> Models:
    """Detach both output layers into vocab-sharded heads, place the teacher (parallel.teacher) and wrap both bodies
    for the configured backend on the layout. Activation checkpointing (train.activation_checkpointing) is switched
    on in the student before any wrapping, so the backends shard the checkpointed blocks."""
    tied = is_tied(student)
    dtype = student.get_input_embeddings().weight.dtype
    # an empty model (loading.empty_model) hands OutputHeads a RowSource: each rank reads only its vocabulary rows
    sources = {id(m): loading.head_source(m, M.head_name(m)) for m in (student, teacher) if loading.is_empty(m)}
    ws = sources.get(id(student)) or M.detach_head(student)
    wt = sources.get(id(teacher)) or (M.detach_head(teacher, copy=False) if teacher is not None else None)
    for m in (m for m in (student, teacher) if id(m) in sources):
        M.detach_head(m, copy=False)
    heads = OutputHeads(ws, wt, vocab_size, layout, cfg.optim, device=device(), tied=tied)
    if tied:  # before any backend wraps the body: the embedding leaves it for the head's rows
        student.set_input_embeddings(TiedEmbedding(heads, dtype))
    for model in (m for m in (student, teacher) if m is not None):
        causal_without_mask_reads(model)
    if cfg.train.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backend = cfg.parallel.backend
    if backend == "none":
        return TorchModels(_placed(student, device()), _placed(teacher, device()), heads, cfg)
    placement, why = "none", "no teacher"
    if teacher is not None:
        size = sum(p.numel() * p.element_size() for p in teacher.parameters())
        placement, why = teacher_placement(cfg.parallel.teacher, size, layout, cfg.parallel.teacher_replicate_fraction)
    if log is not None:
        log(f"layout: {layout.replicas} replica group(s) x {layout.shard_size} ranks; teacher: {placement} ({why})")
    if backend == "fsdp2":
        # FSDP2 shards the empty models, then each rank reads its own shards into device memory
        apply_fsdp2(student, teacher, cfg, layout, placement)
        for m in (m for m in (student, teacher) if loading.is_empty(m)):
            loading.load_local(m, device())
        return TorchModels(student, teacher, heads, cfg, sharded=True)
    # a replicated teacher is read straight into device memory; empty models that ZeRO-3 partitions are read by
    # init_deepspeed, each rank its partitions
    if placement == "replicate":
        teacher = _placed(teacher, device())
    return DeepSpeedModels(*init_deepspeed(student, teacher, cfg, layout, placement), heads, cfg)


def _placed(model: nn.Module | None, where) -> nn.Module | None:
    """The model on `where`: an empty one read there from its checkpoint, a built one moved."""
    if model is None:
        return None
    if loading.is_empty(model):
        loading.load_local(model, where)
        return model
    return model.to(where)
