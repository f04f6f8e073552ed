"""Student (trainable) and teacher (frozen) from local HF checkpoints or from model configs; the shared tokenizer and
the vocabulary checks that must pass before any training starts."""
from __future__ import annotations

import contextlib
import os

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.models import loading

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_tokenizer(cfg):
    """The tokenizer shared by teacher and student: model.tokenizer_path, else the teacher's directory."""
    path = cfg.model.tokenizer_path or cfg.model.teacher_path
    if path is None:
        raise ValueError("model.tokenizer_path is required when the teacher is built from a config")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no EOS token: packing needs a document separator")
    return tok


def pad_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS (padded positions are masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def build_model(path: str | None, config: dict | None, dtype: str, seed: int) -> nn.Module:
    """from_pretrained on a local directory, or a random init from an HF config dict (identical on every rank)."""
    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    conf = dict(config)
    model_type = conf.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **conf)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config)
    return model.to(DTYPES[dtype])


def output_rows(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_vocab(student: nn.Module, teacher: nn.Module, tokenizer) -> int:
    """The real vocabulary size (the tokenizer's). Both output layers must cover it; rows beyond it (padded heads,
    e.g. 151,936 vs 152,064 in the Qwen2.5 family) are masked to -inf in both models by the loss."""
    real = len(tokenizer)
    rows_s, rows_t = output_rows(student), output_rows(teacher)
    for who, rows in (("student", rows_s), ("teacher", rows_t)):
        if rows < real:
            raise ValueError(f"the {who}'s output layer has {rows} rows but the shared tokenizer has {real} tokens: "
                             f"teacher and student must share the tokenizer (resize the {who}'s embeddings)")
    return real


def check_same_tokenizer(cfg, tokenizer) -> None:
    """A teacher or student checkpoint that ships its own tokenizer must agree with the shared one token for token
    (the teacher's own is the shared one unless model.tokenizer_path points elsewhere)."""
    shared = cfg.model.tokenizer_path or cfg.model.teacher_path
    for who in ("teacher", "student"):
        path = getattr(cfg.model, f"{who}_path")
        if path is None or os.path.abspath(path) == os.path.abspath(shared):
            continue
        if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            continue
        other = AutoTokenizer.from_pretrained(path)
        if other.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"the {who}'s tokenizer ({path}) differs from the shared one ({shared}): distillation "
                             f"needs one shared vocabulary (set model.tokenizer_path to the {who}'s, or pick models "
                             f"of one family)")


def model_field(m, who: str) -> str:
    """The config field a model comes from, for error messages."""
    return f"model.{who}_path" if getattr(m, f"{who}_path") is not None else f"model.{who}_config"


def meta_model(m, who: str) -> nn.Module:
    """The teacher's or student's model ('teacher' / 'student') built from its HF config on the meta device: every
    shape, no memory, no weights. A config that cannot build is a ValueError naming the field."""
    path, conf = getattr(m, f"{who}_path"), getattr(m, f"{who}_config")
    field = model_field(m, who)
    try:
        if path is not None:
            hf = AutoConfig.from_pretrained(path)
        else:
            rest = dict(conf)
            hf = AutoConfig.for_model(rest.pop("model_type"), **rest)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf)
    except Exception as e:  # transformers raises ValueError, TypeError, KeyError, AssertionError, OSError...
        raise ValueError(f"{field}: the model cannot be built from it: {type(e).__name__}: {e}") from None


def preflight(cfg, tokenizer) -> None:
    """Every model check that needs no weights, before any load: each HF config parses and builds (on the meta
    device: no memory, no weights), both output layers cover the shared tokenizer and have no bias, the tokenizers
    agree. A problem is a ValueError naming the field."""
    built = {}
    for who in ("teacher", "student"):
        built[who] = meta_model(cfg.model, who)
        field = model_field(cfg.model, who)
        head = built[who].get_output_embeddings()
        if head is None:
            raise ValueError(f"{field}: the model has no output layer (a causal LM head is needed)")
        if getattr(head, "bias", None) is not None:
            raise ValueError(f"{field}: output layers with a bias are not supported by the vocab-parallel loss")
        positions = getattr(built[who].config.get_text_config(), "max_position_embeddings", None)
        if positions is not None and cfg.data.seq_len > positions:
            raise ValueError(f"data.seq_len ({cfg.data.seq_len}) is longer than the {who} was built for "
                             f"(max_position_embeddings {positions}, {field}): lower data.seq_len")
    check_vocab(built["student"], built["teacher"], tokenizer)
    check_same_tokenizer(cfg, tokenizer)


@contextlib.contextmanager
def readable(field: str, path: str | None):
    """A checkpoint that cannot be read (a truncated or corrupt safetensors file, a missing shard) becomes a
    ValueError naming the field and the directory instead of a traceback from deep inside the reader."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{field}: the checkpoint {path!r} cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); a file may be missing, truncated or "
                         f"corrupt: copy it again") from None


def build_for_training(path: str | None, config: dict | None, dtype: str, seed: int) -> nn.Module:
    """A checkpoint with safetensors files: the model empty (parameters on meta, loading.empty_model), so that the
    backend places or shards it and each rank then reads only what it holds (loading.load_local); otherwise (a
    config, or a checkpoint that cannot be read by rows) as build_model does."""
    if path is not None:
        model = loading.empty_model(path, DTYPES[dtype])
        if model is not None:
            return model
    return build_model(path, config, dtype, seed)


def loads_teacher(cfg) -> bool:
    """Whether the training processes hold the teacher: not with loss.offline_teacher (its stored top-k) nor with
    loss.teacher remote (a served teacher's top-k)."""
    return not cfg.loss.offline_teacher and cfg.loss.teacher != "remote"


def build_models(cfg, tokenizer) -> tuple[nn.Module, nn.Module | None, int]:
    """(student in train mode, teacher in eval mode with requires_grad False, real vocab size); a model from a
    checkpoint may still be empty (loading.is_empty: parallelize loads it). Without loads_teacher(cfg) the teacher is
    None: its top-k comes from a cache or a server."""
    m = cfg.model
    teacher = None
    if loads_teacher(cfg):
        with readable(model_field(m, "teacher"), m.teacher_path):
            teacher = build_for_training(m.teacher_path, m.teacher_config, m.dtype, m.init_seed + 1)
        teacher.eval().requires_grad_(False)
    with readable(model_field(m, "student"), m.student_path):
        student = build_for_training(m.student_path, m.student_config, m.dtype, m.init_seed)
    student.train()
    vocab = check_vocab(student, teacher if teacher is not None else student, tokenizer)
    return student, teacher, vocab


def detach_head(model: nn.Module, copy: bool = True) -> torch.Tensor:
    """Take the output layer out of the model (its forward then returns hidden states) and return its full weight
    [V, H] (a copy; copy=False: the tensor itself, for a frozen teacher whose tied embedding then shares it). The
    loss uses the rows vocab-parallel; no backend ever wraps or gathers this weight. A tied student's input
    embedding then reads the same rows (parallelize.TiedEmbedding)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("output layers with a bias are not supported by the vocab-parallel loss")
    weight = head.weight.detach().clone() if copy else head.weight.detach()
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    model.set_output_embeddings(nn.Identity())
    return weight


def weight_name(model: nn.Module, module: nn.Module) -> str:
    """The state-dict name of `module`'s weight inside `model` (e.g. 'lm_head.weight')."""
    for name, m in model.named_modules(remove_duplicate=False):
        if m is module:
            return f"{name}.weight" if name else "weight"
    raise ValueError(f"the model has no {type(module).__name__}")


def head_name(model: nn.Module) -> str:
    return weight_name(model, model.get_output_embeddings())


def embedding_name(model: nn.Module) -> str:
    return weight_name(model, model.get_input_embeddings())


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """[B, T] document indices -> positions that restart at 0 at every document's first token."""
    T = documents.shape[1]
    idx = torch.arange(T, device=documents.device).expand_as(documents)
    start = torch.ones_like(documents, dtype=torch.bool)
    start[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 1).values
    return idx - first
