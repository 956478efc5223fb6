# Every target does its own set-up: virtual environment, dependencies, generated stubs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
STUBS  := service/rpc/generated/.stamp
PROTOS := $(shell find protos -name '*.proto')

.PHONY: run demo test lint typecheck unit unit-grpclib proto stubs stub-tools redis bench bench-grpc-floor bench-transports micro profile clean

$(DEPS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(STUBS): $(DEPS) $(PROTOS) scripts/gen_stubs.py
	$(BIN)/python scripts/gen_stubs.py

## proto: regenerate the Python stubs from protos/
proto: $(STUBS)

## run: start the service (against the built-in Brevo sandbox when BREVO_API_KEY is unset)
run: $(STUBS)
	$(BIN)/python -m service $(ARGS)

## demo: drive one whole conversation through the sandbox from a gRPC client
demo: $(STUBS)
	$(BIN)/python -m service.demo

## stubs: generate Go, Java and TypeScript client stubs from protos/ into build/stubs/
stubs: $(DEPS) stub-tools
	scripts/gen_client_stubs.sh

## stub-tools: install the plugins and compilers of `make stubs` and its tests when missing
stub-tools:
	scripts/ensure-stub-tools.sh

## redis: install redis-server when missing and start one on 127.0.0.1:6379 when stopped
redis:
	scripts/ensure-redis.sh

## bench: the benchmark suite, beside its bare-transport baselines; writes docs/bench/
bench: $(STUBS) redis
	$(BIN)/python -m bench $(BENCH_ARGS)

## bench-grpc-floor: an idle stream's memory on a grpc.aio server keeping nothing for it,
## under each grpcio release of GRPCIO_VERSIONS (each in its own venv under build/grpc-floor/);
## FLOOR_ARGS=--python-share also counts the share of it that is Python's objects
GRPCIO_VERSIONS ?= 1.49.1 1.51.3 1.53.2 1.54.3 1.60.2 1.62.3 1.70.0 1.78.0 1.85.1
bench-grpc-floor:
	FLOOR_ARGS="$(FLOOR_ARGS)" scripts/grpc-floor-versions.sh $(GRPCIO_VERSIONS)

## bench-transports: the service's idle stream and SendMessage, a bare unary call and pushed
## messages, on grpc.aio beside grpclib (python -m bench.transports; about two minutes;
## writes docs/bench/transports.json)
bench-transports: $(STUBS)
	$(BIN)/python -m bench.transports $(TRANSPORTS_ARGS)

## micro: a webhook's own work, in-process (python -m bench.micro; about half a minute)
micro: $(STUBS)
	$(BIN)/python -m bench.micro

## profile: where the service's CPU goes under make bench's ingest load, beside the bare
## route's (python -m bench.profile; about a minute; writes build/profile/profile.json)
profile: $(STUBS)
	$(BIN)/python -m bench.profile $(PROFILE_ARGS)

## test: lint, type-check and run every test; then the tests of the gRPC contract again on
## the other gRPC server (GRPC_SERVER=grpclib), on SQLite
test: lint typecheck unit unit-grpclib

lint: $(STUBS)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	BUF_CACHE_DIR=build/cache/buf $(BIN)/buf lint
	BUF_CACHE_DIR=build/cache/buf $(BIN)/buf breaking --against protos-released

typecheck: $(STUBS)
	$(BIN)/mypy

unit: $(STUBS) redis stub-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# What the contract's callers see over the wire, from connection to status codes, with
# the service on grpclib: every test of these files that does not depend on the store.
GRPCLIB_TESTS := tests/test_rpc.py tests/test_drain.py tests/test_health.py \
	tests/test_resume.py tests/reliability/test_auth.py \
	tests/reliability/test_fuzz_findings.py tests/reliability/test_slow_consumer.py \
	tests/reliability/test_reconnect_burst.py tests/reliability/test_webhook_faults.py
unit-grpclib: $(STUBS) redis stub-tools
	GRPC_SERVER=grpclib $(BIN)/python -m pytest -k "not redis" $(GRPCLIB_TESTS)

clean:
	rm -rf $(VENV) service/rpc/generated .mypy_cache .ruff_cache .pytest_cache build
