# longctx: `make demo` trains the demo recipe, `make test` runs lint + the test suite,
# `make bench` runs the benchmarks (minutes to an hour on 2 cores). Everything installs into .venv on first use.
VENV      ?= .venv
PY        := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP     := $(VENV)/.installed

# DeepSpeed runs on its CPU accelerator here; its compiled ops are cached inside the venv.
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export RAY_USAGE_STATS_ENABLED = 0

.PHONY: install test lint demo bench clean

install: $(STAMP)

# The CPU torch pin goes in first when no torch is present: an unpinned torch would pull a
# multi-GB CUDA build. The project then installs with its test extra (editable).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/longctx train recipes/demo.yaml --workers 2

# Each benchmark prints a table and writes bench/results/NAME.json (ratios against a baseline
# measured in the same run). Run one with: $(PY) -m longctx.bench.NAME --help
BENCHES ?= attention sp positional sparse_power sparse_nsa_mosa train_overhead
bench: $(STAMP)
	for name in $(BENCHES); do $(PY) -m longctx.bench.$$name || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
