# silo — the targets a person and CI use (see README.md).
#
#   make demo    install what is needed, then show silo isolating commands
#   make test    install what is needed, then the whole test suite and lint
#   make bench   install what is needed, then benchmark against bwrap/runc/runsc/firejail
#   make lint    ruff + mypy --strict
#   make clean   remove caches and build leftovers (distclean: also .venv)
#
# Every target that runs code depends on `install` (scripts/install.sh), which is
# idempotent and takes well under a second once everything is in place.

SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python

# Extra arguments, e.g. `make test PYTEST_ARGS="-k mount -x"`, `make bench BENCH_ARGS=--quick`.
PYTEST_ARGS ?=
BENCH_ARGS  ?=
# Per-test time limit (pytest-timeout), so one hung sandbox cannot eat CI's 90 minutes.
TEST_TIMEOUT ?= 600

.PHONY: help install demo test lint bench clean distclean _lint

help:
	@sed -n 's/^#   make /make /p' Makefile

install:
	@bash scripts/install.sh

demo: install
	@bash scripts/demo.sh

# pytest's exit code 5 ("no tests collected") is a failure here, not a pass.
# The suite runs first, lint after it; the target fails if either failed.
test: install
	@rc=0; \
	$(VENV)/bin/pytest -p no:cacheprovider -ra --timeout=$(TEST_TIMEOUT) tests $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests, which is a failure" >&2; fi; \
	lint=0; $(MAKE) --no-print-directory _lint || lint=$$?; \
	if [ $$rc -ne 0 ]; then echo "make test: FAILED (pytest exit code $$rc)" >&2; exit 1; fi; \
	if [ $$lint -ne 0 ]; then echo "make test: FAILED (lint)" >&2; exit 1; fi; \
	echo "make test: passed"

lint: install
	@$(MAKE) --no-print-directory _lint

_lint:
	@rc=0; \
	echo "+ ruff check src tests bench"; $(VENV)/bin/ruff check --no-cache src tests bench || rc=1; \
	echo "+ mypy --strict src/silo"; $(VENV)/bin/mypy --strict src/silo || rc=1; \
	exit $$rc

bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf .mypy_cache .ruff_cache .pytest_cache build dist src/*.egg-info
	find src tests bench -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
