"""The 2-D layout (replicas x shard groups) in real 4-process runs: 2 groups of 2 ranks for DeepSpeed (ZeRO-3 + hpZ)
and FSDP2 (HSDP) against the one-process reference; every teacher placement gives the same losses; activation
checkpointing the same gradients; exact resume across placements. Plus the hot path's host reads (a fixed number per
step, whatever the micro-batches and chunks) and the loss matmul precisions against float64."""
from __future__ import annotations

import torch
import pytest

from tests.test_train import launch, losses

# 8 steps, 4 ranks x 1 sequence x 2 micro-batches = the reference's 4 sequences x 2
STEPS = ["--train.steps=8", "--checkpoint.every=4"]
LAYOUT = ["--parallel.shard_group_size=2", "--train.micro_batch_size=1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    launch(d, 1, "none", "--train.micro_batch_size=4", *STEPS)
    return d


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp2"])
def test_two_groups_of_two_match_the_reference_for_every_teacher_placement_and_resume_exactly(
        backend, reference, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    launch(full, 4, backend, *LAYOUT, *STEPS, "--parallel.teacher=shard")
    ref, got = losses(reference), losses(full)
    assert sorted(got) == list(range(1, 9))
    for s in range(1, 9):  # sharded in groups = unsharded, up to float reassociation
        assert float(got[s]) == pytest.approx(float(ref[s]), rel=1e-4), (backend, s)
    # the teacher sharded in the group, then replicated on resume (a safe change), with activation checkpointing:
    # the same losses as the teacher sharded over every rank, and the resumed half bitwise equal to the full run
    launch(part, 4, backend, *LAYOUT, *STEPS, "--parallel.teacher=shard_group", "--train.stop_after=4",
           "--train.activation_checkpointing=true")
    launch(part, 4, backend, *LAYOUT, *STEPS, "--parallel.teacher=replicate", "--train.activation_checkpointing=true")
    resumed = losses(part)
    for s in range(1, 9):
        assert float(resumed[s]) == pytest.approx(float(got[s]), rel=1e-6), (backend, s)
    assert [resumed[s] for s in range(5, 9)] == [got[s] for s in range(5, 9)], "resume is bitwise"
    log = (part / "history.jsonl").read_text()
    assert "parallel.teacher" in log  # the placement change is recorded as a safe change


def test_activation_checkpointing_gives_the_same_gradients():
    from pipeline import config as C
    from pipeline.models import build as M
    from pipeline.parallel.distributed import Layout
    from pipeline.parallel.backends import parallelize
    grads = []
    for ac in (False, True):
        cfg = C.load_config("pipeline/configs/debug_cpu.yaml", ["--parallel.backend=none",
                                                                  f"--train.activation_checkpointing={ac}"])
        student = M.build_model(None, cfg.model.student_config, "float32", 0).train()
        teacher = M.build_model(None, cfg.model.teacher_config, "float32", 1).eval().requires_grad_(False)
        models = parallelize(student, teacher, 512, cfg, Layout(1, 1, 0, 0))
        assert models.student.is_gradient_checkpointing == ac
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
        models.student_hidden(ids, None).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in models.student.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7, msg=name)


def _steps_syncs(tmp_path, *overrides):
    """Host reads of each of 3 training steps (one process, the real Run and train_step)."""
    from pipeline import config as C, train
    from pipeline.parallel import distributed
    cfg = C.load_config("pipeline/configs/debug_cpu.yaml", [
        f"--run_dir={tmp_path}", "--parallel.backend=none", "--data.seq_len=32", "--data.max_documents=12",
        "--logging.tensorboard=false", "--logging.progress=false", "--train.micro_batch_size=2", *overrides])
    run = train.Run(cfg, distributed.Dist(0, 1, 0, None))
    counts = []
    for _ in range(3):
        with distributed.SyncCounter() as counter:
            train.train_step(run, stats_wanted=True)
        counts.append(counter.count)
    return counts


def test_host_reads_per_step_do_not_grow_with_micro_batches_or_chunks(tmp_path):
    few = _steps_syncs(tmp_path / "a", "--train.grad_accum=1", "--loss.chunk_size=256")
    many = _steps_syncs(tmp_path / "b", "--train.grad_accum=3", "--loss.chunk_size=8")
    assert few == many, (few, many)
    assert max(few) <= 4, few


def test_the_sync_counter_counts_scalar_reads():
    from pipeline.parallel import distributed
    x = torch.ones(3)
    with distributed.SyncCounter() as c:
        float(x.sum())
        torch.nonzero(x)
        x.add_(1)  # no read
        with distributed.host_data():
            int(x.sum())  # host-side data: not counted
    assert c.count == 2


def _precision_problem(seed=0, n=96, h=64, v=700):
    g = torch.Generator().manual_seed(seed)
    hs, ht = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(n, h, generator=g, dtype=torch.float64)
    ws, wt = 0.3 * torch.randn(v, h, generator=g, dtype=torch.float64), 0.3 * torch.randn(v, h, generator=g,
                                                                                          dtype=torch.float64)
    return hs, ht, ws, wt


def precision_errors(precision: str, method: str = "amid") -> tuple[float, float]:
    """(relative error of the loss, of the hidden-state gradient) against float64, for loss.matmul_precision."""
    from pipeline.loss import divergences as L, vocab_parallel as VP
    hs, ht, ws, wt = _precision_problem()
    fn = L.make_loss(method)
    n = hs.shape[0]
    out = {}
    for dtype, prec in ((torch.float64, "highest"), (torch.float32, precision)):
        h = hs.to(dtype).detach().clone().requires_grad_(True)
        loss = VP.fused_linear_loss(fn, h, ht.to(dtype), ws.to(dtype), wt.to(dtype), chunk_size=32,
                                    token_weight=torch.full((n,), 1.0 / n, dtype=dtype), precision=prec)
        loss.backward()
        out[dtype] = (loss.detach().double(), h.grad.double())
    (l64, g64), (l32, g32) = out[torch.float64], out[torch.float32]
    return float(abs(l32 - l64) / abs(l64)), float((g32 - g64).norm() / g64.norm())


def test_matmul_precisions_against_float64():
    highest, high, bf16 = (precision_errors(p) for p in ("highest", "high", "bf16"))
    assert max(highest) < 1e-5 and max(high) < 1e-5  # CPUs have no TF32: high is fp32 here
    assert max(bf16) < 3e-2  # bf16 operands (8 bits of mantissa), fp32 accumulation
    assert bf16[0] > 10 * highest[0]  # the option changes the operands


# ----------------------------------------------------------------------------------------------------------------
# launch details that decide a first GPU cluster run (checked with fake environments)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env,world,want", [
    ({"LOCAL_WORLD_SIZE": "8"}, 32, (8, "LOCAL_WORLD_SIZE")),
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "4(x8)"}, 32, (4, "SLURM_STEP_TASKS_PER_NODE")),
    ({"SLURM_TASKS_PER_NODE": "4(x8)"}, 32, (32, "one group")),  # outside an srun step: not a launcher
    ({"LOCAL_WORLD_SIZE": "3"}, 8, (8, "does not divide")),
    ({}, 4, (4, "one group")),
])
def test_the_default_shard_group_is_a_node(env, world, want):
    from pipeline.parallel.distributed import shard_size_for
    size, why = shard_size_for(world, None, env)
    assert size == want[0] and want[1] in why, (size, why)
    assert shard_size_for(world, 2, env)[0] == 2
    with pytest.raises(ValueError, match="must divide"):
        shard_size_for(12, 5, env)


def test_gpu_choice_with_one_gpu_per_task_and_with_all_visible():
    from pipeline.parallel.distributed import local_device
    assert local_device(3, 1) == 0  # srun --gpus-per-task: CUDA_VISIBLE_DEVICES holds this task's GPU only
    assert local_device(3, 8) == 3
    with pytest.raises(ValueError, match="one GPU per task"):
        local_device(5, 4)


def test_a_gpu_node_with_a_cpu_only_torch_is_refused(monkeypatch):
    from pipeline.parallel.distributed import check_gpu_build
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="install the CUDA build"):
        check_gpu_build({"CUDA_VISIBLE_DEVICES": "0,1"})
    with pytest.raises(ValueError, match="PIPELINE_ALLOW_CPU"):
        check_gpu_build({"SLURM_JOB_GPUS": "0"})
    check_gpu_build({"CUDA_VISIBLE_DEVICES": "0", "PIPELINE_ALLOW_CPU": "1"})  # said explicitly: allowed
    check_gpu_build({"CUDA_VISIBLE_DEVICES": ""})  # no GPU: fine (unless /dev/nvidia0 exists here, which it does not)


def test_teacher_placement_auto_replicates_what_fits():
    from pipeline.parallel.distributed import Layout
    from pipeline.parallel.backends import teacher_placement
    lay = Layout(8, 4, 0, 0)
    gib = 2**30
    assert teacher_placement("auto", 14 * gib, lay, 0.25, memory=80 * gib)[0] == "replicate"  # 7B bf16 on 80 GB
    placement, why = teacher_placement("auto", 28 * gib, lay, 0.25, memory=80 * gib)
    assert placement == "shard_group" and "28.00 GiB" in why and "35.0%" in why
    assert teacher_placement("shard", 1, lay, 0.25, memory=80 * gib) == ("shard", "parallel.teacher")


def test_chunk_rows_fit_the_budget():
    from pipeline.loss.vocab_parallel import chunk_rows
    rows = chunk_rows(256, 152064 // 8)
    assert rows % 64 == 0 and 8 * 4 * rows * (152064 // 8) <= 256 * 2**20
    assert chunk_rows(1, 10**6) == 64  # never below one useful chunk


def test_plan_prints_memory_and_time_and_the_layout_changes_them(capsys, monkeypatch):
    from pipeline import plan
    monkeypatch.setenv("USER", "ada")  # the cluster config's paths name $USER (CI's environment may lack it)
    shapes = ["--model.teacher_path=pipeline/configs/assets/shapes/qwen2.5-7b-instruct",
              "--model.student_path=pipeline/configs/assets/shapes/qwen2.5-1.5b", "--train.global_batch_size=null"]
    assert plan.main(["--config", "pipeline/configs/cluster_7b_to_1b.yaml", "--nodes", "4", "--gpus-per-node", "8",
                      *shapes]) == 0
    table = capsys.readouterr().out
    assert "4 replica group(s) x 8" in table and "memory per GPU" in table and "inter-node" in table
    import json
    rows = {}
    for nodes, extra in ((4, []), (32, []), (32, ["--parallel.shard_group_size=256", "--parallel.teacher=shard"])):
        assert plan.main(["--config", "pipeline/configs/cluster_7b_to_1b.yaml", "--nodes", str(nodes),
                          "--gpus-per-node", "8", "--json", *shapes, *extra]) == 0
        rows[(nodes, bool(extra))] = json.loads(capsys.readouterr().out)
    per_gpu = {k: sum(v["memory_gib"].values()) for k, v in rows.items()}
    assert per_gpu[(32, False)] <= per_gpu[(4, False)] * 1.01  # groups of a node: flat in the world size
    assert rows[(32, True)]["loss_bytes_per_rank"] > 20 * rows[(32, False)]["loss_bytes_per_rank"]  # one group: not
    assert plan.main(["--config", "pipeline/configs/cluster_7b_to_1b.yaml", "--nodes", "3", "--gpus-per-node", "8",
                      *shapes, "--parallel.shard_group_size=5"]) == 2  # a group size that does not divide 24


def test_plan_prices_long_sequences(capsys, monkeypatch):
    """--seq-lens: one sequence per micro-batch at each length; memory grows linearly with the length (activations,
    one recomputed layer, the teacher's layer, the loss's gathered states: no T^2 term with flash attention), with
    checkpointing 32k fits an H100 where without it the activations do not; attention's T^2 FLOPs lower tokens/s."""
    import re
    from pipeline import plan
    monkeypatch.setenv("USER", "ada")
    base = ["--config", "pipeline/configs/cluster_7b_to_1b.yaml", "--nodes", "4", "--gpus-per-node", "8",
            "--model.teacher_path=pipeline/configs/assets/shapes/qwen2.5-7b-instruct",
            "--model.student_path=pipeline/configs/assets/shapes/qwen2.5-1.5b", "--train.global_batch_size=null",
            "--seq-lens", "8192,16384,32768"]

    def table(*extra):
        assert plan.main([*base, *extra]) == 0
        rows = re.findall(r"^\s+([\d,]+)\s+([\d.]+)\s+(yes|NO)\s+([\d,]+)", capsys.readouterr().out, re.M)
        return [(int(n.replace(",", "")), float(g), f, int(t.replace(",", ""))) for n, g, f, t in rows]

    on, off = table("--train.activation_checkpointing=true"), table("--train.activation_checkpointing=false")
    assert [r[0] for r in on] == [8192, 16384, 32768]
    steps = [on[i + 1][1] - on[i][1] for i in range(2)]
    assert steps[1] == pytest.approx(2 * steps[0], rel=0.02)  # linear: doubling the length doubles the growth
    assert [r[2] for r in on] == ["yes"] * 3 and off[-1][2] == "NO"
    assert on[2][3] < on[1][3]  # tokens/s at 32k below 16k: attention's quadratic FLOPs


def test_plan_counts_the_vllm_engines_the_tied_table_and_the_runtime(capsys, monkeypatch):
    """The on-policy cluster job: one awake vLLM engine per generating model (weights, KV cache, overhead: what
    vllm_rollout checks at start), less what sleep mode lets it reuse; the tied 1.5B student's gathered fp32 table
    and its gradient; the CUDA context and NCCL's buffers."""
    import json
    from pipeline import plan
    from pipeline.rollout.vllm import engine_bytes
    monkeypatch.setenv("USER", "ada")
    base = ["--config", "pipeline/configs/cluster_7b_to_1b_onpolicy.yaml", "--nodes", "4", "--gpus-per-node", "8",
            "--json", "--model.teacher_path=pipeline/configs/assets/shapes/qwen2.5-7b-instruct",
            "--model.student_path=pipeline/configs/assets/shapes/qwen2.5-1.5b", "--train.global_batch_size=null",
            "--rollout.schedule=fixed", "--rollout.student_fraction=0.5", "--rollout.teacher_fraction=0.25"]

    def memory(*extra):
        assert plan.main([*base, *extra]) == 0
        return json.loads(capsys.readouterr().out)["memory"]

    awake, asleep, hf = (memory("--rollout.vllm_sleep=false"), memory("--rollout.vllm_sleep=true"),
                         memory("--rollout.engine=hf"))
    from pipeline import config as C
    from pipeline.plan import shapes
    cfg = C.load_config(base[1], base[7:], data_files=False)
    s, t = shapes(cfg.model, "student"), shapes(cfg.model, "teacher")
    both = sum(engine_bytes(m.params, cfg.model.dtype, cfg.rollout.vllm_kv_cache_mb) for m in (s, t))
    assert awake["vLLM engines (always awake)"] == both and "rollout replica (gather once)" not in awake
    assert 0 <= asleep["vLLM engines (awake, beyond released training buffers)"] < both
    assert hf["rollout replica (gather once)"] == s.params * 2 and not any("vLLM" in k for k in hf)
    assert s.tied and awake["tied embedding: gathered table + gradient"] == 2 * s.head * 4
    assert awake["CUDA context + NCCL buffers (assumed)"] == 1.5 * 2**30


def _fsdp_bf16_worker(rank, world):
    from pipeline import config as C
    from pipeline.models import build as M
    from pipeline.parallel.distributed import make_layout
    from pipeline.parallel.backends import parallelize
    cfg = C.load_config("pipeline/configs/debug_cpu.yaml", ["--parallel.backend=fsdp2", "--model.dtype=bfloat16"])
    student = M.build_model(None, cfg.model.student_config, "bfloat16", 0).train()
    teacher = M.build_model(None, cfg.model.teacher_config, "bfloat16", 1).eval().requires_grad_(False)
    models = parallelize(student, teacher, 512, cfg, make_layout(world))
    assert {p.to_local().dtype for p in models.student.parameters()} == {torch.float32}  # masters
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    h = models.student_hidden(ids, None)
    assert h.dtype == torch.bfloat16  # bf16 compute
    h.float().pow(2).mean().backward()
    models.grad_norm()
    models.step(False)
    states = [s["exp_avg"].to_local().dtype for s in models.optimizer.state.values()]
    assert states and set(states) == {torch.float32}  # AdamW state in fp32


def test_fsdp2_in_bf16_keeps_fp32_master_weights():
    from tests.dist_utils import run_workers
    run_workers(_fsdp_bf16_worker, 2)


# ----------------------------------------------------------------------------------------------------------------
# tied students: one matrix for the input embedding and the output layer
# ----------------------------------------------------------------------------------------------------------------
TIED = "{model_type: llama, vocab_size: 512, hidden_size: 48, intermediate_size: 96, num_hidden_layers: 2, " \
       "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256, tie_word_embeddings: true}"


def _tied_case(rank, world, backend):
    """Each rank's share of one forward-KL batch through the pipeline's pieces (parallelize, the fused loss, the
    heads' replica reduction) against a plain HF model whose lm_head IS its embedding, trained by hand: the loss, the
    tied matrix's gradient (both uses summed) and a body gradient."""
    from pipeline import config as C
    from pipeline.models import build as M
    from pipeline.loss import divergences as L
    from pipeline.parallel.distributed import make_layout
    from pipeline.parallel.backends import TiedEmbedding, parallelize
    from pipeline.loss.vocab_parallel import fused_linear_loss
    if world > 1:  # a spawned worker: what a launcher sets (DeepSpeed asks); never in the pytest process itself
        import os
        os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    cfg = C.load_config("pipeline/configs/debug_cpu.yaml", [f"--parallel.backend={backend}",
                                                              f"--model.student_config={TIED}",
                                                              "--optim.grad_clip=1e-3"])  # so that it clips
    student = M.build_model(None, cfg.model.student_config, "float32", 0).train()
    reference = M.build_model(None, cfg.model.student_config, "float32", 0).train()
    teacher = M.build_model(None, cfg.model.teacher_config, "float32", 1).eval().requires_grad_(False)
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    ids = torch.randint(0, 512, (2 * world, 12), generator=torch.Generator().manual_seed(0))
    # the reference: the whole batch, full logits, one process
    zs = reference(ids[:, :-1]).logits
    with torch.no_grad():
        zt = teacher(ids[:, :-1]).logits
    ref_loss = L.make_loss("fkl")(zs, zt).mean()
    ref_loss.backward()
    # the pipeline: this rank's rows of the batch, the tied matrix split by vocabulary rows
    layout = make_layout(None)
    models = parallelize(student, teacher, 512, cfg, layout)
    assert isinstance(models.student.get_input_embeddings() if backend == "none" else
                      student.get_input_embeddings(), TiedEmbedding)
    mine = ids[rank * 2:(rank + 1) * 2, :-1]
    hs, ht = models.student_hidden(mine, None), models.teacher_hidden(mine, None)
    n = hs.shape[0] * hs.shape[1]
    heads = models.heads
    loss = fused_linear_loss(L.make_loss("fkl"), hs.reshape(n, -1), ht.reshape(n, -1), heads.student, heads.teacher,
                             token_weight=torch.full((n,), 1.0 / (n * world)), group=layout.shard_group,
                             vocab_start=heads.start)
    models.backward(loss * world)
    head_sq = heads.local_grad_sq()  # the replicas' sum and the loss scale, as the training step does
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    want = reference.model.embed_tokens.weight.grad[heads.start:heads.end]
    torch.testing.assert_close(heads.student.grad, want, rtol=1e-4, atol=1e-7)
    if backend == "none":
        torch.testing.assert_close(student.model.norm.weight.grad, reference.model.norm.weight.grad, rtol=1e-4,
                                   atol=1e-7)
    # one clipping norm over body and output layer (optim.clip_scope global), inside each backend's own step:
    # the body gradient its AdamW applies is the body's, scaled by grad_clip / the norm over both
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(head_sq)
    opt = models.engine.optimizer.optimizer if backend == "deepspeed" else models.optimizer
    applied = torch.zeros(())

    def record(o, *_):
        applied.add_(sum((p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).float().pow(2).sum()
                         for gr in o.param_groups for p in gr["params"] if p.grad is not None))
    opt.register_step_pre_hook(record)
    body = models.grad_norm()
    stepped, skipped = models.step(False, head_sq=head_sq)
    body = float(body) if stepped is None else stepped
    if world > 1:
        dist.all_reduce(applied)  # ZeRO-3 partitions and FSDP2 shards: the ranks' sum is the whole body
    both = (body ** 2 + float(head_sq)) ** 0.5
    assert not skipped and both > 1e-3
    assert float(applied.sqrt()) == pytest.approx(body * 1e-3 / (both + 1e-6), rel=1e-4)


def test_a_tied_student_trains_one_matrix_like_an_hf_tied_model():
    _tied_case(0, 1, "none")


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp2"])
def test_a_tied_student_trains_one_matrix_like_an_hf_tied_model_in_two_processes(backend):
    from tests.dist_utils import run_workers
    run_workers(_tied_case, 2, backend, timeout=240)


def test_the_config_reference_page_is_what_the_code_generates():
    """docs/config.md lists every field of the config tree with its docstring; a field added, renamed or
    re-documented without regenerating the page fails here."""
    from pipeline import config as C, config_reference as R
    assert R.main(["--check"]) == 0, "run: python -m pipeline.config_reference"
    page = open(R.PAGE).read()
    for dotted in C.flatten(C.to_dict(C.Config())):
        if not dotted.startswith(("model.teacher_config.", "model.student_config.", "loss.options.")):
            assert f"| `{dotted}` |" in page, dotted
