"""Request validation: defaults filled in, and every violation reported at once per field."""

from __future__ import annotations

import math

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2

from libs.catalog import Batching, Deployment, Model, Price, QueuePolicy
from libs.errors import STATUS_DETAILS_KEY, ShepherdError
from services.router.validation import MAX_REQUEST_ID_CHARS, resolved_params

MODEL = Model(
    name="shepherd-tiny",
    aliases=("tiny",),
    family="shepherd-tiny",
    priority=5,
    price=Price(input_nano_per_million=20_000_000, output_nano_per_million=50_000_000),
    default_max_tokens=16,
    max_output_tokens=64,
    batching=Batching(max_batch_size=8, max_queue_delay_ms=5, preferred_batch_sizes=()),
    queue=QueuePolicy(max_size=1024, aging_s=2.0),
    cache_ttl_s=3600,
    deployments=(
        Deployment(name="local/tiny_lm", kind="triton", backend_model="tiny_lm", pool="local"),
    ),
)


def request(**params: float | int) -> router_pb2.ChatRequest:
    return router_pb2.ChatRequest(
        model="tiny",
        messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Count the sheep."),
        ],
        params=common_pb2.GenerationParams(**params),  # type: ignore[arg-type]
        request_id="req-1",
    )


def violations(req: router_pb2.ChatRequest) -> list[tuple[str, str]]:
    """What the caller sees: the field violations of the BadRequest detail."""
    with pytest.raises(ShepherdError) as caught:
        resolved_params(req, MODEL)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    status = status_pb2.Status.FromString(dict(error.trailing_metadata())[STATUS_DETAILS_KEY])
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    found = [(v.field, v.description) for v in bad_request.field_violations]
    for field, description in found:
        assert f"{field}: {description}" in error.message
    return found


def fields(req: router_pb2.ChatRequest) -> list[str]:
    return [field for field, _ in violations(req)]


def test_max_tokens_zero_takes_the_model_default() -> None:
    resolved = resolved_params(request(temperature=0.3, top_p=0.9, seed=11), MODEL)

    assert resolved.max_tokens == MODEL.default_max_tokens
    assert resolved.temperature == pytest.approx(0.3)
    assert resolved.top_p == pytest.approx(0.9)
    assert resolved.HasField("seed") and resolved.seed == 11


def test_explicit_max_tokens_is_kept_and_request_untouched() -> None:
    req = request(max_tokens=64)
    resolved = resolved_params(req, MODEL)
    assert resolved.max_tokens == 64

    req_default = request()
    resolved_params(req_default, MODEL)
    assert req_default.params.max_tokens == 0  # the caller's message is not modified


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_tokens": 65}, "params.max_tokens"),
        ({"max_tokens": -1}, "params.max_tokens"),
        ({"temperature": 2.01}, "params.temperature"),
        ({"temperature": -0.1}, "params.temperature"),
        ({"temperature": math.nan}, "params.temperature"),
        ({"temperature": math.inf}, "params.temperature"),
        ({"top_p": 1.0001}, "params.top_p"),
        ({"top_p": -0.5}, "params.top_p"),
        ({"top_p": math.nan}, "params.top_p"),
    ],
)
def test_single_parameter_violation(params: dict[str, float], field: str) -> None:
    assert fields(request(**params)) == [field]


@pytest.mark.parametrize(
    "params", [{"max_tokens": 64}, {"temperature": 2.0}, {"temperature": 0.0}, {"top_p": 1.0}]
)
def test_boundaries_are_accepted(params: dict[str, float]) -> None:
    resolved_params(request(**params), MODEL)


def test_max_tokens_message_names_the_model_limit() -> None:
    [(field, description)] = violations(request(max_tokens=65))
    assert field == "params.max_tokens"
    assert "64" in description
    assert "shepherd-tiny" in description


def test_empty_messages() -> None:
    req = request()
    del req.messages[:]
    assert violations(req) == [("messages", "at least one message is required")]


def test_every_violation_is_reported_at_once() -> None:
    req = router_pb2.ChatRequest(
        model="tiny",
        messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="fine"),
            common_pb2.ChatMessage(role=common_pb2.ROLE_UNSPECIFIED, content="no role"),
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="   \n"),
            common_pb2.ChatMessage(role=7, content=""),  # type: ignore[arg-type]
        ],
        params=common_pb2.GenerationParams(max_tokens=10_000, temperature=math.nan, top_p=1.5),
        request_id="r" * (MAX_REQUEST_ID_CHARS + 1),
    )

    assert fields(req) == [
        "messages[1].role",
        "messages[3].role",
        "messages[2].content",
        "messages[3].content",
        "params.max_tokens",
        "params.temperature",
        "params.top_p",
        "request_id",
    ]


def test_request_id_at_the_limit_is_accepted() -> None:
    req = request()
    req.request_id = "r" * MAX_REQUEST_ID_CHARS
    resolved_params(req, MODEL)


@pytest.mark.parametrize(
    ("field", "value"), [("priority", 99), ("cache_policy", 99), ("priority", -1)]
)
def test_unknown_enum_values_are_refused_not_read_as_a_default(field: str, value: int) -> None:
    req = request()
    setattr(req, field, value)

    assert fields(req) == [field]
    [(_, message)] = violations(req)
    assert "must be" in message and "(or unset)" in message
