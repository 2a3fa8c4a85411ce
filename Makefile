# Everything runs from a virtual environment inside the checkout, built from pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bluesky-analysis-store demo

# One test module per worker process, one worker per core: module fixtures (stores,
# servers, worker processes) are made once per module, as in a serial run.
test: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadfile

# Everything but the slow fault-injection and load cases.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadfile -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_live_reduction.py

clean:
	rm -rf $(VENV) analysis-store analysis-data
