"""The slurm/ scripts and pipeline.submit against a real Slurm: Debian's slurm-wlm with munge, a controller and two
slurmd "nodes" on this machine, installed and started here when missing, stopped after."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_utils import free_port

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "slurm"
APT = ["slurmctld", "slurmd", "slurm-client", "munge", "libopenmpi-dev", "openmpi-bin"]
TINY = ["--train.micro_batch_size=2", "--train.grad_accum=1", "--data.seq_len=32", "--data.max_documents=12",
        "--optim.warmup_steps=1", "--logging.progress=false", "--parallel.backend=fsdp2"]


def _install() -> str | None:
    """None when Slurm, munge and OpenMPI are usable; otherwise why not."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged", "mpirun")):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "Slurm is not installed and cannot be installed here (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if p.returncode:
            return f"installing Slurm failed: {p.stderr[-500:]}"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = _install()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    p = subprocess.run(["bash", str(HERE / "slurm_up.sh"), str(d), "2", "2", str(free_port()), str(free_port())],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf"), "PIPELINE_VENV": sys.prefix,
           "PIPELINE_REPO": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    yield env
    subprocess.run(["bash", str(HERE / "slurm_down.sh"), str(d)], timeout=60)


def sbatch(env, *args, config=None, extra_env=None) -> str:
    e = {**env, **(extra_env or {})}
    if config:
        e["CONFIG"] = config
    p = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def job_info(env, job) -> dict:
    p = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", p.stdout))


def wait(env, job, timeout=400, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(env, job)
        if info.get("JobState") in done:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env)
    raise TimeoutError(f"job {job} did not finish in {timeout}s: {job_info(env, job)}")


def test_train_script_runs_two_nodes_of_two_tasks_as_two_shard_groups(slurm, tmp_path):
    """2 nodes x 2 tasks under ZeRO-3: the default shard group is a node (2 groups of 2, hpZ; the loss never leaves
    the node), and the losses equal a one-process run over the same 4 sequences per step."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    job = sbatch(slurm, "--nodes=2", "--ntasks-per-node=2", f"--output={tmp_path}/%j.out", "slurm/train.sbatch",
                 *TINY, "--parallel.backend=deepspeed", "--train.micro_batch_size=1", "--train.steps=6",
                 "--checkpoint.every=3", f"--run_dir={run}",
                 config="pipeline/configs/debug_cpu.yaml")
    p = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "pipeline/configs/debug_cpu.yaml", *TINY,
                        "--parallel.backend=none", "--train.micro_batch_size=4", "--train.steps=6",
                        "--checkpoint.every=3", f"--run_dir={ref}"], cwd=REPO, env=slurm, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    info = wait(slurm, job)
    log = (tmp_path / f"{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["NodeList"] == "n[1-2]" and "2 nodes x 2 tasks" in log
    assert "layout: 2 replica group(s) x 2 ranks" in log and "SLURM_STEP_TASKS_PER_NODE" in log, log[-3000:]
    assert (run / "checkpoints" / "step_00000006" / "COMPLETE").exists()
    got, want = ((d / "losses.tsv").read_text().split() for d in (run, ref))
    assert [float(v) for v in got[1::2]] == pytest.approx([float(v) for v in want[1::2]], rel=1e-4)
    # all four ranks belonged to one world: each wrote its summary, with its own rows of the teacher's output layer
    summaries = {(run / f"summary_rank{r}.json").read_text() for r in range(4)}
    assert len(summaries) >= 2
    assert (run / "student" / "model.safetensors").exists()


def test_mpi_script_forms_the_group_through_mpi4py(slurm, tmp_path):
    run = tmp_path / "run"
    job = sbatch(slurm, "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%j.out", "slurm/train_mpi.sbatch",
                 *TINY, "--train.steps=3", f"--run_dir={run}", config="pipeline/configs/debug_cpu.yaml")
    info = wait(slurm, job)
    log = (tmp_path / f"{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert {p.name for p in run.glob("summary_rank*.json")} == {"summary_rank0.json", "summary_rank1.json"}


def _student_tensors(run):
    from safetensors.torch import load_file
    return load_file(str(run / "student" / "model.safetensors"))


def test_preemption_checkpoints_requeues_and_matches_an_uninterrupted_run(slurm, tmp_path):
    args = [*TINY, "--train.steps=24", "--checkpoint.every=0"]
    straight = tmp_path / "straight"
    job = sbatch(slurm, "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%j.out", "slurm/train.sbatch",
                 *args, f"--run_dir={straight}", config="pipeline/configs/debug_cpu.yaml")
    assert wait(slurm, job)["JobState"] == "COMPLETED"

    run = tmp_path / "preempted"
    job = sbatch(slurm, "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%j.out", "slurm/train.sbatch",
                 *args, f"--run_dir={run}", config="pipeline/configs/debug_cpu.yaml")
    tsv = run / "losses.tsv"
    deadline = time.time() + 300
    while time.time() < deadline and (not tsv.exists() or len(tsv.read_text().splitlines()) < 4):
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    # the job checkpoints, requeues itself and runs again from the checkpoint
    deadline = time.time() + 400
    while time.time() < deadline:
        info = job_info(slurm, job)
        if int(info.get("Restarts", "0")) >= 1 and info.get("JobState") == "PENDING":
            break
        time.sleep(0.5)
    info = wait(slurm, job)
    log = (tmp_path / f"{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", (info, log[-3000:])
    assert int(info["Restarts"]) >= 1 and "requeued" in log and "resumed from" in log
    resumed_at = int(re.search(r"resumed from .*step_(\d+) at step", log).group(1))
    assert 0 < resumed_at < 24  # the preemption checkpoint, not a regular one (checkpoint.every=0)
    a, b = _student_tensors(straight), _student_tensors(run)
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "the preempted run's student differs from the uninterrupted one"


def test_array_members_and_chained_eval(slurm, tmp_path):
    root = tmp_path / "sweep"
    arr = sbatch(slurm, "--array=0-1", f"--output={tmp_path}/%A_%a.out", "slurm/sweep_array.sbatch",
                 *TINY, "--train.steps=2", "--checkpoint.export=false", config="pipeline/configs/debug_cpu.yaml",
                 extra_env={"GRID": "0.5 -1", "RUN_ROOT": str(root)})
    for i in (0, 1):
        assert wait(slurm, f"{arr}_{i}")["JobState"] == "COMPLETED"
    assert sorted(p.name for p in root.iterdir()) == ["loss.options.alpha=-1", "loss.options.alpha=0.5"]

    good = tmp_path / "good"
    train = sbatch(slurm, f"--output={tmp_path}/%j.out", "slurm/train.sbatch", *TINY, "--parallel.backend=none",
                   "--train.steps=2", f"--run_dir={good}", config="pipeline/configs/debug_cpu.yaml")
    ev = sbatch(slurm, f"--dependency=afterok:{train}", f"--output={tmp_path}/%j.out", "slurm/eval.sbatch",
                extra_env={"RUN_DIR": str(good), "EVAL_ARGS": "--blocks 4"})
    assert job_info(slurm, ev)["JobState"] == "PENDING"
    assert wait(slurm, train)["JobState"] == "COMPLETED"
    assert wait(slurm, ev)["JobState"] == "COMPLETED", (tmp_path / f"{ev}.out").read_text()[-2000:]
    assert '"kl_to_teacher"' in (good / "eval.json").read_text()

    bad = tmp_path / "bad"
    train = sbatch(slurm, f"--output={tmp_path}/%j.out", "slurm/train.sbatch", "--loss.options={lam: 7}",
                   f"--run_dir={bad}", config="pipeline/configs/debug_cpu.yaml")
    ev = sbatch(slurm, f"--dependency=afterok:{train}", f"--output={tmp_path}/%j.out", "slurm/eval.sbatch",
                extra_env={"RUN_DIR": str(bad)})
    assert wait(slurm, train)["JobState"] == "FAILED"
    time.sleep(2)
    info = job_info(slurm, ev)
    assert info.get("JobState") in ("PENDING", "CANCELLED") and info.get("Reason") in (
        "DependencyNeverSatisfied", "Dependency", "None"), info
    assert not (bad / "eval.json").exists()
    subprocess.run(["scancel", ev], env=slurm)


def _squeue(env) -> str:
    return subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.strip()


@pytest.mark.parametrize("args,message", [
    (["--loss.options={lam: 2}"], "lam"),
    (["--nodes=3"], "can never be scheduled"),
    (["--nodes=0"], "--nodes"),
    (["--gpus-per-node=4"], "GPU"),
    (["--train.global_batch_size=12"], "global_batch_size"),
])
def test_submit_refuses_before_sbatch(slurm, tmp_path, args, message):
    before = _squeue(slurm)
    p = subprocess.run([sys.executable, "-m", "pipeline.submit", "--config", "pipeline/configs/debug_cpu.yaml",
                        f"--run_dir={tmp_path}/run", *args], cwd=REPO, env=slurm, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert _squeue(slurm) == before and not (tmp_path / "run").exists()


def test_submit_queues_and_prints_where_things_go(slurm, tmp_path):
    p = subprocess.run([sys.executable, "-m", "pipeline.submit", "--config", "pipeline/configs/debug_cpu.yaml",
                        "--nodes=2", "--time=0:30:00", f"--run_dir={tmp_path}/run", *TINY, "--train.steps=2", "--eval"],
                       cwd=REPO, env=slurm, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    job = re.search(r"^job (\d+)$", p.stdout, re.M).group(1)
    ev = re.search(r"^eval job (\d+)", p.stdout, re.M).group(1)
    assert f"{tmp_path}/run/logs" in p.stdout and "tensorboard --logdir" in p.stdout
    assert (tmp_path / "run" / "config.submitted.yaml").exists()
    # the chained evaluation asks for what training had: time limit, partition (and a GPU where training had GPUs)
    assert job_info(slurm, ev)["TimeLimit"] == job_info(slurm, job)["TimeLimit"] == "00:30:00"
    assert job_info(slurm, ev)["Partition"] == job_info(slurm, job)["Partition"]
    assert wait(slurm, job)["JobState"] == "COMPLETED"
    assert wait(slurm, ev)["JobState"] == "COMPLETED"
    assert (tmp_path / "run" / "eval.json").exists()


def test_prepare_array_members_share_the_shards_and_finish_the_store(slurm, tmp_path):
    store = tmp_path / "store"
    arr = sbatch(slurm, "--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/%A_%a.out",
                 "slurm/prepare_array.sbatch", f"--out={store}", "--shards=4", config="pipeline/configs/debug_cpu.yaml")
    for i in (0, 1):
        info = wait(slurm, f"{arr}_{i}")
        assert info["JobState"] == "COMPLETED", (tmp_path / f"{arr}_{i}.out").read_text()[-2000:]
    logs = [(tmp_path / f"{arr}_{i}.out").read_text() for i in (0, 1)]
    assert all("2 to do here" in log for log in logs)  # shards 0, 2 and 1, 3
    from pipeline.data.token_store import TokenStore
    assert len(TokenStore(str(store)).index["shards"]) == 4


def test_teacher_server_job_and_a_training_job_that_uses_it(slurm, tmp_path):
    """slurm/teacher_server.sbatch serves the teacher from one node; a training job on the other, queued after it,
    waits for the address file, checks the server and trains against it; scancel stops the server, which removes
    its address file."""
    from tests.test_remote_teacher import K, remote_teacher_checkpoint
    teacher = remote_teacher_checkpoint(tmp_path / "teacher")
    address, run = tmp_path / "teacher.addr", tmp_path / "run"
    common = [f"--model.teacher_path={teacher}", "--model.teacher_config=null", f"--loss.remote.address={address}",
              f"--loss.remote.top_k={K}"]
    server = sbatch(slurm, "--nodelist=n1", f"--output={tmp_path}/server.out", "slurm/teacher_server.sbatch",
                    *common, "--", "--enforce-eager", config="pipeline/configs/debug_cpu.yaml")
    job = sbatch(slurm, "--nodelist=n2", f"--dependency=after:{server}", f"--output={tmp_path}/%j.out",
                 "slurm/train.sbatch", *TINY, *common, "--loss.teacher=remote", "--parallel.backend=none",
                 "--train.steps=3", f"--run_dir={run}", config="pipeline/configs/debug_cpu.yaml")
    try:
        info = wait(slurm, job, timeout=900)
        log = (tmp_path / f"{job}.out").read_text()
        assert info["JobState"] == "COMPLETED", log[-3000:] + (tmp_path / "server.out").read_text()[-3000:]
        assert len((run / "losses.tsv").read_text().splitlines()) == 3
        assert "teacher server up at http://" in (tmp_path / "server.out").read_text()
    finally:
        subprocess.run(["scancel", server], env=slurm)
    wait(slurm, server, timeout=120)
    deadline = time.time() + 60
    while address.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert not address.exists()
