"""The fault suite: each case a real run (1 or 2 processes, the debug config, the real backends), ending in one of a
clear error that names the fix (exit 2, before any model loads where the problem is knowable then), a recovery that
is bitwise identical to an uninterrupted run, or a refusal that leaves everything on disk untouched. Never exit 0
with a wrong result, never a lost valid checkpoint, no wait beyond the configured bound plus 30 s."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.dist_utils import launch_preloaded
from tests.test_train import ENV, REPO, command, train_args

ONPOLICY = "pipeline/configs/debug_onpolicy.yaml"
SHORT = ["--train.steps=6", "--checkpoint.every=2", "--checkpoint.keep_last=10"]
# the rank that poisons its token weights is rank 1 where there is one
FAULT_RANK = {"none": 0, "deepspeed": 1, "fsdp2": 1}
NPROC = {"none": 1, "deepspeed": 2, "fsdp2": 2}


def run(run_dir, backend, *overrides, env=None, timeout=300, nproc=None):
    """A run whose outcome is about the pipeline, not the launcher: ranks forked from the preloaded server (the
    signal, lock and stopped-rank cases below start real torchrun / python processes)."""
    return launch_preloaded(train_args(run_dir, backend, *overrides), nproc or NPROC[backend],
                            {**ENV, **(env or {})}, REPO, timeout)


def ok(p):
    assert p.returncode == 0, p.stderr[-5000:]
    return p


def refused(p, *words, code=2):
    """Exit `code` with a message holding every word, and no traceback of ours."""
    assert p.returncode == code, (p.returncode, p.stderr[-5000:])
    for w in words:
        assert w in p.stderr, (w, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-5000:]


def loss_lines(run_dir) -> list[tuple[int, str]]:
    """Every line of losses.tsv in order (a resumed run writes a step again)."""
    return [(int(a), b) for a, b in (x.split("\t") for x in (Path(run_dir) / "losses.tsv").read_text().splitlines())]


def snapshot(d: Path) -> dict:
    """path -> (size, mtime, sha256) of every file under d: 'nothing on disk was touched'."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != ".lock":
            out[str(p.relative_to(d))] = (p.stat().st_size, p.stat().st_mtime_ns,
                                          hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def tensors(obj, prefix=""):
    """Every tensor inside a nested checkpoint object, by path."""
    out = {}
    if torch.is_tensor(obj):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}/{i}"))
    return out


def trained_state(ckpt: Path) -> dict:
    """The trainable state of a checkpoint: model body + optimizer files and each rank's output-layer rows and
    their AdamW state (not the data position, RNG or counters, which move on with every step)."""
    out = {}
    if (ckpt / "body" / ".metadata").exists():  # FSDP2: a DCP directory; read it whole through DCP's converter
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        whole = ckpt.parent.parent / f"dcp_{ckpt.name}.pt"
        dcp_to_torch_save(ckpt / "body", whole)
        out.update({f"body{k}": v for k, v in tensors(torch.load(whole, weights_only=False)).items()})
    for f in sorted(ckpt.rglob("*")):
        if f.suffix == ".pt" and f.is_file():
            obj = torch.load(f, weights_only=False, map_location="cpu")
            if f.name.startswith("rank"):
                obj = obj["heads"]
            out.update({f"{f.relative_to(ckpt)}{k}": v for k, v in tensors(obj).items()})
    return out


def ckpt(run_dir, step) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


# --------------------------------------------------------------------------------------------------------------
# non-finite steps
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["none", "deepspeed", "fsdp2"])
def test_a_nan_step_is_skipped_on_every_rank_and_changes_nothing(tmp_path, backend):
    p = ok(run(tmp_path, backend, *SHORT, "--checkpoint.every=1", env={
        "PIPELINE_FAULT": f"nan@3:{FAULT_RANK[backend]}"}))
    got = dict(loss_lines(tmp_path))
    assert got[3] == "nan" and all(v != "nan" for s, v in got.items() if s != 3), got
    assert "step 3: non-finite" in p.stderr
    before, skipped, after = (trained_state(ckpt(tmp_path, s)) for s in (2, 3, 4))
    assert before.keys() == skipped.keys() and len(before) > 4
    for k in before:  # parameters and optimizer state bitwise untouched by the skipped step
        assert torch.equal(before[k], skipped[k]), k
    assert any(not torch.equal(skipped[k], after[k]) for k in before)  # and the next step trains again
    assert (tmp_path / "student" / "model.safetensors").exists()


def test_diverging_run_stops_with_an_error_and_writes_nothing_non_finite(tmp_path):
    p = run(tmp_path, "none", "--optim.lr=1.0e+6", "--optim.warmup_steps=0", "--train.steps=12",
            "--checkpoint.every=1", "--checkpoint.keep_last=1", "--safety.max_consecutive_skips=2")
    refused(p, "consecutive steps had a non-finite loss", "optim.lr", code=3)
    assert not (tmp_path / "student").exists()  # no export
    ckpts = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").exists()  # rotation kept the newest, finite one
    assert all(torch.isfinite(t).all() for t in trained_state(ckpts[0]).values() if t.is_floating_point())
    assert "update skipped (3 in a row" in p.stderr and f"stopped at step {int(ckpts[0].name[5:])}" in p.stderr


# --------------------------------------------------------------------------------------------------------------
# checkpoints that prove themselves
# --------------------------------------------------------------------------------------------------------------
def _biggest_body_file(c: Path) -> Path:
    files = [f for f in (c / "body").rglob("*") if f.is_file()] if (c / "body").exists() else [c / "body.pt"]
    return max(files, key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp2"])  # the sharded layouts: several files per rank
def test_truncated_shard_falls_back_to_the_older_checkpoint_bitwise(tmp_path, backend):
    ok(run(tmp_path, backend, *SHORT, "--train.stop_after=4"))
    first = loss_lines(tmp_path)
    victim = _biggest_body_file(ckpt(tmp_path, 4))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    p = ok(run(tmp_path, backend, *SHORT))
    assert str(victim.relative_to(ckpt(tmp_path, 4))) in p.stderr and "truncated" in p.stderr
    assert "OLDER checkpoint" in p.stderr and "step_00000002" in p.stderr
    again = loss_lines(tmp_path)[len(first):]
    assert [s for s, _ in again] == [3, 4, 5, 6]
    assert again[:2] == first[2:4]  # steps 3-4 recomputed from step 2 equal the uninterrupted ones, bitwise


def test_flipped_bytes_are_detected_and_no_valid_checkpoint_is_an_error(tmp_path):
    ok(run(tmp_path, "none", "--train.steps=4", "--checkpoint.every=2", "--checkpoint.export=false"))
    for step in (2, 4):
        f = _biggest_body_file(ckpt(tmp_path, step))
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF  # inside tensor data: the file still loads, with a wrong value
        f.write_bytes(bytes(raw))
    before = snapshot(tmp_path / "checkpoints")
    p = run(tmp_path, "none", "--train.steps=6", "--checkpoint.every=2", "--checkpoint.export=false")
    refused(p, "body.pt: contents differ", "no checkpoint in", "Nothing was loaded or deleted", code=1)
    assert snapshot(tmp_path / "checkpoints") == before


# --------------------------------------------------------------------------------------------------------------
# the run directory
# --------------------------------------------------------------------------------------------------------------
def _start(run_dir, *overrides, nproc=1, backend="none", env=None):
    return subprocess.Popen(command(run_dir, nproc, backend, *overrides), cwd=REPO, env={**ENV, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_steps(run_dir, n, timeout=120):
    tsv = Path(run_dir) / "losses.tsv"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if tsv.exists() and len(tsv.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{run_dir} did not reach {n} steps")


def test_a_second_launch_on_a_busy_run_dir_is_refused_at_once(tmp_path):
    first = _start(tmp_path, "--train.steps=400", "--checkpoint.every=0")
    try:
        _wait_for_steps(tmp_path, 2)
        t0 = time.time()
        p = run(tmp_path, "none", "--train.steps=400")
        refused(p, "is in use by another run", f"pid {first.pid}")
        assert time.time() - t0 < 30
        os.kill(first.pid, signal.SIGUSR1)  # the first run stops cleanly, with a checkpoint
        assert first.wait(timeout=120) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    steps = [s for s, _ in loss_lines(tmp_path)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved lines
    # the lock went with its holder: a new launch resumes
    p = ok(run(tmp_path, "none", "--train.steps=400", "--train.stop_after=" + str(steps[-1] + 1)))
    assert "resumed from" in p.stderr


def test_resume_refuses_config_drift_records_safe_changes_and_never_overwrites_unless_told(tmp_path):
    ok(run(tmp_path, "none", "--train.steps=2"))
    before = snapshot(tmp_path)
    p = run(tmp_path, "none", "--train.steps=2", "--loss.method=fkl", "--loss.options={}", "--data.seq_len=16")
    refused(p, "loss.method", "'amid' in the checkpoint, 'fkl' now", "data.seq_len", "loss.options.alpha")
    assert snapshot(tmp_path) == before  # config.yaml included: a failed launch writes nothing
    refused(run(tmp_path, "none", "--train.steps=2", "--train.micro_batch_size=4"), "train.micro_batch_size")
    refused(run(tmp_path, "none", "--train.steps=2", "--checkpoint.resume=false"), "checkpoint.overwrite=true")
    assert snapshot(tmp_path) == before
    ok(run(tmp_path, "none", "--train.steps=3", "--train.log_every=2"))
    last = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[-1])
    assert last["start_step"] == 2 and set(last["changed"]) == {"train.steps", "train.log_every"}
    ok(run(tmp_path, "none", "--train.steps=2", "--checkpoint.resume=false", "--checkpoint.overwrite=true"))
    assert [s for s, _ in loss_lines(tmp_path)] == [1, 2]  # started again, the old log gone
    history = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert len(history) == 3 and history[2]["overwrite"]
    # the checkpoints deleted by hand, the export and the log still there: another config must not replace or mix them
    import shutil
    shutil.rmtree(tmp_path / "checkpoints")
    before = snapshot(tmp_path)
    refused(run(tmp_path, "none", "--train.steps=2", "--loss.method=fkl", "--loss.options={}"),
            "exported student", "2 recorded step(s)", "checkpoint.overwrite=true")
    assert snapshot(tmp_path) == before
    ok(run(tmp_path, "none", "--train.steps=2", "--checkpoint.resume=false", "--checkpoint.overwrite=true"))
    assert [s for s, _ in loss_lines(tmp_path)] == [1, 2]


def test_a_field_newer_than_the_checkpoint_resumes_at_its_default_only():
    """A checkpoint from before a field existed (here rollout.engine): resuming with the field at its default is no
    change; any other value, or a field the checkpoint has and this launch lacks, is."""
    from pipeline import config as C
    now = C.to_dict(C.load_config(ONPOLICY, []))
    old = C.to_dict(C.load_config(ONPOLICY, []))
    del old["rollout"]["engine"]
    assert C.config_changes(old, now) == ({}, {})
    changed = C.to_dict(C.load_config(ONPOLICY, ["--rollout.engine=vllm"]))
    assert C.config_changes(old, changed)[0] == {"rollout.engine": ("<unset>", "vllm")}
    assert C.config_changes(now, {k: v for k, v in now.items() if k != "rollout"})[0]  # a field gone: a change


# --------------------------------------------------------------------------------------------------------------
# signals and launchers
# --------------------------------------------------------------------------------------------------------------
SIGNALLED = ["--train.steps=12", "--checkpoint.every=0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    ok(run(d, "fsdp2", *SIGNALLED))
    return dict(loss_lines(d))


def _alive(run_dir) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"run_dir={run_dir}"], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


@pytest.mark.parametrize("target,sig", [("one rank", signal.SIGUSR1), ("launcher", signal.SIGUSR1),
                                        ("launcher", signal.SIGTERM)])
def test_stop_signal_anywhere_checkpoints_and_leaves_nothing_behind(tmp_path, uninterrupted, target, sig):
    """torchrun does not forward SIGUSR1 by default and dies of it: its ranks then get SIGTERM from the kernel
    (parent-death signal); SIGTERM it forwards. Either way one checkpoint, no process left."""
    proc = _start(tmp_path, *SIGNALLED, nproc=2, backend="fsdp2")
    try:
        _wait_for_steps(tmp_path, 3)
        if target == "launcher":
            os.kill(proc.pid, sig)
        else:
            ranks = [p for p in _alive(tmp_path) if p != proc.pid]
            os.kill(max(ranks), sig)
        proc.wait(timeout=90)
        deadline = time.time() + 30
        while _alive(tmp_path) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(tmp_path), "processes left behind"
    finally:
        for p in _alive(tmp_path):
            os.kill(p, signal.SIGKILL)
    saved = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").exists(), proc.stderr.read()[-3000:]
    stopped_at = int(saved[0].name.split("_")[1])
    assert 3 <= stopped_at < 12
    if target == "one rank":  # the other rank stopped at the same step, and the resumed run is exact
        assert proc.returncode == 0
        ok(run(tmp_path, "fsdp2", *SIGNALLED))
        resumed = dict(loss_lines(tmp_path))
        assert [resumed[s] for s in range(stopped_at + 1, 13)] == \
            [uninterrupted[s] for s in range(stopped_at + 1, 13)]


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt"))
    except (OSError, StopIteration):
        return False
    return bool(mask >> (sig - 1) & 1)


def test_signal_during_start_up_is_a_clean_stop(tmp_path):
    proc = _start(tmp_path, "--train.steps=4")
    deadline = time.time() + 60
    while not _catches(proc.pid, signal.SIGUSR1) and time.time() < deadline:  # handler in, torch still loading
        time.sleep(0.01)
    assert not (tmp_path / "losses.tsv").exists()
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=120) == 0
    err = proc.stderr.read()
    assert "Traceback" not in err and not (tmp_path / "checkpoints").exists(), err[-3000:]
    assert "nothing to checkpoint" in err and "checkpoint written" not in err  # it says what it did


def test_a_stopped_rank_is_an_error_within_the_bound(tmp_path):
    """Two ranks started the way srun starts them (launcher variables, no torchrun); rank 1 is stopped (SIGSTOP)
    mid-run: rank 0 must report it and exit within the collective bound. (The launcher then ends the job: srun
    --kill-on-bad-exit at once, torchrun after its 30 s shutdown grace.)"""
    from tests.dist_utils import free_port
    bound, port = 5, free_port()
    argv = command(tmp_path, 1, "fsdp2", "--train.steps=400", f"--safety.collective_timeout_s={bound}")
    ranks = [subprocess.Popen(argv, cwd=REPO, env={**ENV, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        _wait_for_steps(tmp_path, 2)
        t0 = time.time()
        ranks[1].send_signal(signal.SIGSTOP)
        ranks[0].wait(timeout=bound + 60)
        waited = time.time() - t0
    finally:
        for p in ranks:
            p.kill()
    err = ranks[0].stderr.read()
    assert ranks[0].returncode == 1
    assert "a collective failed or timed out" in err and "safety.collective_timeout_s = 5" in err, err[-3000:]
    assert "Traceback" not in err
    assert waited < bound + 15, waited  # the bound plus the step in flight and the exit


# ---------------------------------------------------------------------------------------------------------------
# artifacts known by content: stores, caches and teachers
# ---------------------------------------------------------------------------------------------------------------
TINY = REPO / "pipeline/configs/assets/tiny_corpus.txt"
TOKENIZER = str(REPO / "pipeline/configs/assets/tiny_tokenizer")


def _prepared(out: Path, corpus: Path) -> str:
    from pipeline import config as C, prepare as P
    cfg = C.load_config(str(REPO / "pipeline/configs/debug_cpu.yaml"), [
        f"--model.tokenizer_path={TOKENIZER}", f"--data.files=[{corpus}]", "--data.seq_len=32"])
    assert P.prepare(cfg, str(out), workers=1, log=lambda m: None)
    return str(out)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A store and an offline top-k cache over it; a second store of the same corpus reversed line by line (the
    same token count, other content)."""
    from pipeline import config as C, precompute_teacher as PT
    d = tmp_path_factory.mktemp("inputs")
    lines = TINY.read_text().splitlines()
    (d / "reversed.txt").write_text("\n".join(reversed(lines)) + "\n")
    store, other = _prepared(d / "store", TINY), _prepared(d / "other", d / "reversed.txt")
    cfg = C.load_config(str(REPO / "pipeline/configs/debug_cpu.yaml"), [
        f"--model.tokenizer_path={TOKENIZER}", f"--data.store={store}", "--data.seq_len=32"])
    assert PT.precompute(cfg, str(d / "topk"), k=8, batch=8, chunk=64, rank=0, world=1, log=lambda m: None)
    return store, other, str(d / "topk")


def _store_run(tmp_path, store, *extra, name="run"):
    return run(tmp_path / name, "none", f"--data.store={store}", f"--model.tokenizer_path={TOKENIZER}",
               "--data.seq_len=32", *extra)


def test_a_store_rebuilt_in_place_is_refused_on_resume(stores, tmp_path):
    """The checkpoint records the store by content: the same path holding other tokens is another input."""
    import shutil
    store, other, _ = stores
    mine = tmp_path / "store"
    shutil.copytree(store, mine)
    ok(_store_run(tmp_path, mine, "--train.steps=4", "--train.stop_after=2", "--checkpoint.every=2"))
    from pipeline.data.token_store import TokenStore
    before_fp, after_fp = TokenStore(str(mine)).fingerprint, TokenStore(other).fingerprint
    assert TokenStore(str(mine)).total == TokenStore(other).total and before_fp != after_fp
    shutil.rmtree(mine)
    shutil.copytree(other, mine)  # rebuilt in place from other files
    before = snapshot(tmp_path / "run")
    refused(_store_run(tmp_path, mine, "--train.steps=4"), "data.store content", before_fp, after_fp)
    assert snapshot(tmp_path / "run") == before
    shutil.rmtree(mine)
    shutil.copytree(store, mine)  # the same content back: the resume goes on
    assert "resumed from" in ok(_store_run(tmp_path, mine, "--train.steps=4")).stderr


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["store bit flip", "store truncated", "cache ids random", "cache log-probs zero",
                                    "cache checksums missing"])
def test_a_damaged_store_or_cache_stops_the_run_naming_the_file(stores, tmp_path, damage):
    """Exit 1 with the file named, before a step trains on what it read (no losses recorded for it)."""
    import shutil
    import numpy as np
    store, _, topk = stores
    mine_store, mine_topk = tmp_path / "store", tmp_path / "topk"
    shutil.copytree(store, mine_store)
    shutil.copytree(topk, mine_topk)
    target = {"store bit flip": mine_store / "shard_00000.bin", "store truncated": mine_store / "shard_00000.bin",
              "cache ids random": mine_topk / "chunk_000000.ids",
              "cache log-probs zero": mine_topk / "chunk_000000.lp",
              "cache checksums missing": mine_topk / "chunk_000000.ids.sums"}[damage]
    size = target.stat().st_size
    if damage == "store bit flip":
        _flip(target, size // 3)
    elif damage == "store truncated":
        target.write_bytes(target.read_bytes()[: size - 100])
    elif damage == "cache checksums missing":
        target.unlink()
    elif damage == "cache ids random":
        target.write_bytes(np.random.default_rng(0).integers(0, 512, size // 2, dtype=np.uint16).tobytes())
    else:
        target.write_bytes(bytes(size))
    extra = [f"--loss.offline_teacher={mine_topk}", "--train.eval_every=0"] if "cache" in damage else []
    p = _store_run(tmp_path, mine_store, "--train.steps=400", *extra)  # every block is read within 400 steps
    refused(p, str(target), code=1)
    expected = {"store truncated": "truncated", "cache checksums missing": "is missing"}.get(damage,
                                                                                          "do not match the checksum")
    assert expected in p.stderr, p.stderr[-2000:]


def test_a_cache_of_another_store_or_teacher_is_refused(stores, tmp_path):
    """Same token count, same shapes: only the content tells them apart."""
    _, other, topk = stores
    refused(_store_run(tmp_path, other, f"--loss.offline_teacher={topk}", "--train.eval_every=0", name="store"),
            "computed for another setup", "store")
    store = stores[0]
    p = _store_run(tmp_path, store, f"--loss.offline_teacher={topk}", "--train.eval_every=0",
                   "--model.init_seed=7", name="teacher")  # the same teacher config, other weights
    refused(p, "computed for another setup", "teacher")


def test_teacher_weights_are_known_by_content_not_size(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    from pipeline.run.integrity import weights_fingerprint
    conf = AutoConfig.for_model("llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1)
    for name, seed in (("a", 0), ("b", 1), ("a_again", 0)):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / name)
    fa, fb, fa2 = (weights_fingerprint(str(tmp_path / n)) for n in ("a", "b", "a_again"))
    assert (tmp_path / "a/model.safetensors").stat().st_size == (tmp_path / "b/model.safetensors").stat().st_size
    assert fa != fb and fa == fa2
    assert weights_fingerprint(str(tmp_path / "a"), full=True) == weights_fingerprint(str(tmp_path / "a_again"),
                                                                                       full=True)


@pytest.fixture
def small_disk(tmp_path):
    """A small file system (tmpfs) of a size the test picks: small_disk("1300k")."""
    mounted = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"small{len(mounted)}"
        mnt.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                           text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {p.stderr.strip()}")
        mounted.append(mnt)
        return mnt
    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_during_a_save_says_so_and_keeps_the_last_checkpoint(small_disk):
    """Room for one of the debug run's checkpoints (~0.9 MB), not two."""
    d = small_disk("1300k")
    p = run(d / "run", "none", "--train.steps=6", "--checkpoint.every=2", "--checkpoint.keep_last=1",
            "--checkpoint.export=false", "--logging.tensorboard=false")
    refused(p, "disk full while writing checkpoint step", "GiB free", "the last checkpoint took",
            "step_00000002) is kept", code=1)
    saved = [x.name for x in (d / "run" / "checkpoints").iterdir()]
    assert saved == ["step_00000002"] and (d / "run" / "checkpoints" / saved[0] / "COMPLETE").exists()


def test_a_full_disk_during_the_export_says_so_and_keeps_the_checkpoint(small_disk):
    """Room for the final checkpoint, not for the export beside it (~0.3 MB)."""
    d = small_disk("1000k")
    p = run(d / "run", "none", "--train.steps=2", "--checkpoint.every=2", "--logging.tensorboard=false")
    refused(p, "disk full while exporting the student", "the checkpoints are kept", code=1)
    assert (d / "run" / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    assert not (d / "run" / "student").exists() and not (d / "run" / "student.tmp").exists()


def test_prepare_verify_hashes_a_store_in_full(stores, tmp_path, capsys):
    """The full check on request: a flipped byte in a file training never reads (the document ends of a text
    store) is found too."""
    import shutil
    from pipeline import prepare as P
    mine = tmp_path / "store"
    shutil.copytree(stores[0], mine)
    args = ["--config", "pipeline/configs/debug_cpu.yaml", f"--model.tokenizer_path={TOKENIZER}", "--out", str(mine),
            "--verify"]
    assert P.main(args) == 0 and "every file matches" in capsys.readouterr().err
    _flip(mine / "shard_00000.docs", 5)
    assert P.main(args) == 1 and f"differs: {mine / 'shard_00000.docs'}" in capsys.readouterr().err
