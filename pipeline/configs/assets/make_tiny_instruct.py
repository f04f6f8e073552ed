"""How tiny_instruct*.jsonl were made: prompt/response pairs cut from the paragraphs of tiny_corpus.txt (the
paragraph's first words as the prompt, the words after them as the response), for on-policy tests and the
debug_onpolicy config. Re-run: python pipeline/configs/assets/make_tiny_instruct.py"""
import json
import os

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "tiny_corpus.txt")) as f:
    paragraphs = [p.split() for p in f.read().split("\n\n")]
rows = [{"prompt": "Continue: " + " ".join(w[:6]), "response": " ".join(w[6:24])} for w in paragraphs if len(w) >= 12]
for name, part in (("tiny_instruct.jsonl", rows[:-40]), ("tiny_instruct_eval.jsonl", rows[-40:])):
    with open(os.path.join(here, name), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in part)
    print(name, len(part))
