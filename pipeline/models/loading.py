"""Rank-local loading of a local HF checkpoint (safetensors files): the model is built with its parameters on the
meta device (no memory, no initialisation; buffers such as rotary tables are real), the backend shards or places it,
and then each rank reads from the files only the rows it holds (its FSDP2 shard, its vocabulary rows of the output
layer, the whole tensor for a replica) straight into their final memory.

Loading every model whole on every rank (`from_pretrained`) costs each rank the full checkpoint in host memory and in
reads from the shared filesystem: a 7B teacher and a 1.5B student are about 19 GB per rank, 150 GB per node, and a
70B teacher cannot be loaded at all. Measured by bench/load_bench.py (`make bench-load`).

Shapes: V vocabulary rows, H hidden size; a parameter's rows are its first dimension (FSDP2 shards dim 0).
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor, nn
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import AutoConfig, AutoModelForCausalLM

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """The tensors of a safetensors checkpoint directory, read by rows: only the bytes asked for are read (the files
    are memory-mapped; a row range is one contiguous span). Counts the bytes this process read."""

    def __init__(self, path: str):
        self.path, self.bytes_read = path, 0
        if os.path.isfile(os.path.join(path, INDEX)):
            with open(os.path.join(path, INDEX)) as f:
                files = json.load(f)["weight_map"]
        else:
            with safe_open(os.path.join(path, SINGLE), framework="pt") as f:
                files = {k: SINGLE for k in f.keys()}
        self.files = files
        self._open = {}

    @staticmethod
    def available(path: str | None) -> bool:
        return path is not None and any(os.path.isfile(os.path.join(path, f)) for f in (INDEX, SINGLE))

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _slice(self, name: str):
        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(os.path.join(self.path, file), framework="pt")
        return self._open[file].get_slice(name)

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of tensor `name` (all of a 0-d tensor), in its stored dtype."""
        sl = self._slice(name)
        t = sl[start:stop] if sl.get_shape() else sl[:]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def close(self) -> None:
        self._open.clear()


class RowSource:
    """Rows of one checkpoint tensor on demand, indexable like the tensor (`w[start:end]`): what OutputHeads takes in
    place of a full output-layer weight, so a rank reads only its vocabulary rows."""

    def __init__(self, ckpt: Checkpoint, name: str, dtype: torch.dtype):
        self.ckpt, self.name, self.dtype = ckpt, name, dtype
        self.shape = torch.Size(ckpt.shape(name))

    def __getitem__(self, rows: slice) -> Tensor:
        start, stop, step = rows.indices(self.shape[0])
        assert step == 1, "row ranges only"
        return self.ckpt.rows(self.name, start, stop).to(self.dtype)  # the model's dtype, whatever the file's


@contextlib.contextmanager
def params_on_meta():
    """While active, every parameter a module registers goes to the meta device as it is registered: its layer's
    initialisation then runs on meta (free), and the CPU tensor it was created as is never written (never resident).
    Buffers stay real, so values computed at construction (rotary inverse frequencies) survive."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(path: str, dtype: torch.dtype) -> nn.Module | None:
    """The model of checkpoint directory `path` with parameters on meta and its Checkpoint attached
    (`model.source_checkpoint`), or None when it cannot be loaded by rows (no safetensors files, or parameter names the
    files lack: then the caller loads it whole)."""
    if not Checkpoint.available(path):
        return None
    ckpt = Checkpoint(path)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    model.source_checkpoint = ckpt
    if any(checkpoint_name(model, n) is None for n, _ in model.named_parameters()):
        ckpt.close()  # only its index or header was read
        return None
    return model


def checkpoint_name(model: nn.Module, name: str) -> str | None:
    """The checkpoint's name for parameter `name` of `model`: the same, or for a tied output layer stored only as
    the input embedding, the embedding's."""
    ckpt = getattr(model, "source_checkpoint", None)
    if ckpt is None or name in ckpt:
        return name
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        for n, p in model.named_parameters(remove_duplicate=False):
            if p is emb.weight and n in ckpt:
                return n
    return None


def is_empty(model: nn.Module | None) -> bool:
    """Whether `model` still waits for its weights (built by empty_model, not yet loaded)."""
    return model is not None and any(p.is_meta for p in model.parameters())


def head_source(model: nn.Module, head_name: str) -> RowSource:
    """The output layer's rows of an empty model, by their checkpoint name (the embedding's when tied)."""
    return RowSource(model.source_checkpoint, checkpoint_name(model, head_name),
                     model.get_output_embeddings().weight.dtype)


def _local_rows(p: Tensor) -> tuple[Tensor, int]:
    """(the tensor this rank holds of parameter p, the global row it starts at): an FSDP2 DTensor's local shard and
    its offset along dim 0 (the only dimension FSDP2 shards), or the whole tensor."""
    if hasattr(p, "to_local"):
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        assert all(o == 0 for o in offset[1:]), f"only dim-0 shards are read by rows, got offset {offset}"
        return p.to_local(), int(offset[0]) if len(offset) else 0
    return p, 0


def materialise(model: nn.Module, device: torch.device | str) -> dict[str, str]:
    """Give an empty model's parameters (uninitialised) memory on `device`, each rank only its shards under FSDP2;
    buffers keep their constructed values. Returns {parameter name: its checkpoint name}."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    shared: dict[int, list[str]] = {}  # a tied embedding and output layer are one parameter under two names
    for n, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(n)
    names = {n: checkpoint_name(model, n) for n, _ in model.named_parameters()}
    model.to_empty(device=device)
    for first, *others in (v for v in shared.values() if len(v) > 1):  # to_empty gave each name its own tensor
        param = model.get_parameter(first)
        for n in others:
            owner, _, leaf = n.rpartition(".")
            setattr(model.get_submodule(owner), leaf, param)
    ckpt = model.source_checkpoint
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(ckpt.rows(name, 0, b.shape[0] if b.dim() else 1) if name in ckpt else buffers[name])
    return names


@torch.no_grad()
def load_local(model: nn.Module, device: torch.device | str) -> None:
    """An empty model (plain, or sharded by FSDP2) on `device`, filled with the rows this rank holds, read from its
    checkpoint; then the checkpoint is closed."""
    names = materialise(model, device)
    for name, p in model.named_parameters():
        local, start = _local_rows(p)
        if local.numel():
            local.copy_(model.source_checkpoint.rows(names[name], start, start + local.shape[0]))
    model.source_checkpoint.close()


@torch.no_grad()
def load_zero3(model: nn.Module, device: torch.device | str, ds_config: dict) -> None:
    """An empty model partitioned by DeepSpeed ZeRO-3 before its engine is built, each rank reading only the rows
    that cover its partition of each parameter; the engine then finds the parameters partitioned and builds its
    optimizer from the partitions filled here.

    The parameters get uninitialised full-size memory (never written, so never resident on a host) and are turned
    into ZeRO-3 parameters one by one without zero.Init(module=...)'s broadcast of rank 0's values: that would send
    the whole model from rank 0 to every rank (140 GB for a 70B teacher) and make each rank write, so hold, every
    whole parameter in turn, only for the values to be replaced here. Partitioning copies just this rank's slice."""
    import deepspeed  # deferred: DeepSpeed is imported only when the deepspeed backend runs
    names = materialise(model, device)
    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the group (its config reads the world)
    init = deepspeed.zero.Init(config_dict_or_path=ds_config)  # no module: sets up the partitioning only
    if hasattr(init, "_convert_to_deepspeed_param"):  # DeepSpeed's own per-parameter step, minus the broadcast
        for p in model.parameters():
            p.data = p.data.to(init.local_device)
            init._convert_to_deepspeed_param(p)
            p.partition()
    else:  # another DeepSpeed: its public conversion (broadcasts rank 0's uninitialised values, overwritten below)
        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    ckpt = model.source_checkpoint
    for name, p in model.named_parameters():
        part, total = p.ds_tensor, p.ds_numel
        row = 1
        for d in p.ds_shape[1:]:
            row *= d
        rank = dist.get_rank(group=getattr(p, "ds_process_group", None)) if dist.is_initialized() else 0
        start = part.ds_numel * rank  # ZeRO-3's partition: a contiguous range of the flattened parameter
        part.zero_()
        if start < total:
            end = min(start + part.ds_numel, total)
            first, last = start // row, -(-end // row)
            flat = ckpt.rows(names[name], first, last).reshape(-1)
            part[: end - start].copy_(flat[start - first * row: end - first * row])
        if p.numel() == total:  # a persistent (small) parameter stays whole on every rank besides its partition
            p.data.copy_(ckpt.rows(names[name], 0, p.ds_shape[0]).reshape(p.shape))
    ckpt.close()
