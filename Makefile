# lightning_spectral — the two commands: `make demo` and `make test`.
# Each creates .venv when it is missing, installs torch==2.13.0 first (the CPU wheel on this
# machine's disk), then the project with its dev extra.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	$(PY) examples/demo.py --out runs
	@echo "== gate: lightning-spectral check runs/mlp runs/cnn --rules examples/gates.toml"
	$(VENV)/bin/lightning-spectral check runs/mlp runs/cnn --rules examples/gates.toml
	@echo ""
	@echo "Open the dashboard:  $(VENV)/bin/tensorboard --logdir runs   (then the CUSTOM SCALARS tab)"

# `make bench`: the project plus the `bench` extra (WeightWatcher, PyHessian and the
# requirements of Cockpit/BackPACK), then Cockpit and BackPACK themselves with --no-deps:
# BackPACK declares torchvision, and any torchvision here would replace torch 2.13.0 CPU with a
# CUDA build. An install that fails is printed and the run goes on; benchmarks/RESULTS.md lists
# every peer as installed, missing, or failing to import. Then every benchmark script (CPU, and
# CUDA when a GPU is present) and RESULTS.md (run on an idle machine; a failing script is
# reported and the others still run). BENCH_ARGS=--quick gives a smoke run.
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[dev,bench]" || echo "make bench: installing the bench extra FAILED (see above); peers will be reported missing"
	$(PY) -m pip install -q --no-deps "backpack-for-pytorch>=1.6,<2" "cockpit-for-pytorch>=1.0,<2" || echo "make bench: installing backpack/cockpit FAILED (see above); they will be reported missing"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache .ruff_cache
