# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-latest install bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build on this disk, so no dependency pulls a CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,eval]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rqlm demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest tests

# The newest release of every dependency that pyproject's ranges allow, in a venv of its own: where a
# new release breaks rqlm, this shows it before a fresh clone's `make test` does. torch stays the CPU build on
# this disk: an eager upgrade would otherwise take the newest torch, a CUDA build of several GB.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q torch==2.13.0
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev,eval]" torch==2.13.0
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(transformers|accelerate|datasets|peft|lm.eval|vector.quantize.pytorch|torch)=='
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(LATEST)/bin/python -m pytest tests

bench: $(STAMP)
	$(VENV)/bin/rqlm bench

lint: $(STAMP)
	$(VENV)/bin/ruff check rqlm tests benchmarks

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
