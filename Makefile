# lightning_spectral — the two commands: `make demo` and `make test`.
# Each creates .venv when it is missing, installs torch==2.13.0 first (the CPU wheel on this
# machine's disk), then the project with its dev extra. `make docs` builds the documentation
# site, `make examples` runs every example quickly, `make fresh-install` checks a plain
# `pip install .` in a new virtual environment (all three run in CI except `examples`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench venv clean docs docs-strict api-docs examples fresh-install

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

# mypy over the package at the strictness of [tool.mypy] in pyproject.toml
typecheck: $(STAMP)
	$(PY) -m mypy

demo: $(STAMP)
	$(PY) examples/demo.py --out runs
	@echo "== gate: lightning-spectral check runs/mlp runs/cnn --rules examples/gates.toml"
	$(VENV)/bin/lightning-spectral check runs/mlp runs/cnn --rules examples/gates.toml
	@echo ""
	@echo "== regression gate: each run against its recorded baseline (examples/baselines)"
	$(VENV)/bin/lightning-spectral check runs/mlp --baseline examples/baselines/mlp --rules examples/regression.toml
	$(VENV)/bin/lightning-spectral check runs/cnn --baseline examples/baselines/cnn --rules examples/regression.toml
	@echo ""
	@echo "Open the dashboard:  $(VENV)/bin/tensorboard --logdir runs   (then the CUSTOM SCALARS tab)"

# `make docs`: the documentation site (mkdocs.yml) into build/site, after rewriting the API
# reference pages (docs/api/) from the package's __all__; `make docs-strict` (CI) checks them
# instead and fails on any warning. Open build/site/index.html.
DOCS_STAMP := $(VENV)/.docs-installed
MKDOCS := NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[dev,docs]"
	touch $(DOCS_STAMP)

api-docs: $(STAMP)
	$(PY) scripts/gen_api_docs.py

docs: $(DOCS_STAMP) api-docs
	$(MKDOCS) build
	@echo "Open the site: build/site/index.html"

docs-strict: $(DOCS_STAMP)
	$(PY) scripts/gen_api_docs.py --check
	site="$$(mktemp -d)"; $(MKDOCS) build --strict --site-dir "$$site"; status=$$?; \
	rm -rf "$$site"; exit $$status

# every example with its quick arguments (the `# smoke:` lines at the top of each file)
examples: $(STAMP)
	$(PY) scripts/run_examples.py

# a new virtual environment in a temporary folder, `pip install .` without extras, the
# examples that need no extra and README.md's snippet against it (scripts/fresh_install.sh)
fresh-install:
	bash scripts/fresh_install.sh

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
	$(PY) -m benchmarks.run_all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache .ruff_cache build/site
