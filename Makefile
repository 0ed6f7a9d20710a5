# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: env demo test test-fast gpu-check clean-demo

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

# On a CUDA machine: fit / ViT-B/16 step / 4 trials at gpu 0.25 / bench, a Markdown block in
# gpu-check.md for docs/benchmarks.md. Exit 0 ok, 1 a check failed, 2 no CUDA device.
gpu-check: env
	$(PY) -m pipeline.gpu_check --out gpu-check.md

clean-demo:
	rm -rf runs/demo
