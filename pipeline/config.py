"""One typed config tree: a YAML file plus `--section.key=value` overrides, validated entirely before any model
loads. Every field has a docstring-comment; a bad value raises ValueError naming the field and what to fix.

    cfg = load_config("pipeline/configs/debug_cpu.yaml", ["--train.steps=20", "--parallel.backend=fsdp2"])
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from pipeline.loss import divergences as losses


@dataclass
class ModelConfig:
    teacher_path: str | None = None
    """Local HF checkpoint directory of the teacher (from_pretrained). Exactly one of teacher_path /
    teacher_config."""
    teacher_config: dict | None = None
    """An HF model config (dict, with `model_type`) for a randomly initialised teacher: tests and debugging."""
    student_path: str | None = None
    """Local HF checkpoint directory of the student. Exactly one of student_path / student_config."""
    student_config: dict | None = None
    """An HF model config for a randomly initialised student."""
    tokenizer_path: str | None = None
    """Tokenizer directory; default: the teacher's checkpoint directory. Teacher and student share it."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of both models: float32 or bfloat16 (losses always compute in float32)."""
    init_seed: int = 0
    """Seed of random initialisation (identical on every rank)."""


@dataclass
class DataConfig:
    files: list = field(default_factory=list)
    """Local data files or glob patterns (jsonl/json, parquet, txt). Empty when `dataset` names a hub dataset."""
    dataset: str | None = None
    """A dataset name for `datasets.load_dataset` that the cluster can reach (instead of files)."""
    store: str | None = None
    """A token store directory (`python -m pipeline.prepare` builds it from files / dataset): training then reads
    the pre-tokenised packed text (kind text) or examples (kind chat) from it, each rank only its own rows, instead
    of tokenising at start-up."""
    kind: Literal["text", "chat"] = "text"
    """text: documents packed into seq_len blocks (pretraining-style); chat: prompt/response examples for
    instruction tuning (loss on response tokens only; the rollout section mixes in generations)."""
    format: Literal["auto", "json", "parquet", "text"] = "auto"
    """json, parquet, text or auto (from the file extension)."""
    text_field: str = "text"
    """The column that holds the text."""
    seq_len: int = 128
    """Tokens per packed training sequence (text); the longest prompt + response (chat)."""
    max_prompt_len: int = 64
    """chat: prompts keep their last max_prompt_len tokens."""
    prompt_field: str = "prompt"
    """chat: the prompt column (rows with prompt/response columns)."""
    response_field: str = "response"
    """chat: the response column."""
    messages_field: str = "messages"
    """chat: the column of chat messages [{role, content}], last turn the assistant's (used when present)."""
    streaming: bool = False
    """Stream the dataset (for corpora that do not fit on disk); packing happens on the fly."""
    padding_free: bool = True
    """chat: pack each micro-batch's prompt + response examples into rows (as wide as the longest or data.seq_len,
    whichever runs fewer positions; each example attending only to itself, positions restarting with it) instead of
    right-padding every example to the longest: the same losses, fewer positions through both models."""
    document_mask: bool = False
    """text: attention stays inside each document of a packed row and positions restart with each document, for
    student and teacher alike; false: every position attends to the whole row. A document ends at the tokenizer's
    EOS, which packing and the token store append to each: only for data whose documents hold no EOS themselves
    (chat-formatted text whose template ends each turn with the EOS token is cut at every turn)."""
    shuffle_seed: int = 0
    """Seed of the order of packed sequences (one permutation per epoch, identical on every rank)."""
    max_documents: int | None = None
    """Use only the first N documents (quick runs)."""
    eval_files: list = field(default_factory=list)
    """Held-out files (same format rules as `files`) for the curve of held-out KL(teacher || student)."""
    eval_blocks: int = 16
    """Held-out sequences of seq_len tokens (text) or held-out examples (chat) evaluated every
    train.eval_every steps."""


@dataclass
class RemoteTeacherConfig:
    address: str | None = None
    """The served teacher: its URL (http://HOST:PORT), or the address file its server job writes
    (python -m pipeline.teacher_server / slurm/teacher_server.sbatch), which also names the API key's file."""
    api_key_file: str | None = None
    """A file (user-only permissions) holding the server's API key. None: the address file's key file, else the
    environment's TEACHER_API_KEY, else no key. Never on a command line, where ps shows it."""
    model: str | None = None
    """The name the server serves the teacher under (vLLM's --served-model-name); None: model.teacher_path."""
    top_k: int = 20
    """Teacher log-probs per position (at most the server's --max-logprobs); the rest of the vocabulary is one
    bucket, as with loss.offline_teacher."""
    prefetch: int = 2
    """Micro-batches whose scores are requested ahead while the current one computes (0: none)."""
    wait_s: float = 900.0
    """How long a starting run waits for the server to come up before it stops with an error."""
    request_timeout_s: float = 300.0
    """One request's bound (a whole micro-batch's rows)."""
    retries: int = 5
    """Failed requests retried with exponential backoff (1, 2, 4, ... s) before the run checkpoints and stops."""


@dataclass
class TaidConfig:
    t_start: float = 0.4
    """TAID's interpolation t at step 0."""
    t_end: float = 1.0
    """t at the end of training (the linear floor reaches it at the last step)."""
    alpha: float = 5e-4
    """Step size of the adaptive update of t."""
    beta: float = 0.99
    """Momentum of the relative loss decrease."""
    adaptive: bool = True
    """False: t follows the linear ramp only."""
    signal: Literal["ce", "kl"] = "ce"
    """The value that drives t: ce (the official cross-entropy value H(p_t) + KL) or kl."""


@dataclass
class LossConfig:
    method: str = "amid"
    """One of: amid, taid, atkd, fkl, rkl, gjsd, skl, srkl, tvd, alpha_divergence, ab_divergence."""
    options: dict = field(default_factory=dict)
    """The method's options (docs/methods.md), e.g. {alpha: 0.5, lam: 0.1, divergence: ab}."""
    lam_end: float | None = None
    """AMiD only: schedule lam linearly from options.lam to lam_end over training (None: fixed lam)."""
    ce_weight: float = 0.0
    """Weight of an extra next-token cross-entropy on the labels (0 = pure distillation)."""
    chunk_size: int | None = None
    """Tokens per chunk of the fused output-layer + loss (memory is O(chunk x V / shard group)); None: the most
    that keep the chunk's working set (about 8 fp32 copies of [chunk, V / shard group]) within chunk_memory_mb."""
    chunk_memory_mb: float = 256.0
    """Memory budget of one loss chunk when chunk_size is None."""
    matmul_precision: Literal["auto", "highest", "high", "bf16"] = "auto"
    """The loss's output-layer matmuls: highest (fp32), high (TF32 on GPUs; fp32 on CPUs, which have no TF32), bf16
    (bf16 operands, fp32 accumulation and output) or auto: bf16 on GPUs for a bf16 model, high on GPUs for an fp32
    one, highest on CPUs (fp32 matmuls run at about a tenth of the bf16 rate on an H100; the model's own matmuls are
    bf16 already). Softmax, divergences and gradients stay fp32 in all of them; docs/cluster.md lists each setting's
    measured error against float64. A run records the setting auto chose."""
    compile: bool = False
    """torch.compile the per-chunk loss (faster; one compile per run)."""
    offline_teacher: str | None = None
    """A teacher cache written by `python -m pipeline.precompute_teacher` over data.store: train against the
    teacher's stored top-k log-probs plus one bucket for the rest of the vocabulary; no teacher model is loaded."""
    teacher_cache: str | None = None
    """Instruction data: a cache of the teacher's hidden states at the dataset's response positions, written by
    `python -m pipeline.teacher_cache`; steps on dataset responses then skip the teacher's forward (exact: the loss
    is the same). The teacher still loads for generations and evaluations."""
    taid: TaidConfig = field(default_factory=TaidConfig)
    """TAID's t schedule (method: taid)."""
    teacher: Literal["local", "remote"] = "local"
    """local: the teacher runs in the training processes (sharded like the student); remote: a served teacher
    (vLLM, loss.remote) scores every sequence and returns its top-k; no teacher model is loaded."""
    remote: RemoteTeacherConfig = field(default_factory=RemoteTeacherConfig)
    """The served teacher (loss.teacher remote)."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.01
    """AdamW weight decay, on matrices (embeddings and output layers included)."""
    decay_norms_and_biases: bool = False
    """Weight decay on 1-D parameters (norm weights, biases) too; off, as in HF Trainer, TRL and nanoGPT."""
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """cosine, linear or constant decay after warm-up."""
    grad_clip: float = 1.0
    """Max gradient norm (0 = off)."""
    clip_scope: Literal["global", "separate"] = "global"
    """global: one norm over the body and the output layer, as HF Trainer and TRL clip; separate: each clipped to
    grad_clip on its own."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimiser steps."""
    micro_batch_size: int = 4
    """Sequences per rank per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    global_batch_size: int | None = None
    """If set, must equal micro_batch_size x grad_accum x world size (checked at launch)."""
    seed: int = 0
    """Seed of dropout and sampling (offset per rank)."""
    log_every: int = 1
    """Log scalars every N steps."""
    eval_every: int = 0
    """Held-out KL every N steps (and at step 0) when data.eval_files is set; 0 = never."""
    stop_after: int | None = None
    """End this invocation after reaching this step (a checkpoint is written); the schedule still spans `steps`.
    For time-limited allocations: resubmit and the run resumes."""
    activation_checkpointing: bool = False
    """Recompute the student's decoder blocks in backward instead of keeping their activations (about a third more
    student compute; saved activations drop from ~67 H bytes per token and layer, measured for a 1.5B-shaped
    layer, to ~2 H). Same gradients."""


@dataclass
class ParallelConfig:
    backend: Literal["deepspeed", "fsdp2", "none"] = "deepspeed"
    """deepspeed (ZeRO-3), fsdp2 or none (one process, no sharding; a reference run)."""
    ds_student_config: str = "ds_configs/zero3_student.json"
    """DeepSpeed JSON for the student (stage 3; batch sizes, LR and clipping come from this config tree)."""
    ds_teacher_config: str = "ds_configs/zero3_teacher.json"
    """DeepSpeed JSON for the frozen teacher (stage 3 inference: no optimizer)."""
    fsdp_param_dtype: Literal["float32", "bfloat16"] = "float32"
    """FSDP2 mixed precision: dtype of gathered parameters for compute (float32 or bfloat16), student and teacher
    alike; a bfloat16 model computes in bf16 either way (its fp32 master shards are gathered as bf16)."""
    fsdp_reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """FSDP2 mixed precision: dtype of gradient reduction."""
    shard_group_size: int | None = None
    """Ranks per shard group (the 2-D layout replicas x shard): parameters are sharded, and the loss is
    vocab-parallel, inside a group; groups are replicas that only all-reduce gradients. None: the ranks of one node
    (the launcher's LOCAL_WORLD_SIZE / SLURM_NTASKS_PER_NODE), so the loss's token and gradient traffic never
    leaves the node. Must divide the world size. Equal to the world size: one group (shard everything everywhere);
    1: every rank holds full output layers and a chunked loss of its own tokens. DeepSpeed keeps its optimizer
    state sharded over the world and uses the group for ZeRO++ hpZ (the secondary weight partition); FSDP2 runs
    HSDP on a (replicas, shard) device mesh."""
    teacher: Literal["auto", "shard", "shard_group", "replicate"] = "auto"
    """Where the frozen teacher's body lives: shard (over all ranks: smallest memory, every forward gathers across
    nodes), shard_group (sharded inside the shard group, replicated across groups: gathers stay in the node),
    replicate (a full copy per rank: no gather at all) or auto (replicate when the copy takes at most
    teacher_replicate_fraction of a rank's memory, else shard_group; the choice is logged)."""
    teacher_replicate_fraction: float = 0.25
    """auto: the largest share of a rank's device memory (host memory per local rank on CPUs) a full teacher copy
    may take."""


@dataclass
class RolloutConfig:
    student_fraction: float = 0.0
    """chat: share of steps trained on the student's own generations for the step's prompts (on-policy; GKD's
    lambda). The choice per step comes from (seed, step), so every rank makes the same one."""
    teacher_fraction: float = 0.0
    """chat: share of steps trained on the teacher's generations; the rest use the dataset's responses."""
    max_new_tokens: int | None = None
    """Longest generation (default: data.seq_len - data.max_prompt_len)."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens holding this probability (1 = all)."""
    ignore_eos: bool = False
    """Keep generating after an end-of-sequence token, to max_new_tokens (vLLM's option of that name; for
    benchmarks that need a fixed amount of generation per step)."""
    gather: Literal["auto", "once", "per_step"] = "auto"
    """once: gather the full model on every rank for the rollout, then decode with no collective (fast);
    per_step: decode on the sharded model, every rank in lockstep (a parameter all-gather per token; for models
    whose full copy does not fit); auto: once when the full copy fits gather_memory_fraction of the free memory
    on every rank."""
    gather_memory_fraction: float = 0.5
    """auto: the share of free memory a full copy may take."""
    engine: Literal["auto", "hf", "vllm"] = "auto"
    """Who decodes: hf (the loop of pipeline.rollout, shaped by rollout.gather) or vllm (one in-process vLLM engine
    per rank and model, weights pushed after each optimiser step that precedes a rollout; needs the vllm extra);
    auto: vllm on GPUs where vLLM is installed, hf otherwise. The two sample differently (same distribution, other
    random streams), so a run resumes with the engine it started with."""
    vllm_kv_cache_mb: int = 1024
    """vllm: the KV cache of each engine, in MiB (bounded always: unset, vLLM would take most of the memory)."""
    vllm_sleep: bool = True
    """vllm on GPUs: free the engine's KV cache and its weights' GPU memory while the trainer runs (vLLM's sleep mode:
    the teacher's weights wait in host memory, the student's are dropped and pushed again; not available on CPUs,
    where the engine stays as it is)."""
    replay_capacity: int = 0
    """Student generations kept per rank for reuse (DistiLLM's replay buffer; 0 = off)."""
    replay_ratio: float = 0.0
    """Share of on-policy steps that reuse buffered generations instead of generating (once the buffer holds a
    step's worth)."""
    seed: int | None = None
    """Seed of the source choice and of sampling (default: train.seed)."""
    schedule: Literal["fixed", "adaptive"] = "fixed"
    """fixed: the fractions above; adaptive: DistiLLM's adaptive off-policy scheduler (AMiD's official setting): the
    on-policy share starts at adaptive_init and rises by adaptive_step whenever the held-out cross-entropy on dataset
    responses (every adaptive_every steps) has risen by adaptive_eps since the last rise; on-policy steps generate
    while the replay buffer fills, then mostly replay (replay_schedule)."""
    adaptive_every: int = 0
    """adaptive: measure the held-out cross-entropy every this many steps (0: at each train.eval_every evaluation).
    The measurement alone is teacher-forced on data.eval_files' responses, without the evaluation's generated
    answers and the teacher's pass over them: a fraction of an evaluation's cost, so the schedule can follow the loss
    more often than the curves are drawn (DistiLLM measures once per epoch)."""
    adaptive_init: float = 0.0
    """adaptive: the on-policy share at step 0 (DistiLLM: 0, i.e. off-policy until the first rise)."""
    adaptive_step: float = 0.1
    """adaptive: how much the on-policy share rises each time."""
    adaptive_eps: float = 0.1
    """adaptive: the held-out cross-entropy rise that triggers it."""
    replay_schedule: Literal["decreasing", "constant", "increasing"] = "decreasing"
    """adaptive: the share of on-policy steps that generate fresh samples once the buffer is full: decreasing (all
    of them at step 0, none at the end), constant (half) or increasing."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N steps (0: only at the end)."""
    keep_last: int = 2
    """Complete checkpoints to keep."""
    resume: bool = True
    """Resume from the newest checkpoint in the run directory that verifies (checksums, config), if any. Fields that
    change the meaning of the run must match the checkpoint's config (docs/reliability.md)."""
    overwrite: bool = False
    """With resume false: allowed to delete the checkpoints, logs and export a run directory already holds and
    start again. Without it such a launch is refused and nothing on disk is touched."""
    export: bool = True
    """Export the final student as a plain HF checkpoint (safetensors) in run_dir/student: streamed, rank 0 holding at
    most one 2 GiB file of it on the host at a time."""


@dataclass
class SafetyConfig:
    max_consecutive_skips: int = 3
    """A step whose loss or gradient norm is non-finite (decided by all ranks together) is skipped: no update, the
    optimizer state untouched, counted in train/skipped_steps. This many skips in a row stop the run with an error
    and a non-zero exit (0: stop at the first)."""
    collective_timeout_s: float = 300.0
    """Bound of every collective once the models are loaded: a rank that stopped, hung or died becomes an error on
    the others within this many seconds."""
    startup_timeout_s: float = 1800.0
    """Bound of the rendezvous and the collectives while the models load (slow for large checkpoints)."""
    save_timeout_s: float = 1800.0
    """Bound of the collectives around a checkpoint save or the final export (rank 0 may write alone for long)."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write tensorboard scalars to run_dir/tb (rank 0)."""
    progress: bool = True
    """A progress bar on the console (rank 0)."""


@dataclass
class Config:
    run_dir: str = "runs/debug"
    """Where the resolved config, logs, tensorboard events, checkpoints and the exported student go."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------------------------------------------
# building and checking
# --------------------------------------------------------------------------------------------------------------
def _type_ok(value: Any, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return isinstance(value, str) and value in typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (list, dict, str, bool):
        return isinstance(value, tp)
    return isinstance(value, tp)


def _check_value(name: str, value: Any, tp) -> None:
    """The one rule for a field's value: its type (a choice is one of its Literal's values), and a float finite
    (.nan would pass every range check)."""
    if not _type_ok(value, tp):
        if typing.get_origin(tp) is Literal:
            raise ValueError(f"{name} must be one of {', '.join(typing.get_args(tp))}, got {value!r}")
        raise ValueError(f"{name}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")


def check_fields(node, path: str = "") -> None:
    """_check_value on every field of a built config tree (a field set in code skipped _build's check)."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value, tp = getattr(node, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp):
            check_fields(value, f"{path}{f.name}.")
        else:
            _check_value(f"{path}{f.name}", value, tp)


def _build(cls, data: dict, path: str):
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{path}{k}' for k in unknown)}; "
                         f"valid keys in {path.rstrip('.') or 'the top level'}: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{path}{name}.")
            continue
        if tp is float or (typing.get_origin(tp) and float in typing.get_args(tp)):
            value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
            if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string: accept what a user means
                try:
                    value = float(value)
                except ValueError:
                    pass
        _check_value(f"{path}{name}", value, tp)
        kwargs[name] = value
    return cls(**kwargs)


def _parse_override(arg: str) -> tuple[list[str], Any]:
    if not arg.startswith("--") or "=" not in arg:
        raise ValueError(f"override {arg!r}: use --section.key=value")
    key, raw = arg[2:].split("=", 1)
    try:
        return key.split("."), _yaml(raw) if raw != "" else None
    except ValueError as e:
        raise ValueError(f"override {arg!r}: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"override {arg!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); quote "
                         f"strings, write lists as [a, b] and mappings as {{k: v}}") from None


class _Loader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                name = key_node.start_mark.name
                raise ValueError(f"{'' if name.startswith('<') else f'{name}:{line}: '}key {key!r} is given twice "
                                 f"(lines {seen[key]} and {line}): keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _yaml(text_or_file):
    return yaml.load(text_or_file, Loader=_Loader)


def read_yaml(path: str):
    try:
        with open(path) as f:
            return _yaml(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = getattr(e, "problem", None) or str(e)
        raise ValueError(f"{where}: YAML syntax error: {problem} (line {mark.line + 1 if mark else '?'}, column "
                         f"{mark.column + 1 if mark else '?'})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path!r} is not UTF-8 text (byte {e.start})") from None


def load_config(path: str | None, overrides: list[str] = (), data_files: bool = True) -> Config:
    """Read YAML, apply overrides, build the typed tree and validate it (no model, no data is touched beyond
    checking that local files exist; data_files=False skips the data files, for tools that read none)."""
    data: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a mapping at the top level")
    for arg in overrides:
        keys, value = _parse_override(arg)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {arg!r}: {k} is not a section")
        node[keys[-1]] = value
    cfg = _build(Config, data, "")
    expand_paths(cfg)
    validate(cfg, data_files=data_files)
    return cfg


def matmul_precision(requested: str, cuda: bool, dtype: str) -> str:
    """loss.matmul_precision with auto resolved for this device and model dtype."""
    if requested != "auto":
        return requested
    if not cuda:
        return "highest"
    return "bf16" if dtype == "bfloat16" else "high"


def resolve_for_device(cfg: Config, cuda: bool) -> None:
    """Settings whose default depends on the device, fixed once the process knows it (before the run directory
    records the config): a resume on the same kind of device resolves them the same way."""
    cfg.loss.matmul_precision = matmul_precision(cfg.loss.matmul_precision, cuda, cfg.model.dtype)


# every field that holds a path (or a list of paths / glob patterns): `~` and `$VAR` / `${VAR}` are expanded as a
# shell would, so the shipped cluster configs' /scratch/$USER/... mean what they say
PATH_FIELDS = ("run_dir", "model.teacher_path", "model.student_path", "model.tokenizer_path", "data.files",
               "data.store", "data.eval_files", "loss.offline_teacher", "loss.teacher_cache",
               "parallel.ds_student_config", "parallel.ds_teacher_config")
_VAR = re.compile(r"\$(?:(\w+)|\{([^}]*)\})")


def expand_path(value: str, name: str, environ=os.environ) -> str:
    """`~` and `$VAR` / `${VAR}` expanded; a variable that is not set is an error naming the field (a directory
    literally named `$USER` is never what a user meant)."""
    def var(m):
        key = m.group(1) or m.group(2)
        if key not in environ:
            raise ValueError(f"{name}: {value!r} uses ${key}, which is not set in this environment: export it "
                             f"before the launch or write the path out")
        return environ[key]
    return os.path.expanduser(_VAR.sub(var, value))


def expand_paths(cfg: Config, environ=os.environ) -> None:
    """Expand every PATH_FIELDS value of `cfg` in place."""
    for dotted in PATH_FIELDS:
        *sections, leaf = dotted.split(".")
        node = cfg
        for s in sections:
            node = getattr(node, s)
        value = getattr(node, leaf)
        if isinstance(value, str):
            setattr(node, leaf, expand_path(value, dotted, environ))
        elif isinstance(value, list):
            setattr(node, leaf, [expand_path(v, dotted, environ) if isinstance(v, str) else v for v in value])


def _positive(name: str, v, allow_zero=False):
    if v is None or (v < 0 if allow_zero else v <= 0):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")


def resolve_files(patterns: list, field: str = "data.files") -> list[str]:
    out = []
    for p in patterns:
        hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else ([p] if os.path.exists(p) else [])
        if not hits:
            raise ValueError(f"{field}: {p!r} matches no file")
        folders = [h for h in hits if os.path.isdir(h)]
        if folders:
            raise ValueError(f"{field}: {folders[0]!r} is a directory: name its files, or a pattern such as "
                             f"{os.path.join(folders[0], '*.parquet')!r}")
        out.extend(hits)
    return out


def validate(cfg: Config, world_size: int | None = None, data_files: bool = True) -> None:
    """Every check that needs no model: types and choices (check_fields), each section's own ranges and files, then
    the rules between sections (world_size: the batch arithmetic and layout, when known)."""
    check_fields(cfg)
    _check_model(cfg.model)
    _check_data(cfg.data, data_files)
    _check_loss(cfg.loss)
    _check_optim(cfg.optim)
    _check_train(cfg.train, world_size)
    _check_parallel(cfg.parallel, world_size)
    _check_rollout(cfg.rollout)
    _check_checkpoint(cfg.checkpoint)
    _check_safety(cfg.safety)
    _check_across(cfg)


def _check_model(m: ModelConfig) -> None:
    for who in ("teacher", "student"):
        p, c = getattr(m, f"{who}_path"), getattr(m, f"{who}_config")
        if (p is None) == (c is None):
            raise ValueError(f"model.{who}_path / model.{who}_config: give exactly one")
        if p is not None and not os.path.isdir(p):
            raise ValueError(f"model.{who}_path: {p!r} is not a directory (a local HF checkpoint)")
        if c is not None and "model_type" not in c:
            raise ValueError(f"model.{who}_config needs a model_type (e.g. llama)")
    if m.tokenizer_path is not None and not os.path.isdir(m.tokenizer_path):
        raise ValueError(f"model.tokenizer_path: {m.tokenizer_path!r} is not a directory")


def _check_data(d: DataConfig, data_files: bool) -> None:
    if d.files and d.dataset:
        raise ValueError("data.files / data.dataset: give exactly one")
    if not (d.files or d.dataset or d.store):
        raise ValueError("data: give data.files or data.dataset (or data.store, a prepared token store)")
    if d.store is not None:
        if d.streaming:
            raise ValueError("data.store is read by position, not streamed: set data.streaming to false")
    if d.files and data_files:
        resolve_files(d.files)
    if d.eval_files and data_files:
        resolve_files(d.eval_files, "data.eval_files")
    _positive("data.eval_blocks", d.eval_blocks)
    _positive("data.seq_len", d.seq_len)
    if d.seq_len < 2:
        raise ValueError("data.seq_len must be >= 2 (inputs and next-token targets)")
    if d.max_documents is not None:
        _positive("data.max_documents", d.max_documents)
    if d.kind == "chat":
        if d.format == "text":
            raise ValueError("data.kind chat reads json/jsonl or parquet rows; data.format text has no columns")
        if d.streaming:
            raise ValueError("data.kind chat does not stream (examples are held in memory); set data.streaming "
                             "to false")
        _positive("data.max_prompt_len", d.max_prompt_len)
        if d.max_prompt_len >= d.seq_len:
            raise ValueError(f"data.max_prompt_len ({d.max_prompt_len}) must be < data.seq_len ({d.seq_len}): "
                             f"seq_len holds prompt and response")


def _check_loss(lc: LossConfig) -> None:
    try:
        losses.resolve_options(lc.method, lc.options)
    except ValueError as e:
        raise ValueError(f"loss.options: {e}") from None
    if lc.lam_end is not None:
        if lc.method != "amid":
            raise ValueError("loss.lam_end schedules AMiD's lam: only with loss.method = amid")
        if not 0.0 <= lc.lam_end <= 1.0:
            raise ValueError(f"loss.lam_end must be in [0, 1], got {lc.lam_end}")
    _positive("loss.ce_weight", lc.ce_weight, allow_zero=True)
    for name, on in (("loss.offline_teacher", lc.offline_teacher is not None), ("loss.teacher remote",
                                                                                  lc.teacher == "remote")):
        if on and lc.method == "atkd":
            raise ValueError(f"{name}: atkd needs the teacher's full distribution; pick another method")
        if on and (lc.method == "taid" or lc.ce_weight):
            raise ValueError(f"{name} gives the teacher's top-k only: taid and loss.ce_weight are not supported "
                             f"with it")
    if lc.teacher == "remote":
        _check_remote(lc.remote)
    if lc.chunk_size is not None:
        _positive("loss.chunk_size", lc.chunk_size)
    _positive("loss.chunk_memory_mb", lc.chunk_memory_mb)


def _check_remote(rc: RemoteTeacherConfig) -> None:
    if not rc.address:
        raise ValueError("loss.teacher remote: set loss.remote.address (the server's http://HOST:PORT, or the "
                         "address file python -m pipeline.teacher_server writes)")
    if rc.api_key_file is not None and not os.path.isfile(rc.api_key_file):
        raise ValueError(f"loss.remote.api_key_file: {rc.api_key_file!r} does not exist")
    _positive("loss.remote.top_k", rc.top_k)
    _positive("loss.remote.prefetch", rc.prefetch, allow_zero=True)
    _positive("loss.remote.retries", rc.retries, allow_zero=True)
    for name in ("wait_s", "request_timeout_s"):
        _positive(f"loss.remote.{name}", getattr(rc, name))


def _check_optim(o: OptimConfig) -> None:
    _positive("optim.lr", o.lr)
    _positive("optim.min_lr", o.min_lr, allow_zero=True)
    if o.min_lr > o.lr:
        raise ValueError(f"optim.min_lr ({o.min_lr}) must not exceed optim.lr ({o.lr})")
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
        raise ValueError(f"optim.betas must be two numbers in [0, 1), got {o.betas!r}")
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)


def _check_train(tr: TrainConfig, world_size: int | None) -> None:
    _positive("train.steps", tr.steps)
    _positive("train.micro_batch_size", tr.micro_batch_size)
    _positive("train.grad_accum", tr.grad_accum)
    _positive("train.log_every", tr.log_every)
    _positive("train.eval_every", tr.eval_every, allow_zero=True)
    if tr.stop_after is not None and not 0 < tr.stop_after <= tr.steps:
        raise ValueError(f"train.stop_after must be in [1, train.steps], got {tr.stop_after}")
    if tr.global_batch_size is not None:
        per_rank = tr.micro_batch_size * tr.grad_accum
        if tr.global_batch_size % per_rank:
            raise ValueError(f"train.global_batch_size ({tr.global_batch_size}) is not a multiple of "
                             f"micro_batch_size x grad_accum ({per_rank})")
        if world_size is not None and tr.global_batch_size != per_rank * world_size:
            raise ValueError(f"train.global_batch_size ({tr.global_batch_size}) != micro_batch_size x grad_accum x "
                             f"world size ({tr.micro_batch_size} x {tr.grad_accum} x {world_size})")


def _check_parallel(p: ParallelConfig, world_size: int | None) -> None:
    if p.backend == "deepspeed":
        for name in ("ds_student_config", "ds_teacher_config"):
            read_deepspeed_json(getattr(p, name), f"parallel.{name}")
    if world_size is not None and world_size > 1 and p.backend == "none":
        raise ValueError("parallel.backend none runs one process; use deepspeed or fsdp2 for several")
    if p.shard_group_size is not None:
        _positive("parallel.shard_group_size", p.shard_group_size)
        if world_size is not None and world_size % p.shard_group_size:
            raise ValueError(f"parallel.shard_group_size ({p.shard_group_size}) must divide the world size "
                             f"({world_size}): use a divisor such as the ranks per node")
    if not 0.0 < p.teacher_replicate_fraction <= 1.0:
        raise ValueError(f"parallel.teacher_replicate_fraction must be in (0, 1], got {p.teacher_replicate_fraction}")


def _check_rollout(r: RolloutConfig) -> None:
    for name in ("student_fraction", "teacher_fraction", "replay_ratio"):
        v = getattr(r, name)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"rollout.{name} must be in [0, 1], got {v}")
    if r.student_fraction + r.teacher_fraction > 1.0 + 1e-9:
        raise ValueError(f"rollout.student_fraction + teacher_fraction must be <= 1, got "
                         f"{r.student_fraction} + {r.teacher_fraction}")
    if r.max_new_tokens is not None:
        _positive("rollout.max_new_tokens", r.max_new_tokens)
    _positive("rollout.temperature", r.temperature, allow_zero=True)
    if not 0.0 < r.top_p <= 1.0:
        raise ValueError(f"rollout.top_p must be in (0, 1], got {r.top_p}")
    if not 0.0 < r.gather_memory_fraction <= 1.0:
        raise ValueError(f"rollout.gather_memory_fraction must be in (0, 1], got {r.gather_memory_fraction}")
    _positive("rollout.vllm_kv_cache_mb", r.vllm_kv_cache_mb)
    _positive("rollout.replay_capacity", r.replay_capacity, allow_zero=True)
    if r.adaptive_every and r.schedule != "adaptive":
        raise ValueError("rollout.adaptive_every paces rollout.schedule adaptive's measurements: set the schedule to "
                         "adaptive or leave adaptive_every at 0")
    if r.schedule == "adaptive":
        if r.student_fraction or r.teacher_fraction or r.replay_ratio:
            raise ValueError("rollout.schedule adaptive sets the on-policy and replay shares itself: leave "
                             "rollout.student_fraction, teacher_fraction and replay_ratio at 0")
        _positive("rollout.adaptive_every", r.adaptive_every, allow_zero=True)
        for name in ("adaptive_init", "adaptive_step"):
            if not 0.0 <= getattr(r, name) <= 1.0:
                raise ValueError(f"rollout.{name} must be in [0, 1], got {getattr(r, name)}")
        _positive("rollout.adaptive_eps", r.adaptive_eps, allow_zero=True)
    if r.replay_ratio > 0 and r.student_fraction == 0:
        raise ValueError("rollout.replay_ratio reuses student generations: set rollout.student_fraction > 0")


def _check_checkpoint(c: CheckpointConfig) -> None:
    _positive("checkpoint.every", c.every, allow_zero=True)
    _positive("checkpoint.keep_last", c.keep_last)
    if c.overwrite and c.resume:
        raise ValueError("checkpoint.overwrite deletes what the run directory holds: it needs checkpoint.resume "
                         "false (resume true continues the run instead)")


def _check_safety(s: SafetyConfig) -> None:
    _positive("safety.max_consecutive_skips", s.max_consecutive_skips, allow_zero=True)
    for name in ("collective_timeout_s", "startup_timeout_s", "save_timeout_s"):
        _positive(f"safety.{name}", getattr(s, name))


def _check_across(cfg: Config) -> None:
    """The rules between sections."""
    d, lc, tr, r = cfg.data, cfg.loss, cfg.train, cfg.rollout
    if lc.teacher_cache is not None and (d.kind != "chat" or d.store or lc.offline_teacher):
        raise ValueError("loss.teacher_cache is for instruction data read from data.files (data.kind chat, no "
                         "data.store) with a live teacher (no loss.offline_teacher)")
    if lc.teacher == "remote":
        if lc.offline_teacher or lc.teacher_cache:
            raise ValueError("loss.teacher remote scores with the served teacher: unset loss.offline_teacher and "
                             "loss.teacher_cache")
        if not cfg.model.teacher_path:
            raise ValueError("loss.teacher remote: set model.teacher_path to the checkpoint the server serves (its "
                             "name and tokenizer are checked against the server's)")
        if d.eval_files and (tr.eval_every or r.adaptive_every):
            raise ValueError("loss.teacher remote loads no teacher, so there is no held-out KL to compute here: "
                             "unset data.eval_files (or train.eval_every and rollout.adaptive_every)")
        if d.kind == "text" and d.streaming:
            raise ValueError("loss.teacher remote scores packed rows read by position: set data.streaming to false")
        if d.kind == "chat" and r.teacher_fraction:
            raise ValueError("loss.teacher remote: the served teacher scores, it does not generate here: set "
                             "rollout.teacher_fraction to 0")
    if lc.offline_teacher is not None:
        if not d.store:
            raise ValueError("loss.offline_teacher is computed over a token store: set data.store")
        if d.eval_files and tr.eval_every:
            raise ValueError("loss.offline_teacher loads no teacher, so there is no held-out KL to compute: unset "
                             "data.eval_files or train.eval_every")
    t = lc.taid
    try:
        losses.TaidSchedule(total_steps=max(tr.steps, 1), t_start=t.t_start, t_end=t.t_end, alpha=t.alpha,
                            beta=t.beta, adaptive=t.adaptive)
    except ValueError as e:
        raise ValueError(f"loss.taid: {e}") from None
    if (r.student_fraction or r.teacher_fraction) and d.kind != "chat":
        raise ValueError("rollout.student_fraction / teacher_fraction need prompts: set data.kind to chat")
    if r.max_new_tokens is not None and d.kind == "chat" and d.max_prompt_len + r.max_new_tokens > d.seq_len:
        raise ValueError(f"data.max_prompt_len + rollout.max_new_tokens ({d.max_prompt_len} + "
                         f"{r.max_new_tokens}) exceeds data.seq_len ({d.seq_len}); raise seq_len or lower one")
    step = tr.micro_batch_size * tr.grad_accum  # one step's generations per rank
    if r.schedule == "adaptive":
        if d.kind != "chat":
            raise ValueError("rollout.schedule adaptive schedules student generations: set data.kind to chat")
        if not (d.eval_files and (tr.eval_every or r.adaptive_every)):
            raise ValueError("rollout.schedule adaptive follows the held-out cross-entropy: set data.eval_files and "
                             "train.eval_every (or rollout.adaptive_every)")
        if r.replay_capacity < step:
            raise ValueError(f"rollout.schedule adaptive needs rollout.replay_capacity >= one step's generations per "
                             f"rank ({step}), got {r.replay_capacity}")
    if r.replay_ratio > 0 and r.replay_capacity < step:
        raise ValueError(f"rollout.replay_ratio > 0 needs rollout.replay_capacity >= one step's generations "
                         f"per rank ({step} = train.micro_batch_size x grad_accum), got {r.replay_capacity}")


# fields of the DeepSpeed JSON that this config tree owns (one source of truth)
DS_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
            "optimizer", "scheduler")


def read_deepspeed_json(path: str, field_name: str = "parallel.ds_*_config") -> dict:
    """The DeepSpeed JSON, checked: it parses, is ZeRO stage 3, and leaves the fields this config owns alone."""
    if not os.path.isfile(path):
        raise ValueError(f"{field_name}: {path!r} does not exist")
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{field_name}: {path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(ds, dict):
        raise ValueError(f"{field_name}: {path} must hold a JSON object")
    clash = [k for k in DS_OWNED if k in ds and ds[k] != "auto"]
    if clash:
        raise ValueError(f"{field_name}: {path} sets {clash}: these come from the pipeline config (train.*, "
                         f"optim.*); remove them or set them to \"auto\"")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage != 3:
        raise ValueError(f"{field_name}: {path}: zero_optimization.stage must be 3, got {stage!r}")
    return ds


# --------------------------------------------------------------------------------------------------------------
# what a resumed run may change
# --------------------------------------------------------------------------------------------------------------
# Fields that do not change what the run computes, or that practitioners re-tune mid-run: a resume may change them,
# and the change is recorded in run_dir/history.jsonl. That is logging and evaluation cadence, checkpointing, the
# stop point, the learning-rate schedule and clipping (lowering the lr after a divergence, extending train.steps) and
# pure performance knobs. Every other field changes the meaning of the run (method and options, models, tokenizer,
# data, seq_len, batch arithmetic, seeds, backend, AdamW betas and weight decay) and must match the checkpoint.
# A prefix ending in "." covers a whole section.
SAFE_TO_CHANGE = (
    "run_dir", "logging.", "safety.", "checkpoint.", "train.log_every", "train.eval_every", "train.stop_after",
    "train.steps", "optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.schedule", "optim.grad_clip",
    "optim.clip_scope", "data.eval_files", "data.eval_blocks", "loss.chunk_size", "loss.chunk_memory_mb", "loss.compile",
    "parallel.teacher", "parallel.teacher_replicate_fraction", "train.activation_checkpointing", "rollout.gather",
    "rollout.gather_memory_fraction", "rollout.vllm_kv_cache_mb", "rollout.vllm_sleep", "loss.teacher_cache",
)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; option mappings (loss.options, model.*_config) are leaves' parents too, so a
    change inside them names the exact key."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def is_safe_to_change(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_TO_CHANGE)


def config_changes(saved: dict, current: dict) -> tuple[dict, dict]:
    """(unsafe, safe) differences between a checkpoint's resolved config and this launch's, as {field: (saved,
    now)}; fields missing on one side count as changed, except a field newer than the checkpoint left at its
    default (a new field's default keeps the former behaviour, so upgrading the pipeline mid-run resumes)."""
    a, b = flatten(saved), flatten(current)
    defaults = flatten(to_dict(Config()))
    diff = {k: (a.get(k, "<unset>"), b.get(k, "<unset>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not (k not in a and k in defaults and b.get(k) == defaults[k])}
    unsafe = {k: v for k, v in diff.items() if not is_safe_to_change(k)}
    return unsafe, {k: v for k, v in diff.items() if k not in unsafe}


def fingerprint(cfg_dict: dict, world_size: int) -> str:
    """sha256 over the fields that define the run (not the safe-to-change ones) and the world size."""
    meaning = {k: v for k, v in flatten(cfg_dict).items() if not is_safe_to_change(k)}
    meaning["world_size"] = world_size
    return hashlib.sha256(json.dumps(meaning, sort_keys=True, default=str).encode()).hexdigest()


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: Config, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
