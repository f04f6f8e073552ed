#!/usr/bin/env bash
# The check to run on ONE GPU node before queueing a big job (make gpu-check; under 10 minutes on one H100):
#   environment facts; the debug config on one GPU with DeepSpeed and FSDP2 in fp32 and bf16, and a resume; the fp32
#   runs' losses against a CPU run of the same config; host syncs per step and where they come from; the fused loss
#   on CUDA at Qwen2.5 7B -> 1.5B head shapes against full logits (values, gradients, time, memory per precision);
#   a run with 1.5B-shaped models beside pipeline.plan's figures; vLLM's engine start and one weight push.
# Everything lands in one JSON file, $GPU_CHECK_OUT/gpu_check.json (default runs/gpu_check). Exit 0: all runs
# finished and the fp32 losses match the CPU's; 1: something to look at (the JSON says what); 2: no GPU here.
#   srun --gpus=1 --cpus-per-task=8 --time=15:00 make gpu-check          (or on an interactive GPU node)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: no GPU visible here (torch.cuda.is_available() is false: no GPU, a CPU-only torch, or no driver); run it on a GPU node with the CUDA environment (make setup-gpu)" >&2
  exit 2
fi
OUT=${GPU_CHECK_OUT:-runs/gpu_check}; rm -rf "$OUT"; mkdir -p "$OUT"; export GPU_CHECK_OUT=$OUT PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
G="$PY bench/gpu_check.py"
C=pipeline/configs/debug_cpu.yaml
Q=(--logging.progress=false --train.steps=10 --checkpoint.every=5 --checkpoint.export=false)
run() { local name=$1 t=$2; shift 2; timeout "$t" $G train "$name" -- --config $C "--run_dir=$OUT/runs/$name" "${Q[@]}" "$@"; echo "== $name rc=$?"; }
$G facts
run ds_fp32 150
run ds_fp32_resume 120 "--run_dir=$OUT/runs/ds_fp32" --train.steps=12
run fsdp2_fp32 150 --parallel.backend=fsdp2
run ds_bf16 150 --model.dtype=bfloat16
run fsdp2_bf16 150 --parallel.backend=fsdp2 --model.dtype=bfloat16
CUDA_VISIBLE_DEVICES= PIPELINE_ALLOW_CPU=1 DS_ACCELERATOR=cpu run cpu_fsdp2_fp32 150 --parallel.backend=fsdp2
timeout 240 $G loss; echo "== loss rc=$?"
# 1.5B-shaped student and teacher (random weights; the heads: the tiny tokenizer's 512 rows), beside the planner
S=$(tr -d '\n' < pipeline/configs/assets/shapes/qwen2.5-1.5b/config.json)
A=("--model.student_config=$S" "--model.teacher_config=$S" --model.dtype=bfloat16 --data.seq_len=1024
   --train.micro_batch_size=2 --train.grad_accum=2 --train.activation_checkpointing=true)
$PY -m pipeline.plan --config $C --nodes 1 --gpus-per-node 1 "${A[@]}" --json > "$OUT/plan.json"
if [ "$SECONDS" -lt 360 ]; then  # within the 10 minutes
  Q=(--logging.progress=false --train.steps=4 --checkpoint.every=0 --checkpoint.export=false)
  run shape1p5b_ds 180 "${A[@]}"
fi
timeout 120 $G vllm; echo "== vllm rc=$?"
$G report "$OUT"; rc=$?
echo "gpu-check: $OUT/gpu_check.json (${SECONDS}s)"
exit $rc
