"""The teacher cache (loss.teacher_cache): it stores the teacher's hidden states at every response position, as
training computes them; a run on it equals the run without it (1 process, and ZeRO-3 on 2 ranks with steps on the
student's own generations mixed in, where the teacher still runs); a cache that lacks an example or was computed for
another teacher is refused before the first step."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from pipeline import config as C, teacher_cache as TC
from pipeline.models import build as M
from pipeline.data import batches as data
from pipeline.parallel.backends import causal_without_mask_reads, frozen_forward
from tests.dist_utils import launch_preloaded
from tests.test_faults import refused
from tests.test_train import ENV, REPO, losses

ONPOLICY = "pipeline/configs/debug_onpolicy.yaml"
RUN = ["--train.steps=6", "--train.micro_batch_size=2", "--train.grad_accum=2", "--train.eval_every=3",
       "--checkpoint.every=6", "--logging.progress=false", "--checkpoint.export=false", "--rollout.max_new_tokens=12",
       "--loss.options={alpha: -3.0, lam: 0.1, divergence: kl, order: pr}"]


def _cfg(*extra):
    return C.load_config(str(REPO / ONPOLICY), list(extra))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    cfg = _cfg()
    examples = TC.examples_of(cfg, M.load_tokenizer(cfg))  # training and held-out
    assert len(examples) == len(data.load_examples(cfg.data, M.load_tokenizer(cfg))) + cfg.data.eval_blocks
    out = str(tmp_path_factory.mktemp("teacher_cache"))
    TC.build(cfg, examples, out, batch=8, log=lambda m: None)  # padded batches (checked one example at a time)
    return out, examples


def test_the_cache_holds_the_teachers_hidden_states_at_every_response_position(cache):
    out, examples = cache
    cfg = _cfg()
    teacher = M.build_model(None, cfg.model.teacher_config, "float32", cfg.model.init_seed + 1).eval()
    M.detach_head(teacher, copy=False)
    causal_without_mask_reads(teacher)
    reader = TC.TeacherHidden(out)
    picked = random.Random(0).sample(examples, 5)
    for p, r in picked:                                    # one at a time: no padding, no batch neighbours
        with torch.no_grad():
            h = frozen_forward(teacher, torch.tensor([p + r])[:, :-1], None)[0]
        want = h[len(p) - 1:len(p) - 1 + len(r)]           # the positions whose targets are the response tokens
        got = reader.states_of([(p, r)])
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    both = reader.states_of(picked[:2])                    # pair after pair, as collate's loss rows
    assert torch.equal(both, torch.cat([reader.states_of([picked[0]]), reader.states_of([picked[1]])]))
    b = data.collate([p for p, _ in picked[:2]], [r for _, r in picked[:2]], 0)
    assert both.shape[0] == int(b.loss_mask.sum())
    assert TC.build(cfg, examples, out, log=lambda m: pytest.fail("recomputed")) == out  # reused


@pytest.mark.parametrize("backend,nproc,extra", [
    ("none", 1, ["--rollout.student_fraction=0"]),
    # ZeRO-3: every rank skips the sharded teacher on the same steps; on-policy steps still run it
    ("deepspeed", 2, ["--rollout.student_fraction=0.5"]),
])
def test_training_on_the_cache_equals_training_with_the_live_teacher(cache, tmp_path, backend, nproc, extra):
    out, _ = cache

    def launch(name, *more):
        p = launch_preloaded(["--config", ONPOLICY, f"--run_dir={tmp_path / name}", f"--parallel.backend={backend}",
                              *RUN, *extra, *more], nproc, ENV, REPO, 300)
        assert p.returncode == 0, p.stderr[-6000:]
        return losses(tmp_path / name)

    def evals(name):  # step -> (held-out KL, KL on own answers, answer length, CE)
        return {int(s): [float(v) for v in vs] for s, *vs in
                (line.split("\t") for line in (tmp_path / name / "eval.tsv").read_text().splitlines())}

    live, cached = launch("live"), launch("cached", f"--loss.teacher_cache={out}")
    assert sorted(live) == sorted(cached) == list(range(1, 7))
    for step in live:
        assert float(cached[step]) == pytest.approx(float(live[step]), rel=1e-5, abs=1e-7), step
    # the held-out references' KL and CE from the stored states (only their loss rows), the rest as live
    assert sorted(evals("live")) == sorted(evals("cached")) == [0, 3, 6]
    for step, want in evals("live").items():
        assert evals("cached")[step] == pytest.approx(want, rel=1e-5, abs=1e-7), step
    sources = [json.loads(line)["source"] for line in (tmp_path / "cached" / "rollouts_rank0.jsonl").open()]
    assert "dataset" in sources and (backend == "none" or "student" in sources)
    if backend == "none":  # the states are really read, and checked: states replaced after the build stop the run
        other = tmp_path / "other"
        shutil.copytree(out, other)
        states = np.load(other / TC.HIDDEN, mmap_mode="r+")
        states *= 0.5
        states.flush()
        p = launch_preloaded(["--config", ONPOLICY, f"--run_dir={tmp_path / 'moved'}", "--parallel.backend=none",
                              *RUN, *extra, f"--loss.teacher_cache={other}"], 1, ENV, REPO, 300)
        assert p.returncode == 1 and f"{other / TC.HIDDEN}: bytes" in p.stderr and "Traceback" not in p.stderr, \
            p.stderr[-3000:]
        assert not (tmp_path / "moved" / "losses.tsv").exists()  # before any step used them


def test_a_cache_that_does_not_fit_the_run_is_refused_before_training(cache, tmp_path):
    out, _ = cache

    def launch(*more):
        return launch_preloaded(["--config", ONPOLICY, f"--run_dir={tmp_path / 'run'}", "--parallel.backend=none",
                                 *RUN, *more], 1, ENV, REPO, 300)
    # the examples tokenise differently: the cache has not got them
    refused(launch(f"--loss.teacher_cache={out}", "--data.max_prompt_len=16"), "lacks", "recompute it")
    refused(launch(f"--loss.teacher_cache={out}", "--model.init_seed=5"), "another teacher")
    refused(launch(f"--loss.teacher_cache={tmp_path / 'nothing'}"), "not a finished teacher cache")
    assert not (tmp_path / "run" / "losses.tsv").exists()
    with pytest.raises(ValueError, match="teacher_cache is for instruction data"):
        C.validate(C.load_config(str(REPO / "pipeline/configs/debug_cpu.yaml"), [f"--loss.teacher_cache={out}"]))
