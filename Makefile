# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench lint clean

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

bench: $(STAMP)
	$(VENV)/bin/rqlm bench

lint: $(STAMP)
	$(VENV)/bin/ruff check rqlm tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
