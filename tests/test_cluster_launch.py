"""The decisions a GPU cluster job depends on, taken by the same code on CPUs: the device every library selects under
each Slurm GPU binding, the vLLM memory fraction from measured free memory, the sleep level per model, the RNG a vLLM
start leaves alone, `$VAR` / `~` in config paths, and the eval job's held-out data on both cluster configs' data kinds
(bounded, for the config's data kind)."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import config as C, evaluate
from pipeline.parallel import distributed
from pipeline.rollout import vllm as vllm_rollout
from tests.test_rollout import TEMPLATE

TINY = dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
CLUSTER = "pipeline/configs/cluster_7b_to_1b.yaml"
CLUSTER_ONPOLICY = "pipeline/configs/cluster_7b_to_1b_onpolicy.yaml"


# ---------------------------------------------------------------------------------------------------------------
# the GPU each rank and each library uses
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("local, visible, want", [
    (5, 1, "0"),   # srun --gpus-per-task=1 / --gpu-bind=single: each task sees only its GPU, which is cuda:0
    (5, 8, "5"),   # all eight visible (torchrun, or srun without binding): the local rank's GPU
    (0, 8, "0"),
])
def test_local_rank_exported_is_the_gpu_index_deepspeed_and_vllm_select(local, visible, want):
    """DeepSpeed's engine (engine.py: self.local_rank = int(os.environ['LOCAL_RANK']); set_device(local_rank)) and
    vLLM's external launcher (uniproc_executor: local_rank = int(os.environ['LOCAL_RANK']); cuda:local_rank) both
    take LOCAL_RANK as a device index: it must be ours, not SLURM_LOCALID."""
    gpu = distributed.local_device(local, visible)
    env = distributed.launch_environment(rank=8 + local, world=16, local=local, gpu=gpu)
    assert env == {"RANK": str(8 + local), "WORLD_SIZE": "16", "LOCAL_RANK": want}
    assert int(env["LOCAL_RANK"]) < visible  # never an invalid device ordinal
    # no CUDA (CPU ranks): the launcher's local rank, as before
    assert distributed.launch_environment(3, 4, 3, None)["LOCAL_RANK"] == "3"


@pytest.mark.parametrize("preset", [None, "1"])
def test_init_under_gpu_per_task_binding_sets_cuda0_and_exports_it(monkeypatch, preset):
    """distributed.init() inside an srun step whose tasks each see one GPU: the device set and the LOCAL_RANK
    exported agree (cuda:0 on every task), whatever SLURM_LOCALID says. NCCL's watchdog is told to abort the
    communicators and leave the process to our exit-1 path, unless the user chose otherwise."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # the group itself is not under test
    saved = dict(os.environ)  # init() exports variables; every one must be gone again after this test
    try:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                  "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
            os.environ.pop(k, None)
        if preset:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = preset
        os.environ.update(SLURM_STEP_ID="0", SLURM_PROCID="7", SLURM_NTASKS="8", SLURM_LOCALID="7")
        d = distributed.init()
        assert (d.rank, d.world, d.local_rank) == (7, 8, 7)
        assert chosen == [0] and os.environ["LOCAL_RANK"] == "0" and os.environ["RANK"] == "7"
        assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == (preset or "2")
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ---------------------------------------------------------------------------------------------------------------
# vLLM beside the trainer's models
# ---------------------------------------------------------------------------------------------------------------
def test_vllm_memory_fraction_is_what_is_free_and_refuses_what_does_not_fit():
    gib = 2**30
    # an 80 GB GPU with 30 GiB free after the teacher and the student are placed: vLLM's default 0.92 would refuse
    frac = vllm_rollout.memory_fraction(30 * gib, 80 * gib, need=8 * gib)
    assert frac <= 30 / 80 and frac == pytest.approx(30 * 0.98 / 80, abs=1e-3)
    assert frac * 80 * gib >= 8 * gib
    # vLLM's own start-up check (utils.request_memory): free >= ceil(total x fraction)
    assert 30 * gib >= np.ceil(80 * gib * frac)
    with pytest.raises(ValueError, match="lower rollout.vllm_kv_cache_mb.*rollout.engine=hf"):
        vllm_rollout.memory_fraction(6 * gib, 80 * gib, need=8 * gib, who="student_rank0")


def test_sleep_level_keeps_the_teacher_and_drops_the_student(monkeypatch):
    cfg = C.Config()
    assert vllm_rollout.sleep_level("student", cfg) == 0  # CPUs: no sleep mode
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert vllm_rollout.sleep_level("teacher", cfg) == 1 and vllm_rollout.sleep_level("student", cfg) == 2
    cfg.rollout.vllm_sleep = False
    assert vllm_rollout.sleep_level("student", cfg) == 0


def test_a_vllm_start_leaves_the_trainers_random_generators_as_they_were():
    """vLLM seeds torch, numpy and random in the process it runs in (its set_random_seed); our engine runs inside
    the trainer, whose generators must go on as if no engine had started."""
    def seeded():
        torch.manual_seed(123)
        random.seed(5)
        np.random.seed(6)

    seeded()
    want = (torch.rand(3), random.random(), np.random.rand())
    seeded()
    with vllm_rollout._rng_kept():
        torch.manual_seed(0)  # what vLLM's set_random_seed does
        random.seed(0)
        np.random.seed(0)
        torch.rand(10)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


# ---------------------------------------------------------------------------------------------------------------
# paths in configs
# ---------------------------------------------------------------------------------------------------------------
def test_config_paths_expand_user_and_variables_and_refuse_unset_ones(monkeypatch, tmp_path):
    monkeypatch.setenv("USER", "ada")
    monkeypatch.setenv("HOME", str(tmp_path))
    # built, not loaded: the cluster's model paths do not exist here (validation would refuse them)
    raw = C._build(C.Config, C.read_yaml(CLUSTER), "")
    C.expand_paths(raw)
    assert raw.run_dir == "/scratch/ada/runs/amid_7b_1b"
    assert raw.data.store == "/scratch/ada/stores/fineweb-edu-qwen2.5"
    assert raw.data.files == ["/data/fineweb-edu/sample/*.parquet"]
    assert C.expand_path("~/x/${USER}_y", "run_dir") == f"{tmp_path}/x/ada_y"
    monkeypatch.delenv("USER")
    with pytest.raises(ValueError, match=r"run_dir: .*\$USER, which is not set"):
        C.expand_paths(C._build(C.Config, C.read_yaml(CLUSTER), ""))


def test_an_unset_variable_in_a_path_stops_the_launch_with_exit_2(tmp_path, monkeypatch):
    """A real launch (its own process: pipeline.train installs signal handlers that a later fork in this test worker
    would inherit)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_TEST_UNSET"}
    p = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "pipeline/configs/debug_cpu.yaml",
                        "--run_dir=$PIPELINE_TEST_UNSET/run"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "$PIPELINE_TEST_UNSET, which is not set" in p.stderr
    assert not os.path.exists("$PIPELINE_TEST_UNSET")
    monkeypatch.setenv("PIPELINE_TEST_SET", str(tmp_path))
    cfg = C.load_config("pipeline/configs/debug_cpu.yaml", ["--run_dir=${PIPELINE_TEST_SET}/run"])
    assert cfg.run_dir == f"{tmp_path}/run"


# ---------------------------------------------------------------------------------------------------------------
# the eval job on the cluster configs' data kinds
# ---------------------------------------------------------------------------------------------------------------
def _tiny_pair(tmp_path):
    """A tiny student checkpoint on disk and the config overrides that swap the cluster configs' models for tiny
    random ones (the tokenizer: the tiny one, with a chat template for the messages column)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained("pipeline/configs/assets/tiny_tokenizer")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tmp_path / "tok")
    conf = dict(TINY)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(AutoConfig.for_model(conf.pop("model_type"), **conf))
    student.save_pretrained(tmp_path / "student")
    return tmp_path / "student", [
        "--model.teacher_path=null", "--model.student_path=null", f"--model.tokenizer_path={tmp_path / 'tok'}",
        f"--model.teacher_config={json.dumps(dict(TINY, num_hidden_layers=2))}",
        f"--model.student_config={json.dumps(TINY)}", "--model.dtype=float32", f"--run_dir={tmp_path}/run",
        "--parallel.backend=fsdp2", "--loss.compile=false"]


def _evaluate(argv: list[str]) -> tuple[int, int, str]:
    """pipeline.evaluate.main(argv) in a process of its own (it reads parquet and tokenises: threads that a later
    fork() in this test worker must not inherit): (exit code, documents tokenised, stderr)."""
    import subprocess
    import sys
    code = ("import json, sys\nfrom pipeline import evaluate\nn = [0]\nreal = evaluate.data.text_cell\n"
            "def counted(*a):\n    n[0] += 1\n    return real(*a)\nevaluate.data.text_cell = counted\n"
            "rc = evaluate.main(json.loads(sys.argv[1]))\nprint(json.dumps([rc, n[0]]))\n")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, timeout=300)
    rc, documents = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else (p.returncode, -1)
    return rc, documents, p.stderr


def test_eval_job_on_the_pretraining_cluster_config_reads_a_bounded_sample(tmp_path):
    """The text job without data.eval_files, as the cluster config ships: a stand-in corpus of parquet files with
    its `text` column. Only the blocks evaluated are tokenised (from the last training file), not the corpus."""
    student, over = _tiny_pair(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = open("pipeline/configs/assets/tiny_corpus.txt").read().split()
    for i in range(3):
        pd.DataFrame({"text": [" ".join(words[j:j + 120]) for j in range(i * 40, i * 40 + 200 * 40, 40)]}
                     ).to_parquet(corpus / f"part{i}.parquet")
    out = tmp_path / "eval.json"
    rc, documents, err = _evaluate(["--checkpoint", str(student), "--config", CLUSTER, "--out", str(out), "--blocks",
                                    "3", *over, f"--data.files=[{corpus}/*.parquet]", "--data.store=null",
                                    "--data.seq_len=64"])
    assert rc == 0, err[-3000:]
    res = json.loads(out.read_text())
    assert res["data_kind"] == "text" and res["sequences"] == 3 and res["tokens"] == 3 * 63
    assert "part2.parquet" in res["held_out"] and res["kl_to_teacher"] > 0 and res["perplexity"] > 1
    assert 0 < documents < 20, documents  # a few documents of the 600, not the corpus


def test_eval_job_on_the_onpolicy_cluster_config_scores_response_tokens_of_its_chat_data(tmp_path):
    """The chat job (messages column, no `text` column: this used to exit 2), with its data.eval_files."""
    student, over = _tiny_pair(tmp_path)
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"it is {2 * i}, the sum of {i} and {i}."}]}
            for i in range(30)]
    pd.DataFrame(rows).to_parquet(tmp_path / "test_sft.parquet")
    out = tmp_path / "eval.json"
    rc, _, err = _evaluate(["--checkpoint", str(student), "--config", CLUSTER_ONPOLICY, "--out", str(out),
                            "--blocks", "5", *over, f"--data.files=[{tmp_path}/test_sft.parquet]", "--data.store=null",
                            f"--data.eval_files=[{tmp_path}/test_sft.parquet]", "--data.seq_len=64",
                            "--data.max_prompt_len=24", "--rollout.max_new_tokens=32"])
    assert rc == 0, err[-3000:]
    res = json.loads(out.read_text())
    assert res["data_kind"] == "chat" and res["sequences"] == 5 and res["held_out"] == "data.eval_files"
    # response tokens only: each answer is shorter than its prompt + answer
    assert 5 <= res["tokens"] < 5 * 40
    assert res["kl_to_teacher"] > 0 and res["kl_student_to_teacher"] > 0 and 0 <= res["top1_agreement"] <= 1


def test_heldout_metrics_in_chunks_equal_full_logits_in_float64():
    """The eval job's chunked metrics against full-vocabulary logits computed in float64, on a padded batch."""
    from transformers import AutoConfig, AutoModelForCausalLM
    conf = dict(TINY)
    hf = AutoConfig.for_model(conf.pop("model_type"), **conf)
    torch.manual_seed(0)
    s, t = AutoModelForCausalLM.from_config(hf).eval(), AutoModelForCausalLM.from_config(hf).eval()
    batch = evaluate.data.collate([[5, 6, 7], [8, 9]], [[20, 21, 22, 23], [30, 31]], pad_id=0)
    got = evaluate.heldout_metrics(s, t, batch, batch_size=1, chunk_tokens=2)
    with torch.no_grad():
        zs = s(input_ids=batch.tokens[:, :-1], attention_mask=batch.attention_mask[:, :-1]).logits.double()
        zt = t(input_ids=batch.tokens[:, :-1], attention_mask=batch.attention_mask[:, :-1]).logits.double()
    m = batch.loss_mask.bool()
    p, q = zt[m].softmax(-1), zs[m].softmax(-1)
    targets = batch.tokens[:, 1:][m]
    assert got["tokens"] == int(m.sum()) == 6
    assert got["kl_to_teacher"] == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), rel=1e-5)
    assert got["kl_student_to_teacher"] == pytest.approx(float((q * (q.log() - p.log())).sum(-1).mean()), rel=1e-5)
    assert got["perplexity"] == pytest.approx(float((-q.log()[torch.arange(6), targets]).mean().exp()), rel=1e-5)
    assert got["student_entropy"] == pytest.approx(float(-(q * q.log()).sum(-1).mean()), rel=1e-5)
    assert got["top1_agreement"] == float((p.argmax(-1) == q.argmax(-1)).double().mean())


def test_eval_refuses_a_large_teacher_on_cpus_unless_asked(monkeypatch):
    cfg = C.Config()
    cfg.model.teacher_config = dict(TINY, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=16, num_key_value_heads=4, vocab_size=151936)
    monkeypatch.delenv("PIPELINE_ALLOW_CPU", raising=False)
    with pytest.raises(ValueError, match=r"teacher has 1\.\dB parameters.*--gpus=1"):
        evaluate.check_device(cfg)
    evaluate.check_device(cfg, {"PIPELINE_ALLOW_CPU": "1"})
    cfg.model.teacher_config = dict(TINY)
    evaluate.check_device(cfg)  # a small teacher evaluates on CPUs


# ---------------------------------------------------------------------------------------------------------------
# device-dependent defaults and state
# ---------------------------------------------------------------------------------------------------------------
def test_loss_matmul_precision_auto_by_device_and_dtype():
    assert C.matmul_precision("auto", cuda=False, dtype="bfloat16") == "highest"  # CPUs: no TF32, bf16 gains little
    assert C.matmul_precision("auto", cuda=True, dtype="bfloat16") == "bf16"
    assert C.matmul_precision("auto", cuda=True, dtype="float32") == "high"
    assert C.matmul_precision("highest", cuda=True, dtype="bfloat16") == "highest"  # asked for: kept
    cfg = C.load_config("pipeline/configs/debug_cpu.yaml")
    assert cfg.loss.matmul_precision == "auto"
    C.resolve_for_device(cfg, cuda=False)
    assert cfg.loss.matmul_precision == "highest"  # what a CPU run records (and always recorded)


def test_rng_state_holds_this_ranks_gpu_only(monkeypatch):
    """A checkpoint written with eight visible GPUs resumes where each task sees one, and the reverse."""
    from pipeline.run.checkpoint import RngState
    mine, other, restored = torch.tensor([7], dtype=torch.uint8), torch.tensor([9], dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: mine)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every visible GPU's state saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    state = RngState().state_dict()
    assert state["cuda"] is mine
    RngState().load_state_dict(state)
    RngState().load_state_dict(dict(state, cuda=[other, mine]))  # one state per visible GPU: this rank's (1)
    assert restored == [mine, mine]


# ---------------------------------------------------------------------------------------------------------------
# make gpu-check: its parts on CPUs
# ---------------------------------------------------------------------------------------------------------------
def test_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_2():
    import subprocess
    import sys
    p = subprocess.run(["bash", "bench/gpu_check.sh"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHON=sys.executable))
    assert p.returncode == 2, p
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1 and "no GPU visible here" in p.stderr


def test_gpu_check_parts_run_on_cpus_and_report_one_json(tmp_path):
    """The loss check (fused against float64 full logits), an instrumented training run and the report, at small
    sizes: what the script runs on the GPU."""
    import subprocess
    import sys
    from bench import gpu_check
    rows = gpu_check.loss_check(vocab=300, hs=16, ht=24, tokens=[64], check_tokens=32, device="cpu", chunk=40)
    checks = [r for r in rows if "check" in r]
    # near-equal random distributions: AMiD's alpha-mixture value cancels in fp32 (1 - a sum of powers), hence its
    # looser bound on the value; the gradients are what training uses
    assert len(checks) == 6 and all(r["loss_abs_err"] < (1e-5 if r["check"] == "amid" else 1e-6) for r in checks)
    assert all(max(r["grad_rel_err"]) < 1e-4 for r in checks if r["precision"] != "bf16")
    assert all(max(r["grad_rel_err"]) < 2e-2 for r in checks)  # bf16 operands
    assert [r["tokens"] for r in rows if "seconds" in r] == [64] * 4
    out = str(tmp_path)
    for name in ("cpu_fsdp2_fp32", "fsdp2_fp32"):  # in a process of its own, as the script runs it (a training run
        # leaves threads behind, and a later fork() in this test worker could inherit their locks)
        p = subprocess.run([sys.executable, "bench/gpu_check.py", "train", name, "--out", out, "--", "--config",
                            "pipeline/configs/debug_cpu.yaml", f"--run_dir={out}/{name}", "--parallel.backend=none",
                            "--train.steps=3", "--logging.progress=false", "--checkpoint.every=0",
                            "--checkpoint.export=false"], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, DS_ACCELERATOR="cpu"))
        assert p.returncode == 0, p.stderr[-3000:]
    json.dump(gpu_check.facts(), open(f"{out}/facts.json", "w"))
    result = gpu_check.report(out)
    assert json.load(open(f"{out}/gpu_check.json"))["summary"] == result["summary"]
    assert result["fp32_max_rel_loss_diff_vs_cpu"] == {"ds_fp32": None, "fsdp2_fp32": 0.0}
    assert [s["step"] for s in result["runs"]["fsdp2_fp32"]["steps"]] == [0, 1, 2]
    assert result["summary"]["fsdp2_fp32"]["syncs_per_step"] == 0  # nothing synchronises on CPUs
    assert not result["ok"]  # the DeepSpeed run is missing


def _offload_worker(rank, world, tmp):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    from pipeline.models import build as M
    from pipeline.parallel.distributed import make_layout
    from pipeline.parallel.backends import parallelize
    cfg = C.load_config("pipeline/configs/debug_cpu.yaml", [
        "--parallel.ds_student_config=ds_configs/zero3_student_offload.json",
        "--parallel.ds_teacher_config=ds_configs/zero3_teacher_offload.json", f"--run_dir={tmp}/run",
        "--train.grad_accum=1", "--parallel.teacher=shard"])
    student, teacher, vocab = M.build_models(cfg, M.load_tokenizer(cfg))
    models = parallelize(student, teacher, vocab, cfg, make_layout())
    before = [p.ds_tensor.clone() for p in models.student.parameters()]
    ids = torch.randint(0, 512, (2, 8))
    models.backward(models.student_hidden(ids, torch.ones_like(ids)).float().pow(2).mean())
    norm, skipped = models.step(False)
    assert not skipped and norm > 0
    assert any(not torch.equal(a, p.ds_tensor) for a, p in zip(before, models.student.parameters()))


def test_the_zero_offload_configs_train_with_the_pipelines_adamw(tmp_path):
    """ds_configs/*_offload.json: DeepSpeed refuses a client optimizer with ZeRO-Offload by default."""
    from tests.dist_utils import run_workers
    run_workers(_offload_worker, 2, str(tmp_path), timeout=240)


# ---------------------------------------------------------------------------------------------------------------
# durability on shared file systems
# ---------------------------------------------------------------------------------------------------------------
class _Body:
    """The two members of the Models interface checkpoint.save uses, writing one file per rank as the backends do."""

    def local_state_is_finite(self):
        return torch.tensor(True)

    def save(self, path):
        torch.save({"w": torch.ones(3)}, os.path.join(path, f"body{torch.distributed.get_rank()}.pt"))


def _syncfs_worker(rank, world, tmp):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    from pipeline.run import checkpoint
    flushed = []
    real = checkpoint._syncfs
    checkpoint._syncfs = lambda path: flushed.append(sorted(os.listdir(path))) or real(path)
    ctx = distributed.init(require_group=True)
    final = checkpoint.save(tmp, 4, _Body(), {}, ctx, keep_last=2, config={}, fingerprint="f")
    # this rank flushed its own node's writes before any rank hashed them, and before the checkpoint was complete
    assert len(flushed) == 1 and {f"body{rank}.pt", f"rank{rank}.pt"} <= set(flushed[0]), flushed
    assert checkpoint.MARKER not in flushed[0] and checkpoint.MANIFEST not in flushed[0]
    assert checkpoint.verify(final, ctx) == []


def test_every_rank_flushes_the_files_it_wrote_before_they_are_hashed(tmp_path):
    """On Lustre or NFS the rank that hashes and fsyncs a file may be on another node than its writer, and an fsync
    there does not flush this node's pages: each rank syncs its own file system before the barrier."""
    from tests.dist_utils import run_workers
    run_workers(_syncfs_worker, 2, str(tmp_path), timeout=120)


def test_a_kv_cache_too_small_says_raise_it_and_out_of_memory_says_lower_it():
    # vLLM's own words (v1/core/kv_cache_utils.py), wrapped as its engine core wraps them
    inner = ValueError("To serve at least one request with the model's max seq len (4096), (0.56 GiB KV cache is "
                       "needed, which is larger than the available KV cache memory (0.25 GiB). Try increasing "
                       "`gpu_memory_utilization`")
    try:
        try:
            raise inner
        except ValueError as e:
            raise RuntimeError("Engine core initialization failed. See root cause above.") from e
    except RuntimeError as wrapped:
        msg = vllm_rollout.start_failure(wrapped, 256, 4096)
    assert "raise rollout.vllm_kv_cache_mb to at least 574" in msg and "lower rollout.vllm" not in msg
    assert "data.seq_len (4096)" in msg and "gpu_memory_utilization" not in msg.split("(")[0]
    oom = vllm_rollout.start_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), 256, 4096)
    assert "lower rollout.vllm_kv_cache_mb (256)" in oom and "out of memory" in oom
