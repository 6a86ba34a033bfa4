"""Turning one model's queue into batches, with Triton's dynamic batching semantics.

A batch is due when the queue holds the model's max batch size, or any of its preferred batch
sizes, or when the oldest request has waited the max queue delay (the seed's batcher only
flushed when full, so a lone request waited forever). Two exceptions make it due at once,
because waiting there buys nothing: when none of the model's batches is running (the backend
would sit idle for the whole delay, so a lone request goes now, and whatever queues while it
runs goes together the moment it ends: batches still form under load), and when the model's
primary deployment is a hosted API (each request is its own HTTP call, so a batch is only a
way to take one capacity slot for what is queued, never a reason to wait).

A due batch first waits for capacity: a slot on a Triton node (granted by priority across
models, see nodes.py) or on the hosted API. Only then are requests taken off the queue, so
the batch is as large as the queue allows at that moment: the largest preferred size that
can be formed, or everything up to the max batch size once the oldest request has waited the
max delay. Backlog therefore stays in the queue, where it is ordered, shed or spilled,
instead of in a backend's FIFO.

Several batches of one model can be in flight at once, as many as capacity grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

import grpc

from libs.catalog import Model
from libs.errors import ShepherdError
from libs.tasks import log_failure, supervise
from services.scheduler.queue import ModelQueue, PendingRequest
from services.scheduler.stats import ModelStats

_log = logging.getLogger(__name__)

WaiterKey = tuple[float, int]


class Slot(Protocol):
    """Capacity for one batch; released exactly once by whoever runs the batch."""

    def release(self, *, latency_s: float | None = None, failure: str = "") -> None: ...


class BatchRunner(Protocol):
    """What the batcher needs from the dispatcher."""

    async def acquire(self, model: Model, key: Callable[[], WaiterKey]) -> Slot: ...

    async def run(
        self,
        model: Model,
        slot: Slot | None,
        batch: list[PendingRequest],
        error: ShepherdError | None = None,
    ) -> None: ...

    def parallelism(self, model: Model) -> int: ...


class Batcher:
    """The queue of one model and the task that turns it into batches."""

    def __init__(
        self, model: Model, queue: ModelQueue, runner: BatchRunner, stats: ModelStats
    ) -> None:
        self.model = model
        self.queue = queue
        self.stats = stats
        self._runner = runner
        self._max_size = model.batching.max_batch_size
        self._max_delay_s = model.batching.max_queue_delay_ms / 1000.0
        self._preferred = model.batching.preferred_batch_sizes
        # The smallest queue that makes a batch due at once, without the timer.
        self._due_size = min((*self._preferred, self._max_size))
        # Only a self-hosted primary batches inside one model execution, so only it may wait.
        self._waits = bool(model.deployments) and model.deployments[0].kind == "triton"

        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def inflight_batches(self) -> int:
        return len(self._inflight)

    def start(self) -> None:
        self._task = supervise(f"batcher:{self.model.name}", self._loop)

    async def close(self) -> None:
        """Stop forming batches, fail whatever is still queued, let running batches finish."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.queue.drain(
            ShepherdError(grpc.StatusCode.UNAVAILABLE, "the scheduler is shutting down")
        )
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    def key(self) -> WaiterKey:
        """This model's place in line for capacity: best aged request class, then model rank."""
        rank = self.queue.effective_rank()
        return (math.inf if rank is None else rank, self.model.priority)

    def estimated_wait_s(self, rank: int) -> float:
        """How long a newcomer of class `rank` would wait before its batch runs.

        Batches ahead of it (queued requests of its class or better, plus batches already
        running, counted as half done) times the recent batch latency, divided by the batch
        slots serving the model; plus the max delay when it could not fill a batch and would
        wait. Zero until the first batch has been timed, so a cold model admits work rather
        than guessing.
        """
        batch_s = self.stats.dispatch_ema_s
        if batch_s == 0:
            return 0.0
        ahead = self.queue.ahead_of(rank) + 1
        batches = math.ceil(ahead / self._max_size) + 0.5 * self.inflight_batches
        wait = batches * batch_s / max(1, self._runner.parallelism(self.model))
        if ahead < self._due_size and not self._flush_now():
            wait += self._max_delay_s
        return wait

    def submit(self, item: PendingRequest, retry_after_s: float) -> None:
        """Queue a request (or refuse it, see ModelQueue.admit) and wake the loop."""
        self.queue.admit(item, retry_after_s)
        self.stats.tenant_admitted(item.tenant)
        self._wake.set()

    def _due_in(self, now: float) -> float:
        """Seconds until a batch is due; 0 when due now, inf when the queue is empty."""
        depth = self.queue.depth
        if depth == 0:
            return math.inf
        if depth >= self._due_size or self._flush_now():
            return 0.0
        oldest = self.queue.oldest_enqueued_at()
        return 0.0 if oldest is None else max(0.0, oldest + self._max_delay_s - now)

    def _flush_now(self) -> bool:
        """Whether to send what is queued without waiting for company (see the module doc)."""
        return not self._waits or not self._inflight

    def _batch_size(self, now: float) -> int:
        """Triton's rule: a full batch, else all after the max delay, else the largest preferred."""
        depth = self.queue.depth
        if depth >= self._max_size:
            return self._max_size
        if self._flush_now():
            return depth
        oldest = self.queue.oldest_enqueued_at()
        if oldest is not None and now - oldest >= self._max_delay_s:
            return depth
        fitting = [size for size in self._preferred if size <= depth]
        return max(fitting) if fitting else depth

    async def _loop(self) -> None:
        while True:
            wait_s = self._due_in(time.monotonic())
            if wait_s > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), None if math.isinf(wait_s) else wait_s
                    )
                continue
            slot: Slot | None = None
            error: ShepherdError | None = None
            try:
                slot = await self._runner.acquire(self.model, self.key)
            except ShepherdError as refused:
                error = refused  # no backend can take it: the runner falls back or fails it
            now = time.monotonic()
            batch = self.queue.take(self._batch_size(now) if error is None else self._max_size)
            if not batch:
                if slot is not None:
                    slot.release()
                continue
            self.stats.batch(
                len(batch), [(item.tenant, (now - item.enqueued_at) * 1000) for item in batch]
            )
            task = asyncio.create_task(self._dispatch(slot, batch, error))
            self._inflight.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        """A batch ended: when it was the last one running, what queued meanwhile goes now."""
        self._inflight.discard(task)
        log_failure(task)  # _dispatch answers its requests itself; anything left is a bug
        if not self._inflight:
            self._wake.set()

    async def _dispatch(
        self, slot: Slot | None, batch: list[PendingRequest], error: ShepherdError | None
    ) -> None:
        try:
            await self._runner.run(self.model, slot, batch, error)
        except Exception:
            _log.exception("batch failed", extra={"model": self.model.name})
            if slot is not None:
                slot.release()
            for item in batch:
                item.settle(
                    ShepherdError(grpc.StatusCode.INTERNAL, "the batch failed unexpectedly")
                )
        finally:
            # Every request of the batch has its answer by now; count completions per tenant.
            self.stats.tenants_completed(item.tenant for item in batch if _completed(item))


def _completed(item: PendingRequest) -> bool:
    """Whether the request was answered with a completion (not an error, not cancelled)."""
    future = item.future
    return future.done() and not future.cancelled() and future.exception() is None


__all__ = ["BatchRunner", "Batcher", "PendingRequest", "Slot", "WaiterKey"]
