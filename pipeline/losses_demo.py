"""Every distillation method on the same random logits: per-token mean loss and student-gradient norm.

    python -m pipeline.losses_demo [--tokens 64] [--vocab 49152] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.loss.divergences import METHODS, make_loss


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.vocab < 2:
        raise SystemExit("--tokens must be >= 1 and --vocab >= 2")

    g = torch.Generator().manual_seed(args.seed)
    teacher = 3.0 * torch.randn(args.tokens, args.vocab, generator=g)
    student = (0.7 * teacher + 2.0 * torch.randn(args.tokens, args.vocab, generator=g)).requires_grad_(True)
    targets = torch.multinomial(torch.softmax(teacher, -1), 1, generator=g).squeeze(-1)
    mask = torch.rand(args.tokens, generator=g) > 0.1  # some ignored positions, as prompts/padding would be

    print(f"{args.tokens} tokens x {args.vocab} vocab, {int(mask.sum())} valid; teacher p, student q")
    print(f"{'method':18s} {'loss':>10s} {'|grad|':>10s} {'ms':>8s}  definition")
    results = {}
    for name, spec in METHODS.items():
        loss_fn = make_loss(name)
        student.grad = None
        t0 = time.perf_counter()
        per_token = loss_fn(student, teacher, mask=mask, targets=targets)
        loss = per_token.sum() / mask.sum().clamp_min(1)
        loss.backward()
        ms = 1e3 * (time.perf_counter() - t0)
        gnorm = student.grad.norm().item()
        results[name] = {"loss": loss.item(), "grad_norm": gnorm}
        print(f"{name:18s} {loss.item():10.5f} {gnorm:10.5f} {ms:8.1f}  {spec.doc}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
