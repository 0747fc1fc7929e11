# fedstream's everyday commands. `make demo` and `make test` work on a fresh clone:
# both create the virtual environment in .venv first.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
BIN := $(VENV)/bin
# The package alone (what `make demo` needs), and with its dev tools (tests, lint).
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
# The interpreter the virtual environment is made from: python3.11, else python3.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

.PHONY: help venv demo test lint bench protos quality robust clean distclean

help:
	@echo "make venv       create .venv and install fedstream with its dev tools"
	@echo "make demo       local cluster: 1 server + 3 clients train digits (runs/demo)"
	@echo "make test       every test; PYTEST_ARGS='-m \"not slow and not e2e\"' is the fast tier"
	@echo "make lint       ruff check, ruff format --check, mypy"
	@echo "make bench      transfer benchmark grid against TCP/grpcio/memcpy (runs/bench)"
	@echo "make protos     regenerate common/proto/v1 from protos/"
	@echo "make quality    learning-quality report: strategies vs centralised (report/)"
	@echo "make robust     attacks x strategies on digits, real processes (report/robust.md)"
	@echo "make clean      remove caches and build outputs"
	@echo "make distclean  clean, and remove .venv and runs/ too"

venv: $(STAMP)

# constraints.txt pins torch to the CPU wheel on local disk (a bare `torch` would fetch a
# CUDA build) and pins the code generators the committed stubs were made with.
$(RUNTIME_STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || { test -n "$(PYTHON)" || { echo "need python3.11 or python3" >&2; exit 1; }; \
		echo "$(PYTHON) -m venv $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install -c constraints.txt -e .
	@touch $@

$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	@touch $@

demo: $(RUNTIME_STAMP)
	$(BIN)/fedstream demo --run-dir runs/demo $(DEMO_ARGS)

# A few tests need system tools (docker-compose, Debian's chromium, root and ip netns) and
# skip without them; `make test` installs nothing, it names what is missing and what will
# skip (.ci/system-tools; CI installs them with `.ci/system-tools install`).
test: $(STAMP)
	@bash .ci/system-tools report
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# mypy cannot follow setuptools' package-dir mapping, so it reads the sources through a
# tree of links laid out as the installed package: fedstream.server is then server/, and
# every import between the packages is type-checked.
TYPECHECK := build/typecheck

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/fedstream
	ln -s $(CURDIR)/fedstream/*.py $(TYPECHECK)/fedstream/
	for pkg in common server client tasks; do ln -s $(CURDIR)/$$pkg $(TYPECHECK)/fedstream/$$pkg; done
	MYPYPATH=$(TYPECHECK) $(BIN)/mypy -p fedstream -p bench
	MYPYPATH=$(TYPECHECK) $(BIN)/mypy tests

# The full grid takes about half an hour on 2 cores; BENCH_ARGS='--params 100e6' narrows it.
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

protos: $(STAMP)
	$(BIN)/python protos/generate.py

# Not part of `make test`: a few minutes of training, written to report/quality.{md,png}.
quality: $(STAMP)
	$(BIN)/python bench/quality.py --out report

# Not part of `make test`: 77 runs of 6 processes each (about 2 hours on 2 busy cores);
# runs finished earlier are reused from runs/robust/results.json. ROBUST_ARGS narrows it.
ROBUST_ARGS ?=
robust: $(STAMP)
	$(BIN)/python -m bench.robust --out report $(ROBUST_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) runs
