# Two entry points: `make demo` (the pipeline end to end on generated data) and
# `make test` (the suite). Each creates the virtual environment on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install browser demo test test-precision lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev,ray]"  # the suite tests the Ray backend too
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/msa demo --out demo

# The report's test renders it in headless Chromium: Debian's package, installed where missing.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1) || \
	  echo "no chromium (apt-get install chromium): the report's browser test will be skipped"

test: install browser
	$(PY) -m pytest -q

# CI's second pass: only the tests that asked for the CPU class in the last `make test` (the
# others' outcome is the same on every CPU); all of them when there is no record.
test-precision: install
	$(PY) -m pytest -q --precision-only

lint: install
	$(VENV)/bin/ruff check msa tests bench
