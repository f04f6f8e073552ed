# Sourced by the sbatch scripts: the environment, the rendezvous address and port from the allocation.
#   PIPELINE_VENV   a virtualenv to activate (default: the repository's .venv); PIPELINE_CONDA: a conda env instead
#   PIPELINE_REPO   the repository (default: the directory sbatch was called from)
set -euo pipefail
REPO=${PIPELINE_REPO:-$SLURM_SUBMIT_DIR}
cd "$REPO"
if [ -n "${PIPELINE_CONDA:-}" ]; then
  eval "$(conda shell.bash hook)" && conda activate "$PIPELINE_CONDA"
else
  # shellcheck disable=SC1091
  source "${PIPELINE_VENV:-$REPO/.venv}/bin/activate"
fi
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
# a resolvable node name on a real cluster; the node's NodeAddr where names do not resolve (test clusters)
MASTER_ADDR=$(getent hosts "$first" | awk '{print $1; exit}' || true)
[ -n "$MASTER_ADDR" ] || MASTER_ADDR=$(scontrol show node "$first" -o | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR
# a different port after each requeue: the previous run's sockets may linger
export MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID + 997 * ${SLURM_RESTART_COUNT:-0}) % 20000))}
# one CPU thread pool per task unless the user says otherwise; GPUs: one task per GPU (srun binds them)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# for a torchrun-per-node launch: torchrun forwards USR1 (the time-limit warning) to its ranks instead of dying of it
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
# DeepSpeed on the CPU only where the node has no GPU at all (containers often lack nvidia-smi but have the devices)
if [ -z "${SLURM_JOB_GPUS:-}${SLURM_STEP_GPUS:-}${CUDA_VISIBLE_DEVICES:-}" ] && [ ! -e /dev/nvidia0 ]; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
# NCCL: say why a communicator failed. (TORCH_NCCL_ASYNC_ERROR_HANDLING is the pipeline's own default,
# distributed.NCCL_ENVIRONMENT: a failed collective ends through its exit-1 path; a value set here would win.)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes x ${SLURM_NTASKS_PER_NODE:-1} tasks," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT"
