"""Save / resume everything an exact continuation needs; checkpoints that prove themselves; keep the last k; export
the student to HF.

Layout: run_dir/checkpoints/step_00000040/{body/..., rank0.pt, rank1.pt, ..., MANIFEST.json, COMPLETE}.
- What a checkpoint carries besides the model bodies is a registry of named `Stateful` objects (data position,
  output layers, RNG, TAID, replay buffer, schedule, step) built once by train.Run: save and load iterate over it,
  so adding state is one line there and nothing here.
- A checkpoint is written into step_X.tmp. Every rank flushes its node's writes (syncfs: an fsync from another node
  does not flush them on Lustre or NFS); every file is checksummed (sha256; the ranks share the hashing) and
  fsynced; rank 0 writes MANIFEST.json (size and sha256 per file, world size, the resolved config and its
  fingerprint), renames the directory, fsyncs the parent, and writes COMPLETE last. Only a directory with COMPLETE
  is a checkpoint, so a job killed mid-save (kill -9, preemption) never leaves one that looks whole.
- Resume verifies the newest checkpoint against its manifest before loading anything from it; on a missing,
  truncated or altered file it says which, and falls back to the next older checkpoint that verifies (loudly), or
  stops when none does. It never starts from scratch on its own.
- A non-finite model state is never written: save checks every rank's share first (one all-reduce).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import re
import shutil
import sys
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GenerationConfig

from pipeline.models.build import embedding_name, head_name
from pipeline.parallel.distributed import barrier
from pipeline.run.integrity import file_sha256

MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class CheckpointError(RuntimeError):
    """No checkpoint can be used (or one cannot be written); the message says what to do."""


class NonFiniteState(CheckpointError):
    pass


class RngState:
    """Python, numpy, torch and CUDA generator states of this process, as a Stateful. CUDA: the generator of this
    rank's own GPU only. Every visible GPU's (get_rng_state_all) would tie the checkpoint to the GPU binding it was
    written under: a resume where each task sees one GPU instead of eight (or the reverse) could not restore it, and
    a rank never draws on another rank's GPU."""

    def state_dict(self) -> dict:
        return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}

    def load_state_dict(self, s: dict) -> None:
        torch.set_rng_state(s["torch"])
        random.setstate(s["python"])
        np.random.set_state(s["numpy"])
        cuda = s.get("cuda")
        if cuda is None or not torch.cuda.is_available():
            return
        if isinstance(cuda, (list, tuple)):  # a checkpoint holding one state per visible GPU: this rank's
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)


def _dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def complete_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint directories that have their COMPLETE marker, oldest first."""
    d = _dir(run_dir)
    if not os.path.isdir(d):
        return []
    found = [(int(m.group(1)), os.path.join(d, n)) for n in os.listdir(d)
             if (m := re.fullmatch(r"step_(\d+)", n)) and os.path.exists(os.path.join(d, n, MARKER))]
    return [p for _, p in sorted(found)]


def latest(run_dir: str) -> str | None:
    c = complete_checkpoints(run_dir)
    return c[-1] if c else None


def read_manifest(path: str) -> dict | None:
    """The checkpoint's manifest, or None when it has none or it cannot be read."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------------------
# files: checksums, fsync
# --------------------------------------------------------------------------------------------------------------
def _files(root: str) -> list[str]:
    """Every file under root (relative paths, sorted) except the manifest and the marker."""
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), root)
            if rel not in (MANIFEST, MARKER):
                out.append(rel)
    return sorted(out)


def _disk_full(e: BaseException) -> bool:
    """A write that ran out of space: ENOSPC / EDQUOT, or how torch's zip writer and safetensors say so."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(k in str(e) for k in ("unexpected pos", "No space left", "file write failed", "os error 28")):
            return True  # torch's zip writer, safetensors' serializer
        e = e.__cause__ or e.__context__
    return False


def _syncfs(path: str) -> None:
    """Flush this node's unwritten pages of the file system that holds `path` (syncfs(2); sync(2) where libc has
    none). Every rank calls it for the files it wrote before another rank hashes them: on Lustre or NFS an fsync
    from another node does not make this node's writes durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if getattr(ctypes.CDLL(None, use_errno=True), "syncfs")(fd) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs({path})")
    except AttributeError:
        os.sync()
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _gather_dicts(mine: dict, dist_ctx) -> dict:
    """The union of every rank's dict, on every rank (one all_gather_object)."""
    if dist_ctx.group is None:
        return dict(mine)
    parts = [None] * dist_ctx.world
    dist.all_gather_object(parts, mine, group=dist_ctx.group)
    out = {}
    for p in parts:
        out.update(p)
    return out


def _broadcast(obj, dist_ctx):
    if dist_ctx.group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=dist_ctx.group)
    return box[0]


def _all_true(flag: torch.Tensor, dist_ctx) -> bool:
    """MIN over ranks of a device bool; one all-reduce and one host read."""
    t = flag.float().reshape(1)
    if dist_ctx.group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=dist_ctx.group)
    return bool(t.item() > 0)


# --------------------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------------------
def save(run_dir: str, step: int, models, state: dict[str, Stateful], dist_ctx, *, keep_last: int,
         config: dict, fingerprint: str, inputs: dict | None = None) -> str:
    """Write checkpoint `step` (collective: every rank calls it). state: the registry of this rank's small state.
    config / fingerprint: the resolved config and config.fingerprint(); inputs: the content fingerprints of what the
    run reads (integrity.input_fingerprints); all recorded for resume checks."""
    if not _all_true(models.local_state_is_finite(), dist_ctx):
        raise NonFiniteState(f"the model state at step {step} is not finite: no checkpoint written (the newest "
                             f"finite one is kept)")
    final = os.path.join(_dir(run_dir), f"step_{step:08d}")
    tmp = final + ".tmp"
    if dist_ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(dist_ctx.group)
    try:
        models.save(tmp)
        torch.save({name: obj.state_dict() for name, obj in state.items()},
                   os.path.join(tmp, f"rank{dist_ctx.rank}.pt"))
        _syncfs(tmp)
    except Exception as e:  # re-raised unless the disk is full
        if not _disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the space it took, back; the newest complete checkpoint stays
        free = shutil.disk_usage(_dir(run_dir)).free
        previous = complete_checkpoints(run_dir)
        need = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(previous[-1]) for f in fs) \
            if previous else None
        raise CheckpointError(
            f"disk full while writing checkpoint step {step} in {_dir(run_dir)}: {free / 2**30:.2f} GiB free"
            + (f", the last checkpoint took {need / 2**30:.2f} GiB" if need else "")
            + (f"; the newest complete one ({os.path.basename(previous[-1])}) is kept" if previous else "")
            + ": free space (or lower checkpoint.keep_last) and relaunch to resume") from None
    barrier(dist_ctx.group)
    # one listing (rank 0's), then every rank hashes and fsyncs its share of the files
    files = _broadcast(_files(tmp) if dist_ctx.is_main else None, dist_ctx)
    mine = {}
    for rel in files[dist_ctx.rank::dist_ctx.world]:
        size, digest = file_sha256(os.path.join(tmp, rel), fsync=True)
        mine[rel] = {"size": size, "sha256": digest}
    sums = _gather_dicts(mine, dist_ctx)
    if dist_ctx.is_main:
        manifest = {"step": step, "world_size": dist_ctx.world, "fingerprint": fingerprint, "config": config,
                    "inputs": inputs or {},
                    "state": sorted(state), "files": {k: sums[k] for k in sorted(sums)}}
        _write_durably(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, default=str))
        for d, _, _ in os.walk(tmp):
            _fsync_dir(d)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(_dir(run_dir))
        _write_durably(os.path.join(final, MARKER), f"{step}\n")
        _fsync_dir(final)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for n in os.listdir(_dir(run_dir)):  # leftovers of saves that were killed
            if n.endswith(".tmp"):
                shutil.rmtree(os.path.join(_dir(run_dir), n), ignore_errors=True)
    barrier(dist_ctx.group)
    return final


# --------------------------------------------------------------------------------------------------------------
# verify and load
# --------------------------------------------------------------------------------------------------------------
def verify(path: str, dist_ctx) -> list[str]:
    """What is wrong with checkpoint `path` (empty: it verifies). Collective: the ranks share the hashing and all
    return the same list. A checkpoint without a manifest (written before manifests existed) cannot be verified and
    is reported as such."""
    manifest = read_manifest(path)
    if manifest is None:
        return [f"{MANIFEST} is missing or unreadable"]
    problems = []
    if manifest.get("world_size") != dist_ctx.world:
        problems.append(f"saved by {manifest.get('world_size')} ranks, this launch has {dist_ctx.world}: resume with "
                        f"the world size it was saved with")
    names = sorted(manifest.get("files", {}))
    mine = {}
    for rel in names[dist_ctx.rank::dist_ctx.world]:
        want = manifest["files"][rel]
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            mine[rel] = "missing"
            continue
        size, digest = file_sha256(full)
        if size != want["size"]:
            mine[rel] = f"truncated or grown: {size} bytes, {want['size']} expected"
        elif digest != want["sha256"]:
            mine[rel] = "contents differ from the checksum written with it (corrupted)"
    bad = _gather_dicts(mine, dist_ctx)
    return problems + [f"{rel}: {why}" for rel, why in sorted(bad.items())]


def load(path: str, models, state: dict[str, Stateful], dist_ctx) -> int:
    """Restore the models and every registered Stateful from a verified checkpoint; returns its step."""
    f = os.path.join(path, f"rank{dist_ctx.rank}.pt")
    saved = torch.load(f, weights_only=False, map_location="cpu")
    missing = sorted(set(state) - set(saved))
    if missing:
        raise CheckpointError(f"{f} holds no state for {missing}: it was written by a run with another setup")
    models.load(path)
    for name, obj in state.items():
        obj.load_state_dict(saved[name])
    return int(read_manifest(path)["step"])


def load_newest_valid(run_dir: str, models, state: dict[str, Stateful], dist_ctx, log=print,
                      before_load=None) -> str | None:
    """Load the newest checkpoint that verifies; None when the run directory has none at all. Each one that fails
    verification is reported with its problems (file by file) and skipped; when every one fails, CheckpointError
    says so and nothing is loaded or deleted. before_load(path) may refuse the chosen one by raising."""
    candidates = complete_checkpoints(run_dir)[::-1]
    rejected = []
    for path in candidates:
        problems = verify(path, dist_ctx)
        if not problems:
            if rejected and dist_ctx.is_main:
                log(f"WARNING: resuming from {path}, an OLDER checkpoint: the newer one(s) failed verification")
            if before_load is not None:
                before_load(path)
            load(path, models, state, dist_ctx)
            return path
        rejected.append(path)
        if dist_ctx.is_main:
            log(f"WARNING: checkpoint {path} fails verification, not loaded:\n  " + "\n  ".join(problems[:20]))
    if rejected:
        raise CheckpointError(
            f"no checkpoint in {_dir(run_dir)} verifies ({len(rejected)} tried, problems above). Nothing was loaded "
            f"or deleted. Restore the files from a backup, or start again with --checkpoint.resume=false "
            f"--checkpoint.overwrite=true (this deletes them)")
    return None


# --------------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------------
# a bound on the host memory the export's writer (rank 0) holds: one file's worth of tensors at a time
EXPORT_SHARD_BYTES = 2 << 30


def export_student(out_dir: str, models, student_config, tokenizer, dist_ctx) -> str | None:
    """A plain HF checkpoint (safetensors) that from_pretrained loads: the body's full state plus the gathered
    output layer (untied, or the embedding when tied). Streamed (collective: every rank calls it): the body is
    gathered a bucket at a time (the models' full_weights) and rank 0, the only writer, holds at most
    EXPORT_SHARD_BYTES of it on the host before writing a file (a 7B student is 15-30 GB whole); the output layer is
    gathered onto rank 0 alone. Refused when the state is not finite; written beside out_dir and renamed into place,
    so a reader never sees half an export."""
    if not _all_true(models.local_state_is_finite(), dist_ctx):
        raise NonFiniteState("the trained student is not finite: not exported")
    tied, vocab = models.heads.tied, models.heads.vocab_size
    config = student_config
    # the exported model's vocabulary is the tokenizer's: the output layer's padded rows were dropped at load (never
    # a target, never trained), and the embedding's go with them (a Qwen2.5 head of 151,936 rows exports 151,665)
    for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        c.tie_word_embeddings, c.vocab_size = tied, vocab
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = set(model.state_dict())  # persistent entries only (rotary caches etc. are rebuilt on load)
    head_key = embedding_name(model) if tied else head_name(model)
    tmp = out_dir.rstrip("/") + ".tmp"
    writer = None
    if dist_ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        writer = ShardWriter(tmp, EXPORT_SHARD_BYTES)
    dtype, embedding = None, embedding_name(model)
    for name, t in models.full_weights("student"):
        dtype = dtype or t.dtype
        if writer is not None and name in expected:
            writer.add(name, (t[:vocab] if name == embedding else t).to("cpu", copy=True))
    head = models.heads.gather_student(dtype)
    if writer is None:
        return None
    try:
        writer.add(head_key, head.cpu())
        missing = expected - writer.close() - ({head_name(model)} if tied else set())
        if missing:
            raise ValueError(f"the export lacks {len(missing)} tensor(s) of the model class, e.g. "
                             f"{sorted(missing)[:3]}")
        config.dtype, config.architectures = dtype, [type(model).__name__]
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _syncfs(tmp)
    except Exception as e:  # re-raised unless the disk is full
        if not _disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"disk full while exporting the student to {tmp}: "
                              f"{shutil.disk_usage(os.path.dirname(os.path.abspath(tmp))).free / 2**30:.2f} GiB free; "
                              f"the checkpoints are kept: free space and relaunch (the finished run exports again)")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    _fsync_dir(os.path.dirname(os.path.abspath(out_dir)))
    return out_dir


class ShardWriter:
    """Tensors into safetensors files of at most `limit` bytes each (a larger tensor gets a file of its own),
    written as they fill, named as from_pretrained expects (model.safetensors, or model-0000i-of-0000n.safetensors
    and their index)."""

    def __init__(self, root: str, limit: int):
        os.makedirs(root)
        self.root, self.limit = root, limit
        self.pending, self.size, self.total, self.files, self.error = {}, 0, 0, [], None

    def add(self, name: str, t: torch.Tensor) -> None:
        """Queue `t`; a full disk is kept for close() to raise, so the caller still takes part in every gather."""
        if self.error is not None:
            return
        n = t.numel() * t.element_size()
        if self.pending and self.size + n > self.limit:
            try:
                self._flush()
            except Exception as e:  # re-raised unless the disk is full
                if not _disk_full(e):
                    raise
                self.error, self.pending = e, {}
                return
        self.pending[name] = t.contiguous()
        self.size += n
        self.total += n

    def _flush(self) -> None:
        part = f"part{len(self.files):05d}.safetensors"
        save_file(self.pending, os.path.join(self.root, part), metadata={"format": "pt"})
        self.files.append((part, list(self.pending)))
        self.pending, self.size = {}, 0

    def close(self) -> set[str]:
        """Name the files, write the index; the names written."""
        if self.error is not None:
            raise self.error
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (part, _), name in zip(self.files, final):
            os.replace(os.path.join(self.root, part), os.path.join(self.root, name))
        weight_map = {k: name for (_, keys), name in zip(self.files, final) for k in keys}
        if n > 1:
            with open(os.path.join(self.root, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
        return set(weight_map)


def warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
