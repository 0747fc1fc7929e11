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

.PHONY: help venv demo test lint docs bench protos quality robust soak lowcomm clean distclean
.PHONY: image base-image wheelhouse

help:
	@echo "make venv       create .venv and install fedstream with its dev tools"
	@echo "make demo       local cluster: 1 server + 3 clients train digits (runs/demo)"
	@echo "make test       every test; PYTEST_ARGS='-m \"not slow and not e2e\"' is the fast tier"
	@echo "make lint       ruff check, ruff format --check, mypy"
	@echo "make docs       regenerate docs/reference/ and build the docs site, strict (build/site)"
	@echo "make bench      transfer benchmark grid against TCP/grpcio/memcpy (runs/bench)"
	@echo "make protos     regenerate common/proto/v1 from protos/"
	@echo "make quality    learning-quality report: strategies vs centralised (report/)"
	@echo "make robust     attacks x strategies on digits, real processes (report/robust.md)"
	@echo "make soak       60 rounds under kill -9 and cut connections, checked (runs/soak)"
	@echo "make lowcomm    DiLoCo, codecs, streaming: loss against bytes (report/lowcomm.md)"
	@echo "make clean      remove caches and build outputs"
	@echo "make distclean  clean, and remove .venv and runs/ too"
	@echo "make wheelhouse download every wheel the image needs into wheels/ (offline builds)"
	@echo "make base-image a Debian base image with mmdebstrap, for hosts with no registry"
	@echo "make image      the fedstream image (BASE=..., offline with --network none if wheels/)"

venv: $(STAMP)

# constraints.txt pins torch to the CPU wheel on local disk (a bare `torch` would fetch a
# CUDA build) and pins the code generators the committed stubs were made with.
$(RUNTIME_STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || { test -n "$(PYTHON)" || { echo "need python3.11 or python3" >&2; exit 1; }; \
		echo "$(PYTHON) -m venv $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "installing fedstream and its dependencies into $(VENV) (about a minute)..."
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@$(BIN)/pip install --quiet -c constraints.txt -e .
	@echo "installed: $(BIN)/fedstream"
	@touch $@

$(STAMP): $(RUNTIME_STAMP)
	@echo "installing the dev tools (pytest, ruff, mypy, mkdocs)..."
	@$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
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

# The reference pages are generated from the code (fedstream/docs_reference.py); strict mode
# turns every warning (a broken link, a page missing from the nav) into a failure.
# NO_MKDOCS_2_WARNING quiets Material's banner about MkDocs 2.0.
docs: $(STAMP)
	$(BIN)/python -m fedstream.docs_reference
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir build/site

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

# Not part of `make test`: 60 rounds of 6 processes under kill -9 and cut connections, then
# the same run undisturbed (about 10 minutes on 2 busy cores); exits 1 when a check fails.
# SOAK_ARGS='--rounds 80 --seed 3' changes it (python -m bench.soak --help).
SOAK_ARGS ?=
soak: $(STAMP)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# Not part of `make test`: about 15 minutes on 2 busy cores, written to
# report/lowcomm.{md,png}, with one DiLoCo row through real processes (runs/lowcomm).
lowcomm: $(STAMP)
	$(BIN)/python -m bench.lowcomm --out report

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) runs

# Container images (docs/containers.md). Offline: `make wheelhouse base-image image
# BASE=fedstream-base:bookworm`. The docker CLI honours DOCKER_HOST.
IMAGE ?= fedstream:latest
BASE ?=
BASE_IMAGE ?= fedstream-base:bookworm
DEBIAN_MIRROR ?= http://deb.debian.org/debian
# Where torch's CPU build comes from (a bare `torch` on PyPI is the CUDA build); empty
# where the pinned CPU wheel is found otherwise (pip's find-links).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
WHEELS := wheels

# setuptools is the build backend `pip install .` needs inside the image, with no index.
wheelhouse: $(RUNTIME_STAMP)
	$(BIN)/pip download --quiet -c constraints.txt -d $(WHEELS) \
		$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) . 'setuptools>=77'

# Debian bookworm with Python, from a Debian mirror: no registry needed. The host's own
# CA certificates go in too (some networks re-sign TLS).
base-image:
	@command -v mmdebstrap >/dev/null || { echo "make base-image needs mmdebstrap" >&2; exit 1; }
	set -o pipefail; mmdebstrap --quiet --variant=minbase \
		--include=python3,python3-venv,python3-pip,ca-certificates,passwd \
		--customize-hook='copy-in /usr/local/share/ca-certificates /usr/local/share' \
		--customize-hook='chroot "$$1" update-ca-certificates' \
		bookworm - $(DEBIAN_MIRROR) \
		| docker import \
			--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
			--change 'CMD ["python3"]' - $(BASE_IMAGE)

image:
	docker build $(if $(wildcard $(WHEELS)/*.whl),--network none) \
		$(if $(BASE),--build-arg BASE=$(BASE)) -t $(IMAGE) .
