"""The on-policy job end to end in real 2-process runs (torchrun, gloo): ZeRO-3 and FSDP2 with student and teacher
generations of different lengths on the two ranks, the loss on generated tokens only, gather-once = lockstep
per-step decoding, exact resume with the replay buffer, and the debug config learning on held-out prompts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist_utils import launch_preloaded
from tests.test_rollout import eos_prone_student
from tests.test_train import ENV, REPO, losses

ONPOLICY = "pipeline/configs/debug_onpolicy.yaml"
MIX = ["--train.steps=10", "--train.micro_batch_size=2", "--train.grad_accum=2", "--train.eval_every=0",
       "--rollout.student_fraction=0.6", "--rollout.teacher_fraction=0.2", "--rollout.replay_capacity=16",
       "--rollout.replay_ratio=0.5", "--rollout.seed=4", "--rollout.max_new_tokens=24", "--checkpoint.every=5",
       "--logging.progress=false", "--model.student_config=", "--checkpoint.export=false"]


def launch(run_dir, backend, *overrides, timeout=300):
    """Two ranks forked from the preloaded server (tests.dist_utils.launch_preloaded); the timeout turns a rollout
    hang into a failure."""
    p = launch_preloaded(["--config", ONPOLICY, f"--run_dir={run_dir}", f"--parallel.backend={backend}", *overrides],
                         2, ENV, REPO, timeout)
    assert p.returncode == 0, p.stderr[-6000:]


def rollouts(run_dir, rank) -> dict[int, dict]:
    lines = (Path(run_dir) / f"rollouts_rank{rank}.jsonl").read_text().splitlines()
    return {(d := json.loads(x))["step"]: d for x in lines}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A student checkpoint whose generations end at varied lengths (from_pretrained loads it)."""
    d = tmp_path_factory.mktemp("eos_student")
    eos_prone_student(scale=6.0).save_pretrained(d)
    return d


RUNS = (("deepspeed", "once"), ("fsdp2", "per_step"))


@pytest.fixture(scope="module")
def mixed_runs(tmp_path_factory, student_dir):
    """The same 10-step mixed run under ZeRO-3 with gather-once decoding and under FSDP2 with lockstep decoding."""
    out = {}
    for backend, gather in RUNS:
        d = tmp_path_factory.mktemp(f"{backend}_{gather}")
        launch(d, backend, *MIX, f"--model.student_path={student_dir}", f"--rollout.gather={gather}")
        out[backend, gather] = d
    return out


@pytest.mark.parametrize("backend,gather", RUNS)
def test_ranks_generate_different_lengths_and_train_on_generated_tokens_only(mixed_runs, backend, gather):
    d = mixed_runs[backend, gather]
    r0, r1 = rollouts(d, 0), rollouts(d, 1)
    assert sorted(r0) == sorted(r1) == list(range(1, 11))
    sources = [r0[s]["source"] for s in range(1, 11)]
    assert sources == [r1[s]["source"] for s in range(1, 11)]  # one choice on every rank
    assert {"student", "teacher", "replay", "dataset"} <= set(sources), sources
    uneven = 0
    for s in range(1, 11):
        a, b = r0[s], r1[s]
        if a["source"] in ("student", "teacher"):
            assert a["mode"] == b["mode"] == gather
            # the loss counts exactly the generated tokens of both ranks (prompts and padding are masked)
            assert a["loss_tokens"] == b["loss_tokens"] == sum(a["lengths"]) + sum(b["lengths"])
            uneven += max(a["lengths"]) != max(b["lengths"])
            if gather == "per_step":  # lockstep: both ranks decode until the longer one is done
                assert a["decode_steps"] == b["decode_steps"] == max(a["lengths"] + b["lengths"])
            else:                    # no collective while decoding: each rank stops with its own rows
                assert (a["decode_steps"], b["decode_steps"]) == (max(a["lengths"]), max(b["lengths"]))
    assert uneven, "the ranks never generated different lengths: the test lost its point"
    vals = [float(v) for v in losses(d).values()]
    assert len(vals) == 10 and all(v == v and v > 0 for v in vals)


def test_gather_once_under_zero3_equals_lockstep_per_step_under_fsdp2(mixed_runs):
    """Same samples and same losses in both modes and backends (the decoding logits agree)."""
    a, b = (mixed_runs[k] for k in RUNS)
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 11))
    for s in la:
        assert float(la[s]) == pytest.approx(float(lb[s]), rel=1e-4), s
    for rank in (0, 1):
        ra, rb = rollouts(a, rank), rollouts(b, rank)
        assert [ra[s].get("lengths") for s in ra] == [rb[s].get("lengths") for s in rb]


def test_resume_continues_exactly_with_the_replay_buffer(tmp_path, student_dir, mixed_runs):
    full = mixed_runs["deepspeed", "once"]
    args = [*MIX, f"--model.student_path={student_dir}", "--rollout.gather=once"]
    launch(tmp_path, "deepspeed", *args, "--train.stop_after=5")
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5]
    launch(tmp_path, "deepspeed", *args)
    assert losses(tmp_path) == losses(full)  # bitwise: the same generations, buffer draws and updates
    for rank in (0, 1):
        got, want = rollouts(tmp_path, rank), rollouts(full, rank)
        assert [(got[s]["source"], got[s].get("lengths")) for s in range(1, 11)] == \
               [(want[s]["source"], want[s].get("lengths")) for s in range(1, 11)]


def test_the_debug_onpolicy_config_learns_on_heldout_prompts(tmp_path):
    launch(tmp_path, "deepspeed", "--logging.progress=false")
    rows = [line.split("\t") for line in (tmp_path / "eval.tsv").read_text().splitlines()]
    steps = [int(r[0]) for r in rows]
    assert steps == [0, 10, 20, 30, 40]
    kl_answers = [float(r[2]) for r in rows]  # KL(teacher || student) on the student's own greedy answers
    kl_data = [float(r[1]) for r in rows]     # and on the held-out dataset responses
    assert kl_answers[-1] < 0.7 * kl_answers[0], kl_answers
    assert kl_data[-1] < 0.7 * kl_data[0], kl_data
    sources = {json.loads(x)["source"] for x in (tmp_path / "rollouts_rank0.jsonl").read_text().splitlines()}
    assert sources == {"student", "dataset"}


def scalars(run_dir, tag: str) -> dict:
    """{step: value} of a tensorboard scalar of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


ADAPTIVE = ["--train.steps=8", "--train.micro_batch_size=2", "--train.grad_accum=2", "--train.eval_every=2",
            "--data.eval_blocks=4", "--rollout.student_fraction=0", "--rollout.schedule=adaptive",
            "--rollout.adaptive_init=0.6", "--rollout.adaptive_eps=0.0", "--rollout.replay_capacity=8",
            "--rollout.max_new_tokens=16", "--checkpoint.every=4", "--logging.progress=false",
            "--checkpoint.export=false"]


def test_adaptive_schedule_runs_in_step_and_resumes_exactly(tmp_path):
    """DistiLLM's scheduler under ZeRO-3: the same choice on both ranks, generation until the buffer is full before
    any replay, the held-out CE logged for it, and a resumed run equal to an uninterrupted one (its state is in the
    checkpoint)."""
    full, split = tmp_path / "full", tmp_path / "split"
    launch(full, "deepspeed", *ADAPTIVE)
    r0, r1 = rollouts(full, 0), rollouts(full, 1)
    sources = [r0[s]["source"] for s in range(1, 9)]
    assert sources == [r1[s]["source"] for s in range(1, 9)]
    assert set(sources) <= {"student", "replay", "dataset"} and "student" in sources
    if "replay" in sources:  # 8 slots, 4 generations per rank and step: two generating steps come first
        assert sources[: sources.index("replay")].count("student") >= 2
    rows = [line.split("\t") for line in (full / "eval.tsv").read_text().splitlines()]
    assert [int(r[0]) for r in rows] == [0, 2, 4, 6, 8] and all(float(r[4]) > 0 for r in rows)  # held-out CE
    launch(split, "deepspeed", *ADAPTIVE, "--train.stop_after=4")
    launch(split, "deepspeed", *ADAPTIVE)
    assert losses(split) == losses(full)
    assert [rollouts(split, 0)[s]["source"] for s in range(1, 9)] == sources
    # the schedule's measurements paced apart from the evaluations: the same cross-entropy at the same steps (2, 4,
    # ...), so the same run, with the whole evaluation only every 4 steps
    paced = tmp_path / "paced"
    launch(paced, "deepspeed", *ADAPTIVE, "--train.eval_every=4", "--rollout.adaptive_every=2")
    assert [int(line.split("\t")[0]) for line in (paced / "eval.tsv").read_text().splitlines()] == [0, 4, 8]
    assert losses(paced) == losses(full)
    assert [rollouts(paced, 0)[s]["source"] for s in range(1, 9)] == sources
    thresholds = scalars(full, "rollout/adaptive_threshold")
    assert scalars(paced, "rollout/adaptive_threshold") == thresholds
    assert thresholds[3] > thresholds[2]            # the rise that step 2's measurement (no evaluation there) made
