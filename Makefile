# Two entry points: `make demo` (the pipeline end to end on generated data) and
# `make test` (the suite). Each creates the virtual environment on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install demo test test-precision lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev,ray]"  # the suite tests the Ray backend too
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/msa demo --out demo

test: install
	$(PY) -m pytest -q

# CI's second pass: only the tests that asked for the CPU class in the last `make test` (the
# others' outcome is the same on every CPU); all of them when there is no record.
test-precision: install
	$(PY) -m pytest -q --precision-only

lint: install
	$(VENV)/bin/ruff check msa tests bench
