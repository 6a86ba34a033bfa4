"""Per-model queues that form batches by size or by a max-delay timer.

The seed's batcher only flushes when a batch is full, so a lone request waits forever. Here a
batch leaves the queue as soon as it reaches the model's max batch size, or when its oldest
request has waited the model's max queue delay, whichever comes first. Requests whose caller
gave up (cancelled) or whose deadline has passed are dropped at batch formation and never
reach a backend. Several batches of one model may be in flight at once, up to a bound, so a
slow batch does not stall the queue behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from opentelemetry.trace import SpanContext
from shepherd.common.v1 import common_pb2

from libs.catalog import Model
from libs.errors import ShepherdError

_log = logging.getLogger(__name__)


@dataclass(eq=False)
class PendingRequest:
    """One queued request and the future its RPC handler awaits."""

    request_id: str
    tenant: str
    messages: tuple[tuple[str, str], ...]
    params: common_pb2.GenerationParams
    deadline: float
    future: asyncio.Future[common_pb2.Completion]
    span_context: SpanContext
    enqueued_at: float = field(default_factory=time.monotonic)

    def settle(self, result: common_pb2.Completion | ShepherdError) -> None:
        """Answer the waiting RPC once; later answers (e.g. after a retry) are ignored."""
        if self.future.done():
            return
        if isinstance(result, ShepherdError):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)


RunBatch = Callable[[Model, list[PendingRequest]], Awaitable[None]]


class Batcher:
    """The queue of one model and the task that turns it into batches."""

    def __init__(self, model: Model, run_batch: RunBatch, max_inflight_batches: int) -> None:
        self._model = model
        self._run_batch = run_batch
        self._max_size = model.batching.max_batch_size
        self._max_delay_s = model.batching.max_queue_delay_ms / 1000.0
        self._queue: deque[PendingRequest] = deque()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(max_inflight_batches)
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """How many requests are waiting in the queue."""
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher:{self._model.name}")

    async def close(self) -> None:
        """Stop forming batches and fail whatever is still queued."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            self._queue.popleft().settle(
                ShepherdError(grpc.StatusCode.UNAVAILABLE, "the scheduler is shutting down")
            )
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    def submit(self, item: PendingRequest) -> None:
        """Queue a request; the loop is woken when it may now form a batch."""
        self._queue.append(item)
        if len(self._queue) == 1 or len(self._queue) >= self._max_size:
            self._wake.set()

    def _take_batch(self) -> list[PendingRequest]:
        now = time.monotonic()
        batch: list[PendingRequest] = []
        while self._queue and len(batch) < self._max_size:
            item = self._queue.popleft()
            if item.future.done():  # cancelled by its caller: its slot goes to the next one
                continue
            if item.deadline <= now:
                item.settle(
                    ShepherdError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "the request's deadline passed while it was queued; it was not run",
                    )
                )
                continue
            batch.append(item)
        return batch

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._queue) < self._max_size:
                wait_s = self._queue[0].enqueued_at + self._max_delay_s - time.monotonic()
                if wait_s > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait_s)
                    continue
            # Wait for a free slot before taking requests off the queue, so a batch is never
            # held outside the queue where close() could not find it.
            await self._slots.acquire()
            batch = self._take_batch()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._dispatch(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _dispatch(self, batch: list[PendingRequest]) -> None:
        try:
            await self._run_batch(self._model, batch)
        except Exception:
            _log.exception("batch failed", extra={"model": self._model.name})
            for item in batch:
                item.settle(
                    ShepherdError(grpc.StatusCode.INTERNAL, "the batch failed unexpectedly")
                )
        finally:
            self._slots.release()
