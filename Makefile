# hiervl: `make demo` and `make test` do all the set-up on a fresh machine.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
# The install stamp is keyed on the dependency files: a second `make install` with nothing new
# to do finishes in well under a second.
DEPS_HASH := $(shell cat requirements.txt requirements-dev.txt pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
STAMP   := $(VENV)/.installed-$(DEPS_HASH)
PYTEST_ARGS ?=
# `make test` runs the suite in TEST_WORKERS pytest-xdist processes, each test module whole on one
# worker (tests/conftest.py); TEST_WORKERS=0 runs it in one process. PYTEST_ARGS comes last and wins.
# 3 on 2 cores: a worker often waits (a launch starting up, a server, a hang timeout); with 2, pytest's
# processes used 137% of the 200% (bench/RESULTS.md "Issue #22: the suite against the commit it was filed at").
TEST_WORKERS ?= 3
XDIST   := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-all test-unit demo bench lint clean help gpu-check

help:
	@echo "make demo      install, then run the whole pipeline on the embedded synthetic corpus"
	@echo "make test      install, then run the tests (unit + integration, no slow ones; TEST_WORKERS=3 processes)"
	@echo "make test-all  also the slow end-to-end tests"
	@echo "make install   create .venv with pinned dependencies (idempotent, stamped)"
	@echo "make lint      ruff"
	@echo "make gpu-check on a GPU machine: GPU speed + loader figures, then the gpu tests (bench/gpu_visit.sh)"

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0            # first: deepspeed's build imports it
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "hiervl installed in $(VENV) (stamp $(DEPS_HASH))"

test: install
	$(BIN)/python -m pytest -m "not slow and not gpu" $(XDIST) $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest -m "not slow and not gpu and not integration" $(XDIST) $(PYTEST_ARGS)

demo: install
	$(BIN)/hiervl demo

# No install step: it runs on a GPU machine's own torch (bench/gpu_prepare.sh brings the rest; the lent
# GPU machine has no make: run `bash bench/gpu_visit.sh` there). Without a CUDA GPU: one line, exit 2.
gpu-check:
	@bash bench/gpu_visit.sh

lint: install
	$(BIN)/ruff check pipeline dataprep launch tests bench

clean:
	rm -rf runs .pytest_cache
