# Convenience targets. `make test` and `make demo` create .venv on first use.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_DATA ?= data/synthetic
DEMO_OUT ?= output/demo

.PHONY: setup test test-slow demo clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q tests

test-slow: setup
	$(PY) -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) .pytest_cache
