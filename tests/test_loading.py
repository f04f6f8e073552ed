"""Rank-local loading (pipeline.loading) against from_pretrained: every parameter and output-layer row a rank holds
after parallelize equals the checkpoint's, for each backend and teacher placement, tied and untied, with a file
dtype other than the model's; under FSDP2 a rank reads only its share of the files. The streamed export of what
was loaded loads back as the same model."""
from __future__ import annotations

import os

import pytest
import torch

from pipeline import config as C
from pipeline.models import loading
from tests.dist_utils import run_workers

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def _checkpoints(tmp, tied_student: bool) -> tuple[str, str, str]:
    """A teacher (untied, stored in bf16, sharded into two files) and a student checkpoint on disk."""
    from transformers import AutoConfig, AutoModelForCausalLM
    out = []
    for name, conf, dtype, shard in (("teacher", dict(BASE, tie_word_embeddings=False, num_hidden_layers=3),
                                      torch.bfloat16, "200KB"),
                                     # a padded vocabulary (520 rows for the tokenizer's 512), as Qwen2.5's
                                     ("student", dict(BASE, tie_word_embeddings=tied_student, hidden_size=32,
                                                      vocab_size=520,
                                                      num_attention_heads=2, num_key_value_heads=1), torch.float32,
                                      "10GB")):
        torch.manual_seed(len(out))
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **conf)).to(dtype)
        path = os.path.join(tmp, name)
        model.save_pretrained(path, max_shard_size=shard)
        out.append(path)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained("pipeline/configs/assets/tiny_tokenizer").save_pretrained(os.path.join(tmp, "tok"))
    return out[0], out[1], os.path.join(tmp, "tok")


def _check_worker(rank, world, backend, teacher_placement, tmp, tied):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    from transformers import AutoModelForCausalLM
    from pipeline.models import build as M
    from pipeline.parallel.distributed import make_layout
    from pipeline.parallel.backends import iter_full_state, parallelize
    teacher_dir, student_dir, tok = (os.path.join(tmp, n) for n in ("teacher", "student", "tok"))
    cfg = C.load_config("pipeline/configs/debug_cpu.yaml", [
        f"--model.teacher_path={teacher_dir}", f"--model.student_path={student_dir}", f"--model.tokenizer_path={tok}",
        "--model.teacher_config=null", "--model.student_config=null", f"--parallel.backend={backend}",
        f"--parallel.teacher={teacher_placement}", f"--run_dir={tmp}/run", "--train.grad_accum=1"])
    student, teacher, vocab = M.build_models(cfg, M.load_tokenizer(cfg))
    assert loading.is_empty(student) and loading.is_empty(teacher)  # nothing read yet
    readers = (student.source_checkpoint, teacher.source_checkpoint)
    models = parallelize(student, teacher, vocab, cfg, make_layout())
    h = models.heads
    for who, path, rows in (("student", student_dir, h.student), ("teacher", teacher_dir, h.teacher)):
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert torch.equal(rows.float(), ref.get_output_embeddings().weight[h.start:h.end]), who
        body = models.student if who == "student" else models.teacher
        want = ref.state_dict()
        for name, t in iter_full_state(body):
            assert torch.equal(t.float(), want[name].float()), (who, name)
    # the optimizer starts from what was read (ZeRO-3 builds its fp32 masters from the partitions filled before the
    # engine): a step at a negligible learning rate leaves the student where the checkpoint put it
    models.set_lr(1e-9)
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(rank))
    models.backward(models.student_hidden(ids, torch.ones_like(ids)).float().pow(2).mean())
    models.step(False)
    want = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).state_dict()
    for name, t in iter_full_state(models.student):
        torch.testing.assert_close(t.float(), want[name].float(), atol=1e-6, rtol=0, msg=name)
    _check_streamed_export(models, student_dir, tok, tmp)
    if world > 1:
        # each rank read about its share of the student and of a sharded teacher (ZeRO-3: the rows covering its
        # partitions); a replicated teacher's body in full (its output layer's rows are shared out in every case)
        for ckpt, path, sharded in ((readers[0], student_dir, True), (readers[1], teacher_dir,
                                                                          teacher_placement != "replicate")):
            total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
            share = ckpt.bytes_read / total
            assert (share < 0.6) if sharded else (share > 0.75), (path, share)


def _check_streamed_export(models, student_dir, tok, tmp):
    """The export, written in files of at most a few layers (checkpoint.EXPORT_SHARD_BYTES lowered), loads with
    from_pretrained as exactly the trained student: every body tensor and the output layer (tied or not)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from pipeline.parallel import distributed
    from pipeline.run import checkpoint
    from pipeline.parallel.backends import full_state_dict
    dist_ctx = distributed.init(require_group=True)
    state = {k: v.clone() for k, v in full_state_dict(models.student).items()}
    head = models.heads.full_weight(models.heads.student)
    checkpoint.EXPORT_SHARD_BYTES = 40_000
    out = checkpoint.export_student(os.path.join(tmp, "export"), models, AutoConfig.from_pretrained(student_dir),
                                    AutoTokenizer.from_pretrained(tok), dist_ctx)
    distributed.barrier(dist_ctx.group)
    if not dist_ctx.is_main:
        assert out is None
        return
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 3 and os.path.exists(os.path.join(out, "model.safetensors.index.json")), files
    from safetensors import safe_open
    for f in files:  # a file is over the bound only when it holds one tensor
        with safe_open(os.path.join(out, f), "pt") as g:
            assert os.path.getsize(os.path.join(out, f)) < 60_000 or len(list(g.keys())) == 1, f
    model = AutoModelForCausalLM.from_pretrained(out)
    got = model.state_dict()
    for name, t in state.items():  # the embedding over the tokenizer's rows only, as the output layer
        if name in got:
            assert torch.equal(got[name], t[: got[name].shape[0]].to(got[name].dtype)), name
    assert torch.equal(model.get_output_embeddings().weight, head.to(model.dtype))
    assert model.config.tie_word_embeddings == models.heads.tied and model.config.vocab_size == 512


@pytest.mark.parametrize("backend, placement", [("fsdp2", "shard"), ("fsdp2", "replicate"),
                                                ("deepspeed", "shard"), ("deepspeed", "replicate")])
def test_rank_local_loading_equals_from_pretrained_in_two_processes(tmp_path, backend, placement):
    _checkpoints(tmp_path, tied_student=backend == "fsdp2")
    run_workers(_check_worker, 2, backend, placement, str(tmp_path), backend == "fsdp2", timeout=240)


def test_rank_local_loading_in_one_process_equals_from_pretrained(tmp_path):
    _checkpoints(tmp_path, tied_student=True)
    from transformers import AutoModelForCausalLM
    model = loading.empty_model(str(tmp_path / "student"), torch.float32)
    loading.load_local(model, "cpu")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"), dtype=torch.float32)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    assert set(model.state_dict()) == set(ref.state_dict())
    for name, t in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    x = torch.randint(0, 512, (2, 9))
    assert torch.equal(model(x).logits, ref(x).logits)  # rotary tables and every weight as from_pretrained's


def test_a_checkpoint_without_safetensors_or_with_other_names_loads_whole(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **BASE))
    (tmp_path / "pt").mkdir()
    model.config.save_pretrained(tmp_path / "pt")
    torch.save(model.state_dict(), tmp_path / "pt" / "pytorch_model.bin")
    assert loading.empty_model(str(tmp_path / "pt"), torch.float32) is None
    from safetensors.torch import save_file
    (tmp_path / "renamed").mkdir()
    model.config.save_pretrained(tmp_path / "renamed")
    save_file({f"x.{k}": v.contiguous() for k, v in model.state_dict().items() if "lm_head" not in k},
              str(tmp_path / "renamed" / "model.safetensors"))
    assert loading.empty_model(str(tmp_path / "renamed"), torch.float32) is None
