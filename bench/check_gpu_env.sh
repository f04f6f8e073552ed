#!/usr/bin/env bash
# make check-gpu-env: requirements-gpu.txt resolved by pip's dry run against PyPI for linux x86_64 and Python 3.11
# (no wheel is downloaded), then checked: torch is a CUDA build (it requires NVIDIA's CUDA runtime wheels) and vLLM is
# the CUDA vllm at the pinned version. DeepSpeed ships as a source archive: its pinned version must exist there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
platforms=(--platform manylinux2014_x86_64); for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
grep -v -e '^#' -e '^deepspeed' requirements-gpu.txt > "$work/wheels.txt"
"$PY" -m pip install --dry-run --ignore-installed --quiet --isolated --index-url https://pypi.org/simple \
  --target "$work/t" --report "$work/report.json" --python-version 3.11 --only-binary=:all: "${platforms[@]}" \
  -r "$work/wheels.txt"
ds=$(grep '^deepspeed' requirements-gpu.txt)
"$PY" -m pip download --quiet --isolated --index-url https://pypi.org/simple --no-deps --no-binary :all: \
  --no-build-isolation -d "$work/ds" "$ds"
"$PY" - "$work/report.json" <<'PYEOF'
import json, sys
got = {i["metadata"]["name"].lower(): i for i in json.load(open(sys.argv[1]))["install"]}
torch, vllm = got["torch"]["metadata"], got["vllm"]["metadata"]
cuda = sorted(n for n in got if n.startswith("nvidia-cuda-runtime"))
assert cuda, f"torch {torch['version']} resolved without NVIDIA's CUDA runtime: a CPU build ({got['torch']['download_info']['url']})"
print(f"check-gpu-env: {len(got)} packages resolve; torch {torch['version']} (CUDA: {', '.join(cuda)}), "
      f"vllm {vllm['version']}, transformers {got['transformers']['metadata']['version']}; deepspeed's archive found")
PYEOF
