"""Every OpenTelemetry GenAI semantic-convention name Shepherd emits, in one place.

Why one module: the GenAI conventions are still "Development" upstream, and names move
between versions (`gen_ai.system` became `gen_ai.provider.name`; the token-usage metric is
being renamed as this is written). Dashboards and LLM-aware trace tools key on these exact
strings, so when the conventions move, this file is the only one to change, and the version
below says which document the names follow.

Followed: OpenTelemetry semantic conventions for generative AI, v1.37.0 (`gen-ai-spans.md`
and `gen-ai-metrics.md`), the first version with `gen_ai.provider.name`. Not implemented:
the opt-in events carrying prompts and completions (`gen_ai.input.messages`...): prompts are
tenants' data and never leave the mesh in telemetry.

Where each applies:

* router: one CLIENT span per chat, named `chat {gen_ai.request.model}`, with the request and
  response attributes below, and the client metrics `gen_ai.client.operation.duration` and
  `gen_ai.client.token.usage` (services/router/observe.py);
* scheduler: the model-server metrics `gen_ai.server.request.duration`,
  `gen_ai.server.time_to_first_token` and `gen_ai.server.time_per_output_token`
  (services/scheduler/stats.py), and the `hosted.chat` CLIENT span of each call to a hosted
  API (services/scheduler/hosted.py).

Provider names (`gen_ai.provider.name`): the catalog's provider for hosted deployments (e.g.
`holysheep`, an OpenAI-compatible API: the conventions ask for the actual provider, not the
wire format), `triton` for Shepherd's own nodes, and `shepherd` before the request was
placed (an error before any backend was chosen).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from shepherd.common.v1 import common_pb2

from libs import histograms
from libs.catalog import Deployment

SEMCONV_VERSION = "1.37.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"

# -- attributes -------------------------------------------------------------------------------
OPERATION_NAME = "gen_ai.operation.name"
PROVIDER_NAME = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_TOP_P = "gen_ai.request.top_p"
REQUEST_SEED = "gen_ai.request.seed"
RESPONSE_ID = "gen_ai.response.id"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
TOKEN_TYPE = "gen_ai.token.type"
ERROR_TYPE = "error.type"

# -- values -----------------------------------------------------------------------------------
OPERATION_CHAT = "chat"
OPERATION_EMBEDDINGS = "embeddings"
TOKEN_INPUT = "input"
TOKEN_OUTPUT = "output"
PROVIDER_TRITON = "triton"
PROVIDER_UNPLACED = "shepherd"

# -- metrics: (name, unit, description, explicit bucket boundaries) ---------------------------
CLIENT_OPERATION_DURATION = "gen_ai.client.operation.duration"
CLIENT_TOKEN_USAGE = "gen_ai.client.token.usage"
SERVER_REQUEST_DURATION = "gen_ai.server.request.duration"
SERVER_TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"
SERVER_TIME_PER_OUTPUT_TOKEN = "gen_ai.server.time_per_output_token"

DURATION_BUCKETS_S = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

METRICS: Mapping[str, tuple[str, str, tuple[float, ...]]] = {
    CLIENT_OPERATION_DURATION: ("s", "GenAI operation duration.", DURATION_BUCKETS_S),
    CLIENT_TOKEN_USAGE: ("{token}", "Number of input and output tokens used.", TOKEN_BUCKETS),
    SERVER_REQUEST_DURATION: (
        "s",
        "Generative AI server request duration such as time-to-last byte or last output token.",
        DURATION_BUCKETS_S,
    ),
    SERVER_TIME_TO_FIRST_TOKEN: (
        "s",
        "Time to generate first token for successful responses.",
        TTFT_BUCKETS_S,
    ),
    SERVER_TIME_PER_OUTPUT_TOKEN: (
        "s",
        "Time per output token generated after the first token for successful responses.",
        TPOT_BUCKETS_S,
    ),
}

# Shepherd's FinishReason in the conventions' words (OpenAI's: stop, length, content_filter...).
FINISH_REASONS: Mapping[int, str] = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
    common_pb2.FINISH_REASON_ERROR: "error",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}


def histogram(scope: str, name: str) -> histograms.Histogram:
    """The conventions' histogram `name` under the instrumentation scope `scope` (with these
    conventions' schema URL), with its unit, description and buckets (libs/histograms.py)."""
    unit, description, buckets = METRICS[name]
    return histograms.histogram(
        scope,
        name,
        unit=unit,
        description=description,
        boundaries=buckets,
        schema_url=SCHEMA_URL,
    )


def provider_of(placement: common_pb2.Placement, providers: Mapping[str, str]) -> str:
    """`gen_ai.provider.name` of where an answer ran: `providers` maps a hosted deployment's
    name to its catalog provider; Triton placements are `triton`."""
    if placement.kind == common_pb2.BACKEND_KIND_TRITON:
        return PROVIDER_TRITON
    return providers.get(placement.deployment, PROVIDER_UNPLACED)


def deployment_providers(deployments: Iterable[Deployment]) -> dict[str, str]:
    """Hosted deployment name -> its catalog provider, for `provider_of`."""
    return {d.name: d.provider for d in deployments if d.kind == "hosted"}


def chat_span_name(model: str, operation: str = OPERATION_CHAT) -> str:
    """The span name the conventions give an inference: `{operation} {request model}`."""
    return f"{operation} {model}" if model else operation
