"""The OpenAI wire format of the HTTP edge: requests read as gRPC callers send them, answers
that the openai SDK parses, and errors with the status and shape its exceptions expect."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from shepherd.common.v1 import common_pb2

from libs.errors import ShepherdError, invalid_argument, resource_exhausted, retry_info
from services.router.openai_compat import (
    StopScanner,
    completion,
    cut_at_stop,
    error_response,
    finish_chunk,
    first_chunk,
    parse_chat,
    parse_embed,
    text_chunk,
    usage_chunk,
)
from services.router.pipeline import Ending

HEADERS: dict[str, str] = {}


def body(**fields: Any) -> bytes:
    return json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}
    ).encode()


def refusal(raw: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The error JSON a bad request gets, with its status checked to be 400."""
    with pytest.raises(ShepherdError) as caught:
        parse_chat(raw, headers or HEADERS, "new-id")
    failure = error_response(caught.value)
    assert failure.status == 400
    error: dict[str, Any] = json.loads(failure.body)["error"]
    assert error["type"] == "invalid_request_error"
    return error


def test_a_chat_request_reads_as_the_grpc_request_it_stands_for() -> None:
    call = parse_chat(
        body(
            messages=[
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
                },
                {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": "again", "name": "ignored"},
            ],
            max_tokens=9,
            max_completion_tokens=12,
            temperature=0.5,
            top_p=1,
            seed=7,
            n=1,
            stream=True,
            stream_options={"include_usage": False},
            stop="END",
            user="u-1",
            presence_penalty=0.3,  # known to OpenAI, meaningless here: ignored
            some_future_field={"x": 1},  # unknown: ignored, as OpenAI ignores it
        ),
        {
            "idempotency-key": "retry-me",
            "x-shepherd-priority": "HIGH",
            "x-shepherd-self-hosted-only": "true",
            "x-shepherd-cache-policy": "bypass",
            "x-shepherd-timeout-s": "2.5",
        },
        "new-id",
    )
    request = call.request
    assert request.model == "tiny"
    assert [(m.role, m.content) for m in request.messages] == [
        (common_pb2.ROLE_SYSTEM, "be brief"),
        (common_pb2.ROLE_USER, "Hello"),
        (common_pb2.ROLE_ASSISTANT, "Hi"),
        (common_pb2.ROLE_USER, "again"),
    ]
    # max_completion_tokens, OpenAI's newer name, wins over max_tokens.
    assert (
        request.params.max_tokens == 12
        and call.names["params.max_tokens"] == "max_completion_tokens"
    )
    assert (request.params.temperature, request.params.top_p, request.params.seed) == (0.5, 1, 7)
    assert request.priority == common_pb2.PRIORITY_HIGH
    assert request.self_hosted_only and request.cache_policy == common_pb2.CACHE_POLICY_BYPASS
    assert request.request_id == "retry-me" and call.completion_id == "chatcmpl-retry-me"
    assert call.stream and call.stop == ("END",) and call.timeout_s == 2.5


def test_defaults_leave_the_grpc_defaults_and_pick_a_fresh_request_id() -> None:
    call = parse_chat(body(), {}, "fresh")
    assert call.request.request_id == "fresh"
    assert not call.request.params.max_tokens and not call.request.params.HasField("seed")
    assert call.request.priority == common_pb2.PRIORITY_UNSPECIFIED
    assert not call.stream and call.timeout_s is None
    assert (
        parse_chat(body(), {"x-request-id": "from-proxy"}, "x").request.request_id == "from-proxy"
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 10**400}, "temperature"),
        ({"n": True}, "n"),
        ({"seed": 2**64}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": "hi"}, "messages"),
        ({"model": 3}, "model"),
    ],
)
def test_what_shepherd_cannot_honour_is_a_400_naming_the_param(
    fields: dict[str, Any], param: str
) -> None:
    error = refusal(body(**fields))
    assert error["param"] == param
    assert error["message"].startswith(f"invalid request: {param}: ")


@pytest.mark.parametrize(
    ("headers", "param"),
    [
        ({"x-shepherd-priority": "urgent"}, "x-shepherd-priority"),
        ({"x-shepherd-self-hosted-only": "maybe"}, "x-shepherd-self-hosted-only"),
        ({"x-shepherd-cache-policy": "never"}, "x-shepherd-cache-policy"),
        ({"x-shepherd-timeout-s": "-1"}, "x-shepherd-timeout-s"),
    ],
)
def test_bad_shepherd_headers_are_a_400_naming_the_header(
    headers: dict[str, str], param: str
) -> None:
    assert refusal(body(), headers)["param"] == param


def test_a_body_that_is_not_a_json_object_is_a_400() -> None:
    assert "could not parse the JSON body" in refusal(b"{not json")["message"]
    assert refusal(b"[1, 2]")["param"] == "body"


def test_every_problem_is_listed_at_once() -> None:
    message = refusal(body(n=3, temperature="x", stop=7))["message"]
    assert "n:" in message and "temperature:" in message and "stop:" in message


def test_the_pipelines_field_names_come_back_as_the_callers() -> None:
    # The pipeline validates the gRPC request; its errors name the proto's fields.
    error = invalid_argument(
        [("params.max_tokens", "must be between 1 and 256"), ("params.temperature", "bad")]
    )
    call = parse_chat(body(max_tokens=9999), {"idempotency-key": "k"}, "x")
    failure = json.loads(error_response(error, call.names).body)["error"]
    assert failure["param"] == "max_tokens"
    assert (
        failure["message"]
        == "invalid request: max_tokens: must be between 1 and 256; temperature: bad"
    )
    conflict = invalid_argument([("request_id", "'k' was already used")])
    assert (
        json.loads(error_response(conflict, call.names).body)["error"]["param"] == "idempotency-key"
    )


@pytest.mark.parametrize(
    ("code", "status", "kind", "error_code"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, 401, "invalid_request_error", "invalid_api_key"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error", "permission_denied"),
        (grpc.StatusCode.FAILED_PRECONDITION, 403, "permission_error", "failed_precondition"),
        (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error", "model_not_found"),
        (grpc.StatusCode.UNAVAILABLE, 503, "server_error", "unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error", "deadline_exceeded"),
        (grpc.StatusCode.INTERNAL, 500, "server_error", "internal"),
    ],
)
def test_statuses_map_to_the_http_status_the_sdk_expects(
    code: grpc.StatusCode, status: int, kind: str, error_code: str
) -> None:
    failure = error_response(ShepherdError(code, "what happened"))
    assert failure.status == status
    assert json.loads(failure.body)["error"] == {
        "message": "what happened",
        "type": kind,
        "param": "model" if status == 404 else None,
        "code": error_code,
    }


def quota(subject: str, description: str, after_s: float | None) -> ShepherdError:
    details: list[Any] = [
        error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)
            ]
        )
    ]
    if after_s is not None:
        details.append(retry_info(after_s))
    return ShepherdError(grpc.StatusCode.RESOURCE_EXHAUSTED, "refused", details)


def test_429s_say_which_limit_and_when_to_come_back() -> None:
    rpm = error_response(quota("tenant:acme", "5 requests per minute", 2.2))
    assert rpm.status == 429
    assert rpm.headers == {"retry-after": "3", "retry-after-ms": "2200"}
    assert json.loads(rpm.body)["error"]["type"] == "requests"
    assert json.loads(rpm.body)["error"]["code"] == "rate_limit_exceeded"
    tpm = error_response(quota("tenant:acme/model:gpt-4.1", "100 tokens per minute", 1.0))
    assert json.loads(tpm.body)["error"]["type"] == "tokens"
    # A budget that resets hours from now: the SDK is told not to retry on its own.
    budget = error_response(quota("tenant:acme/budget:day", "daily budget ...", 7200.0))
    assert json.loads(budget.body)["error"]["code"] == "insufficient_quota"
    assert budget.headers["retry-after"] == "7200" and budget.headers["x-should-retry"] == "false"
    # A full queue (the scheduler's refusal) carries RetryInfo and no QuotaFailure.
    queue = error_response(resource_exhausted("the queue of model x is full", 0.5))
    assert queue.status == 429 and queue.headers["retry-after"] == "1"
    assert json.loads(queue.body)["error"]["type"] == "server_overloaded"


def ending(reason: int = common_pb2.FINISH_REASON_STOP, seed: int | None = None) -> Ending:
    return Ending(
        request_id="r1",
        model="shepherd-tiny",
        finish_reason=reason,
        usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7),
        cost=common_pb2.Money(nano_usd=1234),
        placement=common_pb2.Placement(
            deployment="local/tiny_lm",
            kind=common_pb2.BACKEND_KIND_TRITON,
            node="n1",
            batch_size=2,
            gpu_us=1500,
            batch_gpu_us=2900,
            batch_id="b-7",
        ),
        cache_hit=False,
        trace_id="ab" * 16,
        seed=seed,
    )


def test_an_answer_parses_as_the_sdks_chat_completion() -> None:
    call = parse_chat(body(), {}, "r1")
    answer = ChatCompletion.model_validate_json(
        completion(
            call, "Hello there", ending(common_pb2.FINISH_REASON_LENGTH, seed=5), stopped=False
        )
    )
    assert answer.id == "chatcmpl-r1" and answer.object == "chat.completion"
    assert answer.model == "shepherd-tiny"
    assert answer.choices[0].message.content == "Hello there"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.total_tokens == 7
    extra = (answer.model_extra or {})["shepherd"]
    assert extra["cost_nano_usd"] == 1234 and extra["seed"] == 5
    assert extra["placement"] == {
        "deployment": "local/tiny_lm",
        "backend": "triton",
        "node": "n1",
        "batch_size": 2,
        "spilled_over": False,
        "gpu_us": 1500,
        "batch_gpu_us": 2900,
        "batch_id": "b-7",
    }


def events(raw: bytes) -> list[bytes]:
    """The `data:` payloads of SSE bytes, each checked to be framed as one event."""
    assert raw.endswith(b"\n\n")
    frames = raw.split(b"\n\n")[:-1]
    assert all(frame.startswith(b"data: ") and b"\n" not in frame for frame in frames)
    return [frame[len(b"data: ") :] for frame in frames]


def test_stream_chunks_parse_as_the_sdks_chunks() -> None:
    call = parse_chat(body(stream=True), {}, "r2")
    raw = (
        first_chunk(call, "shepherd-tiny", 100)
        + text_chunk(call, "shepherd-tiny", 100, "Hi")
        + finish_chunk(call, 100, ending(), stopped=False)
        + usage_chunk(call, 100, ending())
    )
    chunks = [ChatCompletionChunk.model_validate_json(data) for data in events(raw)]
    assert {c.id for c in chunks} == {"chatcmpl-r2"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[1].choices[0].delta.content == "Hi"
    assert chunks[2].choices[0].finish_reason == "stop"
    assert chunks[3].choices == [] and chunks[3].usage is not None
    assert chunks[3].usage.completion_tokens == 4
    assert (chunks[3].model_extra or {})["shepherd"]["trace_id"] == "ab" * 16
    assert all(c.usage is None for c in chunks[:3])


@pytest.mark.parametrize(
    ("pieces", "stops", "expected", "hit"),
    [
        (["Hello wor", "ld, bye"], ["world"], "Hello ", True),
        (["ab", "c", "d"], ["cd"], "ab", True),
        (["abc", "x"], ["cd"], "abcx", False),  # a held "c" goes out when it is not "cd"
        (["one END two"], ["END", "one"], "", True),  # the earliest stop wins
        (["plain"], ["zz"], "plain", False),
    ],
)
def test_stop_sequences_cut_a_stream_where_they_start(
    pieces: list[str], stops: list[str], expected: str, hit: bool
) -> None:
    scanner = StopScanner(stops)
    sent = "".join(scanner.feed(piece) for piece in pieces) + scanner.flush()
    assert (sent, scanner.hit) == (expected, hit)
    assert cut_at_stop("".join(pieces), stops) == (expected, hit)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"model": "embed"}, "input", "a string or a non-empty list of strings"),
        ({"model": "embed", "input": [1, 2, 3]}, "input", "token arrays are not supported"),
        ({"model": "embed", "input": "x", "encoding_format": "int8"}, "encoding_format", "float"),
        ({"model": "embed", "input": "x", "dimensions": 64}, "dimensions", "one vector size"),
        ({"input": "x"}, "model", "an embedding model"),
    ],
)
def test_an_embeddings_request_openai_would_refuse_is_refused_naming_the_field(
    body: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ShepherdError) as refused:
        parse_embed(json.dumps(body).encode(), {}, "id-1")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{field}:" in refused.value.message and message in refused.value.message


def test_an_embeddings_request_reads_one_input_or_many_and_the_encoding() -> None:
    one = parse_embed(b'{"model": "embed", "input": "hello"}', {"idempotency-key": "k1"}, "new")
    many = parse_embed(
        b'{"model": "embed", "input": ["a", "b"], "encoding_format": "base64"}', {}, "new"
    )
    assert list(one.request.inputs) == ["hello"] and not one.base64
    assert one.request.request_id == "k1"
    assert list(many.request.inputs) == ["a", "b"] and many.base64
    assert many.request.request_id == "new"
