# Shepherd: `make run` brings the whole mesh up locally; `make test` runs the suite.
# Both create the virtual environment and generate the gRPC stubs first, so a fresh clone
# needs nothing installed by hand beyond Python 3.11+.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GEN := gen
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := $(GEN)/.stamp
PTH = $(shell $(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/shepherd_gen.pth

.PHONY: all venv gen run test bench bench-batching bench-quota bench-hosted bench-streaming \
	bench-gateway bench-grpc-floor bench-single-flight bench-soak bench-http-edge bench-http-stacks \
	bench-cost bench-embeddings bench-telemetry bench-spans bench-scale-out lint fmt clean

all: gen

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

# Generate the Python stubs for every proto into gen/ and put gen/ on the venv's import path.
$(GEN_STAMP): $(STAMP) $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(BIN)/python -m grpc_tools.protoc -I protos \
		--python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) $(PROTOS)
	echo "$(CURDIR)/$(GEN)" > $(PTH)
	touch $@

gen: $(GEN_STAMP)

run: gen
	$(BIN)/python -m deploy.local.launcher

# Lint first (cheap, and keeps the contracts buf-clean), then the whole suite against real servers,
# on TEST_WORKERS pytest-xdist workers, each taking whole test files (their servers are per
# file). One worker ran it in 9.4 minutes here, two in 5.3; TEST_WORKERS=0 runs it in-process.
TEST_WORKERS ?= 2
test: gen lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# Every benchmark; each prints a table and writes .build/bench/<name>.json (docs/BENCHMARKS.md).
bench: bench-batching bench-quota bench-hosted bench-streaming bench-gateway bench-grpc-floor \
	bench-single-flight bench-soak bench-http-edge bench-http-stacks bench-cost bench-embeddings \
	bench-telemetry bench-spans bench-scale-out

# Dynamic batching against one-at-a-time dispatch through the scheduler, on a real local Triton
# node.
bench-batching: gen
	$(BIN)/python -m bench.batching

# Batch fill and utilisation of tiny_lm's pool at concurrency 1, 8, 32, 64 from Shepherd's own
# pool report (GPU time attributed from Triton's statistics), next to throughput; and what the
# statistics read behind each batch's GPU time costs.
bench-cost: gen
	$(BIN)/python -m bench.cost

# The CPU and Redis round trips that budgets and rate limits add per request, on a real Valkey.
bench-quota: gen
	$(BIN)/python -m bench.quota

# CPU per hosted call of the openai SDK's two transports (httpx, aiohttp), streaming and not,
# against the provider simulator.
bench-hosted: gen
	$(BIN)/python -m bench.hosted_transport

# Streaming through the whole local mesh against calling the model directly: time to first
# token, total latency, ChatStream against unary Chat throughput, self-hosted and hosted.
bench-streaming: gen
	$(BIN)/python -m bench.streaming

# The mesh's own cost per request, as gateways are benchmarked: added latency over calling
# Triton and the hosted API directly, CPU per request of every process, and the throughput
# frontier (p99 under 10/50/100 ms); add ARGS=--profile for py-spy flame graphs of the services.
bench-gateway: gen
	$(BIN)/python -m bench.gateway $(ARGS)

# What one grpc.aio call costs in CPU on this machine, back to back and after a pause, against a
# bidirectional stream message and a plain TCP echo: the floor under every hop of the mesh.
bench-grpc-floor: gen
	$(BIN)/python -m bench.grpc_floor

# N identical requests at once with single-flight on and off (Triton inferences, p50/p99), and
# what the lease adds to a miss nobody follows (target: at most 0.2 ms p50).
bench-single-flight: gen
	$(BIN)/python -m bench.single_flight $(SINGLE_FLIGHT_ARGS)

# A soak: 50,000 requests of a realistic mix through the whole local mesh, sampling every
# service's RSS and Valkey's memory every 5,000 requests; reports growth per request, what Valkey
# keeps for a production day, and checks the ledger against the answers (about 5-8 minutes;
# SOAK_ARGS='--requests 100000' to change).
bench-soak: gen
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# What telemetry costs: the mesh's CPU per request with spans, metrics, /metrics, Triton tracing
# and access logs on, against OTEL_SDK_DISABLED and WARNING logs (target: at most 15 % more).
# Two meshes side by side, about 3 minutes (TELEMETRY_ARGS='--requests 4000' to change).
bench-telemetry: gen
	$(BIN)/python -m bench.telemetry $(TELEMETRY_ARGS)
# What one span costs to record and to encode: OpenTelemetry's SDK against libs/spans.py and
# libs/otlp_spans.py, warm and after an idle pause (about 20 s; no target).
bench-spans: gen
	$(BIN)/python -m bench.spans
# The OpenAI-compatible HTTP edge against the gRPC API and direct Triton: added latency at
# concurrency 1, throughput at 32, and the router's CPU per request (target: HTTP at most 1.3x
# gRPC's); HTTP_EDGE_ARGS='--requests 4000' to change.
bench-http-edge: gen
	$(BIN)/python -m bench.http_edge $(HTTP_EDGE_ARGS)

# The HTTP stacks the edge could run on (aiohttp, uvicorn with httptools, Starlette or h11),
# and grpc.aio for scale: server CPU per request of the same handler, JSON and SSE.
bench-http-stacks: gen
	$(BIN)/python -m bench.http_stacks

# Embedding throughput at concurrency 32: RouterService/Embed through the whole mesh against
# calling Triton's embed_tiny directly, one row per call and in full batches (the ratio is the
# headline); EMBEDDINGS_ARGS='--concurrency 64 --requests 5000' to change.
bench-embeddings: gen
	$(BIN)/python -m bench.embeddings $(EMBEDDINGS_ARGS)

# Scheduler scale-out: throughput through the router with 1, 2 and 3 scheduler replicas, and a
# simulation of 100 models, 50 nodes and 10 replicas; about a minute
# (SCALE_OUT_ARGS='--seconds 10 --concurrency 64' to change).
bench-scale-out: gen
	$(BIN)/python -m bench.scale_out $(SCALE_OUT_ARGS)

lint: gen
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint
	$(BIN)/buf format --exit-code > /dev/null
	# Contracts change additively: nothing on main that callers build on may break.
	$(BIN)/buf breaking --against '.git#branch=main'

fmt: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/buf format -w

clean:
	rm -rf $(GEN) .build .run
