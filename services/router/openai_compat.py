"""OpenAI's chat API, translated to and from the router's pipeline: requests, answers, errors.

The HTTP edge (services/router/http_edge.py) owns the sockets; this module owns the wire
format, with no I/O, so every rule here is checked by unit tests:

- `parse_chat` reads a POST /v1/chat/completions body and Shepherd's headers into the same
  `ChatRequest` a gRPC caller sends (so both are one request: same fingerprint, cache key and
  ledger entry), refusing what Shepherd cannot honour with a 400 that names the `param`.
- `completion`, `first_chunk`, `text_chunk`, `finish_chunk` and `usage_chunk` build the
  answer from the openai package's own types (ChatCompletion, ChatCompletionChunk,
  CompletionUsage), so its shape cannot drift from what the SDK parses; `models_list` does
  the same for GET /v1/models.
- `error_response` maps a ShepherdError to OpenAI's error JSON and the HTTP status the SDK
  turns into its exception classes, with Retry-After from the status' RetryInfo.

What OpenAI's API has and Shepherd does not: `n` > 1, tools and functions, `logprobs` and a
`response_format` other than text are refused with a 400 (answering as if they were honoured
would be wrong); other fields Shepherd has no use for are ignored, as OpenAI ignores fields it
does not know. `stop` is applied here: the text ends before the first stop sequence, and the
model's usage (what it generated and is billed for) is reported unchanged.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
from google.rpc import error_details_pb2
from openai.types import CompletionUsage, CreateEmbeddingResponse, Embedding, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat import chat_completion as completion_types
from openai.types.chat import chat_completion_chunk as chunk_types
from openai.types.create_embedding_response import Usage as EmbeddingUsage
from pydantic import BaseModel
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2

from libs.catalog import Catalog
from libs.errors import MAX_MESSAGE_BYTES, ShepherdError, invalid_argument, shorten
from services.router.pipeline import Ending

# At most this many stop sequences, as OpenAI allows.
MAX_STOP_SEQUENCES = 4
INT64 = (-(2**63), 2**63 - 1)

ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    # OpenAI's newer name for the system role; the model sees a system message.
    "developer": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
}
PRIORITIES = {
    "low": common_pb2.PRIORITY_LOW,
    "normal": common_pb2.PRIORITY_NORMAL,
    "high": common_pb2.PRIORITY_HIGH,
}
CACHE_POLICIES = {
    "auto": common_pb2.CACHE_POLICY_AUTO,
    "bypass": common_pb2.CACHE_POLICY_BYPASS,
    "always": common_pb2.CACHE_POLICY_ALWAYS,
}
TRUE, FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})

# Shepherd's request headers (lower case: HTTP header names are case-insensitive).
PRIORITY_HEADER = "x-shepherd-priority"
SELF_HOSTED_HEADER = "x-shepherd-self-hosted-only"
CACHE_HEADER = "x-shepherd-cache-policy"
TIMEOUT_HEADER = "x-shepherd-timeout-s"
IDEMPOTENCY_HEADER = "idempotency-key"
REQUEST_ID_HEADER = "x-request-id"

FinishReason = Literal["stop", "length", "content_filter"]
_FINISH: dict[int, FinishReason] = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}
_BACKENDS = {common_pb2.BACKEND_KIND_TRITON: "triton", common_pb2.BACKEND_KIND_HOSTED: "hosted"}


@dataclass(frozen=True)
class ChatCall:
    """One POST /v1/chat/completions, read: the pipeline's request and what the edge does."""

    request: router_pb2.ChatRequest
    stream: bool
    stop: tuple[str, ...] = ()
    timeout_s: float | None = None
    # How the caller named the fields the pipeline validates, for errors that name them.
    names: Mapping[str, str] = field(default_factory=dict)

    @property
    def completion_id(self) -> str:
        return f"chatcmpl-{self.request.request_id}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _content(value: object, where: str, violations: list[tuple[str, str]]) -> str:
    """A message's text: a string, or an array of text parts (joined), as OpenAI accepts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts: list[str] = []
        for index, part in enumerate(value):
            if (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                violations.append(
                    (f"{where}[{index}]", f"only text parts are supported, not {kind!r}")
                )
        return "".join(texts)
    violations.append((where, "must be a string or an array of text parts"))
    return ""


def _messages(value: object, violations: list[tuple[str, str]]) -> list[common_pb2.ChatMessage]:
    if not isinstance(value, list):
        violations.append(("messages", "must be an array of messages"))
        return []
    messages: list[common_pb2.ChatMessage] = []
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            violations.append((where, "must be an object with a role and content"))
            continue
        role = item.get("role")
        if role not in ROLES:
            violations.append(
                (
                    f"{where}.role",
                    f"{role!r} is not supported: use system, developer, user or assistant"
                    " (Shepherd serves no tools)",
                )
            )
            continue
        if item.get("tool_calls") or item.get("function_call"):
            violations.append((f"{where}.tool_calls", "tool calls are not supported"))
            continue
        content = _content(item.get("content"), f"{where}.content", violations)
        messages.append(common_pb2.ChatMessage(role=ROLES[role], content=content))
    return messages


def _stop(value: object, violations: list[tuple[str, str]]) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or not all(isinstance(s, str) and s for s in stops)
        or len(stops) > MAX_STOP_SEQUENCES
    ):
        violations.append(
            ("stop", f"must be a non-empty string or up to {MAX_STOP_SEQUENCES} of them")
        )
        return ()
    return tuple(stops)


def _header_choice(
    headers: Mapping[str, str],
    name: str,
    choices: Mapping[str, int],
    violations: list[tuple[str, str]],
) -> int:
    raw = headers.get(name)
    if raw is None or not raw.strip():
        return 0
    value = choices.get(raw.strip().lower())
    if value is None:
        violations.append((name, f"must be one of {', '.join(choices)}, not {raw!r}"))
        return 0
    return value


def _header_bool(headers: Mapping[str, str], name: str, violations: list[tuple[str, str]]) -> bool:
    raw = (headers.get(name) or "").strip().lower()
    if raw in TRUE:
        return True
    if raw and raw not in FALSE:
        violations.append((name, f"must be true or false, not {raw!r}"))
    return False


def _timeout(headers: Mapping[str, str], violations: list[tuple[str, str]]) -> float | None:
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        violations.append((TIMEOUT_HEADER, f"must be a positive number of seconds, not {raw!r}"))
        return None
    return value


def _request_id(headers: Mapping[str, str], new_id: str) -> tuple[str, str]:
    """The caller's idempotency key (Idempotency-Key, else X-Request-ID) and the header that
    carried it; a fresh id when neither is sent."""
    for name in (IDEMPOTENCY_HEADER, REQUEST_ID_HEADER):
        value = (headers.get(name) or "").strip()
        if value:
            return value, name
    return new_id, IDEMPOTENCY_HEADER


def _json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or INVALID_ARGUMENT (a 400) saying why not."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise invalid_argument(
            [("body", "we could not parse the JSON body of your request")]
        ) from None
    if not isinstance(data, dict):
        raise invalid_argument([("body", "must be a JSON object")])
    return data


def parse_chat(body: bytes, headers: Mapping[str, str], new_id: str) -> ChatCall:
    """Read a chat request; every problem is reported at once, as a 400 naming the first.

    `headers` must look names up case-insensitively (aiohttp's do; tests pass lower case).
    `new_id` is the request id used when the caller sends no idempotency key.
    """
    data = _json_object(body)
    violations: list[tuple[str, str]] = []
    model = data.get("model")
    if not isinstance(model, str) or not model:
        violations.append(("model", "is required: a model name or alias (GET /v1/models)"))
        model = ""
    messages = _messages(data.get("messages"), violations)

    params = common_pb2.GenerationParams()
    names = {"params.temperature": "temperature", "params.top_p": "top_p"}
    for name in ("max_completion_tokens", "max_tokens"):
        value = data.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            violations.append((name, "must be a whole number of at least 1"))
        elif not params.max_tokens:
            # max_completion_tokens is OpenAI's newer name and wins when both are sent.
            params.max_tokens = min(value, 2**31 - 1)
            names["params.max_tokens"] = name
    for name in ("temperature", "top_p"):
        value = data.get(name)
        if value is None:
            continue
        try:
            number = float(value) if _is_number(value) else math.nan
        except OverflowError:  # a whole number too large for a float
            number = math.nan
        if not math.isfinite(number):
            violations.append((name, "must be a finite number"))
        else:
            setattr(params, name, number)
    seed = data.get("seed")
    if seed is not None:
        if not _is_int(seed) or not INT64[0] <= seed <= INT64[1]:
            violations.append(("seed", "must be a whole number that fits in 64 bits"))
        else:
            params.seed = seed
    n = data.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        violations.append(("n", "only n=1 is supported: send one request per answer you need"))
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        violations.append(("stream", "must be true or false"))
    if data.get("tools") or data.get("functions"):
        violations.append(("tools", "tools and functions are not supported by Shepherd"))
    if data.get("logprobs"):
        violations.append(("logprobs", "log probabilities are not supported by Shepherd"))
    response_format = data.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type") != "text"
    ):
        violations.append(("response_format", "only {'type': 'text'} is supported"))
    stop = _stop(data.get("stop"), violations)
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        violations.append(("user", "must be a string"))

    request_id, id_header = _request_id(headers, new_id)
    names["request_id"] = id_header
    request = router_pb2.ChatRequest(
        model=model,
        messages=messages,
        params=params,
        priority=_header_choice(headers, PRIORITY_HEADER, PRIORITIES, violations),
        cache_policy=_header_choice(headers, CACHE_HEADER, CACHE_POLICIES, violations),
        request_id=request_id,
        self_hosted_only=_header_bool(headers, SELF_HOSTED_HEADER, violations),
    )
    timeout_s = _timeout(headers, violations)
    if violations:
        raise invalid_argument(violations)
    return ChatCall(request, bool(stream), stop, timeout_s, names)


class StopScanner:
    """Cuts a stream of text before the first of its stop sequences.

    Text that could be the start of a stop sequence is held back until the next piece shows
    whether it is one; `flush` returns it at the end when it was not.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._longest = max(len(s) for s in stops)
        self._held = ""
        self.hit = False

    def feed(self, text: str) -> str:
        """What of `text` (and of what was held) may go to the caller now."""
        if self.hit:
            return ""
        buffer = self._held + text
        found = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if found:
            self.hit = True
            self._held = ""
            return buffer[: min(found)]
        keep = 0
        for size in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-size:]
            if any(s.startswith(tail) for s in self._stops):
                keep = size
                break
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.hit else held


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to its first stop sequence, and whether one was found."""
    scanner = StopScanner(stops)
    kept = scanner.feed(text)
    return (kept, True) if scanner.hit else (kept + scanner.flush(), False)


# -- answers ----------------------------------------------------------------------------------


def finish_reason(ending: Ending, stopped: bool) -> FinishReason:
    """OpenAI's finish reason: "stop" when a stop sequence cut the text."""
    return "stop" if stopped else _FINISH.get(ending.finish_reason, "stop")


def usage_of(ending: Ending) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=ending.usage.prompt_tokens,
        completion_tokens=ending.usage.completion_tokens,
        total_tokens=ending.usage.total_tokens,
    )


def shepherd_fields(ending: Ending) -> dict[str, Any]:
    """What Shepherd adds to OpenAI's answer (under the extra key `shepherd`, which the SDK
    keeps in `model_extra`): the price, where it ran, the cache and the trace."""
    placement = ending.placement
    fields: dict[str, Any] = {
        "request_id": ending.request_id,
        "cost_nano_usd": ending.cost.nano_usd,
        "cache_hit": ending.cache_hit,
        "coalesced": ending.coalesced,
        "placement": {
            "deployment": placement.deployment,
            "backend": _BACKENDS.get(placement.kind, ""),
            "node": placement.node,
            "batch_size": placement.batch_size,
            "spilled_over": placement.spilled_over,
            # The GPU time this request used, its batch's, and the batch (Placement.gpu_us).
            "gpu_us": placement.gpu_us,
            "batch_gpu_us": placement.batch_gpu_us,
            "batch_id": placement.batch_id,
        },
        "trace_id": ending.trace_id,
    }
    if ending.usage_estimated:
        fields["usage_estimated"] = True
    if ending.seed is not None:
        fields["seed"] = ending.seed
    return fields


def answer_headers(ending: Ending) -> dict[str, str]:
    """Response headers of a whole answer: the cost, the placement and the cache."""
    placement = ending.placement
    return {
        "x-shepherd-cost-nano-usd": str(ending.cost.nano_usd),
        "x-shepherd-placement": (
            f"deployment={placement.deployment}; backend={_BACKENDS.get(placement.kind, '')};"
            f" node={placement.node}; batch-size={placement.batch_size};"
            f" spilled-over={'true' if placement.spilled_over else 'false'};"
            f" gpu-us={placement.gpu_us}"
        ),
        "x-shepherd-cache-hit": "true" if ending.cache_hit else "false",
    }


def _extra(answer: BaseModel, **fields: Any) -> None:
    """Add fields the openai types do not declare: they allow extras, and the SDK keeps what
    it receives of them in `model_extra`."""
    for name, value in fields.items():
        setattr(answer, name, value)


def completion(call: ChatCall, text: str, ending: Ending, *, stopped: bool) -> bytes:
    """A whole answer, as POST /v1/chat/completions returns it without `stream`."""
    answer = ChatCompletion(
        id=call.completion_id,
        object="chat.completion",
        created=int(time.time()),
        model=ending.model,
        choices=[
            completion_types.Choice(
                index=0,
                message=ChatCompletionMessage(role="assistant", content=text, refusal=None),
                logprobs=None,
                finish_reason=finish_reason(ending, stopped),
            )
        ],
        usage=usage_of(ending),
    )
    _extra(answer, shepherd=shepherd_fields(ending))
    return answer.model_dump_json(exclude_unset=True).encode()


def _chunk(
    call: ChatCall,
    model: str,
    created: int,
    choices: list[chunk_types.Choice],
    usage: CompletionUsage | None = None,
    shepherd: dict[str, Any] | None = None,
) -> bytes:
    chunk = ChatCompletionChunk(
        id=call.completion_id,
        object="chat.completion.chunk",
        created=created,
        model=model,
        choices=choices,
        usage=usage,
    )
    if shepherd is not None:
        _extra(chunk, shepherd=shepherd)
    return b"data: " + chunk.model_dump_json(exclude_unset=True).encode() + b"\n\n"


def first_chunk(call: ChatCall, model: str, created: int) -> bytes:
    """The first event of a stream: the assistant's role and no text yet, as OpenAI sends."""
    delta = chunk_types.ChoiceDelta(role="assistant", content="", refusal=None)
    return _chunk(
        call, model, created, [chunk_types.Choice(index=0, delta=delta, finish_reason=None)]
    )


def text_chunk(call: ChatCall, model: str, created: int, text: str) -> bytes:
    delta = chunk_types.ChoiceDelta(content=text)
    return _chunk(
        call, model, created, [chunk_types.Choice(index=0, delta=delta, finish_reason=None)]
    )


def finish_chunk(call: ChatCall, created: int, ending: Ending, *, stopped: bool) -> bytes:
    delta = chunk_types.ChoiceDelta()
    reason = finish_reason(ending, stopped)
    return _chunk(
        call,
        ending.model,
        created,
        [chunk_types.Choice(index=0, delta=delta, finish_reason=reason)],
    )


def usage_chunk(call: ChatCall, created: int, ending: Ending) -> bytes:
    """The last chunk before [DONE]: no choices, the usage, and Shepherd's fields. Sent on
    every stream, asked for with `stream_options.include_usage` or not."""
    return _chunk(
        call,
        ending.model,
        created,
        [],
        usage=usage_of(ending),
        shepherd=shepherd_fields(ending),
    )


DONE = b"data: [DONE]\n\n"


def error_event(body: bytes) -> bytes:
    """An error after a stream began: an event the SDK raises as APIError."""
    return b"data: " + body + b"\n\n"


def models_list(catalog: Catalog, created: int) -> bytes:
    """GET /v1/models: every model and every alias (`root` names what an alias resolves to,
    as vLLM's list does)."""
    data = [entry.model_dump(exclude_unset=True) for entry in models(catalog, created)]
    return json.dumps({"object": "list", "data": data}).encode()


def models(catalog: Catalog, created: int) -> list[Model]:
    return [
        _model(name, model.name, created)
        for model in catalog.models.values()
        for name in (model.name, *model.aliases)
    ]


def _model(name: str, root: str, created: int) -> Model:
    entry = Model(id=name, object="model", created=created, owned_by="shepherd")
    _extra(entry, root=root)  # what an alias resolves to
    return entry


def model_entry(catalog: Catalog, name: str, created: int) -> bytes:
    """GET /v1/models/{model}: one model or alias; NOT_FOUND with suggestions otherwise."""
    entry = _model(name, catalog.resolve(name).name, created)
    return entry.model_dump_json(exclude_unset=True).encode()


# -- errors -----------------------------------------------------------------------------------

_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    # A request that must stay self-hosted, for a model that runs only on hosted APIs.
    grpc.StatusCode.FAILED_PRECONDITION: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.ABORTED: (409, "server_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "server_overloaded"),
    grpc.StatusCode.CANCELLED: (499, "server_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
}
_CODES = {
    grpc.StatusCode.UNAUTHENTICATED: "invalid_api_key",
    grpc.StatusCode.NOT_FOUND: "model_not_found",
}
# A 429 whose Retry-After is further away than this tells the SDK not to retry on its own
# (x-should-retry: false): a budget that resets at midnight is not worth two more tries.
MAX_SDK_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class ErrorResponse:
    """An error as the HTTP edge sends it."""

    status: int
    body: bytes
    headers: dict[str, str]
    message: str


def _rate_limit_kind(error: ShepherdError) -> tuple[str, str]:
    """(type, code) of a 429: which limit refused it, as OpenAI names them."""
    for detail in error.details:
        if isinstance(detail, error_details_pb2.QuotaFailure):
            for violation in detail.violations:
                if "/budget:" in violation.subject:
                    return "insufficient_quota", "insufficient_quota"
                if "tokens per minute" in violation.description:
                    return "tokens", "rate_limit_exceeded"
                if "requests per minute" in violation.description:
                    return "requests", "rate_limit_exceeded"
    return "server_overloaded", "resource_exhausted"


def error_response(error: ShepherdError, names: Mapping[str, str] | None = None) -> ErrorResponse:
    """OpenAI's error JSON for `error`, its HTTP status and headers.

    `names` renames the pipeline's field names to the caller's (`params.max_tokens` to
    `max_tokens`, `request_id` to the header that carried it), in the message and in `param`.
    """
    names = names or {}
    status, kind = _STATUS.get(error.code, (500, "server_error"))
    code: str | None = _CODES.get(error.code, error.code.name.lower())
    param: str | None = "model" if error.code == grpc.StatusCode.NOT_FOUND else None
    message = error.wire_message
    headers: dict[str, str] = {}
    for detail in error.details:
        if isinstance(detail, error_details_pb2.BadRequest) and detail.field_violations:
            fields = [(names.get(v.field, v.field), v.description) for v in detail.field_violations]
            param = fields[0][0]
            message = shorten(
                "invalid request: " + "; ".join(f"{f}: {d}" for f, d in fields), MAX_MESSAGE_BYTES
            )
        elif isinstance(detail, error_details_pb2.RetryInfo):
            after_s = detail.retry_delay.ToNanoseconds() / 1e9
            headers["retry-after"] = str(max(1, math.ceil(after_s)))
            headers["retry-after-ms"] = str(max(1, round(after_s * 1000)))
            if after_s > MAX_SDK_RETRY_AFTER_S:
                headers["x-should-retry"] = "false"
    if error.code == grpc.StatusCode.INVALID_ARGUMENT:
        code = None  # as OpenAI's: `param` says which field
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        kind, code = _rate_limit_kind(error)
        if "retry-after" not in headers:
            headers["x-should-retry"] = "false"  # no wait makes it pass (one request too big)
    body = json.dumps(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}
    ).encode()
    return ErrorResponse(status, body, headers, message)


def http_error(status: int, message: str, code: str | None = None) -> ErrorResponse:
    """An error of the HTTP layer itself (unknown path, wrong method, body too large)."""
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error" if status < 500 else "server_error",
                "param": None,
                "code": code,
            }
        }
    ).encode()
    return ErrorResponse(status, body, {}, message)


@dataclass(frozen=True)
class EmbedCall:
    """One POST /v1/embeddings, read: the pipeline's request and how vectors are encoded."""

    request: router_pb2.EmbedRequest
    base64: bool
    timeout_s: float | None = None


def parse_embed(body: bytes, headers: Mapping[str, str], new_id: str) -> EmbedCall:
    """Read an embeddings request (OpenAI's shape); every problem reported at once.

    `input` is a string or a list of strings; token arrays are refused (Shepherd's models
    tokenize themselves). `encoding_format` is "float" (the API's default) or "base64"
    (what the openai SDK asks for unless told otherwise: little-endian float32, as OpenAI
    sends it). `dimensions` is refused: the catalog's models have one size each.
    """
    data = _json_object(body)
    violations: list[tuple[str, str]] = []
    model = data.get("model")
    if not isinstance(model, str) or not model:
        violations.append(("model", "is required: an embedding model (GET /v1/models)"))
        model = ""
    raw = data.get("input")
    inputs: list[str] = []
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        inputs = list(raw)
    elif isinstance(raw, list) and raw and all(_is_int(i) or isinstance(i, list) for i in raw):
        violations.append(("input", "token arrays are not supported: send the text"))
    else:
        violations.append(("input", "is required: a string or a non-empty list of strings"))
    encoding = data.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        violations.append(("encoding_format", "must be float or base64"))
    if data.get("dimensions") is not None:
        violations.append(("dimensions", "is not supported: each model has one vector size"))
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        violations.append(("user", "must be a string"))
    request_id, _ = _request_id(headers, new_id)
    request = router_pb2.EmbedRequest(
        model=model,
        inputs=inputs,
        priority=_header_choice(headers, PRIORITY_HEADER, PRIORITIES, violations),
        cache_policy=_header_choice(headers, CACHE_HEADER, CACHE_POLICIES, violations),
        request_id=request_id,
        self_hosted_only=_header_bool(headers, SELF_HOSTED_HEADER, violations),
    )
    timeout_s = _timeout(headers, violations)
    if violations:
        raise invalid_argument(violations)
    return EmbedCall(request, encoding == "base64", timeout_s)


def embeddings(call: EmbedCall, ending: Ending) -> bytes:
    """The vectors, as POST /v1/embeddings returns them."""
    data = []
    for index, vector in enumerate(ending.embeddings):
        values = list(vector.values)
        encoded: list[float] | str = values
        if call.base64:
            encoded = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        # model_construct: a base64 vector is a string, which the type (floats) does not say.
        data.append(Embedding.model_construct(embedding=encoded, index=index, object="embedding"))
    answer = CreateEmbeddingResponse.model_construct(
        data=data,
        model=ending.model,
        object="list",
        usage=EmbeddingUsage(
            prompt_tokens=ending.usage.prompt_tokens, total_tokens=ending.usage.total_tokens
        ),
    )
    return answer.model_dump_json(exclude_unset=False).encode()
