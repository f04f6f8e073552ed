"""The training pipeline in real multi-process runs (gloo, torchrun): ZeRO-3 and FSDP2 against a one-process
reference, a frozen teacher, exact resume (also after kill -9 of one rank), tensorboard events, the HF export, and
config errors that fail fast."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.dist_utils import free_port, launch_preloaded

REPO = Path(__file__).resolve().parents[1]
DEBUG = "pipeline/configs/debug_cpu.yaml"
# small and quick: 24 steps over a few documents (two optimiser steps per epoch), 2 ranks x 2 sequences x 2 accum
COMMON = ["--train.steps=24", "--train.micro_batch_size=2", "--train.grad_accum=2", "--data.seq_len=32",
          "--data.max_documents=12", "--checkpoint.every=8", "--checkpoint.keep_last=3", "--optim.warmup_steps=2",
          "--logging.progress=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def train_args(run_dir, backend, *overrides):
    return ["--config", DEBUG, f"--run_dir={run_dir}", f"--parallel.backend={backend}", *COMMON, *overrides]


def command(run_dir, nproc, backend, *overrides):
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                 f"--master-port={free_port()}"] if nproc > 1 else [sys.executable])
    return launcher + ["-m", "pipeline.train", *train_args(run_dir, backend, *overrides)]


def launch(run_dir, nproc, backend, *overrides, timeout=600):
    """The run on `nproc` ranks started from the preloaded server (tests.dist_utils.launch_preloaded); the launchers
    themselves are exercised by the kill -9 test below, tests/test_faults.py and tests/test_slurm.py."""
    p = launch_preloaded(train_args(run_dir, backend, *overrides), nproc, ENV, REPO, timeout)
    assert p.returncode == 0, p.stderr[-6000:]
    return p


def losses(run_dir) -> dict[int, str]:
    """step -> loss as written (repr of the float); a step logged twice (a killed run) keeps its last value."""
    out = {}
    for line in (Path(run_dir) / "losses.tsv").read_text().splitlines():
        step, value = line.split("\t")
        out[int(step)] = value
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, no sharding, micro-batch 4 = 2 ranks x 2: the same data per step as the 2-rank runs."""
    d = tmp_path_factory.mktemp("ref")
    launch(d, 1, "none", "--train.micro_batch_size=4")
    return d


@pytest.fixture(scope="module", params=["deepspeed", "fsdp2"])
def two_ranks(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    launch(d, 2, request.param)
    return request.param, d


def test_loss_falls_and_matches_the_single_process_run(two_ranks, reference):
    backend, d = two_ranks
    got, ref = losses(d), losses(reference)
    assert sorted(got) == list(range(1, 25))
    vals = [float(got[s]) for s in range(1, 25)]
    assert sum(vals[-3:]) < 0.7 * sum(vals[:3]), vals  # it learns
    for s in range(1, 25):  # sharded = unsharded, up to float reassociation
        assert float(got[s]) == pytest.approx(float(ref[s]), rel=1e-4), (backend, s)


def test_teacher_is_bit_identical_before_and_after(two_ranks):
    _, d = two_ranks
    for r in (0, 1):
        summary = json.loads((d / f"summary_rank{r}.json").read_text())
        assert summary["teacher_digest_before"] == summary["teacher_digest_after"]


def test_tensorboard_events_read_back(two_ranks):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, d = two_ranks
    acc = EventAccumulator(str(d / "tb"))
    acc.Reload()
    events = acc.Scalars("loss/total")
    assert [e.step for e in events] == list(range(1, 25))
    ref = losses(d)
    assert [e.value for e in events] == pytest.approx([float(ref[s]) for s in range(1, 25)], rel=1e-6)
    for tag in ("lr", "grad_norm/body", "grad_norm/head", "tokens_per_s", "agreement/top1", "memory/peak_gb",
                "train/skipped_steps", "data/wait_s"):
        assert tag in acc.Tags()["scalars"], tag


def test_export_loads_with_from_pretrained(two_ranks):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, d = two_ranks
    model = AutoModelForCausalLM.from_pretrained(d / "student")
    tok = AutoTokenizer.from_pretrained(d / "student")
    ids = tok("Return a new list", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape[-1] == 512 and torch.isfinite(logits).all()
    # the debug student is tied, and stays tied: one matrix, the trained one (the last checkpoint's output layer)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    last = sorted((d / "checkpoints").glob("step_*"))[-1]
    shards = [torch.load(last / f"rank{r}.pt", map_location="cpu", weights_only=False)["heads"] for r in (0, 1)]
    assert [s["start"] for s in shards] == [0, shards[0]["end"]] and shards[1]["end"] == 512
    torch.testing.assert_close(model.lm_head.weight.detach(), torch.cat([s["student"] for s in shards]))


def test_exact_resume_after_kill_9_mid_run(tmp_path, two_ranks):
    backend, full = two_ranks
    proc = subprocess.Popen(command(tmp_path, 2, backend), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    tsv = tmp_path / "losses.tsv"
    while time.time() < deadline and (not tsv.exists() or len(tsv.read_text().splitlines()) < 11):
        time.sleep(0.05)
    # kill -9 one worker (rank 1) while the run is past its step-8 checkpoint
    workers = subprocess.run(["pgrep", "-f", f"run_dir={tmp_path}"], capture_output=True, text=True).stdout.split()
    workers = [int(p) for p in workers if int(p) != proc.pid]
    assert workers, "no worker found to kill"
    os.kill(max(workers), signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step_00000008" in ckpts
    launch(tmp_path, 2, backend)
    resumed, ref = losses(tmp_path), losses(full)
    assert [resumed[s] for s in range(9, 25)] == [ref[s] for s in range(9, 25)]


def test_incomplete_checkpoints_are_never_loaded(tmp_path):
    from pipeline.run import checkpoint
    ck = tmp_path / "checkpoints"
    (ck / "step_00000004").mkdir(parents=True)
    (ck / "step_00000004" / "COMPLETE").write_text("4\n")
    (ck / "step_00000008").mkdir()                       # killed before its marker
    (ck / "step_00000012.tmp").mkdir()                   # killed mid-write
    assert checkpoint.latest(str(tmp_path)) == str(ck / "step_00000004")


@pytest.mark.parametrize("override,field", [
    ("--loss.bogus=1", "loss.bogus"),
    ("--train.steps=ten", "train.steps"),
    ("--loss.options={lam: 1.5}", "lam"),
    ("--loss.options={alpha: .inf}", "alpha"),
    ("--train.global_batch_size=7", "global_batch_size"),
    ("--data.files=[/nonexistent/corpus.txt]", "data.files"),
    ("--parallel.backend=megatron", "parallel.backend"),
])
def test_config_errors_fail_fast_and_name_the_field(override, field):
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", DEBUG, override], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and field in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert time.time() - t0 < 20.0  # no model or data loads (a loaded 2-core machine takes several seconds)


def test_vocabulary_checks_before_training():
    """A model whose output layer cannot cover the shared tokenizer is refused with a message that says what to
    fix; a larger (padded) head is accepted and its extra rows are dropped from the vocab-parallel split."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from pipeline.models import build as M
    from pipeline.parallel.backends import OutputHeads
    from pipeline.config import OptimConfig
    from pipeline.parallel.distributed import Layout
    tok = AutoTokenizer.from_pretrained(REPO / "pipeline/configs/assets/tiny_tokenizer")
    conf = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1)
    small = LlamaForCausalLM(LlamaConfig(vocab_size=500, **conf))
    padded = LlamaForCausalLM(LlamaConfig(vocab_size=576, **conf))
    with pytest.raises(ValueError, match="share the tokenizer"):
        M.check_vocab(small, padded, tok)
    assert M.check_vocab(padded, padded, tok) == 512
    heads = OutputHeads(M.detach_head(padded), M.detach_head(LlamaForCausalLM(LlamaConfig(vocab_size=600, **conf))),
                        512, Layout(1, 1, 0, 0), OptimConfig())
    assert heads.student.shape[0] == heads.teacher.shape[0] == 512
