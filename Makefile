# Two entry points (see README): `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned torch resolves to the local CPU wheel on the project machines; elsewhere pass
# e.g. TORCH="torch --index-url <your CPU wheel index>" to avoid a multi-GB CUDA download.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,recipes,hf]"
	touch $@

demo: setup
	$(BIN)/python examples/quickstart.py

# lint, format and type checks first (cheap), then the tests
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/overhead.py

# ruff and mypy read their settings from pyproject.toml
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache .mypy_cache
