"""Input problems are errors a user can act on: exit 2 with the field (file, line, row) and the fix, before any
model loads where the problem is knowable then, and nothing written. Each case a real run unless it is a pure
function of the config."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.test_faults import ENV, ONPOLICY, REPO, ok, refused, run
from tests.test_train import DEBUG, command


def test_stale_slurm_variables_do_not_make_a_world(tmp_path):
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "1"}
    ok(run(tmp_path, "none", "--train.steps=1", env=env, timeout=120))
    assert json.loads((tmp_path / "history.jsonl").read_text())["world_size_from"] == "no launcher variables"


def test_world_size_source_is_reported():
    from pipeline.parallel.distributed import env_ranks
    step = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
            "SLURM_LOCALID": "1"}
    assert env_ranks(step) == (3, 4, 1, "SLURM_STEP_NUM_TASKS=4")
    assert env_ranks({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}) == (0, 1, 0, "no launcher variables")
    assert env_ranks({"RANK": "1", "WORLD_SIZE": "2"})[3] == "WORLD_SIZE=2"
    with pytest.raises(ValueError, match="stale"):
        env_ranks({"RANK": "2", "WORLD_SIZE": "2"})


# --------------------------------------------------------------------------------------------------------------
# errors users can act on
# --------------------------------------------------------------------------------------------------------------
def _quick(*args, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"run_dir: {tmp_path / 'run'}\ntrain: {{steps: 4\nloss: {{method: fkl}}\n")
    t0 = time.time()
    p = _quick("--config", str(bad))
    refused(p, f"{bad}:3:", "YAML syntax error")
    # before anything loads: no run directory, no model; the bound is loose (a loaded machine starts Python slowly)
    assert not (tmp_path / "run").exists() and "Loading" not in p.stderr
    assert time.time() - t0 < 30


def test_a_key_given_twice_names_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys without a word: the second `steps` would silently win."""
    from pipeline import config as C
    cfg = tmp_path / "dup.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\ntrain:\n  steps: 100\n  log_every: 1\n  steps: 10\n")
    with pytest.raises(ValueError, match=rf"{cfg}:5: key 'steps' is given twice \(lines 3 and 5\)"):
        C.load_config(str(cfg))
    # the same key in two different sections is no repetition
    cfg.write_text("train: {seed: 1}\nrollout: {seed: 2}\n")
    assert C.read_yaml(str(cfg)) == {"train": {"seed": 1}, "rollout": {"seed": 2}}


def test_float_fields_accept_exponents_without_a_dot():
    from pipeline import config as C
    cfg = C.load_config(DEBUG, ["--optim.lr=1e-3", "--optim.min_lr=1e-5"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.min_lr == 1e-5


CONFIG_PROBLEMS = [
    ("--train.global_batch_size=16", ["train.global_batch_size (16)", "world size"]),
    ("--parallel.ds_student_config=BROKEN", ["parallel.ds_student_config", "not valid JSON"]),
    ("--model.student_config={model_type: llama, vocab_size: 512, hidden_size: 50, num_attention_heads: 4}",
     ["model.student_config", "cannot be built"]),
    ("--model.student_config={model_type: llama, vocab_size: 100, hidden_size: 16, num_attention_heads: 2}",
     ["student's output layer has 100 rows", "512 tokens"]),
    # numbers that are not numbers would pass every range check (a NaN compares false with everything)
    ("--optim.grad_clip=.nan", ["optim.grad_clip", "finite"]),
    ("--safety.collective_timeout_s=.nan", ["safety.collective_timeout_s", "finite"]),
    ("--optim.lr=.inf", ["optim.lr", "finite"]),
    ("--optim.weight_decay=-.inf", ["optim.weight_decay", "finite"]),
    ("--optim.min_lr=.nan", ["optim.min_lr", "finite"]),
    ("--loss.options={lam: 0.1, lam: 0.3}", ["--loss.options", "'lam' is given twice"]),
    # more than the models have: positions
    ("--data.seq_len=4096", ["data.seq_len (4096)", "max_position_embeddings", "lower data.seq_len"]),
]


def _config_problem(tmp_path, override, words):
    if "BROKEN" in override:
        broken = tmp_path / "ds.json"
        broken.write_text('{"zero_optimization": {"stage": 3},\n "bf16": }')
        override = override.replace("BROKEN", str(broken))
        words = words + [f"{broken}:2:"]
    backend = "--parallel.backend=deepspeed" if "ds_" in override else "--parallel.backend=none"
    return ["--config", DEBUG, f"--run_dir={tmp_path}/run", backend, override], words


def test_config_problems_exit_2_before_any_model_loads(tmp_path):
    """The command line: exit 2, the words, no traceback, nothing written, quickly. (One real launch; the other
    cases go through the same checks in-process below.)"""
    args, words = _config_problem(tmp_path, *CONFIG_PROBLEMS[-1])
    t0 = time.time()
    refused(_quick(*args), *words)
    assert time.time() - t0 < 30
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("override,words", CONFIG_PROBLEMS)
def test_config_problems_are_found_by_the_start_up_checks(tmp_path, override, words):
    """What the command line runs before any model loads: the config's validation, then the model preflight."""
    from pipeline import config as C
    from pipeline.models import build as M
    args, words = _config_problem(tmp_path, override, words)
    with pytest.raises(ValueError) as e:
        cfg = C.load_config(args[1], args[2:])
        C.validate(cfg, world_size=1)
        M.preflight(cfg, M.load_tokenizer(cfg))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_the_vllm_engine_without_vllm_is_refused_before_anything_is_written(tmp_path):
    """vLLM hidden by a package of that name that fails to import (as a missing or broken install does)."""
    shadow = tmp_path / "shadow" / "vllm"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("no vllm here (hidden by the test)")\n')
    t0 = time.time()
    p = _quick("--config", ONPOLICY, f"--run_dir={tmp_path}/run", "--parallel.backend=none", "--rollout.engine=vllm",
               env={"PYTHONPATH": f"{tmp_path / 'shadow'}:{REPO}"})
    refused(p, "rollout.engine = vllm", "no vllm here", "pip install -e '.[vllm]'", "rollout.engine=hf")
    assert time.time() - t0 < 30
    assert not (tmp_path / "run").exists()


def test_backend_none_under_a_launcher_is_an_input_error(tmp_path):
    p = subprocess.run(command(tmp_path, 2, "none", "--train.steps=1"), cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and "parallel.backend none runs one process" in p.stderr
    assert "exitcode  : 2" in p.stderr or "exitcode: 2" in p.stderr.replace(" ", "")
    assert not any(line.startswith("[rank") and "Traceback" in line for line in p.stderr.splitlines())


def _chat_files(tmp_path, train_rows: str | bytes, eval_rows: str | bytes | None = None) -> list[str]:
    f = tmp_path / "train.jsonl"
    f.write_bytes(train_rows if isinstance(train_rows, bytes) else train_rows.encode())
    extra = []
    if eval_rows is not None:
        e = tmp_path / "eval.jsonl"
        e.write_bytes(eval_rows if isinstance(eval_rows, bytes) else eval_rows.encode())
        extra = [f"--data.eval_files=[{e}]", "--train.eval_every=1"]
    return [f"--run_dir={tmp_path}/run", "--parallel.backend=none", f"--data.files=[{f}]",
            "--rollout.student_fraction=0", "--logging.progress=false", *extra]


GOOD = "".join(json.dumps({"prompt": f"question {i}", "response": f"answer {i}"}) + "\n" for i in range(8))
DATA_PROBLEMS = [
    ("", None, ["train.jsonl is empty"]),
    (GOOD + '{"prompt": "x", "response": \n', None, ["train.jsonl:9:", "not valid JSON"]),
    (GOOD + '{"prompt": "x", "response": 7}\n', None, ["row 8", "'response'", "expected text, got int"]),
    (GOOD.encode() + b'{"prompt": "caf\xe9", "response": "y"}\n', None, ["not UTF-8", "byte offset"]),
    ('{"prompt": "a", "response": null}\n{"prompt": "b", "response": "  "}\n', None,
     ["none of the 2 rows has both a non-empty prompt and a non-empty response"]),
    (GOOD, "", ["data.eval_files", "eval.jsonl is empty"]),
]


def test_data_errors_exit_2_and_write_nothing(tmp_path):
    """The command line on a data problem (one real launch; the cases below go through the same loading code)."""
    rows, eval_rows, words = DATA_PROBLEMS[2]
    refused(_quick("--config", ONPOLICY, *_chat_files(tmp_path, rows, eval_rows)), *words)
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("rows,eval_rows,words", DATA_PROBLEMS)
def test_data_errors_name_the_file_row_and_field(tmp_path, rows, eval_rows, words):
    """The training start-up's own data path: the config's file checks, the training examples, the held-out ones."""
    from types import SimpleNamespace
    from pipeline import config as C, train
    from pipeline.models import build as M
    from pipeline.data import batches as data
    with pytest.raises(ValueError) as e:
        cfg = C.load_config(ONPOLICY, _chat_files(tmp_path, rows, eval_rows))
        tok = M.load_tokenizer(cfg)
        data.make_batches(cfg, tok, 0, 1)
        train._heldout(cfg, tok, SimpleNamespace(rank=0, world=1))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from pipeline import config as C
    from pipeline.models import build as M
    tok = AutoTokenizer.from_pretrained(REPO / "pipeline/configs/assets/tiny_tokenizer")
    teacher = tmp_path / "teacher"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(teacher)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(teacher)
    cfg = C.load_config(DEBUG, [f"--model.teacher_path={teacher}", "--model.teacher_config=null"])
    with pytest.raises(ValueError, match="teacher's tokenizer .* differs from the shared one"):
        M.preflight(cfg, AutoTokenizer.from_pretrained(REPO / "pipeline/configs/assets/tiny_tokenizer"))


@pytest.mark.parametrize("tool, args, option", [
    ("plan", ["--nodes", "0", "--gpus-per-node", "8"], "--nodes"),
    ("plan", ["--nodes", "1", "--gpus-per-node", "-1"], "--gpus-per-node"),
    ("plan", ["--nodes", "1", "--gpus-per-node", "8", "--mfu", "0"], "--mfu"),
    ("plan", ["--nodes", "1", "--gpus-per-node", "8", "--tflops", "nan"], "--tflops"),
    ("evaluate", ["--checkpoint", "x", "--blocks", "0"], "--blocks"),
    ("prepare", ["--workers", "0"], "--workers"),
    ("prepare", ["--task", "-1"], "--task"),
    ("precompute_teacher", ["--k", "0"], "--k"),
    ("precompute_teacher", ["--chunk", "two"], "--chunk"),
    ("teacher_cache", ["--out", "x", "--batch", "0"], "--batch"),
    ("submit", ["--nodes", "-2"], "--nodes"),
    ("submit", ["--cpus-per-task", "0"], "--cpus-per-task"),
])
def test_every_tool_checks_its_own_numbers(tool, args, option, capsys):
    """One line naming the option, exit 2, before the config is read (a division by zero or a silent negative
    otherwise)."""
    import importlib
    main = importlib.import_module(f"pipeline.{tool}").main
    with pytest.raises(SystemExit) as e:
        main(["--config", DEBUG, *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {option}" in err and "Traceback" not in err, err


def test_unreadable_inputs_are_one_line_naming_the_file(tmp_path):
    """A truncated model checkpoint, a directory given as a data file, a missing file of a chat store, a
    checkpoint to evaluate that is not one: exit 2 and the path, no traceback."""
    from transformers import AutoConfig, AutoModelForCausalLM
    conf = AutoConfig.for_model("llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / "student")
    weights = tmp_path / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    tok = f"--model.tokenizer_path={REPO / 'pipeline/configs/assets/tiny_tokenizer'}"
    p = _quick("--config", DEBUG, f"--run_dir={tmp_path}/run", "--parallel.backend=none", tok,
               f"--model.student_path={tmp_path / 'student'}", "--model.student_config=null", timeout=120)
    refused(p, "model.student_path", str(tmp_path / "student"), "cannot be read", "copy it again")
    (tmp_path / "folder.txt").mkdir()
    refused(_quick("--config", DEBUG, f"--run_dir={tmp_path}/run", f"--data.files=[{tmp_path / 'folder.txt'}]"),
            "data.files", "is a directory")
    p = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(tmp_path), "--config", DEBUG],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    refused(p, "--checkpoint", "not an HF checkpoint directory")


def test_a_chat_store_missing_a_file_is_refused_naming_it(tmp_path):
    from pipeline import config as C, prepare as P
    from pipeline.data import token_store as S
    cfg = C.load_config(ONPOLICY, [f"--data.files=[{REPO / 'pipeline/configs/assets/tiny_instruct.jsonl'}]"])
    P.prepare(cfg, str(tmp_path / "store"), workers=1, log=lambda m: None)
    (tmp_path / "store" / "shard_00000.prompt").unlink()
    with pytest.raises(S.StoreError, match=r"shard_00000.prompt is missing"):
        S.TokenStore(str(tmp_path / "store")).examples(cfg.data)


def test_two_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    """Two pipeline.prepare (or precompute_teacher) processes on one directory write the same shards: each through
    its own temporary file, so neither renames the other's half-written one into place."""
    import multiprocessing as mp
    from pipeline.data import token_store as S
    target = tmp_path / "shard_00000.bin"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=S.write_atomic, args=(str(target), bytes([i]) * (1 << 22))) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    data = target.read_bytes()
    assert all(p.exitcode == 0 for p in procs) and len(data) == 1 << 22 and len(set(data)) == 1
    assert [f.name for f in tmp_path.iterdir()] == ["shard_00000.bin"]  # no temporary left behind


def test_the_distill_command_runs_each_tool_and_names_them_when_asked_for_another(capsys):
    from pipeline import cli
    with pytest.raises(SystemExit) as e:  # dispatched: the tool's own argument check answers
        cli.main(["plan", "--config", DEBUG, "--nodes", "0", "--gpus-per-node", "8"])
    assert e.value.code == 2 and "argument --nodes" in capsys.readouterr().err
    assert cli.main(["config-reference", "--check"]) == 0
    assert cli.main(["distil"]) == 2 and "distill {train,prepare," in capsys.readouterr().err


REMOTE_PROBLEMS = [
    (["--loss.remote.address=null"], ["loss.remote.address"]),
    (["--loss.method=atkd", "--loss.options={}"], ["loss.teacher remote: atkd needs the teacher's full distribution"]),
    (["--loss.method=taid", "--loss.options={}"], ["loss.teacher remote gives the teacher's top-k only"]),
    (["--loss.ce_weight=0.1"], ["loss.teacher remote gives the teacher's top-k only"]),
    (["--loss.offline_teacher=runs/topk"], ["unset loss.offline_teacher"]),
    (["--model.teacher_path=null", "--model.teacher_config={model_type: llama}"], ["set model.teacher_path"]),
    ([f"--data.eval_files=[{DEBUG}]", "--train.eval_every=5"], ["no held-out KL", "unset data.eval_files"]),
    (["--data.streaming=true"], ["set data.streaming to false"]),
    (["--loss.remote.top_k=0"], ["loss.remote.top_k must be > 0"]),
    (["--loss.remote.api_key_file=/nonexistent/key"], ["loss.remote.api_key_file", "does not exist"]),
]


@pytest.mark.parametrize("overrides,words", REMOTE_PROBLEMS)
def test_a_served_teacher_the_job_cannot_use_is_refused_by_the_config_checks(tmp_path, overrides, words):
    """loss.teacher remote: what cannot work with a served teacher's top-k (methods that need the full distribution,
    a second teacher source, held-out KL without a teacher, streaming) is refused before anything connects."""
    from pipeline import config as C
    base = [f"--model.teacher_path={tmp_path}", "--model.teacher_config=null", "--loss.teacher=remote",
            "--loss.remote.address=http://127.0.0.1:1"]
    with pytest.raises(ValueError) as e:
        C.validate(C.load_config(DEBUG, base + overrides), world_size=1)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
