"""Rollouts and instruction data: sampling against a float64 reference, decoding against HF generate, response-only
loss masks, chat templates, the shared-seed source choice, the replay buffer; in real 2- and 3-process gloo groups,
the vocab-parallel decoding logits and generation under ZeRO-3 and FSDP2 (gather-once and lockstep per-step) with
ranks that stop at different steps, equal to one-process decoding."""
from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
import torch.distributed as dist

from pipeline import config as C
from pipeline.data import batches as data
from pipeline.rollout import hf as rollout
from tests.dist_utils import run_workers

ONPOLICY = "pipeline/configs/debug_onpolicy.yaml"
TINY = dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
EOS = 0  # the tiny tokenizer's <|endoftext|>


def eos_prone_student(scale: float, seed: int = 0, conf: dict = TINY):
    """A random tiny Llama whose EOS logit follows a direction shared by 64 token embeddings: since the residual
    stream carries the current token's embedding, EOS becomes likely after those tokens, so sequences end at
    varied lengths (a random model alone almost never emits EOS)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **conf))
    emb = model.get_input_embeddings().weight.detach()
    chosen = torch.randperm(conf["vocab_size"], generator=torch.Generator().manual_seed(1))[:64]
    direction = emb[chosen].sum(0)
    with torch.no_grad():
        model.get_output_embeddings().weight[EOS] = scale * direction / direction.norm()
    return model


# --------------------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------------------
def _nucleus64(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """float64 reference: the renormalised nucleus distribution, token by token."""
    p = torch.softmax(logits.double() / temperature, -1)
    out = torch.zeros_like(p)
    for b in range(p.shape[0]):
        mass = 0.0
        for v in torch.argsort(p[b], descending=True).tolist():
            if mass >= top_p:
                break
            out[b, v] = p[b, v]
            mass += float(p[b, v])
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (1.0, 1e-6)])
def test_sampling_frequencies_match_the_float64_nucleus(temperature, top_p):
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(3, 12, generator=g)
    want = _nucleus64(logits, temperature, top_p)
    n = 20_000
    # n independent draws per row in one call: row r of the repeated batch is row r % 3 of the logits
    draws = rollout.sample_next(logits.repeat(n, 1), temperature, top_p, g).view(n, 3)
    for b in range(3):
        freq = torch.bincount(draws[:, b], minlength=12).double() / n
        assert set(torch.nonzero(freq).flatten().tolist()) <= set(torch.nonzero(want[b]).flatten().tolist())
        assert torch.allclose(freq, want[b], atol=0.015), (b, freq, want[b])


def test_greedy_is_argmax_and_ignores_top_p():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    assert torch.equal(rollout.sample_next(logits, 0.0, 0.3, None), logits.argmax(-1))
    # a nucleus smaller than the top token keeps the top token: sampling is then argmax too
    assert torch.equal(rollout.sample_next(logits, 1.0, 1e-9, torch.Generator().manual_seed(0)), logits.argmax(-1))


# --------------------------------------------------------------------------------------------------------------
# decoding (one process)
# --------------------------------------------------------------------------------------------------------------
def test_greedy_decoding_equals_hf_generate_with_left_padding():
    from pipeline.models import build as M
    model = eos_prone_student(scale=0.0).eval()  # EOS never wins: full-length rows
    reference = copy.deepcopy(model)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    ids, mask = rollout.left_pad(prompts, pad_id=1)
    want = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                              pad_token_id=1, eos_token_id=None)[:, ids.shape[1]:]
    replica = rollout.local_replica(model, M.detach_head(model))
    tokens, lengths = rollout.decode(rollout.replica_forward(replica), ids, mask, max_new=16, eos_id=None, pad_id=1,
                                     temperature=0.0, top_p=1.0)
    assert torch.equal(tokens, want)
    assert lengths.tolist() == [16, 16, 16]


def test_rows_end_at_their_first_eos_and_pad_after():
    from pipeline.models import build as M
    model = eos_prone_student(scale=6.0).eval()
    replica = rollout.local_replica(model, M.detach_head(model))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 512, (6,), generator=g).tolist() for _ in range(16)]
    tokens, lengths = rollout.decode(rollout.replica_forward(replica), *rollout.left_pad(prompts, 1), max_new=24,
                                     eos_id=EOS, pad_id=1, temperature=1.0, top_p=1.0, generator=g)
    assert len(set(lengths.tolist())) > 3, lengths  # the test model gives varied lengths
    for row, n in zip(tokens.tolist(), lengths.tolist()):
        assert EOS not in row[: n - 1]
        if n < 24:
            assert row[n - 1] == EOS
        assert all(t == 1 for t in row[n:])
    assert tokens.shape[1] == max(lengths.tolist())  # no step after every row ended


# --------------------------------------------------------------------------------------------------------------
# instruction data
# --------------------------------------------------------------------------------------------------------------
def test_collate_puts_the_loss_on_response_tokens_only():
    batch = data.collate([[5, 6, 7], [8]], [[20, 21], [30, 31, 32, 0]], pad_id=1)
    assert batch.tokens.tolist() == [[5, 6, 7, 20, 21], [8, 30, 31, 32, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    batch = data.collate([[5, 6, 7], [8]], [[20], [30, 0]], pad_id=1)
    assert batch.tokens.tolist() == [[5, 6, 7, 20], [8, 30, 0, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # targets are tokens[1:]: row 0 predicts 6, 7, 20 (only 20 is response), row 1 predicts 30, 0, pad
    assert batch.loss_mask.tolist() == [[0, 0, 1], [1, 1, 0]]
    targets = batch.tokens[:, 1:][batch.loss_mask.bool()].tolist()
    assert targets == [20, 30, 0]


TEMPLATE = ("{% for m in messages %}<|pad|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|pad|>assistant\n{% endif %}")


def _tokenizer(template=None):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained("pipeline/configs/assets/tiny_tokenizer")
    tok.chat_template = template
    return tok


def _data_cfg(**kw):
    return C.DataConfig(kind="chat", files=["x.jsonl"], seq_len=kw.pop("seq_len", 64),
                        max_prompt_len=kw.pop("max_prompt_len", 24), **kw)


def test_chat_template_splits_prompt_and_response():
    tok = _tokenizer(TEMPLATE)
    row = {"messages": [{"role": "user", "content": "What is JSON?"}, {"role": "assistant", "content": "A format."}]}
    prompt, response = data.tokenize_example(row, tok, _data_cfg(), "messages")
    full = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
    assert prompt + response == list(full)
    assert tok.decode(response) == "A format.<|endoftext|>\n"
    assert tok.decode(prompt).endswith("<|pad|>assistant\n")
    # a prompt/response row goes through the same template as a one-turn conversation
    pair = data.tokenize_example({"prompt": "What is JSON?", "response": "A format."}, tok, _data_cfg(), "pairs")
    assert pair == (prompt, response)


def test_without_a_template_the_response_ends_with_eos_and_lengths_are_capped():
    tok = _tokenizer()
    row = {"prompt": "one two three four five six seven", "response": "eight nine ten " * 20}
    prompt, response = data.tokenize_example(row, tok, _data_cfg(seq_len=32, max_prompt_len=4), "pairs")
    assert prompt == tok(row["prompt"], add_special_tokens=False)["input_ids"][-4:]  # the prompt's end is kept
    assert len(prompt) + len(response) == 32
    short = data.tokenize_example({"prompt": "a", "response": "b"}, tok, _data_cfg(), "pairs")[1]
    assert short[-1] == tok.eos_token_id


def test_bad_chat_rows_are_refused_with_what_to_fix(tmp_path):
    tok = _tokenizer(TEMPLATE)
    with pytest.raises(ValueError, match="assistant turn"):
        data.tokenize_example({"messages": [{"role": "user", "content": "hi"}]}, tok, _data_cfg(), "messages")
    f = tmp_path / "rows.jsonl"
    f.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ValueError, match="prompt_field"):
        data.load_examples(_data_cfg(), tok, files=[str(f)])


def test_instruction_batches_partition_like_one_rank_and_resume():
    examples = [([i], [i + 1000]) for i in range(40)]
    one = data.PackedBatches(examples, 6, 0, 1, seed=3)
    two = [data.PackedBatches(examples, 3, r, 2, seed=3) for r in range(2)]
    for _ in range(9):  # over two epochs
        assert one.next() == two[0].next() + two[1].next()
    state = two[1].state_dict()
    again = data.PackedBatches(examples, 3, 1, 2, seed=3)
    again.load_state_dict(state)
    assert again.next() == two[1].next()


# --------------------------------------------------------------------------------------------------------------
# the step's source and the replay buffer
# --------------------------------------------------------------------------------------------------------------
def test_source_choice_depends_on_seed_and_step_only_and_follows_the_fractions():
    picks = [rollout.choose_source(7, s, 0.5, 0.2, 0.0, False) for s in range(4000)]
    assert picks == [rollout.choose_source(7, s, 0.5, 0.2, 0.0, False) for s in range(4000)]
    share = {k: picks.count(k) / len(picks) for k in ("student", "teacher", "dataset")}
    assert share["student"] == pytest.approx(0.5, abs=0.03) and share["teacher"] == pytest.approx(0.2, abs=0.03)
    assert picks != [rollout.choose_source(8, s, 0.5, 0.2, 0.0, False) for s in range(4000)]
    replay = [rollout.choose_source(7, s, 0.5, 0.2, 0.5, True) for s in range(4000)]
    # replay replaces about half of the student steps, and only those
    assert {p for p, q in zip(picks, replay) if p != q} == {"student"}
    assert replay.count("replay") / picks.count("student") == pytest.approx(0.5, abs=0.05)
    assert "replay" not in [rollout.choose_source(7, s, 0.5, 0.2, 1.0, False) for s in range(200)]
    assert set(rollout.choose_source(7, s, 0.0, 0.0, 0.0, False) for s in range(200)) == {"dataset"}


def test_adaptive_schedule_rises_only_on_a_heldout_rise_and_splits_steps_as_distillm():
    sched = rollout.AdaptiveSchedule(init=0.0, step_size=0.1, eps=0.1, replay_schedule="decreasing")
    assert {sched.choose(3, s, 100, False) for s in range(100)} == {"dataset"}  # off-policy until the first rise
    for loss, want in [(2.0, 0.0), (1.5, 0.0), (2.05, 0.0), (2.1, 0.1), (2.15, 0.1), (2.2, 0.2), (9.0, 0.3)]:
        sched.update(loss)
        assert sched.threshold == pytest.approx(want), (loss, sched.state_dict())
    assert sched.reference == 9.0  # moves only with a rise
    for _ in range(20):
        sched.update(100.0 + _)
    assert sched.threshold == 1.0
    sched = rollout.AdaptiveSchedule(init=0.6, step_size=0.1, eps=0.1, replay_schedule="decreasing")
    steps = range(4000)
    filling = [sched.choose(5, s, 4000, False) for s in steps]   # the buffer not yet full: every on-policy step generates
    assert set(filling) == {"student", "dataset"}
    assert filling.count("student") / 4000 == pytest.approx(0.6, abs=0.03)
    full = [sched.choose(5, s, 4000, True) for s in steps]       # full: fresh share 0.6 (1 - s / total), rest replay
    assert [a == "dataset" for a in filling] == [b == "dataset" for b in full]
    early, late = full[:1000], full[3000:]
    assert early.count("student") / 1000 == pytest.approx(0.6 * (1 - 0.125), abs=0.05)
    assert late.count("student") / 1000 == pytest.approx(0.6 * (1 - 0.875), abs=0.05)
    assert full == [rollout.AdaptiveSchedule(0.6, 0.1, 0.1, "decreasing").choose(5, s, 4000, True) for s in steps]
    constant = rollout.AdaptiveSchedule(0.6, 0.1, 0.1, "constant")
    assert constant.fresh_share(0, 10) == constant.fresh_share(9, 10) == pytest.approx(0.3)
    other = rollout.AdaptiveSchedule(0.0, 0.1, 0.1, "decreasing")
    other.load_state_dict(sched.state_dict())
    assert other.state_dict() == sched.state_dict()


def test_replay_buffer_keeps_the_newest_and_samples_distinct_items():
    buf = rollout.ReplayBuffer(5)
    buf.push([(i, i) for i in range(3)])
    buf.push([(i, i) for i in range(3, 8)])
    assert buf.items == [(i, i) for i in range(3, 8)]
    got = buf.sample(5, torch.Generator().manual_seed(0))
    assert sorted(got) == buf.items
    other = rollout.ReplayBuffer(5)
    other.load_state_dict(buf.state_dict())
    assert other.sample(3, torch.Generator().manual_seed(1)) == buf.sample(3, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("override,field", [
    (["--rollout.student_fraction=0.7", "--rollout.teacher_fraction=0.5"], "student_fraction \\+ teacher_fraction"),
    (["--data.kind=text", "--data.files=[pipeline/configs/assets/tiny_corpus.txt]"], "data.kind to chat"),
    (["--data.max_prompt_len=64"], "data.max_prompt_len"),
    (["--rollout.max_new_tokens=60"], "rollout.max_new_tokens"),
    (["--rollout.replay_ratio=0.5"], "replay_capacity"),
    (["--rollout.gather=sometimes"], "rollout.gather"),
    (["--rollout.top_p=0"], "rollout.top_p"),
    (["--data.kind=chats"], "data.kind"),
    (["--rollout.schedule=adaptive", "--rollout.replay_capacity=8"], "leave rollout.student_fraction"),
    (["--rollout.schedule=adaptive", "--rollout.student_fraction=0", "--rollout.replay_capacity=8",
      "--train.eval_every=0"], "data.eval_files and train.eval_every"),
    (["--rollout.schedule=adaptive", "--rollout.student_fraction=0"], "replay_capacity >= one step"),
    (["--rollout.adaptive_every=5"], "rollout.adaptive_every paces rollout.schedule adaptive"),
    (["--rollout.schedule=adaptive", "--rollout.student_fraction=0", "--rollout.replay_capacity=8",
      "--rollout.adaptive_every=-1"], "rollout.adaptive_every must be >= 0"),
    (["--rollout.schedule=adaptive", "--rollout.student_fraction=0", "--rollout.replay_capacity=8",
      "--rollout.replay_schedule=sometimes"], "rollout.replay_schedule"),
    (["--rollout.schedule=often"], "rollout.schedule"),
    (["--rollout.engine=fast"], "rollout.engine"),
    (["--rollout.vllm_kv_cache_mb=0"], "rollout.vllm_kv_cache_mb"),
])
def test_rollout_config_errors_name_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        C.load_config(ONPOLICY, override)


# --------------------------------------------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------------------------------------------
def _vp_logits_worker(rank, world, V, H, B):
    from pipeline.loss.vocab_parallel import shard_range
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, H, generator=g)
    h = torch.randn(world, B, H, generator=g)
    start, end = shard_range(V, rank, world)
    got = rollout.vocab_parallel_logits(h[rank], w[start:end], V, dist.group.WORLD)
    want = h[rank].double() @ w.double().t()
    assert got.shape == (B, V)
    assert torch.allclose(got.double(), want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("world,V", [(2, 97), (3, 97), (3, 512)])
def test_vocab_parallel_decoding_logits_equal_the_full_matmul(world, V):
    run_workers(_vp_logits_worker, world, V, 16, 3)


def _generate_worker(rank, world, backend):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    from pipeline.models import build as M
    from pipeline.parallel.distributed import make_layout
    from pipeline.parallel.backends import parallelize
    cfg = C.load_config(ONPOLICY, [f"--parallel.backend={backend}", "--train.micro_batch_size=3",
                                   "--train.grad_accum=1"])
    student = eos_prone_student(scale=40.0)
    teacher = M.build_model(None, cfg.model.teacher_config, "float32", 1).eval().requires_grad_(False)
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    ref_heads = {"student": M.detach_head(ref_student), "teacher": M.detach_head(ref_teacher)}
    models = parallelize(student, teacher, TINY["vocab_size"], cfg, make_layout())
    g = torch.Generator().manual_seed(10 + rank)
    prompts = [torch.randint(2, 512, (int(n),), generator=g).tolist() for n in (4, 7, 5)[: 3 - rank]]
    # rank 0 stops at the EOS-prone token within a few steps; rank 1 ignores EOS and decodes all 20 steps: under
    # per_step, rank 0 must keep stepping (its gathers are rank 1's too) or both hang
    eos = EOS if rank == 0 else None
    # both gather modes on the same sharded models (one launch): per_step first, then once
    for mode, who, ref in [(m, w, r) for m in ("per_step", "once")
                           for w, r in (("student", ref_student), ("teacher", ref_teacher))]:
        rc = dataclasses.replace(cfg.rollout, gather=mode)
        out, info = rollout.generate(models, who, prompts, rc=rc, max_new=20, eos_id=eos, pad_id=1,
                                     seed=5, group=dist.group.WORLD, temperature=0.0)
        replica = rollout.local_replica(ref, ref_heads[who])
        tokens, lengths = rollout.decode(rollout.replica_forward(replica), *rollout.left_pad(prompts, 1),
                                         max_new=20, eos_id=eos, pad_id=1, temperature=0.0, top_p=1.0)
        assert out == [tokens[i, :n].tolist() for i, n in enumerate(lengths.tolist())], (mode, who, out)
        assert info["mode"] == mode
        steps = [None] * world
        dist.all_gather_object(steps, (info["decode_steps"], max(info["lengths"])))
        if who == "student":
            assert steps[0][1] < 20 == steps[1][1], steps  # rank 0's rows did end early
            # once: each rank stops on its own; per_step: in lockstep until the last rank is done
            assert (steps[0][0] < steps[1][0]) if mode == "once" else (steps[0][0] == steps[1][0]), (mode, steps)
    # and the group is still in step: a collective after the rollouts sees every rank
    x = torch.ones(1)
    dist.all_reduce(x)
    assert x.item() == world
    if backend == "deepspeed":  # the training engine still works after the rollout (hooks and partitions intact)
        hidden = models.student_hidden(torch.tensor([prompts[0]]), torch.ones(1, len(prompts[0]), dtype=torch.long))
        models.backward(hidden.float().pow(2).mean())


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp2"])
def test_sharded_generation_equals_one_process_decoding_with_ranks_ending_apart(backend):
    """Both gather modes (per_step, then once on the same models) equal one-process decoding."""
    run_workers(_generate_worker, 2, backend, timeout=300)
