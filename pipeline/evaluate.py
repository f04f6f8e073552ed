"""Held-out evaluation of a student against its teacher: perplexity, token-level KL(teacher || student), teacher
top-1 agreement; results as JSON (and printed).

    python -m pipeline.evaluate --checkpoint runs/x/student --config runs/x/config.yaml [--out eval.json]
        [--blocks 64] [--data.eval_files=[held_out.txt]] [--section.key=value ...]

The teacher and the data come from the (training) config, for its data kind (text: packed blocks; chat: the
response tokens of instruction examples); `--data.eval_files=...` points at held-out data. Only the sequences
evaluated are read and tokenised. Evaluation runs in one process (on its GPU in the training dtype), a few
sequences at a time, with full-vocabulary logits for at most 1024 positions at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import torch
from transformers import AutoModelForCausalLM

from pipeline import cli, config as C
from pipeline.data import batches as data
from pipeline.data.token_store import TokenStore
from pipeline.loss import divergences as losses
from pipeline.models import build as M
from pipeline.rollout import hf as rollout


def hidden_states(model, tokens, attention_mask, documents=None):
    """The final (normalised) hidden states [B, T, H] of a causal LM: its decoder without the output layer.
    documents [B, T] (packed text, data.document_mask): attention inside each document, as training runs it
    (transformers derives the documents from positions that restart with each)."""
    if documents is not None:
        return model.get_decoder()(input_ids=tokens, position_ids=M.document_positions(documents),
                                   use_cache=False).last_hidden_state
    return model.get_decoder()(input_ids=tokens, attention_mask=attention_mask, use_cache=False).last_hidden_state


@torch.no_grad()
def heldout_metrics(student, teacher, batch: data.Batch, batch_size: int = 4, chunk_tokens: int = 1024) -> dict:
    """Token means over the loss positions of `batch` (every next token of a packed block; the response tokens of
    instruction examples): perplexity, KL(teacher || student), KL(student || teacher), teacher top-1 agreement,
    the student's entropy. Full-vocabulary logits exist for `chunk_tokens` positions at a time: a 152k vocabulary
    at 4 x 4095 positions would be 10 GB per model in fp32. Padded output rows beyond the shared vocabulary are
    ignored. One host read at the end."""
    device = next(student.parameters()).device
    ws, wt = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    v = min(ws.shape[0], wt.shape[0])
    ws, wt = ws[:v], wt[:v]
    fkl, rkl = losses.make_loss("fkl"), losses.make_loss("rkl")
    totals = torch.zeros(6, dtype=torch.float64, device=device)  # nll, fkl, rkl, agreement, entropy, tokens
    for i in range(0, batch.tokens.shape[0], batch_size):
        tokens = batch.tokens[i:i + batch_size].to(device)
        attn = batch.attention_mask[i:i + batch_size, :-1].to(device)
        mask = batch.loss_mask[i:i + batch_size].to(device).bool()
        docs = None if batch.documents is None else batch.documents[i:i + batch_size, :-1].to(device)
        hs = hidden_states(student, tokens[:, :-1], attn, docs)[mask]  # [N, H]
        ht = hidden_states(teacher, tokens[:, :-1], attn, docs)[mask]
        targets = tokens[:, 1:][mask]
        for j in range(0, targets.numel(), chunk_tokens):
            zs = (hs[j:j + chunk_tokens] @ ws.t()).float()  # [chunk, V]
            zt = (ht[j:j + chunk_tokens] @ wt.t()).float()
            logq = torch.log_softmax(zs, -1)
            totals += torch.stack([
                losses.cross_entropy(zs, targets[j:j + chunk_tokens]).sum(), fkl(zs, zt).sum(), rkl(zs, zt).sum(),
                losses.top1_agreement(zs, zt).sum(), -(logq.exp() * logq).sum(),
                torch.tensor(float(zs.shape[0]), device=device)]).double()
    nll, kl_pq, kl_qp, agree, entropy, n = totals.tolist()
    n = max(n, 1.0)
    return {"perplexity": math.exp(nll / n), "kl_to_teacher": kl_pq / n, "kl_student_to_teacher": kl_qp / n,
            "top1_agreement": agree / n, "student_entropy": entropy / n, "tokens": int(n)}


def evaluate_models(student, teacher, blocks: torch.Tensor, batch_size: int = 4, eos_id: int | None = None) -> dict:
    """Token means over all predicted positions of packed blocks [n, T]: perplexity, KL(teacher || student),
    teacher top-1 agreement; eos_id: documents masked as in training (data.document_mask)."""
    student.eval()
    m = heldout_metrics(student, teacher, data.text_batch(blocks, eos_id), batch_size)
    return {k: m[k] for k in ("perplexity", "kl_to_teacher", "top1_agreement", "tokens")}


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
    from rouge_score import rouge_scorer  # deferred: rouge_score is imported only when answers are scored
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


def answers(model, tokenizer, prompts: list[str], max_new_tokens: int, *, temperature: float, seed: int | None,
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
    greedy = answers(student, tokenizer, prompts, max_new_tokens, temperature=0.0, seed=None, batch_size=batch_size)
    sampled = [rouge_l(answers(student, tokenizer, prompts, max_new_tokens, temperature=1.0, seed=seed,
                                     batch_size=batch_size), refs)
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


def first_blocks(docs, tokenizer, text_field: str, seq_len: int, n: int) -> torch.Tensor:
    """The first `n` packed blocks [<= n, seq_len] of a document stream (data.pack_blocks' blocks), tokenising only
    the documents they need."""
    flat, need = [], n * seq_len
    for i, row in enumerate(docs):
        text = data.text_cell(row[text_field], text_field, i)
        if text:
            flat += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(flat) >= need:
            break
    k = min(len(flat) // seq_len, n)
    return torch.tensor(flat[: k * seq_len], dtype=torch.long).view(k, seq_len)


def heldout_sample(cfg, tokenizer, n: int) -> tuple[data.Batch, str]:
    """(a batch of at most `n` held-out sequences, where they came from), for the config's data kind, reading only
    what it needs: data.eval_files' first rows when set; else the tail of the token store (data.store), else the
    first rows of the last training file (the training data: seen in training, said in the result)."""
    d, pad = cfg.data, M.pad_id(tokenizer)
    if d.eval_files:
        files, where = d.eval_files, "data.eval_files"
    elif d.store:
        store = TokenStore(d.store)
        store.check_tokenizer(tokenizer)
        rows = store.examples(d) if d.kind == "chat" else store.blocks(d.seq_len)
        tail = torch.arange(max(len(rows) - n, 0), len(rows))
        where = f"the last {len(tail)} {'examples' if d.kind == 'chat' else 'blocks'} of data.store (training data)"
        return (data.collate(*zip(*rows[tail]), pad) if d.kind == "chat"
                else data.text_batch(rows[tail], data.document_end(cfg, tokenizer))), where
    elif d.files:
        files = C.resolve_files(d.files)[-1:]
        where = f"the first rows of {files[0]} (training data)"
    else:
        raise ValueError("evaluation needs held-out data: set data.eval_files (or data.store / data.files)")
    if d.kind == "chat":
        examples = data.load_examples(dataclasses.replace(d, max_documents=n), tokenizer, files=files, what=where)
        return data.collate(*zip(*examples[:n]), pad), where
    # one file (or the held-out files) as an Arrow table, read lazily row by row; not streamed: a stream's reader
    # threads would outlive it in this process
    held = dataclasses.replace(d, files=files, dataset=None, streaming=False, max_documents=None)
    blocks = first_blocks(data.load_documents(held, where), tokenizer, d.text_field, d.seq_len, n)
    if blocks.shape[0] == 0:
        raise ValueError(f"{where}: no held-out block of data.seq_len ({d.seq_len}) tokens in it")
    return data.text_batch(blocks, data.document_end(cfg, tokenizer)), where


def check_device(cfg, environ=os.environ) -> None:
    """Refuse to evaluate a large teacher on CPUs, which takes hours (the eval job without a GPU): say how to get
    one, or PIPELINE_ALLOW_CPU=1 to mean it."""
    if torch.cuda.is_available() or environ.get("PIPELINE_ALLOW_CPU") == "1":
        return
    params = sum(p.numel() for p in M.meta_model(cfg.model, "teacher").parameters())
    if params > CPU_EVAL_PARAMS:
        raise ValueError(f"no GPU here, and the teacher has {params / 1e9:.1f}B parameters (hours on CPUs): submit "
                         f"the evaluation with a GPU (`sbatch --gpus=1 slurm/eval.sbatch`, or pipeline.submit --eval),"
                         f" or set PIPELINE_ALLOW_CPU=1")


CPU_EVAL_PARAMS = 1_000_000_000  # above this a CPU evaluation is refused unless asked for


def evaluate_checkpoint(checkpoint: str, cfg, n_blocks: int, prompts=None) -> dict:
    """Held-out metrics of an HF student checkpoint against the config's teacher on at most `n_blocks` held-out
    sequences (heldout_sample; instruction data: on the response tokens); ROUGE-L too when `prompts` = (prompts,
    references)."""
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise ValueError(f"--checkpoint {checkpoint!r} is not an HF checkpoint directory (no config.json): give the "
                         f"run's exported student, e.g. run_dir/student")
    check_device(cfg)
    tokenizer = M.load_tokenizer(cfg)
    batch, where = heldout_sample(cfg, tokenizer, n_blocks)
    # on a GPU in the training dtype (a 7B teacher in fp32 on a CPU takes hours); on CPUs in fp32
    gpu = torch.cuda.is_available()
    dtype = cfg.model.dtype if gpu else "float32"
    device = "cuda" if gpu else "cpu"
    with M.readable("--checkpoint", checkpoint):
        student = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=M.DTYPES[dtype]).to(device).eval()
    with M.readable(M.model_field(cfg.model, "teacher"), cfg.model.teacher_path):
        teacher = M.build_model(cfg.model.teacher_path, cfg.model.teacher_config, dtype,
                                cfg.model.init_seed + 1).to(device)
    scores = heldout_metrics(student, teacher.eval(), batch)
    if cfg.data.kind == "text":  # the keys a text job's result has always had
        scores = {k: scores[k] for k in ("perplexity", "kl_to_teacher", "top1_agreement", "tokens")}
    scores.update(data_kind=cfg.data.kind, sequences=int(batch.tokens.shape[0]), held_out=where)
    if prompts:
        scores["rouge_l"] = rouge_l(generate(student, tokenizer, prompts[0]), prompts[1])
    return scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="an HF checkpoint directory (e.g. run_dir/student)")
    ap.add_argument("--config", required=True, help="the training config (teacher, tokenizer, data)")
    ap.add_argument("--out", help="write the results JSON here")
    ap.add_argument("--blocks", type=cli.positive_int, default=64, help="held-out sequences: blocks of data.seq_len tokens (text), examples (chat)")
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
