"""The optimiser as users expect it: weight decay on matrices only (norm weights and biases undecayed unless told),
and one clipping norm over the body and the output layer (optim.clip_scope global, what HF Trainer and TRL do),
against plain-PyTorch references."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline import config as C
from pipeline.models import build as M
from pipeline.parallel.distributed import Layout
from pipeline.parallel.backends import build_adamw, parallelize

DEBUG = "pipeline/configs/debug_cpu.yaml"


@pytest.mark.parametrize("decay_all", [False, True])
def test_weight_decay_skips_norms_and_biases_unless_told(decay_all):
    cfg = C.load_config(DEBUG, ["--optim.weight_decay=0.5", "--optim.lr=0.1",
                                f"--optim.decay_norms_and_biases={str(decay_all).lower()}"])
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    before = copy.deepcopy(model)
    opt = build_adamw(model.parameters(), cfg.optim)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves a parameter
    opt.step()
    for (name, p), q in zip(model.named_parameters(), before.parameters()):
        decayed = p.ndim >= 2 or decay_all
        want = q * (1 - 0.1 * 0.5) if decayed else q
        torch.testing.assert_close(p.detach(), want.detach(), rtol=0, atol=1e-7, msg=name)
    assert len(opt.param_groups) == (1 if decay_all else 2)


def _step(scope: str, scale: float):
    """One optimiser step of the debug student (backend none) with gradients `scale` x a fixed pattern, and the
    same step by hand: one AdamW over body + output layer, torch's clip_grad_norm_ over the chosen sets."""
    cfg = C.load_config(DEBUG, ["--parallel.backend=none", f"--optim.clip_scope={scope}", "--optim.grad_clip=1.0",
                                "--optim.lr=0.01"])
    student = M.build_model(None, cfg.model.student_config, "float32", 0).train()
    teacher = M.build_model(None, cfg.model.teacher_config, "float32", 1).eval().requires_grad_(False)
    models = parallelize(student, teacher, 512, cfg, Layout(1, 1, 0, 0))
    body = [p for p in models.student.parameters() if p.requires_grad]
    head = models.heads.student
    g = torch.Generator().manual_seed(0)
    for p in body + [head]:
        p.grad = scale * torch.randn(p.shape, generator=g)
    ref_body, ref_head = [p.detach().clone().requires_grad_() for p in body], head.detach().clone().requires_grad_()
    for r, p in zip(ref_body + [ref_head], body + [head]):
        r.grad = p.grad.clone()
    if scope == "global":
        torch.nn.utils.clip_grad_norm_(ref_body + [ref_head], 1.0)
    else:
        torch.nn.utils.clip_grad_norm_(ref_body, 1.0)
        torch.nn.utils.clip_grad_norm_([ref_head], 1.0)
    # the gradients each optimizer is about to apply (Adam's first update hardly depends on their scale)
    seen = {}
    for opt in (models.optimizer, models.heads.optimizer):
        opt.register_step_pre_hook(lambda o, *_: seen.update(
            {id(p): p.grad.clone() for gr in o.param_groups for p in gr["params"] if p.grad is not None}))
    # the training step's order: the heads' share, the body's norm, then both steps (train.train_step)
    head_sq = models.heads.local_grad_sq()
    body_norm = models.grad_norm()
    both = scope == "global"
    models.step(False, head_sq=head_sq if both else None)
    models.heads.step(1.0, head_sq + body_norm ** 2 if both else head_sq, False)
    for r, p in zip(ref_body + [ref_head], body + [head]):
        torch.testing.assert_close(seen[id(p)], r.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scope", ["global", "separate"])
@pytest.mark.parametrize("scale", [1e-4, 1.0])  # below the clip (nothing happens) and well above it
def test_clipping_matches_torch_over_the_chosen_sets(scope, scale):
    _step(scope, scale)


def test_the_clipping_scope_is_checked():
    with pytest.raises(ValueError, match="optim.clip_scope must be one of global, separate"):
        C.load_config(DEBUG, ["--optim.clip_scope=everything"])
