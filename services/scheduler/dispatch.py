"""Running a formed batch: where it runs, one retry on another node, fallback and spill-over.

Every backend speaks one protocol (services/scheduler/events.py): `run(target, batch)`
yields each request's deltas and its final event as they are produced, and the dispatcher
passes them into each request's event channel. The Triton backend streams a decoupled model
step by step (or answers a one-shot model in one piece); the hosted backend streams SSE. A
batch may move to another node, or a request to the next deployment, only while nothing has
reached its caller: once a delta is out, the request ends where it is, and an error after
that ends it with the usage so far.

A model's first deployment decides where its queue drains: a Triton pool (capacity granted
per node by nodes.py) or a hosted API (a bounded number of concurrent batches per model).

A Triton batch that fails because its node is unavailable is retried once on another node of
the pool; the failed node's circuit breaker hears about it. If the retry fails too, or no node
can take the batch, its requests go to the model's hosted deployments, in catalog order,
except requests that must stay on self-hosted nodes (tenant policy or the request's own
flag), which are answered UNAVAILABLE with what was tried. A request whose caller gave up or
whose deadline passed is dropped before every attempt, so it never reaches a backend. Each
request is answered once (PendingRequest.settle ignores later answers), so a retry can never
produce a second answer or a second bill.

Spill-over: when admission finds that a self-hosted model's queue would make a request miss
its deadline, the request goes straight to the hosted deployment instead (if it may leave),
and its Placement says so.

With scale-out on, a batch's requests are claimed in Redis by (tenant, request id) before it
runs (one script per batch, services/scheduler/cluster.py): a request another live replica
is already running (a router's retry after an owner it could not reach) is answered ABORTED
instead of being run twice. The claims are dropped when the batch ends.

One span per batch is parented to the oldest request's trace and linked to every request span
it serves.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import grpc
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan

from libs.catalog import Deployment, Model
from libs.errors import ShepherdError
from libs.retry import RetryPolicy
from libs.telemetry import tracer
from services.scheduler.batcher import Slot, WaiterKey
from services.scheduler.cluster import Cluster
from services.scheduler.events import Delta, Event, Final
from services.scheduler.hosted import HostedBackend
from services.scheduler.nodes import Lease, NodePool
from services.scheduler.queue import PendingRequest, expired
from services.scheduler.stats import ModelStats
from services.scheduler.triton import NodeUnavailable, TritonBackend

_log = logging.getLogger(__name__)
# A batch whose node cannot take it is retried once, at once, on another node (the node's
# breaker hears of the failure); the same policy object as hosted and billing retries.
_NODE_RETRY = RetryPolicy(attempts=2, base_s=0.0, max_s=0.0)


class HostedSlot:
    """One of a hosted-only model's concurrent batch slots."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self._released = False

    def release(self, *, latency_s: float | None = None, failure: str = "") -> None:
        if not self._released:
            self._released = True
            self._semaphore.release()


def _first_key() -> WaiterKey:
    """A retry already waited its turn once: it goes ahead of everything queued."""
    return (-math.inf, 0)


class Dispatcher:
    """Sends batches to Triton pools or hosted APIs, with retry, fallback and spill-over."""

    def __init__(
        self,
        pools: Mapping[str, NodePool],
        triton: TritonBackend,
        hosted: HostedBackend,
        stats: Mapping[str, ModelStats],
        hosted_inflight_batches: int,
        cluster: Cluster | None = None,
    ) -> None:
        self._cluster = cluster
        self._pools = pools
        self._triton = triton
        self._hosted = hosted
        self._stats = stats
        self._hosted_slots: dict[str, asyncio.Semaphore] = {}
        self._hosted_inflight = hosted_inflight_batches

    # -- capacity ---------------------------------------------------------------------------

    async def acquire(self, model: Model, key: Callable[[], WaiterKey]) -> Slot:
        """Wait for capacity for one batch of `model` on its primary deployment."""
        primary = model.deployments[0]
        if primary.kind == "triton":
            return await self._pools[primary.pool].acquire(primary, key)
        semaphore = self._hosted_slots.setdefault(
            model.name, asyncio.Semaphore(self._hosted_inflight)
        )
        await semaphore.acquire()
        return HostedSlot(semaphore)

    def usable(self, model: Model) -> bool:
        """Whether some deployment of `model` could take a request now (for readiness)."""
        return any(
            self._pools[d.pool].serves(d) if d.kind == "triton" else self._hosted.usable(d)
            for d in model.deployments
        )

    def parallelism(self, model: Model) -> int:
        primary = model.deployments[0]
        if primary.kind == "triton":
            return self._pools[primary.pool].capacity(primary)
        return self._hosted_inflight

    # -- running ----------------------------------------------------------------------------

    async def run(
        self,
        model: Model,
        slot: Slot | None,
        batch: list[PendingRequest],
        error: ShepherdError | None = None,
    ) -> None:
        if self._cluster is None:
            await self._run(model, slot, batch, error)
            return
        keys = [(item.tenant, item.request_id) for item in batch]
        batch = await self._claim(self._cluster, batch, keys)
        try:
            if batch:
                await self._run(model, slot, batch, error)
            elif slot is not None:
                slot.release()
        finally:
            self._cluster.unclaim(keys)

    @staticmethod
    async def _claim(
        cluster: Cluster, batch: list[PendingRequest], keys: list[tuple[str, str]]
    ) -> list[PendingRequest]:
        """The requests of the batch this replica may run: not running on another replica."""
        now = time.monotonic()
        ttl_s = max(item.deadline for item in batch) - now + 1.0
        unreachable = {r for item in batch for r in item.unreachable}
        try:
            refused = await cluster.claim(keys, ttl_s, unreachable)
        except Exception as error:  # Redis unreachable: run it; the claim only saves GPU time
            _log.warning("request claims unavailable", extra={"error": str(error)})
            return batch
        for index in refused:
            batch[index].settle(
                ShepherdError(
                    grpc.StatusCode.ABORTED,
                    f"request {batch[index].request_id!r} is already running on another "
                    "scheduler replica; it is not run twice",
                )
            )
        return [item for index, item in enumerate(batch) if index not in refused]

    async def _run(
        self,
        model: Model,
        slot: Slot | None,
        batch: list[PendingRequest],
        error: ShepherdError | None = None,
    ) -> None:
        parent = trace.set_span_in_context(NonRecordingSpan(batch[0].span_context))
        links = [Link(item.span_context) for item in batch]
        with tracer(__name__).start_as_current_span(
            "scheduler.batch", context=parent, links=links
        ) as span:
            span.set_attribute("shepherd.model", model.name)
            span.set_attribute("shepherd.batch.size", len(batch))
            failures = [error.message] if error is not None else []
            pending = batch
            if isinstance(slot, Lease):
                pending = await self._run_triton(model, slot, batch, failures, span)
                fallbacks = model.hosted
            elif slot is not None:
                try:
                    pending = await self._run_hosted(model, model.hosted, batch, failures, span)
                finally:
                    slot.release()
                fallbacks = ()
            else:
                fallbacks = (
                    model.hosted if model.deployments[0].kind == "triton" else model.deployments
                )
            if not pending:
                return
            leaving = [item for item in pending if not item.self_hosted_only]
            staying = [item for item in pending if item.self_hosted_only]
            if leaving and fallbacks:
                span.add_event("fallback.hosted", {"requests": len(leaving)})
                leaving = await self._run_hosted(model, fallbacks, leaving, failures, span)
            unanswered = leaving + staying
            if not unanswered:
                return
            message = f"no healthy backend for model {model.name}: " + " | ".join(failures)
            span.set_status(trace.StatusCode.ERROR, message)
            for item in unanswered:
                detail = (
                    " (this request must stay on self-hosted nodes, so no hosted API was tried)"
                    if item.self_hosted_only and model.hosted
                    else ""
                )
                item.settle(ShepherdError(grpc.StatusCode.UNAVAILABLE, message + detail))

    async def spill(self, model: Model, item: PendingRequest, reason: str) -> None:
        """Send one request straight to the hosted deployments (admission chose spill-over)."""
        self._stats[model.name].outcome("spilled_over")
        with tracer(__name__).start_as_current_span("scheduler.spill_over") as span:
            span.set_attribute("shepherd.model", model.name)
            span.set_attribute("shepherd.spill_over.reason", reason)
            failures: list[str] = []
            unanswered = await self._run_hosted(
                model, model.hosted, [item], failures, span, spilled=True
            )
            if unanswered:
                item.settle(
                    ShepherdError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"{reason}, and the hosted spill-over failed: " + " | ".join(failures),
                    )
                )

    def _live(self, batch: Sequence[PendingRequest]) -> list[PendingRequest]:
        """Drop requests whose caller gave up or whose deadline passed, answering the latter."""
        now = time.monotonic()
        live = []
        for item in batch:
            if item.events.done:
                continue
            if item.deadline <= now:
                item.settle(expired())
                continue
            live.append(item)
        return live

    async def _run_triton(
        self,
        model: Model,
        lease: Lease,
        batch: list[PendingRequest],
        failures: list[str],
        span: trace.Span,
    ) -> list[PendingRequest]:
        """Run on the leased node, retrying once elsewhere; returns requests still unanswered.

        A node that cannot take the batch at all fails before any token is sent, so the whole
        batch may go to another node; after that, each request's own events decide.
        """
        deployment = lease.deployment
        pool = self._pools[deployment.pool]
        tried: set[str] = set()
        for attempt in range(1, _NODE_RETRY.attempts + 1):
            live = self._live(batch)
            if not live:
                lease.release()
                return []
            tried.add(lease.address)
            started = time.monotonic()
            try:
                retry = await self._stream(
                    model, self._triton.run(lease, live), live, deployment, span
                )
            except NodeUnavailable as error:
                lease.release(failure=error.message)
                failures.append(error.message)
                span.add_event(
                    "node.unavailable",
                    {"node": lease.address, "attempt": attempt, "message": error.message},
                )
                delay = _NODE_RETRY.next_delay(
                    attempt, deadline=max(item.deadline for item in live)
                )
                if delay is None:
                    return live
                await asyncio.sleep(delay)
                try:
                    lease = await asyncio.wait_for(
                        pool.acquire(deployment, _first_key, exclude=frozenset(tried)),
                        max(0.001, max(item.deadline for item in live) - time.monotonic()),
                    )
                except TimeoutError:
                    for item in live:
                        item.settle(expired())
                    return []
                except ShepherdError as refused:
                    failures.append(refused.message)
                    return live
                continue
            except ShepherdError as error:
                lease.release(latency_s=None)
                span.set_status(trace.StatusCode.ERROR, error.message)
                for item in live:
                    item.settle(error)
                return []
            lease.release(latency_s=time.monotonic() - started)  # unless the backend did
            latency_s = lease.latency_s or time.monotonic() - started
            self._stats[model.name].dispatched(latency_s, lease.address, True)
            span.set_attribute("shepherd.deployment", deployment.name)
            span.set_attribute("shepherd.triton.node", lease.address)
            return retry
        return []

    async def _run_hosted(
        self,
        model: Model,
        deployments: Sequence[Deployment],
        batch: list[PendingRequest],
        failures: list[str],
        span: trace.Span,
        spilled: bool = False,
    ) -> list[PendingRequest]:
        """Try hosted deployments in order; returns requests still unanswered.

        A request moves on to the next deployment only while nothing has been sent to its
        caller: once a token is out, its stream ends where it is.
        """
        pending = batch
        for deployment in deployments:
            live = self._live(pending)
            if not live:
                return []
            started = time.monotonic()
            try:
                pending = await self._stream(
                    model,
                    self._hosted.run(deployment, live),
                    live,
                    deployment,
                    span,
                    spilled=spilled,
                    failures=failures,
                )
            except ShepherdError as error:
                for item in live:
                    item.settle(error)
                return []
            primary = deployment is model.deployments[0]
            self._stats[model.name].dispatched(time.monotonic() - started, deployment.name, primary)
            if not pending:
                span.set_attribute("shepherd.deployment", deployment.name)
                return []
            span.add_event("deployment.unavailable", {"deployment": deployment.name})
        return self._live(pending)

    async def _stream(
        self,
        model: Model,
        events: AsyncIterator[tuple[int, Event]],
        batch: Sequence[PendingRequest],
        deployment: Deployment,
        span: trace.Span,
        *,
        spilled: bool = False,
        failures: list[str] | None = None,
    ) -> list[PendingRequest]:
        """Deliver a backend's events to each request's channel, as they come.

        Returns the requests that failed UNAVAILABLE before their first token (they may try
        the next deployment). Every other request ends here with its Final or its error.
        """
        stats = self._stats[model.name]
        retry: list[PendingRequest] = []
        ended = [False] * len(batch)
        try:
            async for row, event in events:
                item = batch[row]
                now = time.monotonic()
                if isinstance(event, Delta):
                    first = item.events.first_delta_at is None
                    item.events.delta(event, now)
                    if first and item.events.first_delta_at is not None:
                        stats.first_token(now - item.enqueued_at)
                        span.add_event(
                            "first_token",
                            {
                                "shepherd.request_id": item.request_id,
                                "shepherd.ttft_ms": (now - item.enqueued_at) * 1000,
                            },
                        )
                    continue
                ended[row] = True
                if isinstance(event, Final):
                    if spilled:
                        event.completion.placement.spilled_over = True
                    if not item.events.done:
                        stats.outcome("completed")
                        stats.finished(item.events.first_delta_at, now, event.completion)
                    item.events.finish(event)
                elif (
                    event.error.code == grpc.StatusCode.UNAVAILABLE
                    and not item.events.started
                    and failures is not None
                ):
                    failures.append(f"{deployment.name}: {event.error.message}")
                    retry.append(item)
                else:
                    item.events.fail(event.error, event.usage)
                if all(ended[i] or batch[i].events.done for i in range(len(batch))):
                    break
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        for row, item in enumerate(batch):
            if not ended[row] and not item.events.done:
                item.settle(
                    ShepherdError(
                        grpc.StatusCode.INTERNAL,
                        f"{deployment.name} ended without answering this request",
                    )
                )
        return retry

    async def close(self) -> None:
        await self._triton.close()
        await self._hosted.close()
