# Quickstart: `make demo` (train the tiny FoT model offline, then a passkey check) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test bench install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# CPU torch first, pinned, so nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fot.demo

# Two workers, tests of one module on one worker (module fixtures are built once): the suite is
# mostly single-threaded XLA compiles (2026-12-01, 2-core CI-size machine: 10 min 47 s with two
# workers; one worker took 16 min 49 s, that run under extra load).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadscope

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) runs
