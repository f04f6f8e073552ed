"""Save / resume everything an exact continuation needs; atomic; keep the last k; export the student to HF.

Layout: run_dir/checkpoints/step_00000040/{body/..., rank0.pt, rank1.pt, ..., COMPLETE}. A checkpoint is written into
step_X.tmp, renamed once every rank has finished, and valid only once COMPLETE (written last, fsynced) exists; resume
picks the newest valid one, so a job killed mid-save (kill -9, preemption) never loads a partial checkpoint.
"""
from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from pipeline.distributed import barrier

MARKER = "COMPLETE"


def _dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def complete_checkpoints(run_dir: str) -> list[str]:
    d = _dir(run_dir)
    if not os.path.isdir(d):
        return []
    found = [(int(m.group(1)), os.path.join(d, n)) for n in os.listdir(d)
             if (m := re.fullmatch(r"step_(\d+)", n)) and os.path.exists(os.path.join(d, n, MARKER))]
    return [p for _, p in sorted(found)]


def latest(run_dir: str) -> str | None:
    c = complete_checkpoints(run_dir)
    return c[-1] if c else None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None:
        torch.cuda.set_rng_state_all(s["cuda"])


def save(run_dir: str, step: int, models, extra: dict, dist_ctx, keep_last: int) -> str:
    """extra: this rank's small state (data position, TAID state, ...); the heads and RNG are added here."""
    final = os.path.join(_dir(run_dir), f"step_{step:08d}")
    tmp = final + ".tmp"
    if dist_ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(dist_ctx.group)
    models.save(tmp)
    torch.save({"step": step, "heads": models.heads.state_dict(), "rng": rng_state(), **extra},
               os.path.join(tmp, f"rank{dist_ctx.rank}.pt"))
    barrier(dist_ctx.group)
    if dist_ctx.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(final, MARKER), "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for n in os.listdir(_dir(run_dir)):  # leftovers of saves that were killed
            if n.endswith(".tmp"):
                shutil.rmtree(os.path.join(_dir(run_dir), n), ignore_errors=True)
    barrier(dist_ctx.group)
    return final


def load(path: str, models, dist_ctx) -> dict:
    """Restore the models, heads and RNG; returns this rank's extra state (with 'step')."""
    f = os.path.join(path, f"rank{dist_ctx.rank}.pt")
    if not os.path.exists(f):
        raise ValueError(f"{path} has no state for rank {dist_ctx.rank}: resume with the world size it was saved "
                         f"with")
    state = torch.load(f, weights_only=False)
    models.load(path)
    models.heads.load_state_dict(state.pop("heads"))
    set_rng_state(state.pop("rng"))
    return state


def export_student(out_dir: str, models, student_config, tokenizer, dist_ctx) -> str | None:
    """A plain HF checkpoint (safetensors) that from_pretrained loads: the body's full state plus the gathered
    output layer (untied)."""
    from transformers import AutoModelForCausalLM
    head = models.heads.full_student_weight()
    body = models.full_student_state()
    if not dist_ctx.is_main:
        return None
    config = student_config
    config.tie_word_embeddings = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = model.state_dict().keys()  # persistent entries only (rotary caches etc. are rebuilt on load)
    head_key = output_prefix(model) + "weight"
    state = {k: v for k, v in body.items() if k in expected}
    state[head_key] = head.to(next(iter(body.values())).dtype)
    model.load_state_dict(state, assign=True, strict=True)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def output_prefix(model) -> str:
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    raise ValueError("the student has no output layer to export")
