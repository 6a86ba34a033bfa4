"""ShepherdError's rich details, and what a real gRPC client sees through the service gate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
import pytest
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from deploy.local.ports import free_port
from libs.errors import (
    MAX_MESSAGE_BYTES,
    MAX_VIOLATIONS,
    STATUS_DETAILS_KEY,
    ShepherdError,
    invalid_argument,
    resource_exhausted,
    shorten,
)
from libs.gate import ServiceGate

SECRET = "db-password-hunter2"
M = TypeVar("M", bound=Message)


def decode(error: ShepherdError) -> status_pb2.Status:
    metadata = dict(error.trailing_metadata())
    assert set(metadata) == {STATUS_DETAILS_KEY}
    return status_pb2.Status.FromString(metadata[STATUS_DETAILS_KEY])


def unpack(status: status_pb2.Status, kind: type[M]) -> list[M]:
    found = []
    for packed in status.details:
        if packed.Is(kind.DESCRIPTOR):
            detail = kind()
            packed.Unpack(detail)
            found.append(detail)
    return found


def test_invalid_argument_round_trips_bad_request() -> None:
    error = invalid_argument(
        [("messages", "at least one message is required"), ("params.top_p", "must be <= 1")]
    )

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == (
        "invalid request: messages: at least one message is required; params.top_p: must be <= 1"
    )
    status = decode(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == error.message
    [bad_request] = unpack(status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("messages", "at least one message is required"),
        ("params.top_p", "must be <= 1"),
    ]


def test_hundreds_of_violations_are_bounded_and_counted() -> None:
    error = invalid_argument((f"messages[{i}].role", "must be ROLE_USER") for i in range(500))

    assert error.message.startswith("invalid request: messages[0].role: must be ROLE_USER; ")
    assert error.message.endswith(" more")
    assert len(error.message.encode()) <= MAX_MESSAGE_BYTES
    listed = error.message.count("must be ROLE_USER")
    assert error.message.endswith(f"; and {500 - listed} more")
    [bad_request] = unpack(decode(error), error_details_pb2.BadRequest)
    assert len(bad_request.field_violations) == MAX_VIOLATIONS


def test_shorten_cuts_on_a_character_boundary_and_says_so() -> None:
    assert shorten("short", 100) == "short"
    cut = shorten("🐑" * 1_000, 100)
    assert len(cut.encode()) <= 100
    assert cut.startswith("🐑") and cut.endswith("(shortened)")


def test_resource_exhausted_carries_retry_delay() -> None:
    error = resource_exhausted("tenant over its rate limit", 1.5)

    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = decode(error)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert status.message == "tenant over its rate limit"
    [retry] = unpack(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay == duration_pb2.Duration(seconds=1, nanos=500_000_000)


def test_resource_exhausted_without_delay_has_no_details() -> None:
    error = resource_exhausted("queue full", None)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details == ()
    assert error.trailing_metadata() == ()


async def fail_with_bad_request(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise invalid_argument([("model", "is required"), ("messages[0].content", "is empty")])


async def fail_with_retry(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise resource_exhausted("slow down", 2.25)


async def fail_plain(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise ShepherdError(grpc.StatusCode.NOT_FOUND, "unknown model 'gpt5'")


async def fail_echoing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise ShepherdError(grpc.StatusCode.NOT_FOUND, f"unknown model {'x' * 50_000!r}")


async def fail_with_many_violations(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise invalid_argument((f"messages[{i}].role", "must be ROLE_USER") for i in range(500))


async def crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError(f"connection to postgres failed with password {SECRET}")


async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"echo:" + request


SERVICE = "shepherd.test.v1.Probe"


@pytest.fixture(scope="module")
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[ServiceGate()])
    handlers = {
        "BadRequest": grpc.unary_unary_rpc_method_handler(fail_with_bad_request),
        "Retry": grpc.unary_unary_rpc_method_handler(fail_with_retry),
        "Plain": grpc.unary_unary_rpc_method_handler(fail_plain),
        "Echoing": grpc.unary_unary_rpc_method_handler(fail_echoing),
        "ManyViolations": grpc.unary_unary_rpc_method_handler(fail_with_many_violations),
        "Crash": grpc.unary_unary_rpc_method_handler(crash),
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = free_port()
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    chan = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield chan
    finally:
        await chan.close()
        await server.stop(None)


async def call(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryCall:
    call = channel.unary_unary(f"/{SERVICE}/{method}")(b"hi", timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    return call


async def test_successful_call_passes_through(channel: grpc.aio.Channel) -> None:
    assert await channel.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=5) == b"echo:hi"


async def test_client_sees_code_message_and_bad_request(channel: grpc.aio.Channel) -> None:
    call_ = await call(channel, "BadRequest")

    assert await call_.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await call_.details() == (
        "invalid request: model: is required; messages[0].content: is empty"
    )
    status = await rpc_status.aio.from_call(call_)
    assert status is not None
    [bad_request] = unpack(status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("model", "is required"),
        ("messages[0].content", "is empty"),
    ]


async def test_client_sees_retry_info(channel: grpc.aio.Channel) -> None:
    call_ = await call(channel, "Retry")

    assert await call_.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await call_.details() == "slow down"
    status = await rpc_status.aio.from_call(call_)
    assert status is not None
    [retry] = unpack(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() == 2_250_000_000


async def test_error_without_details_has_no_status_details(channel: grpc.aio.Channel) -> None:
    call_ = await call(channel, "Plain")

    assert await call_.code() == grpc.StatusCode.NOT_FOUND
    assert await call_.details() == "unknown model 'gpt5'"
    assert await rpc_status.aio.from_call(call_) is None


async def test_a_huge_message_reaches_the_client_shortened(channel: grpc.aio.Channel) -> None:
    """A status over 8 KiB would reach the client as RESOURCE_EXHAUSTED "Stream removed"."""
    call_ = await call(channel, "Echoing")

    assert await call_.code() == grpc.StatusCode.NOT_FOUND
    details = await call_.details()
    assert details.startswith("unknown model 'xxx") and details.endswith("(shortened)")


async def test_hundreds_of_violations_reach_the_client_as_invalid_argument(
    channel: grpc.aio.Channel,
) -> None:
    call_ = await call(channel, "ManyViolations")

    assert await call_.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await call_.details()).endswith(" more")
    status = await rpc_status.aio.from_call(call_)
    assert status is not None
    [bad_request] = unpack(status, error_details_pb2.BadRequest)
    assert len(bad_request.field_violations) == MAX_VIOLATIONS


async def test_unexpected_exception_is_internal_without_traceback(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("ERROR", logger="libs.errors"):
        call_ = await call(channel, "Crash")

    assert await call_.code() == grpc.StatusCode.INTERNAL
    details = await call_.details()
    assert f"/{SERVICE}/Crash" in details
    assert "see the service logs" in details
    for leak in ("Traceback", "RuntimeError", SECRET, "postgres", 'File "'):
        assert leak not in details
    trailing = await call_.trailing_metadata()
    assert all(SECRET not in str(value) for _, value in trailing)
    # The full story goes to the service's own log instead.
    assert any(SECRET in (record.exc_text or "") for record in caplog.records)
