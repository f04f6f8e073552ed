"""On-policy generation for distillation: the student (or the teacher) writes responses to the step's prompts.

Two ways to decode a sharded model, chosen per rollout by `rollout.gather`:
- once: gather the full body (full_state_dict) and the full output layer once, build a plain local replica, and
  decode with the KV cache and no collective at all, so ranks finish whenever their own sequences end. One
  all-gather of the weights per rollout instead of one per generated token (TRL #3858: ~10 h for step 0 without it).
- per_step: decode on the sharded model (ZeRO-3 / FSDP2 gather each layer per token) with the vocab-parallel
  output layer. Every token is then a collective, so every rank keeps decoding (dummy steps once its own rows are
  done) until all ranks are done: the stop is agreed with one all-reduce per token (DeepSpeed #8262 deadlocked
  when ranks hit EOS at different steps).
auto picks once when the full copy fits `gather_memory_fraction` of the free memory on every rank (agreed by a
MIN all-reduce, so no rank goes its own way).

Which data a step trains on (dataset responses, student or teacher generations, the replay buffer) comes from
(seed, step) alone: identical on every rank by construction, never a per-rank coin.

Shapes: B sequences, P prompt length (left-padded), L generated length, H hidden, V vocab, Vp local vocab shard.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import AutoModelForCausalLM

from pipeline.loss.vocab_parallel import shard_range
from pipeline.models.build import embedding_name, head_name
from pipeline.parallel.backends import full_numel, full_state_dict
from pipeline.parallel.distributed import any_rank

SOURCES = ("dataset", "student", "teacher", "replay")


# --------------------------------------------------------------------------------------------------------------
# sampling and the decode loop (pure, single rank)
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How a rollout decodes: at most max_new tokens, stopping at eos_id (None: never), temperature (0 = greedy),
    top_p, and the seed each prompt's randomness derives from (reproducible whatever else the engine ran)."""
    max_new: int
    eos_id: int | None
    temperature: float
    top_p: float
    seed: int


class Generator(Protocol):
    """What a rollout engine offers the loop, the HF decode loop and vLLM alike: `who`'s completions (token ids, EOS
    included when reached, nothing after it) for this rank's prompts, and stats. Collective: every rank calls it
    for the same rollout. version: the optimiser step the model's weights come from (an engine that holds its own
    copy of them refreshes it when this changes)."""

    def generate(self, prompts: list, sampling: Sampling, version: int) -> tuple[list, dict]: ...


class HFGenerator:
    """The HF decode loop (generate below) behind the Generator interface: it reads the trainer's (sharded) weights
    at every rollout, so `version` needs no push."""

    def __init__(self, models, who: str, rc, pad_id: int, group):
        self.models, self.who, self.rc, self.pad_id, self.group = models, who, rc, pad_id, group

    def generate(self, prompts: list, sampling: Sampling, version: int) -> tuple[list, dict]:
        rc = dataclasses.replace(self.rc, top_p=sampling.top_p)
        return generate(self.models, self.who, prompts, rc=rc, max_new=sampling.max_new, eos_id=sampling.eos_id,
                        pad_id=self.pad_id, seed=sampling.seed, group=self.group, temperature=sampling.temperature)


def sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """[B, V] logits -> [B] token ids. temperature 0 is greedy; top_p < 1 samples from the smallest set of tokens
    whose probability reaches top_p (the most likely token is always kept)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p     # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: list, pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths -> ids [B, P] and mask [B, P], padded on the left so every row's next token
    is at the same column."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids, mask


@torch.no_grad()
def decode(forward_last, ids: Tensor, mask: Tensor, *, max_new: int, eos_id: int | None, pad_id: int,
           temperature: float, top_p: float, generator=None, group=None) -> tuple[Tensor, Tensor]:
    """Autoregressive decoding with a KV cache. forward_last(ids, mask, positions, cache) -> (logits [B, V] of the
    last position, cache). Returns tokens [B, L] (pad after a row's EOS) and lengths [B] (up to and including EOS).

    group=None: stop when this rank's rows are done (no collective inside forward_last). A group: forward_last
    runs collectives, so keep stepping until every rank's rows are done (agreed each token) or max_new."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = forward_last(ids, mask, positions, None)
    B, device = ids.shape[0], ids.device
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), max_new, dtype=torch.long, device=device)
    out = []
    for i in range(max_new):
        nxt = sample_next(logits, temperature, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        if eos_id is not None:
            ended = ~done & (nxt == eos_id)
            lengths[ended] = i + 1
            done |= ended
        if i + 1 == max_new or not any_rank(not bool(done.all()), group):
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        logits, cache = forward_last(nxt[:, None], mask, positions, cache)
    tokens = torch.stack(out, dim=1)
    return tokens, lengths.clamp(max=tokens.shape[1])


# --------------------------------------------------------------------------------------------------------------
# the two ways to run a sharded model's forward for decoding
# --------------------------------------------------------------------------------------------------------------
def local_replica(body, head_weight: Tensor):
    """A plain (unsharded) copy of `body` with the full output layer, for decoding with no collective. Parameters
    are built on the meta device and then take the gathered tensors (no random init, no second copy)."""
    from accelerate import init_empty_weights  # deferred: only the meta-device replica needs it
    state = full_state_dict(body)
    with init_empty_weights(include_buffers=False):
        replica = AutoModelForCausalLM.from_config(body.config)
    head = torch.nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False, device="meta")
    replica.set_output_embeddings(head)
    dtype = next(iter(state.values())).dtype
    state[head_name(replica)] = head_weight.to(dtype)
    if embedding_name(replica) not in state:  # a tied student (parallelize.TiedEmbedding): the embedding is the head
        state[embedding_name(replica)] = state[head_name(replica)]
    missing, unexpected = replica.load_state_dict(state, strict=False, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    # buffers (rotary inv_freq) were built on the host by from_config; the parameters are already on the device
    return replica.to(head_weight.device).eval()


def replica_forward(replica):
    def forward_last(ids, mask, positions, cache):
        out = replica(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), out.past_key_values
    return forward_last


def vocab_parallel_logits(h: Tensor, w_shard: Tensor, vocab_size: int, group) -> Tensor:
    """This rank's rows h [B, H] (B equal on every rank) -> their full-vocabulary logits [B, V], from every rank's
    rows of the output layer: all-gather the B hidden states, one local [world B, Vp] matmul, and an all-to-all
    that hands each rank the columns of its own rows. Only the last position of each sequence is ever full-vocab."""
    world = dist.get_world_size(group)
    B = h.shape[0]
    per = -(-vocab_size // world)
    parts = [torch.empty_like(h) for _ in range(world)]
    dist.all_gather(parts, h.contiguous(), group=group)
    hs = torch.cat(parts)
    local = torch.full((world * B, per), float("-inf"), device=h.device)
    local[:, : w_shard.shape[0]] = hs.float() @ w_shard.float().t()
    received = torch.empty_like(local)
    dist.all_to_all_single(received, local, group=group)  # block s: my rows x rank s's columns
    cols = torch.cat([torch.arange(s * per, s * per + (e - b), device=h.device)
                      for s, (b, e) in enumerate(shard_range(vocab_size, r, world) for r in range(world))])
    return received.view(world, B, per).transpose(0, 1).reshape(B, world * per)[:, cols]


def sharded_forward(body, w_shard: Tensor, vocab_size: int, group):
    def forward_last(ids, mask, positions, cache):
        out = body(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1)
        h = out.logits[:, -1]  # the body's output layer is an Identity: these are hidden states [B, H]
        return vocab_parallel_logits(h, w_shard, vocab_size, group), out.past_key_values
    return forward_last


def _free_bytes() -> float:
    if torch.cuda.is_available():
        return float(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return 0.0


def choose_gather(mode: str, body, vocab_size: int, fraction: float, group) -> str:
    """once / per_step; auto asks whether a full copy fits on every rank (one MIN all-reduce: all agree)."""
    if mode != "auto":
        return mode
    elem = next(body.parameters()).element_size()
    hidden = body.config.get_text_config().hidden_size
    need = (full_numel(body) + vocab_size * hidden) * elem
    free = torch.tensor([_free_bytes()], dtype=torch.float64, device=next(body.parameters()).device)
    if group is not None:
        dist.all_reduce(free, op=dist.ReduceOp.MIN, group=group)
    return "once" if need <= fraction * float(free) else "per_step"


def generating(cfg) -> set[str]:
    """The models that generate in a run of `cfg`: the student (on-policy steps, the adaptive schedule, answers to
    the held-out prompts) and the teacher (teacher_fraction)."""
    r = cfg.rollout
    heldout = bool(cfg.data.eval_files and (cfg.train.eval_every or r.adaptive_every))
    return ({"student"} if r.student_fraction > 0 or r.schedule == "adaptive" or heldout else set()) | (
        {"teacher"} if r.teacher_fraction > 0 else set())


def body_and_head(models, who: str):
    """`who`'s ('student' / 'teacher') model body and this rank's shard of its output layer."""
    if who == "student":
        return models.student, models.heads.student
    return models.teacher, models.heads.teacher


def generate(models, who: str, prompts: list, *, rc, max_new: int, eos_id: int, pad_id: int, seed: int,
             group, temperature: float | None = None) -> tuple[list, dict]:
    """The completions (lists of token ids, EOS included when reached) of `who` ('student' or 'teacher') for this
    rank's prompts, and timing stats. Collective: every rank of the group calls it for the same rollout, with its
    own prompts (per_step mode pads to the same number of rows everywhere)."""
    body, shard = body_and_head(models, who)
    heads = models.heads
    temperature = rc.temperature if temperature is None else temperature
    t0 = time.perf_counter()
    mode = choose_gather(rc.gather, body, heads.vocab_size, rc.gather_memory_fraction, group) \
        if group is not None else "once"
    device = next(body.parameters()).device
    was_training = body.training
    body.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    n = len(prompts)
    rows = prompts
    if mode == "per_step":
        # every rank runs the same forwards: pad to the largest row count (a rank may have none, at evaluation)
        most = torch.tensor([n], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
        rows = prompts + [[pad_id]] * (int(most) - n)
        # the vocabulary is split inside the shard group; the lockstep (and the body's gathers) span `group`
        forward_last = sharded_forward(body, shard.detach(), heads.vocab_size, heads.group)
    else:
        forward_last = replica_forward(local_replica(body, heads.full_weight(shard)))
    t_gather = time.perf_counter() - t0
    ids, mask = (t.to(device) for t in left_pad(rows, pad_id)) if rows else (None, None)
    tokens, lengths = (decode(forward_last, ids, mask, max_new=max_new, eos_id=eos_id, pad_id=pad_id,
                              temperature=temperature, top_p=rc.top_p, generator=generator,
                              group=group if mode == "per_step" else None)
                       if rows else (torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
    if mode == "per_step" and hasattr(body, "reshard"):
        body.reshard()  # FSDP2 keeps the root's parameters gathered after a forward without backward
    body.train(was_training)
    out = [tokens[i, : lengths[i]].tolist() for i in range(n)]
    elapsed = time.perf_counter() - t0
    return out, {"mode": mode, "seconds": elapsed, "gather_seconds": t_gather, "decode_steps": tokens.shape[1],
                 "lengths": lengths[:n].tolist(), "tokens": int(lengths[:n].sum()) if n else 0}


# --------------------------------------------------------------------------------------------------------------
# what a step trains on
# --------------------------------------------------------------------------------------------------------------
def step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + salt) % (2 ** 62)


def _shared_uniforms(seed: int, step: int) -> list[float]:
    return torch.rand(2, generator=torch.Generator().manual_seed(step_seed(seed, step))).tolist()


def choose_source(seed: int, step: int, student_fraction: float, teacher_fraction: float, replay_ratio: float,
                  replay_ready: bool) -> str:
    """dataset / student / teacher / replay for this step, from (seed, step) only: the same on every rank.
    `replay_ready` (the buffer holds a step's worth) is the same on every rank too, since every rank pushes the
    same number of generations."""
    u, v = _shared_uniforms(seed, step)
    if u < student_fraction:
        return "replay" if replay_ready and v < replay_ratio else "student"
    if u < student_fraction + teacher_fraction:
        return "teacher"
    return "dataset"


class AdaptiveSchedule:
    """DistiLLM's adaptive off-policy scheduler (AMiD's official runs use it). A threshold (the on-policy share)
    rises by `step_size` whenever the held-out loss has risen by `eps` over the reference (the loss at the last
    rise, or before training); each step draws u from (seed, step): u < fresh share (or u < threshold while the
    buffer is not full) generates, u < threshold replays, otherwise the dataset's responses. Its state is the same
    on every rank (the held-out loss is global) and goes into checkpoints."""

    def __init__(self, init: float, step_size: float, eps: float, replay_schedule: str):
        self.threshold, self.step_size, self.eps, self.replay_schedule = init, step_size, eps, replay_schedule
        self.reference: float | None = None

    def fresh_share(self, step: int, total: int) -> float:
        progress = step / max(total, 1)
        factor = {"decreasing": 1.0 - progress, "constant": 0.5, "increasing": progress}[self.replay_schedule]
        return self.threshold * factor

    def choose(self, seed: int, step: int, total: int, buffer_full: bool) -> str:
        u, _ = _shared_uniforms(seed, step)
        if u < self.fresh_share(step, total) or (u < self.threshold and not buffer_full):
            return "student"
        return "replay" if u < self.threshold else "dataset"

    def update(self, heldout_loss: float) -> None:
        if self.reference is None:
            self.reference = heldout_loss
        elif heldout_loss >= self.reference + self.eps:
            self.threshold = min(1.0, self.threshold + self.step_size)
            self.reference = heldout_loss

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "reference": self.reference}

    def load_state_dict(self, state: dict) -> None:
        self.threshold, self.reference = state["threshold"], state["reference"]


class ReplayBuffer:
    """This rank's most recent student generations (prompt, completion), reused for later steps (DistiLLM's
    replay buffer: fewer generations for the same number of on-policy-like steps)."""

    def __init__(self, capacity: int):
        self.capacity, self.items = capacity, []

    def __len__(self) -> int:
        return len(self.items)

    def push(self, pairs: list) -> None:
        self.items.extend(pairs)
        del self.items[: max(len(self.items) - self.capacity, 0)]

    def sample(self, n: int, generator: torch.Generator) -> list:
        """n distinct items, uniformly."""
        idx = torch.randperm(len(self.items), generator=generator)[:n].tolist()
        return [self.items[i] for i in idx]

    def state_dict(self) -> dict:
        return {"items": list(self.items)}

    def load_state_dict(self, state: dict) -> None:
        self.items = list(state["items"])
