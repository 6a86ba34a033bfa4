"""The router's end of SchedulerService/InferMany: its requests, many on one open stream.

Why: one gRPC call per request was most of what the router-scheduler hop cost
(services/scheduler/multiplex.py says how much). One stream per scheduler replica is opened
on first use and opened again after it ends; each request is a call on it with an id, its
own deadline, its trace context and the replicas the router could not reach, and calls that
start while a message is being sent go together in the next one, as events do coming back.

A call looks to the pipeline like the InferStream call it replaces (`read()` gives the
deltas, the final chunk, then the end or the error; `cancel()` stops the work), and its
errors are the
`grpc.aio.AioRpcError`s that call would raise, rich details included. So retries, billing of
partial usage and error mapping in services/router/pipeline.py are one code path for both.
When the stream breaks (the replica went away), every call on it fails with the stream's
error, which the pipeline treats as it treats a call that could not reach the replica.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence

import grpc
from shepherd.scheduler.v1 import scheduler_pb2

from libs.errors import STATUS_DETAILS_KEY, status_code
from libs.peers import PeerChannel
from libs.telemetry import trace_metadata

METHOD = "/shepherd.scheduler.v1.SchedulerService/InferMany"
# How long past a call's own timeout the router waits for the scheduler's last event: the
# scheduler ends the call at the timeout and sends what was generated (to bill), which
# takes a moment to arrive.
_GRACE_S = 0.05


def _rpc_error(code: grpc.StatusCode, message: str, details: bytes = b"") -> grpc.aio.AioRpcError:
    """The error an InferStream call would have raised for this status."""
    trailing = grpc.aio.Metadata((STATUS_DETAILS_KEY, details)) if details else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, message)


class MultiplexedCall:
    """One request on an InferMany stream, read like the InferStream call it replaces."""

    __slots__ = ("_deadline", "_error", "_events", "_finished", "_id", "_stream")

    def __init__(self, stream: _Stream, call_id: int, deadline: float) -> None:
        self._stream = stream
        self._id = call_id
        self._deadline = deadline
        self._events: asyncio.Queue[scheduler_pb2.InferEvent | grpc.aio.AioRpcError]
        self._events = asyncio.Queue()
        self._finished = False
        self._error: grpc.aio.AioRpcError | None = None  # raised after the final chunk

    def deliver(self, event: scheduler_pb2.InferEvent | grpc.aio.AioRpcError) -> None:
        self._events.put_nowait(event)

    async def read(self) -> scheduler_pb2.InferStreamResponse | object:
        """The next chunk (deltas, then the final one), then `grpc.aio.EOF`; an error is raised
        where the call's status would be, after the final chunk that carried what was used."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._finished:
            return grpc.aio.EOF
        try:
            async with asyncio.timeout_at(self._deadline):
                event = await self._events.get()
        except TimeoutError:
            self.cancel()
            raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except asyncio.CancelledError:
            self.cancel()  # the caller went away: so does the request
            raise
        if isinstance(event, grpc.aio.AioRpcError):
            self._finished = True
            raise event
        if event.HasField("delta"):
            return scheduler_pb2.InferStreamResponse(delta=event.delta)
        self._finished = True
        if event.HasField("failure"):
            failure = event.failure
            error = _rpc_error(status_code(failure.code), failure.message, failure.status_details)
            if not event.HasField("final"):
                raise error
            self._error = error
        if event.HasField("final"):
            return scheduler_pb2.InferStreamResponse(final=event.final)
        return grpc.aio.EOF

    def cancel(self) -> None:
        """Stop the request: the scheduler drops it from its queue or stops its work."""
        if not self._finished:
            self._finished = True
            self._stream.cancel(self._id)


class _Stream:
    """One open InferMany stream and the calls waiting on it."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call
        self._pending: dict[int, MultiplexedCall] = {}
        self._calls: list[scheduler_pb2.InferCall] = []
        self._cancelled: list[int] = []
        self._wake = asyncio.Event()
        self._next_id = 0
        self.error: grpc.aio.AioRpcError | None = None
        self._writer = asyncio.ensure_future(self._write())
        self._reader = asyncio.ensure_future(self._read())

    def start(self, call: scheduler_pb2.InferCall, timeout_s: float) -> MultiplexedCall:
        self._next_id += 1
        call.id = self._next_id
        deadline = asyncio.get_running_loop().time() + timeout_s + _GRACE_S
        pending = self._pending[call.id] = MultiplexedCall(self, call.id, deadline)
        self._calls.append(call)
        self._wake.set()
        return pending

    def cancel(self, call_id: int) -> None:
        if self._pending.pop(call_id, None) is not None and self.error is None:
            self._cancelled.append(call_id)
            self._wake.set()

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not (self._calls or self._cancelled):
                    continue
                message = scheduler_pb2.InferManyRequest(
                    calls=self._calls, cancelled_ids=self._cancelled
                )
                self._calls, self._cancelled = [], []
                await self._call.write(message)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as error:
            self._end(error)
        except Exception:  # the call ended under the writer: its status says why
            code, details = await self._call.code(), await self._call.details()
            self._end(_rpc_error(code, details or f"InferMany stream ended with {code.name}"))

    async def _read(self) -> None:
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    break
                pending = self._pending
                for event in message.events:
                    call = pending.get(event.id)
                    if call is not None:
                        if not event.HasField("delta"):
                            del pending[event.id]  # its last event
                        call.deliver(event)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as error:
            self._end(error)
            return
        self._end(
            _rpc_error(
                grpc.StatusCode.UNAVAILABLE,
                "the scheduler ended the InferMany stream (it is shutting down): "
                "retry on another replica",
            )
        )

    def _end(self, error: grpc.aio.AioRpcError) -> None:
        """The stream is over: fail every call waiting on it with its error."""
        if self.error is not None:
            return
        self.error = error
        pending, self._pending = self._pending, {}
        for call in pending.values():
            call.deliver(error)
        self._writer.cancel()
        self._call.cancel()

    async def close(self) -> None:
        self._end(_rpc_error(grpc.StatusCode.CANCELLED, "the router is shutting down"))
        self._reader.cancel()
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)


class InferManyClient:
    """The router's InferMany stream to one scheduler replica (see the module doc)."""

    def __init__(self, channel: PeerChannel) -> None:
        self._open = channel.stream_stream(
            METHOD,
            request_serializer=scheduler_pb2.InferManyRequest.SerializeToString,
            response_deserializer=scheduler_pb2.InferManyResponse.FromString,
        )
        self._stream: _Stream | None = None

    def start(
        self,
        request: scheduler_pb2.InferStreamRequest,
        timeout_s: float,
        unreachable: Sequence[str] = (),
    ) -> MultiplexedCall:
        """Send `request` on the stream (opened if need be); read the returned call's outcome."""
        stream = self._stream
        if stream is None or stream.error is not None:
            # Opened, and its tasks started, outside any request's trace and tenant: the
            # stream is shared, each call carries its own. A stream that ended has already
            # failed its calls and stopped its tasks.
            stream = self._stream = contextvars.Context().run(self._new_stream)
        traceparent = tracestate = ""
        for key, value in trace_metadata():
            if key == "traceparent":
                traceparent = value
            elif key == "tracestate":
                tracestate = value
        return stream.start(
            scheduler_pb2.InferCall(
                request=request,
                timeout_ms=max(1, int(timeout_s * 1000)),
                traceparent=traceparent,
                tracestate=tracestate,
                unreachable_replicas=",".join(unreachable),
            ),
            timeout_s,
        )

    def _new_stream(self) -> _Stream:
        return _Stream(self._open(None))

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()
