"""Held-out evaluation of a student against its teacher: perplexity, token-level KL(teacher || student), teacher
top-1 agreement; results as JSON (and printed).

    python -m pipeline.evaluate --checkpoint runs/x/student --config runs/x/config.yaml [--out eval.json]
        [--blocks 64] [--data.files=[held_out.txt]] [--section.key=value ...]

The teacher and the data come from the (training) config; `--data.files=...` points at held-out text. Evaluation
runs in one process on full logits, a few sequences at a time.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from pipeline import config as C, data, losses, models as M, rollout


@torch.no_grad()
def evaluate_models(student, teacher, blocks: torch.Tensor, batch_size: int = 4) -> dict:
    """Token means over all predicted positions of `blocks` [n, T]."""
    student.eval()
    n_tok, nll, kl, agree = 0, 0.0, 0.0, 0.0
    fkl = losses.make_loss("fkl")
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i:i + batch_size].to(next(student.parameters()).device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        zs = student(input_ids=inputs).logits.float()
        zt = teacher(input_ids=inputs).logits.float()
        v = min(zs.shape[-1], zt.shape[-1])  # padded output rows beyond the shared vocabulary are ignored
        zs, zt = zs[..., :v], zt[..., :v]
        nll += float(losses.cross_entropy(zs, targets).sum())
        kl += float(fkl(zs, zt).sum())
        agree += float(losses.top1_agreement(zs, zt).sum())
        n_tok += targets.numel()
    return {"perplexity": math.exp(nll / n_tok), "kl_to_teacher": kl / n_tok, "top1_agreement": agree / n_tok,
            "tokens": n_tok}


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    """The prompt in the tokenizer's chat template (plain text where it has none), ready for generation."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")
        return ids if torch.is_tensor(ids) else ids["input_ids"]
    return tokenizer(prompt + "\n", return_tensors="pt").input_ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy responses, one prompt at a time (no padding effects)."""
    model.eval()
    out = []
    for p in prompts:
        ids = chat_ids(tokenizer, p).to(next(model.parameters()).device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=M.pad_id(tokenizer))
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                   seed: int | None = None) -> list[str]:
    """Responses to `prompts` generated together (left padding): greedy at temperature 0, else sampled with a
    generator seeded by `seed` (the same seed gives the same answers)."""
    model.eval()
    device = next(model.parameters()).device
    pad = M.pad_id(tokenizer)
    ids, attn = rollout.left_pad([chat_ids(tokenizer, p)[0].tolist() for p in prompts], pad)
    width = ids.shape[1]
    sample = temperature > 0
    if sample:
        torch.manual_seed(0 if seed is None else seed)  # generate() samples from the global generator
    gen = model.generate(ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens,
                         do_sample=sample, temperature=temperature if sample else None, top_p=1.0 if sample else None,
                         top_k=0 if sample else None, pad_token_id=pad)
    return [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen]


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (rouge_score's rougeL with stemming, as in the AMiD / DistiLLM / MiniLLM evaluations), in
    percent."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return 100.0 * sum(scores) / max(len(scores), 1)


@torch.no_grad()
def response_divergences(student, teacher, batch, batch_size: int = 8) -> dict:
    """Token means over the response tokens of a data.collate batch: KL(p || q), KL(q || p), teacher top-1
    agreement, and the student's entropy H(q) (p teacher, q student, full logits; nats)."""
    fkl, rkl = losses.make_loss("fkl"), losses.make_loss("rkl")
    n, totals = 0.0, torch.zeros(4, dtype=torch.float64)
    for i in range(0, batch.tokens.shape[0], batch_size):
        tokens, attn = batch.tokens[i:i + batch_size, :-1], batch.attention_mask[i:i + batch_size, :-1]
        mask = batch.loss_mask[i:i + batch_size].bool()
        zs = student(input_ids=tokens, attention_mask=attn).logits.float()
        zt = teacher(input_ids=tokens, attention_mask=attn).logits.float()
        v = min(zs.shape[-1], zt.shape[-1])
        zs, zt = zs[..., :v][mask], zt[..., :v][mask]
        logq = torch.log_softmax(zs, -1)
        totals += torch.stack([fkl(zs, zt).sum(), rkl(zs, zt).sum(), losses.top1_agreement(zs, zt).sum(),
                               -(logq.exp() * logq).sum()]).double()
        n += float(mask.sum())
    kl_pq, kl_qp, agree, entropy = (totals / max(n, 1.0)).tolist()
    return {"fkl": kl_pq, "rkl": kl_qp, "top1_agreement": agree, "entropy": entropy}


def answers(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, seed: int | None,
            batch_size: int = 50) -> list[str]:
    """Responses to `prompts` in batches of `batch_size`: greedy at temperature 0, else sampled, batch i of a seed
    seeded by seed * 1000 + its first index (so an answer does not depend on how many batches ran before)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        out += generate_batch(model, tokenizer, prompts[i:i + batch_size], max_new_tokens, temperature,
                              None if seed is None else seed * 1000 + i)
    return out


def pair_divergences(student, teacher, tokenizer, prompts: list[str], responses: list[str], d) -> dict:
    """response_divergences on (prompt, response) pairs laid out as training lays them out (`d`: the DataConfig of
    the run's chat format and lengths)."""
    ex = [data.tokenize_example({d.prompt_field: p, d.response_field: r}, tokenizer, d, "pairs")
          for p, r in zip(prompts, responses)]
    return response_divergences(student, teacher, data.collate(*zip(*ex), M.pad_id(tokenizer)))


# instruct_scores' result keys for the references' teacher-forced divergences (in the result's order), each with its
# response_divergences key; `study backfill` checks a recorded result against a recomputation through the same table.
ON_REFERENCES = {"heldout_fkl": "fkl", "heldout_rkl": "rkl", "top1_agreement": "top1_agreement",
                 "student_entropy": "entropy"}


def sampling_seeds(n: int) -> list[int]:
    """The evaluation's sampling seeds: the AMiD paper's 10, 20, ... (five seeds: 10-50)."""
    return [10 * (s + 1) for s in range(n)]


def instruct_scores(student, teacher, tokenizer, rows: list[dict], d, *, sample_seeds: int = 5,
                    max_new_tokens: int = 64, kl_prompts: int = 64, batch_size: int = 50) -> dict:
    """What the method studies compare, on held-out {prompt, response} rows (response: the teacher's answer):
    ROUGE-L of greedy answers and of answers sampled at temperature 1 with `sample_seeds` seeds (their mean, as the
    AMiD paper's 5 evaluation seeds), held-out forward and reverse KL, top-1 agreement and the student's entropy on
    the references (teacher-forced, first `kl_prompts` rows; how sharp the student is decides how far its samples at
    temperature 1 stray from its greedy answer), and forward KL on the student's own greedy answers. `d`: the
    DataConfig whose chat format and lengths the training used."""
    prompts, refs = [r["prompt"] for r in rows], [r["response"] for r in rows]
    greedy = answers(student, tokenizer, prompts, max_new_tokens, 0.0, None, batch_size)
    sampled = [rouge_l(answers(student, tokenizer, prompts, max_new_tokens, 1.0, seed, batch_size), refs)
               for seed in sampling_seeds(sample_seeds)]
    n = min(kl_prompts, len(rows))
    on_refs = pair_divergences(student, teacher, tokenizer, prompts[:n], refs[:n], d)
    # an empty answer has no response tokens to score (tokenize_example drops it): score "." in its place
    on_own = pair_divergences(student, teacher, tokenizer, prompts[:n], [a or "." for a in greedy[:n]], d)
    mean = sum(sampled) / len(sampled) if sampled else float("nan")
    return {"rouge_l": mean, "rouge_l_seeds": sampled, "rouge_l_greedy": rouge_l(greedy, refs),
            **{key: on_refs[ours] for key, ours in ON_REFERENCES.items()},
            "own_answers_fkl": on_own["fkl"], "answer_words": sum(len(a.split()) for a in greedy) / len(greedy),
            "sample": {"prompt": prompts[-1], "reference": refs[-1], "greedy": greedy[-1]}}


def evaluate_checkpoint(checkpoint: str, cfg, n_blocks: int, prompts=None) -> dict:
    """Held-out metrics of an HF student checkpoint against the config's teacher, on `n_blocks` packed sequences of
    data.eval_files (else the tail of the training data); ROUGE-L too when `prompts` = (prompts, references)."""
    from transformers import AutoModelForCausalLM
    tokenizer = M.load_tokenizer(cfg)
    d = cfg.data
    held = C.DataConfig(files=d.eval_files or d.files, dataset=None if d.eval_files else d.dataset, format=d.format,
                        text_field=d.text_field, seq_len=d.seq_len)
    blocks = data.pack_blocks(data.load_documents(held), tokenizer, held.text_field, held.seq_len)
    if blocks.shape[0] == 0:
        raise ValueError(f"no held-out block of data.seq_len ({d.seq_len}) tokens in the data")
    # held-out files: any part is unseen, take the first blocks; the training data: its tail
    blocks = blocks[:n_blocks] if d.eval_files else blocks[-n_blocks:]
    # on a GPU in the training dtype (a 7B teacher in fp32 on a CPU takes hours); on CPUs in fp32
    gpu = torch.cuda.is_available()
    dtype = cfg.model.dtype if gpu else "float32"
    device = "cuda" if gpu else "cpu"
    student = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=M.DTYPES[dtype]).to(device)
    teacher = M.build_model(cfg.model.teacher_path, cfg.model.teacher_config, dtype, cfg.model.init_seed + 1).to(device)
    scores = evaluate_models(student, teacher.eval(), blocks)
    if prompts:
        scores["rouge_l"] = rouge_l(generate(student, tokenizer, prompts[0]), prompts[1])
    return scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="an HF checkpoint directory (e.g. run_dir/student)")
    ap.add_argument("--config", required=True, help="the training config (teacher, tokenizer, data)")
    ap.add_argument("--out", help="write the results JSON here")
    ap.add_argument("--blocks", type=int, default=64, help="held-out sequences of data.seq_len tokens")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = C.load_config(args.config, overrides)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        result = {"checkpoint": args.checkpoint, **evaluate_checkpoint(args.checkpoint, cfg, args.blocks)}
    except ValueError as err:
        print(str(err), file=sys.stderr)
        return 2
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
