"""Where does each method's first gradient point? For the embedded pair on the study task's training prompts: the
gradient of each loss with respect to the student's logits (teacher-forced on the teacher's answers), its cosine
with forward KL's, its norm, and how hard it pushes the teacher's top-1 token (minus the gradient at that token),
from a given student (default: the 6-layer student the studies start from; --student DIR for a trained one).

    python bench/gradient_direction.py [--student runs/assets/student-init] [--examples 16]

Ends with one JSON line {"student": ..., "rows": {method: {"cos_fkl", "norm", "top1_push"}}}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline import config as C  # noqa: E402
from pipeline.data import batches as data  # noqa: E402
from pipeline.loss import divergences as L  # noqa: E402

ROWS = [("fkl", "fkl", {}), ("rkl", "rkl", {}), ("skl", "skl", {}), ("srkl", "srkl", {}), ("gkd", "gjsd", {}),
        ("taid (t=0.4)", "taid", {}), ("abkd (0.2, 0.7)", "ab_divergence", {}),
        ("amid AB(p, r) a=0.5", "amid", {"alpha": 0.5, "divergence": "ab"})] + [
        (f"amid KL(p, r) a={a:g}", "amid", {"alpha": a, "divergence": "kl"}) for a in (-5.0, -3.0, -1.0, 0.0, 0.5, 1.0)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="runs/assets/smollm2-135m-instruct")
    ap.add_argument("--student", default="runs/assets/student-init")
    ap.add_argument("--train", default="runs/assets/instruct/train.jsonl")
    ap.add_argument("--examples", type=int, default=16)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32).eval()
    d = C.load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipeline",
                                   "configs", "study_offpolicy.yaml"), []).data
    rows = [json.loads(line) for line in open(args.train)][: args.examples]
    batch = data.collate(*zip(*[data.tokenize_example(r, tok, d, "pairs") for r in rows]), tok.pad_token_id or 0)
    keep = batch.loss_mask.bool()
    with torch.no_grad():
        inputs, attn = batch.tokens[:, :-1], batch.attention_mask[:, :-1]
        zt = teacher(input_ids=inputs, attention_mask=attn).logits[keep]
        zs = student(input_ids=inputs, attention_mask=attn).logits[keep]
    top = zt.argmax(-1, keepdim=True)

    def grad(method, options):
        z = zs.clone().requires_grad_(True)
        L.distillation_loss(method, z, zt, **({"lam": 0.1, "order": "pr", **options} if method == "amid"
                                               else options)).mean().backward()
        return z.grad

    g_fkl = grad("fkl", {})
    out = {}
    for name, method, options in ROWS:
        g = grad(method, options)
        out[name] = {"cos_fkl": round(torch.nn.functional.cosine_similarity(g.flatten(), g_fkl.flatten(), 0).item(), 3),
                     "norm": float(f"{g.norm().item():.3g}"),
                     "top1_push": float(f"{-g.gather(1, top).mean().item():.3g}")}
        print(f"{name:24s} cos with FKL {out[name]['cos_fkl']:+.3f}   norm {out[name]['norm']:.3g}   "
              f"push on the teacher's top-1 {out[name]['top1_push']:.3g}", file=sys.stderr)
    print(json.dumps({"student": args.student, "tokens": int(keep.sum()), "rows": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
