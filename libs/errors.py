"""One error type for the whole mesh, mapped to gRPC statuses with google.rpc rich details.

Code deep inside a service raises `ShepherdError`; the server interceptor installed by
`libs.server` turns it into the gRPC status, message and details the caller sees. Errors that
arrive from a peer service are passed on unchanged, rich details included, so the caller of
the router sees the scheduler's own explanation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from libs.telemetry import current_trace_id

_log = logging.getLogger(__name__)
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# What one status may carry. A gRPC client refuses a status whose trailers pass 8 KiB (grpcio's
# default soft limit, 16 KiB hard), and its caller then sees RESOURCE_EXHAUSTED "Stream
# removed" and learns nothing. An error can echo what the caller sent (a model name, a date)
# and lists every violation, so both are bounded here, where errors go on the wire: the
# message to MAX_MESSAGE_BYTES of UTF-8 (percent-encoded on the wire: up to 3 times as long,
# and carried again in the details), a BadRequest to MAX_VIOLATIONS of MAX_DESCRIPTION_BYTES.
MAX_MESSAGE_BYTES = 800
MAX_VIOLATIONS = 10
MAX_DESCRIPTION_BYTES = 200


def shorten(text: str, limit_bytes: int) -> str:
    """`text`, cut to at most `limit_bytes` of UTF-8 (on a character boundary) and marked so."""
    data = text.encode()
    if len(data) <= limit_bytes:
        return text
    mark = " … (shortened)"
    kept = data[: max(0, limit_bytes - len(mark.encode()))].decode(errors="ignore")
    return kept + mark


class ShepherdError(Exception):
    """A failure the caller should see as `code` with an actionable `message`."""

    def __init__(
        self, code: grpc.StatusCode, message: str, details: Sequence[Message] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = tuple(details)

    @property
    def wire_message(self) -> str:
        """The message as the caller receives it: at most MAX_MESSAGE_BYTES."""
        return shorten(self.message, MAX_MESSAGE_BYTES)

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """Encode the rich details the way grpcio-status and grpcurl read them."""
        if not self.details:
            return ()
        status = status_pb2.Status(code=self.code.value[0], message=self.wire_message)
        for detail in self.details:
            packed = any_pb2.Any()
            packed.Pack(detail)
            status.details.append(packed)
        return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def invalid_argument(violations: Iterable[tuple[str, str]]) -> ShepherdError:
    """INVALID_ARGUMENT with one google.rpc.BadRequest field violation per problem.

    At most MAX_VIOLATIONS are listed, and the message names as many as fit in
    MAX_MESSAGE_BYTES, then how many more there are: a request with hundreds of bad messages
    still gets a status its caller can read.
    """
    items = [(field, shorten(text, MAX_DESCRIPTION_BYTES)) for field, text in violations]
    shown = items[:MAX_VIOLATIONS]
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in shown
        ]
    )
    summary, listed = "invalid request: ", 0
    room = MAX_MESSAGE_BYTES - len("; and 9999999 more")
    for field, description in shown:
        part = f"{'; ' if listed else ''}{field}: {description}"
        if listed and len((summary + part).encode()) > room:
            break
        summary, listed = summary + part, listed + 1
    if len(items) > listed:
        summary += f"; and {len(items) - listed} more"
    return ShepherdError(grpc.StatusCode.INVALID_ARGUMENT, summary, [bad_request])


def retry_info(retry_after_s: float) -> error_details_pb2.RetryInfo:
    """google.rpc.RetryInfo telling the caller how long to wait before trying again."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_after_s * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def resource_exhausted(message: str, retry_after_s: float | None) -> ShepherdError:
    """RESOURCE_EXHAUSTED with google.rpc.RetryInfo telling the caller when to try again."""
    details = [retry_info(retry_after_s)] if retry_after_s is not None else []
    return ShepherdError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, details)


_DETAIL_KINDS = (
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.ErrorInfo,
)


def unpack_details(status: status_pb2.Status) -> list[Message]:
    """The google.rpc details Shepherd sends, unpacked from a status."""
    details: list[Message] = []
    for packed in status.details:
        for kind in _DETAIL_KINDS:
            if packed.Is(kind.DESCRIPTOR):
                detail = kind()
                packed.Unpack(detail)
                details.append(detail)
    return details


def from_rpc_error(error: grpc.aio.AioRpcError, peer: str) -> ShepherdError:
    """Re-raise a peer's status as ours, keeping its code, message and rich details."""
    details: list[Message] = []
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            details.extend(unpack_details(status_pb2.Status.FromString(value)))
    code = error.code()
    message = error.details() or f"{peer} failed with {code.name}"
    if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in message.lower():
        message = f"the {peer} service is unreachable: {message}"
    return ShepherdError(code, message, details)


async def abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> NoReturn:
    """End the call with the status `error` maps to; it always raises.

    A ShepherdError becomes its status, message and rich details; an abort the servicer made
    itself passes through; anything else becomes INTERNAL with the trace id to look up, and
    its traceback goes to the log only, so no Python traceback text ever reaches a caller.
    """
    if isinstance(error, grpc.aio.AbortError):
        raise error
    failure = as_shepherd_error(error, method)
    await context.abort(failure.code, failure.wire_message, failure.trailing_metadata())
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def as_shepherd_error(error: Exception, method: str) -> ShepherdError:
    """The error a caller is told about: a ShepherdError as it is, anything else INTERNAL.

    For anything else the traceback goes to the log, with the trace id the caller is given
    to look it up, so no Python traceback text ever reaches a caller.
    """
    if isinstance(error, ShepherdError):
        return error
    trace_id = current_trace_id()
    _log.error("unhandled error", exc_info=error, extra={"method": method})
    return ShepherdError(
        grpc.StatusCode.INTERNAL,
        f"internal error in {method}; see the service logs for trace id {trace_id}",
    )


_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The gRPC status code with this number (as carried inside messages); UNKNOWN if none."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
