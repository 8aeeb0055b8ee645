# Two entry points for a fresh machine (Python 3.11 + pip): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch (a plain `torch` requirement would pull a multi-GB CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,hf,tb]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/scalevec demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# Everything but the tests marked slow (subprocess trainings, torchrun, compiles, the kernel build, smoke runs).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# What the GPU machine (no network) cannot make: the prepared corpus and tomli_w (pure Python, not on its image),
# under .cache/gpu for `run(..., carry=[".cache/gpu"])` (docs/performance.md, "GPU").
gpu-prep: $(STAMP)
	$(BIN)/scalevec prepare data.dir=$(CURDIR)/.cache/gpu/data
	$(BIN)/pip install -q --no-deps --upgrade --target .cache/gpu/site tomli-w

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

.PHONY: install demo test test-fast lint gpu-prep
