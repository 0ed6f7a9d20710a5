# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: env demo test test-fast clean-demo

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

env: $(VENV)/.installed

demo: env
	$(PY) -m pipeline.demo

test: env
	$(PY) -m pytest -q tests

test-fast: env
	$(PY) -m pytest -q tests -m "not slow and not reliability and not browser"

clean-demo:
	rm -rf runs/demo
