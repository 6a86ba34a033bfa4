"""The SchedulerService RPCs: admit a request and wait for its answer; report statistics.

Embed fans a request out: each input becomes a request of its own in the embedding model's
queue (one row of a batch), so inputs of many callers are encoded together, and the vectors
are gathered back in input order. An input that fails fails the whole Embed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence

import grpc
from google.rpc import error_details_pb2
from opentelemetry import trace
from shepherd.common.v1 import common_pb2
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from libs import genai
from libs.apikeys import valid_tenant
from libs.catalog import Catalog, Model
from libs.errors import ShepherdError, invalid_argument
from libs.gate import ServiceGate
from libs.generation import (
    embedding_violations,
    message_violations,
    params_violations,
    priority_violations,
    task_violations,
)
from libs.membership import ERROR_DOMAIN, NOT_OWNER_REASON, describe, unreachable_in
from libs.telemetry import set_tenant
from services.scheduler.admission import Admission
from services.scheduler.batcher import Batcher
from services.scheduler.cluster import Cluster
from services.scheduler.events import finish_reason
from services.scheduler.multiplex import InferManyStream
from services.scheduler.nodes import ModelState, NodePool, NodeState
from services.scheduler.placement import LOAD, LOAD_FAILED, UNLOAD, Placer
from services.scheduler.queue import CLASSES, PendingRequest
from services.scheduler.stats import ModelStats, TenantStats, percentile

_ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
}
_NODE_STATES = {
    NodeState.UNKNOWN: scheduler_pb2.NODE_STATE_UNSPECIFIED,
    NodeState.HEALTHY: scheduler_pb2.NODE_STATE_HEALTHY,
    NodeState.OPEN: scheduler_pb2.NODE_STATE_OPEN,
    NodeState.HALF_OPEN: scheduler_pb2.NODE_STATE_HALF_OPEN,
}
_ACTIONS = {
    LOAD: scheduler_pb2.PLACEMENT_ACTION_LOAD,
    UNLOAD: scheduler_pb2.PLACEMENT_ACTION_UNLOAD,
    LOAD_FAILED: scheduler_pb2.PLACEMENT_ACTION_LOAD_FAILED,
}


def _too_late(model: Model, timeout_s: float) -> ShepherdError:
    return ShepherdError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"deadline exceeded: no answer from the {model.name} backends within {timeout_s:.1f}s",
    )


def _partial(item: PendingRequest, reason: int) -> common_pb2.CompletionFinal | None:
    """The final chunk of a request that ended early: the usage generated so far, to bill;
    None when nothing was generated (there is nothing to bill)."""
    channel = item.events
    if not (channel.started or channel.partial_usage.total_tokens):
        return None
    return common_pb2.CompletionFinal(finish_reason=reason, usage=channel.partial_usage)


def _ended(item: PendingRequest, completion: common_pb2.Completion) -> common_pb2.CompletionFinal:
    """The final chunk of a request that ended well: the whole text unless it was streamed."""
    return common_pb2.CompletionFinal(
        finish_reason=finish_reason(completion.finish_reason),
        usage=completion.usage,
        placement=completion.placement,
        usage_estimated=item.events.estimated,
        text="" if item.deltas else completion.text,
        seed=item.params.seed if _sampled(item) else None,
        document_ids=completion.document_ids,
    )


def _unreachable(context: grpc.aio.ServicerContext) -> list[str]:
    """The replicas a router could not reach, as a call's metadata names them."""
    return unreachable_in(context.invocation_metadata() or ())


def _sampled(item: PendingRequest) -> bool:
    """Whether the answer was sampled (so its seed is worth returning)."""
    return item.params.temperature > 0 and item.params.HasField("seed")


# Per-request seeds: not secrets, only fresh; one generator, seeded from the OS once.
_SEEDS = random.Random()


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Validates requests, hands them to admission and reads the scheduler's state."""

    def __init__(
        self,
        catalog: Catalog,
        admission: Admission,
        batchers: Mapping[str, Batcher],
        pools: Mapping[str, NodePool],
        placers: Sequence[Placer],
        default_timeout_s: float,
        metering: Callable[[str], tuple[int, int]] | None = None,
        cluster: Cluster | None = None,
        replica_id: str = "",
        stream_interval_s: float = 0.0,
        gate: ServiceGate | None = None,
    ) -> None:
        self._cluster = cluster
        self._gate = gate
        self._stream_interval_s = stream_interval_s
        self._replica_id = cluster.replica_id if cluster is not None else replica_id
        self._catalog = catalog
        self._admission = admission
        self._batchers = batchers
        self._pools = pools
        self._placers = placers
        self._default_timeout_s = default_timeout_s
        self._providers = genai.deployment_providers(
            d for model in catalog.models.values() for d in model.deployments
        )
        self._metering = metering or (lambda _address: (0, 0))

    async def _pending(
        self,
        request: scheduler_pb2.InferRequest | scheduler_pb2.InferStreamRequest,
        remaining_s: float | None,
        unreachable_ids: Iterable[str],
        *,
        deltas: bool,
    ) -> tuple[Model, PendingRequest, float]:
        """Validate a request (even from the router: it owns its input) and make it pending.

        `remaining_s` is what is left of the caller's deadline (None: the default timeout),
        `unreachable_ids` the replicas the router could not reach, and `deltas` whether the
        caller reads text as it is generated.
        """
        model = self._catalog.resolve(request.model)
        violations = []
        if not valid_tenant(request.tenant):
            # The tenant decides fair share and the self-hosted-only policy: never guessed.
            violations.append(("tenant", "is required: 1-64 letters, digits, '-' or '_'"))
        violations.extend(task_violations(model, "chat"))
        if not request.messages:
            violations.append(("messages", "at least one message is required"))
        violations.extend(message_violations(request.messages))
        # Checked again here, not trusted from the router: a bad row must never reach a batch.
        violations.extend(params_violations(request.params, model, resolved=True))
        violations.extend(priority_violations(request.priority))
        if violations:
            raise invalid_argument(violations)
        set_tenant(request.tenant)
        unreachable = await self._owned(model, unreachable_ids)
        timeout_s = self._default_timeout_s if remaining_s is None else remaining_s
        params = request.params
        if params.temperature > 0 and not params.HasField("seed"):
            # Sampling without a seed means fresh randomness: a seed of our own per request,
            # recorded in the answer (Completion.seed) so that it can be reproduced.
            params = common_pb2.GenerationParams()
            params.CopyFrom(request.params)
            params.seed = _SEEDS.getrandbits(63)
        item = PendingRequest(
            request_id=request.request_id,
            tenant=request.tenant,
            messages=tuple((_ROLES[m.role], m.content) for m in request.messages),
            params=params,
            deadline=time.monotonic() + timeout_s,
            span_context=trace.get_current_span().get_span_context(),
            priority=request.priority,
            self_hosted_only=request.self_hosted_only,
            weight=self._catalog.tenant(request.tenant).weight,
            deltas=deltas,
            unreachable=unreachable,
        )
        return model, item, timeout_s

    async def Infer(
        self, request: scheduler_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.InferResponse:
        model, item, timeout_s = await self._pending(
            request, context.time_remaining(), _unreachable(context), deltas=False
        )
        completion: common_pb2.Completion | None = None
        error_type = ""
        # If the caller cancels, awaiting cancels the outcome too: the request leaves the
        # queue at once and is never dispatched, or its backend stream is closed.
        try:
            try:
                await self._admission.admit(model, item)
                completion = await asyncio.wait_for(item.future, timeout_s)
            except TimeoutError:
                raise _too_late(model, timeout_s) from None
        except ShepherdError as error:
            error_type = error.code.name
            raise
        except asyncio.CancelledError:
            error_type = grpc.StatusCode.CANCELLED.name
            raise
        finally:
            self._served(model, item, completion, error_type)
        assert completion is not None  # wait_for returned it, or the call raised
        if _sampled(item):
            completion.seed = item.params.seed
        return scheduler_pb2.InferResponse(completion=completion)

    async def InferStream(
        self, request: scheduler_pb2.InferStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.InferStreamResponse]:
        """Deltas as the backend produces them, then one final chunk on every path."""
        remaining_s, unreachable = context.time_remaining(), _unreachable(context)
        async for chunk in self.answer(request, remaining_s, unreachable):
            yield chunk

    async def answer(
        self,
        request: scheduler_pb2.InferStreamRequest,
        remaining_s: float | None,
        unreachable_ids: Iterable[str],
    ) -> AsyncIterator[scheduler_pb2.InferStreamResponse]:
        """The chunks of one request, for InferStream and for each call on an InferMany stream
        (services/scheduler/multiplex.py): deltas unless final_only, then one final chunk.

        On an error or a passed deadline after some text, the final chunk carries the usage
        so far (so the router bills what was generated), then the error is raised.
        """
        model, item, timeout_s = await self._pending(
            request, remaining_s, unreachable_ids, deltas=not request.final_only
        )
        channel = item.events
        completion: common_pb2.Completion | None = None
        error_type = grpc.StatusCode.CANCELLED.name  # until it ends any other way
        try:
            await self._admission.admit(model, item)
            async with asyncio.timeout(timeout_s):
                if item.deltas:
                    async for delta in channel.deltas(self._stream_interval_s):
                        yield scheduler_pb2.InferStreamResponse(
                            delta=common_pb2.CompletionDelta(text=delta.text, usage=delta.usage)
                        )
                completion = await item.future
                error_type = ""
        except TimeoutError:
            error_type = grpc.StatusCode.DEADLINE_EXCEEDED.name
            partial = _partial(item, common_pb2.FINISH_REASON_CANCELLED)
            if partial is not None:
                yield scheduler_pb2.InferStreamResponse(final=partial)
            raise _too_late(model, timeout_s) from None
        except ShepherdError as error:
            error_type = error.code.name
            partial = _partial(item, common_pb2.FINISH_REASON_ERROR)
            if partial is not None:
                yield scheduler_pb2.InferStreamResponse(final=partial)
            raise
        finally:
            item.future.cancel()  # the caller went away (or it is done): stop the work
            self._served(model, item, completion, error_type)
        yield scheduler_pb2.InferStreamResponse(final=_ended(item, completion))

    async def InferMany(
        self,
        request_iterator: AsyncIterator[scheduler_pb2.InferManyRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[scheduler_pb2.InferManyResponse]:
        """Many requests on one open stream (services/scheduler/multiplex.py)."""
        async for response in InferManyStream(self.answer, self._gate).serve(request_iterator):
            yield response

    async def Embed(
        self, request: scheduler_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.EmbedResponse:
        """Queue every input as a row of the embedding model's batches; gather the vectors."""
        model = self._catalog.resolve(request.model)
        violations = task_violations(model, "embedding")
        if not valid_tenant(request.tenant):
            violations.append(("tenant", "is required: 1-64 letters, digits, '-' or '_'"))
        violations.extend(embedding_violations(request.inputs))
        violations.extend(priority_violations(request.priority))
        if violations:
            raise invalid_argument(violations)
        unreachable = await self._owned(model, _unreachable(context))
        remaining = context.time_remaining()
        timeout_s = self._default_timeout_s if remaining is None else remaining
        deadline = time.monotonic() + timeout_s
        span_context = trace.get_current_span().get_span_context()
        weight = self._catalog.tenant(request.tenant).weight
        items = [
            PendingRequest(
                request_id=request.request_id,
                tenant=request.tenant,
                messages=(("user", text),),
                params=common_pb2.GenerationParams(),
                deadline=deadline,
                span_context=span_context,
                priority=request.priority,
                self_hosted_only=request.self_hosted_only,
                weight=weight,
                deltas=False,
                unreachable=unreachable,
            )
            for text in request.inputs
        ]
        try:
            # Admission does not yield on the way to the queue, so the inputs of one request
            # are queued together and leave in as few batches as the batch size allows.
            for item in items:
                await self._admission.admit(model, item)
            async with asyncio.timeout(timeout_s):
                rows = await asyncio.gather(*(item.future for item in items))
        except TimeoutError:
            raise _too_late(model, timeout_s) from None
        finally:
            for item in items:
                item.future.cancel()  # the rest of a failed or abandoned Embed: stop its work
        tokens = sum(row.usage.prompt_tokens for row in rows)
        placement = common_pb2.Placement()
        placement.CopyFrom(rows[0].placement)
        placement.batch_size = max(row.placement.batch_size for row in rows)
        return scheduler_pb2.EmbedResponse(
            completion=common_pb2.Completion(
                finish_reason="stop",
                usage=common_pb2.Usage(prompt_tokens=tokens, total_tokens=tokens),
                placement=placement,
                embeddings=[vector for row in rows for vector in row.embeddings],
            )
        )

    async def _owned(self, model: Model, unreachable_ids: Iterable[str]) -> frozenset[str]:
        """Scale-out: refuse a model another replica owns (its queue is there), naming it.

        In memory on the hot path; only a request this replica believes it does not own reads
        the members again first. A router that could not reach a replica names it in the
        metadata; the owner among the rest then takes the request (the replicas a router
        could not reach are returned: their claims on the request are void).
        """
        cluster = self._cluster
        if cluster is None:
            return frozenset()
        unreachable = frozenset(
            replica for replica in unreachable_ids if replica and replica != cluster.replica_id
        )
        if cluster.owns(model.name, unreachable):
            return unreachable
        await cluster.refresh()
        if cluster.owns(model.name, unreachable):
            return unreachable
        owner = cluster.owner(model.name, unreachable) or ""
        raise ShepherdError(
            grpc.StatusCode.UNAVAILABLE,
            f"model {model.name} is queued on scheduler replica "
            f"{describe(cluster.members, owner)}, not on {cluster.replica_id}: send it there",
            [
                error_details_pb2.ErrorInfo(
                    reason=NOT_OWNER_REASON,
                    domain=ERROR_DOMAIN,
                    metadata={"owner": owner, "address": cluster.members.get(owner, "")},
                )
            ],
        )

    async def GetAssignments(
        self, request: scheduler_pb2.GetAssignmentsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetAssignmentsResponse:
        """Members, model -> owner and pool -> placement leader, as this replica sees them."""
        response = scheduler_pb2.GetAssignmentsResponse(
            replica_id=self._replica_id, scale_out=self._cluster is not None
        )
        if self._cluster is None:
            response.models.extend(
                scheduler_pb2.ModelAssignment(model=name, replica_id=self._replica_id)
                for name in sorted(self._catalog.models)
            )
            response.pools.extend(
                scheduler_pb2.PoolLeader(pool=name, replica_id=self._replica_id)
                for name in sorted(self._pools)
            )
            return response
        members, owners, leaders = self._cluster.snapshot()
        response.members.extend(
            scheduler_pb2.SchedulerMember(replica_id=replica, address=address)
            for replica, address in sorted(members.items())
        )
        response.models.extend(
            scheduler_pb2.ModelAssignment(model=name, replica_id=owner)
            for name, owner in sorted(owners.items())
        )
        response.pools.extend(
            scheduler_pb2.PoolLeader(pool=name, replica_id=leader)
            for name, leader in sorted(leaders.items())
        )
        return response

    async def EnsureLoaded(
        self, request: scheduler_pb2.EnsureLoadedRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.EnsureLoadedResponse:
        """Another replica has work for a model no node of the pool holds: place it (leader)."""
        pool = self._pools.get(request.pool)
        placer = pool.placement if pool is not None else None
        deployment = pool.deployment(request.backend_model) if pool is not None else None
        if pool is None or not isinstance(placer, Placer) or deployment is None:
            raise ShepherdError(
                grpc.StatusCode.NOT_FOUND,
                f"no pool {request.pool!r} in explicit model control with a deployment of "
                f"{request.backend_model!r}",
            )
        remaining = context.time_remaining()
        timeout_s = 30.0 if remaining is None else max(0.0, remaining - 0.1)
        nodes = await placer.ensure(pool, deployment, timeout_s)
        return scheduler_pb2.EnsureLoadedResponse(nodes=sorted(nodes))

    def _served(
        self,
        model: Model,
        item: PendingRequest,
        completion: common_pb2.Completion | None,
        error_type: str,
    ) -> None:
        """Record the GenAI server metrics of a request that ended (services/scheduler/stats)."""
        now = time.monotonic()
        if completion is not None:
            provider = genai.provider_of(completion.placement, self._providers)
        else:
            primary = model.deployments[0]
            provider = genai.PROVIDER_TRITON if primary.kind == "triton" else primary.provider
        first = item.events.first_delta_at
        tokens = completion.usage.completion_tokens if completion is not None else 0
        self._batchers[model.name].stats.served(
            now - item.enqueued_at,
            provider,
            completion=completion,
            ttft_s=None if first is None else first - item.enqueued_at,
            tpot_s=None if first is None or tokens < 2 else (now - first) / (tokens - 1),
            error_type=error_type,
        )

    async def GetStats(
        self, request: scheduler_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetStatsResponse:
        if request.model:
            names = [self._catalog.resolve(request.model).name]
        else:
            names = sorted(self._batchers)
        response = scheduler_pb2.GetStatsResponse(replica_id=self._replica_id)
        for name in names:
            batcher = self._batchers[name]
            queue, stats = batcher.queue, batcher.stats
            counters = queue.counters
            response.models.append(
                scheduler_pb2.ModelStats(
                    model=name,
                    queue_depth=queue.depth,
                    queue_depth_by_priority=[
                        scheduler_pb2.PriorityDepth(priority=priority, depth=queue.depth_of(rank))
                        for rank, priority in enumerate(CLASSES)
                    ],
                    admitted=counters.admitted,
                    completed=stats.completed,
                    rejected=counters.rejected,
                    shed=counters.shed,
                    expired=counters.expired,
                    cancelled=counters.cancelled,
                    spilled_over=stats.spilled_over,
                    batches=stats.batches,
                    batch_sizes=[
                        scheduler_pb2.BatchSizeCount(size=size, count=count)
                        for size, count in sorted(stats.batch_sizes.items())
                    ],
                    queue_wait_p50_ms=percentile(stats.queue_wait_ms, 0.5),
                    queue_wait_p99_ms=percentile(stats.queue_wait_ms, 0.99),
                    dispatch_latency_p50_ms=percentile(stats.dispatch_ms, 0.5),
                    dispatch_latency_p99_ms=percentile(stats.dispatch_ms, 0.99),
                    estimated_wait_ms=batcher.estimated_wait_s(1) * 1000,
                    ttft_p50_ms=percentile(stats.ttft_ms, 0.5),
                    ttft_p99_ms=percentile(stats.ttft_ms, 0.99),
                    time_per_output_token_p50_ms=percentile(stats.tpot_ms, 0.5),
                    time_per_output_token_p99_ms=percentile(stats.tpot_ms, 0.99),
                    tenants=_tenant_stats(stats, queue.tenant_depths()),
                    composing_models=[
                        step.model for d in batcher.model.self_hosted for step in d.steps
                    ],
                    owner_replica_id=(
                        self._cluster.owner(name) or ""
                        if self._cluster is not None
                        else self._replica_id
                    ),
                )
            )
        for pool in self._pools.values():
            for node in pool.nodes.values():
                reads, metered = self._metering(node.address)
                response.nodes.append(
                    scheduler_pb2.NodeStats(
                        pool=pool.pool.name,
                        address=node.address,
                        state=_NODE_STATES[node.state],
                        inflight_batches=node.inflight,
                        max_inflight_batches=node.cap,
                        ema_latency_ms=node.ema_s * 1000,
                        loaded_models=sorted(
                            m.name for m in node.models.values() if m.state is ModelState.READY
                        ),
                        memory_total_mb=node.memory_total_mb,
                        memory_used_mb=node.memory_used_mb,
                        consecutive_failures=node.failures,
                        statistics_reads=reads,
                        metered_batches=metered,
                    )
                )
        events = sorted(
            (e for placer in self._placers for e in placer.events), key=lambda e: e.unix_ms
        )
        response.placement_events.extend(
            scheduler_pb2.PlacementEvent(
                unix_ms=e.unix_ms,
                node=e.node,
                backend_model=e.backend_model,
                action=_ACTIONS[e.action],
                reason=e.reason,
                duration_ms=e.duration_ms,
            )
            for e in events
        )
        return response


def _tenant_stats(
    stats: ModelStats, depths: Mapping[str, int]
) -> list[scheduler_pb2.TenantQueueStats]:
    """One entry per tenant tracked or queued now, by name; reading does not mark it as seen."""
    entries = []
    for name in sorted(set(stats.tenants) | set(depths)):
        tenant = stats.tenants.get(name) or TenantStats()
        entries.append(
            scheduler_pb2.TenantQueueStats(
                tenant=name,
                queue_depth=depths.get(name, 0),
                admitted=tenant.admitted,
                completed=tenant.completed,
                queue_wait_p50_ms=percentile(tenant.queue_wait_ms, 0.5),
                queue_wait_p99_ms=percentile(tenant.queue_wait_ms, 0.99),
            )
        )
    return entries
