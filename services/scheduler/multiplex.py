"""SchedulerService/InferMany: a router's requests, many on one open stream.

Why: one gRPC call per request was most of what the router-scheduler hop cost. Measured with a
bare grpc.aio echo on this machine, a server-streaming call costs both ends about 0.4-0.5 ms of
CPU at concurrency 64, and one message each way on an open stream about 0.15 ms; under load
several requests' events share a message, and that falls to a few microseconds
(docs/BENCHMARKS.md).

Each call on the stream is served as a call of its own would be: in its own task, with its
own deadline, inside a server span that continues the caller's trace (named after
InferMany), its duration recorded by status code, its tenant on its log lines. It is
answered by the same code as InferStream (SchedulerServicer.answer): deltas unless
final_only, then the final chunk, or the error (with the usage generated so far, to bill).
One bad call fails alone. A cancelled id stops its work and is sent nothing more. Events that
occur while a message is being sent go together in the next.

Draining: once the service gate closes (libs/gate.py), a new call on an open stream is
refused as a new RPC would be (UNAVAILABLE, "retry on another replica"), and each call
already running counts in the gate's in-flight calls until its last event is sent, so the
server's drain waits for it. When the router closes its side, the stream ends after the last
event; when the stream breaks, every call on it is cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable

import grpc
from shepherd.common.v1 import common_pb2
from shepherd.scheduler.v1 import scheduler_pb2

from libs.errors import ShepherdError, as_shepherd_error
from libs.gate import ServiceGate
from libs.membership import replica_ids
from libs.telemetry import MAX_TRACE_HEADER, end_status, server_span

METHOD = "/shepherd.scheduler.v1.SchedulerService/InferMany"

Answer = Callable[
    [scheduler_pb2.InferStreamRequest, float | None, Iterable[str]],
    AsyncIterator[scheduler_pb2.InferStreamResponse],
]


def failure(error: ShepherdError) -> scheduler_pb2.InferFailure:
    """An error as an event of a multiplexed call carries it: code, message, details."""
    details = error.trailing_metadata()
    return scheduler_pb2.InferFailure(
        code=error.code.value[0],
        message=error.wire_message,
        status_details=details[0][1] if details else b"",
    )


class InferManyStream:
    """One open InferMany stream: its calls run concurrently, their events go back in groups."""

    def __init__(self, answer: Answer, gate: ServiceGate | None) -> None:
        self._answer = answer
        self._gate = gate
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._ready: list[scheduler_pb2.InferEvent] = []
        self._counted = 0  # of the events in _ready, how many end a call counted in flight
        self._wake = asyncio.Event()
        self._reading = True

    async def serve(
        self, requests: AsyncIterator[scheduler_pb2.InferManyRequest]
    ) -> AsyncIterator[scheduler_pb2.InferManyResponse]:
        """The stream's responses: every event, until the caller is done and none is left."""
        reader = asyncio.ensure_future(self._read(requests))
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._ready:
                    events, counted = self._ready, self._counted
                    self._ready, self._counted = [], 0
                    try:
                        yield scheduler_pb2.InferManyResponse(events=events)
                    finally:
                        self._leave(counted)
                if not self._reading and not self._tasks and not self._ready:
                    break
        finally:
            reader.cancel()
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()  # the stream ended or broke: nobody will read these events
            await asyncio.gather(reader, *tasks, return_exceptions=True)
            self._leave(self._counted)
            self._counted = 0

    def _leave(self, count: int) -> None:
        if self._gate is not None:
            for _ in range(count):
                self._gate.inflight.leave()

    async def _read(self, requests: AsyncIterator[scheduler_pb2.InferManyRequest]) -> None:
        try:
            async for message in requests:
                for call_id in message.cancelled_ids:
                    task = self._tasks.get(call_id)
                    if task is not None:
                        task.cancel()
                for call in message.calls:
                    self._start(call)
        finally:
            self._reading = False
            self._wake.set()

    def _start(self, call: scheduler_pb2.InferCall) -> None:
        if call.id in self._tasks:
            self._end(
                call.id,
                None,
                ShepherdError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"call id {call.id} is already in use on this InferMany stream: "
                    "give each call an id of its own",
                ),
                counted=False,
            )
            return
        gate = self._gate
        if gate is not None and gate.closed:
            gate.record(METHOD, grpc.StatusCode.UNAVAILABLE, 0.0)
            error = ShepherdError(grpc.StatusCode.UNAVAILABLE, gate.refusal)
            self._end(call.id, None, error, counted=False)
            return
        if gate is not None:
            gate.inflight.enter()
        task = asyncio.ensure_future(self._call(call))
        self._tasks[call.id] = task
        task.add_done_callback(lambda done: self._done(call.id, done))

    def _done(self, call_id: int, task: asyncio.Task[None]) -> None:
        if self._tasks.get(call_id) is task:
            del self._tasks[call_id]
        if task.cancelled():
            self._leave(1)  # cancelled by its caller: nothing more to send, not in flight
        self._wake.set()  # the last call gone from a stream the caller closed: it ends

    async def _call(self, call: scheduler_pb2.InferCall) -> None:
        """Serve one call in its own span, queueing its events for the next message."""
        started = time.perf_counter()
        code = grpc.StatusCode.CANCELLED
        carrier = [
            (key, value)
            for key, value in (("traceparent", call.traceparent), ("tracestate", call.tracestate))
            if value and len(value) <= MAX_TRACE_HEADER
        ]
        final: common_pb2.CompletionFinal | None = None
        error: ShepherdError | None = None
        try:
            with server_span(METHOD, carrier) as span:
                try:
                    async for chunk in self._answer(
                        call.request,
                        call.timeout_ms / 1000 if call.timeout_ms else None,
                        replica_ids(call.unreachable_replicas),
                    ):
                        if chunk.HasField("delta"):
                            self._ready.append(
                                scheduler_pb2.InferEvent(id=call.id, delta=chunk.delta)
                            )
                            self._wake.set()
                        else:
                            final = chunk.final
                except asyncio.CancelledError:
                    end_status(span, code)
                    raise
                except Exception as raised:
                    error = as_shepherd_error(raised, METHOD)
                code = error.code if error is not None else grpc.StatusCode.OK
                end_status(span, code, error.message if error is not None else "")
            self._end(call.id, final, error, counted=True)
        finally:
            if self._gate is not None:
                self._gate.record(METHOD, code, time.perf_counter() - started)

    def _end(
        self,
        call_id: int,
        final: common_pb2.CompletionFinal | None,
        error: ShepherdError | None,
        *,
        counted: bool,
    ) -> None:
        """Queue the event that ends a call: its final chunk, its failure, or both."""
        self._ready.append(
            scheduler_pb2.InferEvent(
                id=call_id,
                final=final,
                failure=failure(error) if error is not None else None,
            )
        )
        self._counted += counted
        self._wake.set()
