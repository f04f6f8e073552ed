"""Submit a distillation job to Slurm after checking everything that can be checked before it queues.

    python -m pipeline.submit --config run.yaml --nodes 4 --gpus-per-node 8 [--partition gpu] [--account a]
        [--time 24:00:00] [--mpi] [--eval] [--section.key=value ...]

1. The config (and overrides) is loaded and validated for the world size nodes x tasks-per-node (batch arithmetic
   included): a bad field fails here, exit 2, nothing queued.
2. The resources are checked against the cluster with `sinfo` (enough nodes in the partition, enough GPUs per node).
3. The resolved config is written to run_dir/config.submitted.yaml, the job is submitted with sbatch (the resolved
   config is what it runs), and the job id, the log path and the tensorboard path are printed. --eval chains an
   evaluation job that starts only if training succeeded.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

from pipeline import cli, config as C

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SubmitError(ValueError):
    pass


def cluster_nodes(partition: str | None) -> list[dict]:
    """[{name, cpus, gpus}] of the partition's nodes (the default partition if None), from sinfo."""
    cmd = ["sinfo", "-h", "-N", "-o", "%N|%c|%G|%P"]
    if partition:
        cmd += ["-p", partition]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise SubmitError("sinfo not found: run this on a Slurm login node") from None
    if out.returncode:
        raise SubmitError(f"sinfo failed: {out.stderr.strip()}")
    nodes = {}
    for line in out.stdout.splitlines():
        name, cpus, gres, part = line.split("|")
        if partition is None and not part.endswith("*"):
            continue  # only the default partition
        m = re.search(r"gpu(?::[^:(]+)?:(\d+)", gres)
        nodes[name] = {"name": name, "cpus": int(cpus), "gpus": int(m.group(1)) if m else 0}
    return list(nodes.values())


def check_resources(args) -> None:
    if args.nodes < 1 or args.tasks_per_node < 1:
        raise SubmitError(f"--nodes ({args.nodes}) and --tasks-per-node ({args.tasks_per_node}) must be >= 1")
    if args.gpus_per_node and args.tasks_per_node != args.gpus_per_node:
        raise SubmitError(f"one task per GPU: --tasks-per-node ({args.tasks_per_node}) must equal --gpus-per-node "
                          f"({args.gpus_per_node})")
    if args.time and not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", args.time):
        raise SubmitError(f"--time {args.time!r}: use [days-]hours[:minutes[:seconds]]")
    nodes = cluster_nodes(args.partition)
    where = f"partition {args.partition!r}" if args.partition else "the default partition"
    if len(nodes) < args.nodes:
        raise SubmitError(f"{where} has {len(nodes)} node(s); --nodes {args.nodes} can never be scheduled")
    fit = [n for n in nodes if n["gpus"] >= args.gpus_per_node and n["cpus"] >= args.tasks_per_node]
    if len(fit) < args.nodes:
        raise SubmitError(f"{where}: only {len(fit)} node(s) have {args.gpus_per_node} GPU(s) and "
                          f"{args.tasks_per_node} CPU(s) for the tasks; {args.nodes} needed")
    # a task per GPU with one core starves its data work, NCCL proxy threads and compilation: give each task its
    # share of the smallest fitting node's cores (at most 16) unless the user chose
    if args.cpus_per_task is None:
        smallest = min(sorted(n["cpus"] for n in fit)[-args.nodes:])
        args.cpus_per_task = max(1, min(16, smallest // args.tasks_per_node))


def sbatch(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SubmitError(f"sbatch refused the job: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=cli.positive_int, default=1)
    ap.add_argument("--gpus-per-node", type=cli.count, default=0, help="0 on CPU clusters")
    ap.add_argument("--tasks-per-node", type=cli.positive_int, default=None, help="default: --gpus-per-node, or 1")
    ap.add_argument("--partition")
    ap.add_argument("--account")
    ap.add_argument("--time", help="Slurm time limit, e.g. 24:00:00")
    ap.add_argument("--mpi", action="store_true", help="ranks from MPI (slurm/train_mpi.sbatch)")
    ap.add_argument("--eval", action="store_true", help="chain slurm/eval.sbatch after a successful training")
    ap.add_argument("--cpus-per-task", type=cli.positive_int, default=None,
                    help="default: each task's share of a node's cores (at most 16)")
    args, overrides = ap.parse_known_args(argv)
    args.tasks_per_node = args.tasks_per_node or args.gpus_per_node or 1
    try:
        cfg = C.load_config(args.config, overrides)
        C.validate(cfg, world_size=args.nodes * args.tasks_per_node)
        if shutil.which("sbatch") is None:
            raise SubmitError("sbatch not found: run this on a Slurm login node")
        check_resources(args)
    except ValueError as e:
        print(f"not submitted: {e}", file=sys.stderr)
        return 2
    run_dir = os.path.abspath(cfg.run_dir)
    logs = os.path.join(run_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    cfg.run_dir = run_dir
    resolved = os.path.join(run_dir, "config.submitted.yaml")
    C.save_resolved(cfg, resolved)
    where = [f"{flag}={value}" for flag, value in (("--partition", args.partition), ("--account", args.account),
                                                    ("--time", args.time)) if value]
    script = "slurm/train_mpi.sbatch" if args.mpi else "slurm/train.sbatch"
    train_cmd = ["sbatch", "--parsable", f"--nodes={args.nodes}"] + where + [
        f"--ntasks-per-node={args.tasks_per_node}", f"--cpus-per-task={args.cpus_per_task}",
        f"--output={logs}/%x-%j.out", f"--export=ALL,CONFIG={resolved},PIPELINE_REPO={REPO}"]
    if args.gpus_per_node:
        train_cmd.append(f"--gpus-per-node={args.gpus_per_node}")
    try:
        job = sbatch(train_cmd + [script])
        print(f"job {job}\nlog {logs}/{'distill-mpi' if args.mpi else 'distill'}-{job}.out\n"
              f"tensorboard --logdir {run_dir}/tb")
        if args.eval:
            # the same partition, account and time limit as training; one GPU where training had GPUs (the teacher
            # and the student are evaluated on it, in the training dtype)
            ev = sbatch(["sbatch", "--parsable", "--nodes=1", "--ntasks=1", f"--cpus-per-task={args.cpus_per_task}"]
                        + where + (["--gpus-per-node=1"] if args.gpus_per_node else [])
                        + [f"--dependency=afterok:{job}", f"--output={logs}/%x-%j.out",
                           f"--export=ALL,RUN_DIR={run_dir},CONFIG={resolved},PIPELINE_REPO={REPO}",
                           "slurm/eval.sbatch"])
            print(f"eval job {ev} (after {job} succeeds): {run_dir}/eval.json")
    except SubmitError as e:
        print(f"not submitted: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
