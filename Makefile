# Quickstart: `make demo` (train the tiny FoT model offline, then a passkey check) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test bench install clean

# XLA:CPU allocates a step's temporaries afresh every step; with this glibc's malloc backs them with
# transparent huge pages instead of faulting them in 4 KiB at a time (the tiny step 1.34x faster,
# `python -m bench.bench_host_memory`, which times both settings itself). `make bench` runs with it
# too, torch in the same process alike: each framework's steps run in rounds, so the kernel's
# compaction right after the other's step shows only in bench_torch's last column (BENCHMARKS.md).
# Ignored where glibc is older than 2.35 or absent.
HUGE_PAGES := GLIBC_TUNABLES=glibc.malloc.hugetlb=1

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
	$(HUGE_PAGES) $(BIN)/python -m fot.demo

# Two workers, tests of one module on one worker (module fixtures are built once): the suite is
# mostly single-threaded XLA compiles, which tests/conftest.py caches on disk (2-core CI-size machine,
# clean clone, `.ci/run` with the install: 6 min 22 s-10 min 4 s on 2026-12-07; 13 min 33 s before the cache).
test: $(STAMP)
	$(HUGE_PAGES) $(BIN)/python -m pytest -n 2 --dist loadscope

bench: $(STAMP)
	$(HUGE_PAGES) $(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) runs
