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

# Every benchmark script, then benchmarks/RESULTS.md from their sections (run on an idle
# machine; a failing script is reported and the others still run).
bench: $(STAMP)
	@status=0; for f in benchmarks/bench_*.py; do \
		echo "== $$f"; $(PY) $$f || { echo "FAILED: $$f"; status=1; }; \
	done; $(PY) benchmarks/collect.py; exit $$status

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache .ruff_cache
