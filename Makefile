# Everything starts from nothing: `make test` / `make demo` / `make bench` create .venv when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines take the CPU build of torch that lies on disk; never an unpinned torch (a multi-GB CUDA build).
# On a CUDA box the venv sees the system's torch instead (created with --system-site-packages).
TORCH_CPU := torch==2.13.0
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
EXTRAS ?= dev,hf,dashboard

.PHONY: install browser test demo bench bench-coverage bench-gpu compile-check gpu-check clean

# GPU targets run on machines that may have no network: once .venv exists they use it as it is (a stale
# .venv/.installed, e.g. after a Makefile edit, would otherwise send `install` to pip). Without .venv they
# build it first, which needs the network.
OFFLINE_VENV := $(if $(wildcard $(BIN)/python),,install)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
ifeq ($(HAS_CUDA),1)
	test -x $(BIN)/python || $(PY) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" || $(BIN)/pip install torch
else
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_CPU)
endif
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

# The dashboard's browser tests drive Debian's chromium (never a downloaded browser); CI runs as root.
browser:
	command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: install browser
	$(BIN)/python -m pytest tests

# The demo: one moe-tiny run (seconds, no Ray), then the leverage demo: sweep (local Ray) -> fits + report ->
# dashboard. A rerun reuses what finished (--resume); a failed trial (exit 1) still gets fitted and shown;
# Ctrl-C stops the sweep (and its Ray) or the dashboard.
DEMO_ROOT ?= results
demo: install
	$(BIN)/moelab train --preset moe-tiny --steps 300 --out runs/demo-moe-tiny --resume
	$(BIN)/moelab sweep leverage-demo --storage $(DEMO_ROOT) --resume; test $$? -le 1
	$(BIN)/moelab fit $(DEMO_ROOT) --sweep leverage-demo
	$(BIN)/moelab dashboard $(DEMO_ROOT)

bench: install
	OMP_NUM_THREADS=2 $(BIN)/python bench/moe_experts_cpu.py
	OMP_NUM_THREADS=2 $(BIN)/python bench/train_cpu.py
	$(BIN)/python bench/parallel_cpu.py
	OMP_NUM_THREADS=2 $(BIN)/python bench/fits_bench.py

# Coverage of moelab fit's intervals on the truth harness: 200 worlds with known answers (~1 h on 2 cores).
bench-coverage: install
	OMP_NUM_THREADS=1 $(BIN)/python bench/coverage_bench.py --replicates 200 --n-boot 100 --workers 2

# The Triton kernel benchmark needs a CUDA GPU (exits 2 with a message elsewhere).
bench-gpu: $(OFFLINE_VENV)
	$(BIN)/python -m moelab.kernels.bench --markdown

# Compile the Triton kernels for sm_90 offline (no GPU needed): catches register spills and compile errors.
compile-check: $(OFFLINE_VENV)
	$(BIN)/python -m moelab.kernels.bench --compile-check 90

# Everything that needs a CUDA GPU, in one run of a few minutes: kernel tests on the GPU, the kernel benchmark
# (full and small token counts), a 30-step moe-1b (4 layers) eager and compiled with MFU and peak memory, host
# syncs per step. Writes a markdown section for bench/RESULTS.md to GPU_CHECK_OUT; exits 1 if a check failed,
# 3 without a CUDA device.
GPU_CHECK_OUT ?= bench/gpu_check.md
gpu-check: $(OFFLINE_VENV)
	$(BIN)/python bench/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) runs .pytest_cache  # results/ (the demo's store) is kept: delete it by hand
