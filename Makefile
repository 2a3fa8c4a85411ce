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
# servers, worker processes) are made once per module, as in a serial run. The cases that
# spend minutes waiting (marked "waits": a server down for minutes) run beside them in a
# pytest of their own, whose report follows; either failing fails the target. The sources
# are compiled first: where PYTHONDONTWRITEBYTECODE is set, each of the hundreds of Python
# processes the tests start would otherwise compile the package again.
# Only the modules that have such cases are collected for them (collecting every module
# imports every test's dependencies: seconds of the other pytest's processor time).
WORKERS ?= auto
WAITS_MODULES = $(shell grep -l "mark.waits" tests/test_*.py)
test: $(STAMP)
	@$(BIN)/python -m compileall -q bluesky_analysis_store tests >/dev/null
	@waits_log=$$(mktemp); waits_tmp=$$(mktemp -d); \
	$(BIN)/python -m pytest -m waits --basetemp="$$waits_tmp" $(WAITS_MODULES) >"$$waits_log" 2>&1 & waits=$$!; \
	$(BIN)/python -m pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder -m "not waits"; status=$$?; \
	wait $$waits || status=1; \
	echo "--- the cases that wait (pytest -m waits) ---"; cat "$$waits_log"; \
	rm -rf "$$waits_log" "$$waits_tmp"; exit $$status

# Everything but the slow fault-injection and load cases.
test-fast: $(STAMP)
	@$(BIN)/python -m compileall -q bluesky_analysis_store tests >/dev/null
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_live_reduction.py

clean:
	rm -rf $(VENV) analysis-store analysis-data
