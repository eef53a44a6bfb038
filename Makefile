# One entry point for set-up, tests, demo and benchmarks. `make test` and `make demo` install first when
# needed, so either is the only command a fresh machine needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
# torch 2.13.0 is the CPU build this project is developed against; pyproject's range admits it.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: the suite spends much of its time starting and waiting on processes
# that import torch, so with one pytest process it keeps about one core busy. tests/conftest.py groups the
# tests (one file a group; everything that builds network namespaces in one group) and hands the longest groups out
# first. On the 2-core dev machine (2026-12-07), before the grouping worked (pytest 9 had broken xdist's own):
# 1 process 1,477-1,565 s, 2 workers 1,280 s, 3 workers 1,039-1,411 s, 4 slower than 3; with it, 3 workers 988-990 s.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 3

.PHONY: install install-bench test test-fast demo bench bench-assemble bench-cluster bench-autotune-cluster bench-cost-cluster gpu-check lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)" "setuptools>=68" wheel
	# DeepSpeed (a test/bench extra: the peers' parity check and benchmark) ships only an sdist whose build
	# imports torch: build it against the installed torch, or pip's isolated build would fetch a second,
	# CUDA-sized torch.
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation "deepspeed==0.19.8"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

install-bench: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $@

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not dist and not e2e" $(PYTEST_ARGS)

DEMO_OUT ?= demo-out

# The main job on the built-in demo: estimate a 70B run, train the demo model on 2 CPU ranks with ztune's
# runtime, autotune it, then launch the winner (local mode of `ztune launch`).
demo: install
	@echo "== 1/4 ztune estimate: will llama-2-70b fit on 4 DGX H100 nodes, and how fast?"
	$(VENV)/bin/ztune estimate --model llama-2-70b --hardware dgx-h100 --nodes 4 --seq 4096 --global-batch 1024
	@echo "== 2/4 train tiny-gpt (21M) for 30 steps with ZeRO-2 on 2 CPU ranks"
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node 2 examples/train_tiny.py --steps 30
	@echo "== 3/4 ztune autotune: the fastest config for tiny-gpt on this machine"
	$(VENV)/bin/ztune autotune --smoke --out $(DEMO_OUT)/autotune
	@echo "== 4/4 ztune launch: train with the winner"
	$(VENV)/bin/ztune launch --nproc-per-node 2 --config $(DEMO_OUT)/autotune/best.yaml \
		examples/train_tiny.py -- --steps 20

# BENCH_ARGS=--cluster adds the cluster-in-a-box benchmarks (need root; see bench-cluster, bench-autotune-cluster,
# bench-cost-cluster). The benchmarks train in bf16: on a CPU without avx512_bf16 / amx_bf16 run_all.py refuses to
# start (bf16 matmul there is ~50x slower than fp32) unless BENCH_ARGS has --allow-slow-bf16.
BENCH_ARGS ?=

bench: install-bench
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

# Rebuild docs/benchmarks.md from the sections in docs/bench/ as last written (after running one benchmark script by
# hand, e.g. bench_cost_cluster.py --precision fp32); runs nothing.
bench-assemble: install
	$(PY) benchmarks/run_all.py --assemble

# 2 hosts x 2 ranks in network namespaces behind 1 and 10 Gbit/s tbf-shaped links (benchmarks/cluster_box.py):
# builds the box, runs ztune flat and hierarchical stages 1-3, ZeRO++, 1-bit Adam, DDP and DeepSpeed ZeRO-1/2/3,
# tears it down, writes docs/bench/cluster.md and reassembles docs/benchmarks.md. Needs root (ip netns, tc).
bench-cluster: install-bench
	$(PY) benchmarks/run_all.py bench_cluster $(BENCH_ARGS)

# `ztune autotune -H` on a 2 x 2-rank box at 1 Gbit/s (probe, tune, the whole grid with --exhaustive, a SIGKILLed
# tuner; nothing may be left on any host): writes docs/bench/autotune_cluster.md. Needs root, sshd.
bench-autotune-cluster: install-bench
	$(PY) benchmarks/run_all.py bench_autotune_cluster $(BENCH_ARGS)

# The cost model against the same box: `ztune probe` on both hosts, the ztune variants measured, `ztune estimate`
# on the probed profile per variant; writes docs/bench/cost_cluster.md (+ .json). Needs root.
bench-cost-cluster: install-bench
	$(PY) benchmarks/run_all.py bench_cost_cluster $(BENCH_ARGS)

# One prepared check of the CUDA paths on one GPU, within 8 minutes (docs/gpu-check.md). It runs on a bare GPU
# machine's own python3 (torch with CUDA, transformers, ... preinstalled), not on .venv: the editable install
# below needs no network (no dependencies, no build isolation); a plain PYTHONPATH would not do, since
# pyproject's package-dir maps runtime/ to ztune.runtime. Results go to $(GPU_CHECK_OUT): the device tool's
# $OUT when set. GPU_CHECK_ARGS=--dry-run runs the same script on the CPU with tiny sizes.
GPU_PY ?= python3
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),gpu-check-out)
GPU_CHECK_ARGS ?=

gpu-check:
	$(GPU_PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation --no-index -e . \
		|| echo "gpu-check: the editable install failed (above); the check imports ztune from the source tree instead"
	PYTHONUNBUFFERED=1 $(GPU_PY) benchmarks/gpu_check.py --out "$(GPU_CHECK_OUT)" $(GPU_CHECK_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
