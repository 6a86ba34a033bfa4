"""The request path of a chat, independent of the transport that carries it.

authenticate → resolve → validate → reserve (budget, rate limits) → cache → schedule (stream)
→ bill → store → answer. `ChatPipeline.run` yields `Text` events as the answer is generated
and then exactly one `Ending`, on every path: a normal end, a cache hit (replayed as a
stream), max_tokens, a backend error after some text (the Ending carries the usage so far and
what it cost; the error is raised after it), and a passed deadline. gRPC's Chat collects the
events, ChatStream forwards them, and an HTTP edge will be a third adapter over the same run.

Money on every path: what was generated is billed exactly once. A request that ends before
any text gives its reservation back; a request cut off after some text (an error, or the
caller going away) is billed for the tokens the scheduler reported with its last delta. When
billing (or its Redis) is down, the record goes to the router's durable spool (spool.py)
and the answer is returned priced as billing will price it; only when even the spool cannot
take it is the answer withheld (UNAVAILABLE, retry with the same request id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import grpc
from shepherd.billing.v1 import billing_pb2
from shepherd.cache.v1 import cache_pb2, cache_pb2_grpc
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2
from shepherd.scheduler.v1 import scheduler_pb2

from libs import genai
from libs.catalog import Catalog, Model
from libs.errors import ShepherdError, from_rpc_error, invalid_argument, status_code
from libs.fingerprint import is_cacheable, request_fingerprint
from libs.generation import task_violations
from libs.membership import unreachable_in
from libs.retry import RetryPolicy
from libs.telemetry import current_trace_id, trace_metadata
from services.router.auth import Authenticator
from services.router.config import RouterConfig
from services.router.flight import Leadership, trimmed_text
from services.router.observe import ChatObserver
from services.router.quota import Quota, Ticket
from services.router.schedulers import SchedulerDirectory
from services.router.spool import UsageSpool
from services.router.usage import UsageRecorder
from services.router.validation import resolved_params

_log = logging.getLogger(__name__)
# Billing is idempotent on (tenant, request id), so a brief outage is retried, within the
# billing timeout, before the caller is told to retry with the same id.
_BILLING_RETRY = RetryPolicy(attempts=3, base_s=0.05, max_s=0.5)
# What billing (or its Redis) being down or overloaded looks like: usage waits in the spool.
_BILLING_OUTAGE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
_CACHEABLE_ENDINGS = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
FINISH_TEXT = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
    common_pb2.FINISH_REASON_ERROR: "error",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}
FINISH_ENUM = {text: reason for reason, text in FINISH_TEXT.items()}
Metadata = Sequence[tuple[str, str | bytes]]
ChatLike: TypeAlias = router_pb2.ChatRequest | router_pb2.ChatStreamRequest


# A request is sent to another scheduler replica only while this much of its deadline is left.
_MIN_RETRY_S = 0.5


class SchedulerCall(Protocol):
    """A scheduler call the pipeline reads: InferStream, or one on an InferMany stream."""

    async def read(self) -> Any: ...

    def cancel(self) -> Any: ...


async def _chunks(
    call: SchedulerCall,
    first: object,
) -> AsyncIterator[scheduler_pb2.InferStreamResponse]:
    """The stream's chunks, the first of which was already read (or its error raised).

    Read with `read()` throughout: grpc.aio refuses a call read both ways.
    """
    chunk = first
    while True:
        if isinstance(chunk, BaseException):
            raise chunk
        if chunk is grpc.aio.EOF:
            return
        yield chunk
        chunk = await call.read()


def _before(remaining_s: float) -> float:
    """A deadline for the scheduler that leaves the router time to answer its own caller."""
    return max(0.001, remaining_s - min(0.25, remaining_s * 0.1))


@dataclass(frozen=True)
class Text:
    """Text generated since the previous event."""

    text: str


@dataclass(frozen=True)
class Ending:
    """The end of an answer: why, what it consumed and cost, and where it ran."""

    request_id: str
    model: str
    finish_reason: int
    usage: common_pb2.Usage
    cost: common_pb2.Money
    placement: common_pb2.Placement
    cache_hit: bool
    trace_id: str
    usage_estimated: bool = False
    seed: int | None = None  # what a sampled answer was generated with, to reproduce it
    coalesced: bool = False  # shared from an identical request in flight (single-flight)
    # The documents a retrieval-augmented model answered from, best first (else empty).
    document_ids: Sequence[str] = ()
    # An embedding model's vectors, one per input (services/router/embeddings.py).
    embeddings: Sequence[common_pb2.Embedding] = ()


ChatEvent = Text | Ending


@dataclass
class _Request:
    """One chat on its way through the pipeline."""

    tenant: str
    model: Model
    params: common_pb2.GenerationParams
    request_id: str
    fingerprint: str
    ticket: Ticket
    deadline: float


class ChatPipeline:
    """The router's request path, shared by every transport.

    `task` is the kind of model it serves; EmbedPipeline (services/router/embeddings.py) runs
    the same path for embedding models, with its own parameters and compute step.
    """

    task = "chat"
    # What its runs are in the GenAI conventions' words (observe.py).
    operation = genai.OPERATION_CHAT

    def __init__(
        self,
        config: RouterConfig,
        catalog: Catalog,
        authenticator: Authenticator,
        quota: Quota,
        scheduler: SchedulerDirectory,
        cache: cache_pb2_grpc.CacheServiceStub,
        usage: UsageRecorder,
        spool: UsageSpool,
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._auth = authenticator
        self._quota = quota
        self._scheduler = scheduler
        self._cache = cache
        self._usage = usage
        self._spool = spool
        self._observer = ChatObserver(catalog)

    def _remaining(self, deadline: float, cap_s: float) -> float:
        return max(0.0, min(cap_s, deadline - time.monotonic()))

    def run(
        self,
        request: ChatLike,
        metadata: Metadata,
        time_remaining_s: float | None,
        *,
        deltas: bool = True,
        method: str = "",
    ) -> AsyncIterator[ChatEvent]:
        """Answer `request`: Text events, then one Ending (then the error, if one ended it).

        With `deltas` false (a unary caller) the text comes as one Text event at the end, and
        the scheduler and backends skip streaming it piece by piece, which costs CPU per piece.
        Every run leaves a GenAI span, metrics and one access line naming `method` (by default
        the gRPC method it stands for) (observe.py).
        """
        return self._observer.observe(
            self._run(request, metadata, time_remaining_s, deltas),
            request,
            method or ("ChatStream" if deltas else "Chat"),
            self.operation,
        )

    async def _run(
        self,
        request: ChatLike,
        metadata: Metadata,
        time_remaining_s: float | None,
        deltas: bool,
    ) -> AsyncIterator[ChatEvent]:
        tenant = await self._auth.tenant_for(metadata)
        if not request.model:
            raise ShepherdError(
                grpc.StatusCode.INVALID_ARGUMENT, "model is required (call ListModels to see them)"
            )
        model = self._catalog.resolve(request.model)
        wrong_task = task_violations(model, self.task)
        if wrong_task:
            raise invalid_argument(wrong_task)
        params = self._params(request, model)
        request_id = request.request_id or uuid.uuid4().hex
        timeout_s = self._config.default_timeout_s if time_remaining_s is None else time_remaining_s
        fingerprint = request_fingerprint(model.name, request.messages, params)
        ticket = await self._quota.admit(
            tenant=tenant,
            request_id=request_id,
            fingerprint=fingerprint,
            model=model,
            messages=request.messages,
            max_tokens=params.max_tokens,
            timeout_s=timeout_s,
        )
        chat = _Request(
            tenant, model, params, request_id, fingerprint, ticket, time.monotonic() + timeout_s
        )
        try:
            lookup = await self._lookup(request, chat)
        except BaseException:
            await self._quota.release(ticket)
            raise
        if lookup.hit:
            async for event in self._replay(chat, lookup.completion):
                yield event
            return
        if lookup.outcome == cache_pb2.LOOKUP_OUTCOME_FOLLOW:
            async for event in self._follow(request, chat, lookup, deltas):
                yield event
            return
        async for event in self._generate(request, chat, lookup, deltas):
            yield event

    def _params(self, request: ChatLike, model: Model) -> common_pb2.GenerationParams:
        """Validate the request; its parameters with the model's defaults filled in."""
        return resolved_params(request, model)

    async def _replay(
        self,
        chat: _Request,
        completion: common_pb2.Completion,
        *,
        coalesced: bool = False,
        skip: int = 0,
    ) -> AsyncIterator[ChatEvent]:
        """A cache hit (or a leader's answer), as a stream: its text, then the Ending at no
        cost. `skip` characters of the text were already sent to the caller."""
        cost = await self._bill(
            chat, completion.usage, completion.placement, cache_hit=True, coalesced=coalesced
        )
        rest, _ = trimmed_text(completion.text, skip)
        if rest or not skip:
            yield Text(rest)
        yield self._ending(
            chat,
            FINISH_ENUM.get(completion.finish_reason, common_pb2.FINISH_REASON_STOP),
            completion.usage,
            cost,
            completion.placement,
            cache_hit=True,
            seed=completion.seed if completion.HasField("seed") else None,
            coalesced=coalesced,
            document_ids=completion.document_ids,
            embeddings=completion.embeddings,
        )

    async def _follow(
        self, request: ChatLike, chat: _Request, lookup: cache_pb2.LookupResponse, deltas: bool
    ) -> AsyncIterator[ChatEvent]:
        """Wait for the leader of an identical request and answer with its answer.

        Text the leader publishes is forwarded as it comes (to a streaming caller). The
        leader's completion is billed to this caller as a cache hit, flagged coalesced. A
        leader that dies (its lease expires) or fails is taken over: a new lookup makes this
        request the leader, a follower of another, or a hit; a leader's failure that is the
        caller's fault (INVALID_ARGUMENT) is this request's too. A follower never waits past
        half of what is left of its deadline: then it computes the answer itself.
        """
        sent = 0  # characters of text already sent to the caller
        leader_failures = 0
        while True:
            budget = self._remaining(chat.deadline, self._config.default_timeout_s) / 2
            result: common_pb2.Completion | cache_pb2.FollowEnd | None = None
            try:
                async for event in self._cache.Follow(
                    cache_pb2.FollowRequest(key=lookup.key, tenant=chat.tenant), timeout=budget
                ):
                    if event.HasField("text"):
                        if deltas:
                            sent += len(event.text)
                            yield Text(event.text)
                    elif event.HasField("completion"):
                        result = event.completion
                        break
                    else:
                        result = event.end
                        break
            except grpc.aio.AioRpcError as error:
                # Waited long enough, or the cache is down: compute the answer ourselves.
                _log.info(
                    "following failed; computing the answer", extra={"error": error.code().name}
                )
            except BaseException:
                await self._quota.release(chat.ticket)
                raise
            if isinstance(result, common_pb2.Completion):
                async for answer in self._replay(chat, result, coalesced=True, skip=sent):
                    yield answer
                return
            if isinstance(result, cache_pb2.FollowEnd) and not result.lease_expired:
                code = status_code(result.code)
                leader_failures += 1
                if code == grpc.StatusCode.INVALID_ARGUMENT or leader_failures > 1:
                    await self._quota.release(chat.ticket)
                    if sent:
                        # Text reached the caller: the stream still ends with its final chunk
                        # (nothing billed: the leader pays for what it generated).
                        yield self._ending(
                            chat,
                            common_pb2.FINISH_REASON_ERROR,
                            common_pb2.Usage(),
                            common_pb2.Money(),
                            common_pb2.Placement(),
                            cache_hit=True,
                            coalesced=True,
                        )
                    raise ShepherdError(code, result.message)
            if result is None:
                lookup = cache_pb2.LookupResponse(cacheable=True, key=lookup.key)
            else:
                try:
                    lookup = await self._lookup(request, chat)
                except BaseException:
                    await self._quota.release(chat.ticket)
                    raise
                if lookup.hit:
                    async for answer in self._replay(chat, lookup.completion, skip=sent):
                        yield answer
                    return
                if lookup.outcome == cache_pb2.LOOKUP_OUTCOME_FOLLOW:
                    continue
            async for answer in self._generate(request, chat, lookup, deltas, skip=sent):
                yield answer
            return

    async def _generate(
        self,
        request: ChatLike,
        chat: _Request,
        lookup: cache_pb2.LookupResponse,
        deltas: bool,
        *,
        skip: int = 0,
    ) -> AsyncIterator[ChatEvent]:
        """Compute the answer; as the leader of a lease, share it with the followers.

        `skip` characters of the answer were already sent to the caller (while it followed a
        leader that then failed): they are not sent again.
        """
        leadership = None
        if lookup.outcome == cache_pb2.LOOKUP_OUTCOME_LEAD:
            leadership = Leadership(
                self._cache,
                lookup.key,
                lookup.lease_token,
                chat.tenant,
                lookup.lease_ms,
                publish=deltas,
            )
        try:
            async for event in self._compute(request, chat, lookup, deltas, leadership):
                if isinstance(event, Text) and skip:
                    rest, skip = trimmed_text(event.text, skip)
                    if not rest:
                        continue
                    event = Text(rest)
                yield event
        except ShepherdError as error:
            if leadership is not None:
                await asyncio.shield(leadership.abandon(error.code, error.message))
            raise
        finally:
            if leadership is not None and not leadership.settled:
                # The caller went away, or anything else ended the leader without an answer.
                await asyncio.shield(
                    leadership.abandon(grpc.StatusCode.CANCELLED, "the leader stopped early")
                )

    async def _compute(
        self,
        request: ChatLike,
        chat: _Request,
        lookup: cache_pb2.LookupResponse,
        deltas: bool,
        leadership: Leadership | None,
    ) -> AsyncIterator[ChatEvent]:
        """Stream from the scheduler, bill what was used, store a complete answer.

        The request goes to the scheduler replica that owns its model (schedulers.py). If that
        replica refused it as not its owner, or could not be reached, before any text, it is
        sent once more, to the owner named by a fresh read of the members, while its deadline
        leaves time for it; the same request id, so the replicas' claims and billing's ledger
        never run or bill it twice.
        """
        scheduler_request = scheduler_pb2.InferStreamRequest(
            request_id=chat.request_id,
            tenant=chat.tenant,
            model=chat.model.name,
            messages=request.messages,
            params=chat.params,
            priority=request.priority,
            self_hosted_only=request.self_hosted_only,
            final_only=not deltas,
        )
        retried = False
        while True:
            replica, scheduler, metadata = self._scheduler.route(chat.model.name)
            # The scheduler stops a little before the caller's own deadline, so the final
            # chunk (with what was generated, billed) still reaches the caller.
            timeout_s = _before(self._remaining(chat.deadline, self._config.default_timeout_s))
            # A call on the replica's open InferMany stream, unless it has none.
            multiplexed = self._scheduler.multiplexed(replica)
            call: SchedulerCall
            if multiplexed is None:
                call = scheduler.InferStream(
                    scheduler_request, timeout=timeout_s, metadata=metadata
                )
            else:
                call = multiplexed.start(scheduler_request, timeout_s, unreachable_in(metadata))
            first: object
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as error:
                if multiplexed is not None and error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._scheduler.unimplemented(replica)  # nothing ran: send it the old way
                    continue
                if (
                    not retried
                    and self._scheduler.retryable(replica, error)
                    and chat.deadline - time.monotonic() > _MIN_RETRY_S
                ):
                    retried = True
                    with contextlib.suppress(Exception):
                        await self._scheduler.refresh()
                    continue
                first = error
            except BaseException as error:  # the caller went away: handled below, as ever
                first = error
            break
        parts: list[str] = []
        used = common_pb2.Usage()
        final: common_pb2.CompletionFinal | None = None
        try:
            async for chunk in _chunks(call, first):
                if chunk.HasField("delta"):
                    parts.append(chunk.delta.text)
                    used = chunk.delta.usage
                    if leadership is not None:
                        leadership.publish(chunk.delta.text)
                    yield Text(chunk.delta.text)
                else:
                    final = chunk.final
                    if final.text:  # final_only: the whole text rides in the final chunk
                        parts.append(final.text)
                        yield Text(final.text)
        except grpc.aio.AioRpcError as error:
            failure = from_rpc_error(error, "scheduler")
            late = failure.code == grpc.StatusCode.DEADLINE_EXCEEDED
            ended = (
                final.finish_reason
                if final is not None
                else common_pb2.FINISH_REASON_CANCELLED
                if late
                else common_pb2.FINISH_REASON_ERROR
            )
            used = final.usage if final is not None and final.usage.total_tokens else used
            placement = final.placement if final is not None else common_pb2.Placement()
            if used.total_tokens:
                # Text was generated before the failure: bill it, say so, then the error.
                cost = await self._bill(chat, used, placement, cache_hit=False)
            else:
                await self._quota.release(chat.ticket)
                cost = common_pb2.Money()
            if used.total_tokens or late:
                yield self._ending(chat, ended, used, cost, placement, cache_hit=False)
            raise failure from error
        except BaseException:
            # The caller went away mid-answer: stop the work, bill what it consumed.
            call.cancel()
            if used.total_tokens:
                await asyncio.shield(
                    self._bill(chat, used, common_pb2.Placement(), cache_hit=False)
                )
            else:
                await self._quota.release(chat.ticket)
            raise
        if final is None:
            await self._quota.release(chat.ticket)
            raise ShepherdError(
                grpc.StatusCode.INTERNAL, "the scheduler ended the stream without a final chunk"
            )
        cost = await self._bill(chat, final.usage, final.placement, cache_hit=False)
        seed = final.seed if final.HasField("seed") else None
        keep = lookup.cacheable and final.finish_reason in _CACHEABLE_ENDINGS
        if keep or leadership is not None:
            completion = common_pb2.Completion(
                text="".join(parts),
                finish_reason=FINISH_TEXT[final.finish_reason],
                usage=final.usage,
                placement=final.placement,
                seed=seed,
                document_ids=final.document_ids,
            )
            if leadership is not None:
                # An answer that may not be cached (e.g. filtered) still goes to followers.
                await leadership.finish(completion, keep=keep, ttl_s=chat.model.cache_ttl_s)
            else:
                await self._store(chat, lookup.key, completion)
        yield self._ending(
            chat,
            final.finish_reason,
            final.usage,
            cost,
            final.placement,
            cache_hit=False,
            estimated=final.usage_estimated,
            seed=seed,
            document_ids=final.document_ids,
        )

    def _ending(
        self,
        chat: _Request,
        reason: int,
        used: common_pb2.Usage,
        cost: common_pb2.Money,
        placement: common_pb2.Placement,
        *,
        cache_hit: bool,
        estimated: bool = False,
        seed: int | None = None,
        coalesced: bool = False,
        document_ids: Sequence[str] = (),
        embeddings: Sequence[common_pb2.Embedding] = (),
    ) -> Ending:
        if cache_hit and placement.batch_id:
            # A replayed answer ran on no GPU now: where it was computed, without its GPU time.
            replayed = common_pb2.Placement()
            replayed.CopyFrom(placement)
            for name in ("gpu_us", "batch_gpu_us", "batch_id"):
                replayed.ClearField(name)
            placement = replayed
        return Ending(
            request_id=chat.request_id,
            model=chat.model.name,
            finish_reason=reason,
            usage=used,
            cost=cost,
            placement=placement,
            cache_hit=cache_hit,
            trace_id=current_trace_id(),
            usage_estimated=estimated,
            seed=seed,
            coalesced=coalesced,
            document_ids=document_ids,
            embeddings=embeddings,
        )

    async def _lookup(self, request: ChatLike, chat: _Request) -> cache_pb2.LookupResponse:
        """Ask the cache; any cache failure is a miss, since the cache only saves work.

        The cache applies the tenant's own policy (cache scope, self-hosted only) itself. A
        request the cache may not answer (bypass, or sampling) skips the hop altogether.
        """
        if not is_cacheable(request.cache_policy, chat.params):
            return cache_pb2.LookupResponse(cacheable=False)
        try:
            return await self._cache.Lookup(
                cache_pb2.LookupRequest(
                    model_family=chat.model.family,
                    messages=request.messages,
                    params=chat.params,
                    policy=request.cache_policy,
                    tenant=chat.tenant,
                    self_hosted_only=request.self_hosted_only,
                ),
                timeout=self._remaining(chat.deadline, self._config.cache_timeout_s),
            )
        except grpc.aio.AioRpcError as error:
            _log.warning("cache lookup failed open", extra={"error": error.details()})
            return cache_pb2.LookupResponse()

    async def _store(self, chat: _Request, key: str, completion: common_pb2.Completion) -> None:
        try:
            await self._cache.Store(
                cache_pb2.StoreRequest(
                    key=key,
                    completion=completion,
                    ttl_seconds=chat.model.cache_ttl_s,
                    tenant=chat.tenant,
                ),
                timeout=self._config.cache_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            _log.warning("cache store failed open", extra={"error": error.details()})

    async def _bill(
        self,
        chat: _Request,
        used: common_pb2.Usage,
        placement: common_pb2.Placement,
        *,
        cache_hit: bool,
        coalesced: bool = False,
    ) -> common_pb2.Money:
        """Record usage, retrying briefly: the ledger is idempotent on (tenant, request_id)."""
        record = billing_pb2.RecordUsageRequest(
            request_id=chat.request_id,
            tenant=chat.tenant,
            model=chat.model.name,
            deployment=placement.deployment,
            usage=used,
            cache_hit=cache_hit,
            coalesced=coalesced,
            gpu_us=0 if cache_hit else placement.gpu_us,
            fingerprint=chat.fingerprint,
            # Records go to billing in groups: each carries its own request's trace.
            traceparent=dict(trace_metadata()).get("traceparent", ""),
        )
        deadline = time.monotonic() + self._config.billing_timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._usage.record(
                    record, _BILLING_RETRY.attempt_timeout(deadline) or 0.0
                )
                return response.cost
            except ShepherdError as error:
                if error.code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                delay = (
                    _BILLING_RETRY.next_delay(attempt, deadline=deadline)
                    if error.code == grpc.StatusCode.UNAVAILABLE
                    else None
                )
                if delay is not None:
                    await asyncio.sleep(delay)
                elif error.code in _BILLING_OUTAGE:
                    return await self._defer(chat, record, used, cache_hit, error)
                else:  # e.g. a misconfigured service token: no spool would ever get through
                    raise ShepherdError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the answer was computed but could not be billed ({error.message});"
                        f" retry with request_id {chat.request_id!r}: it is billed at most once",
                    ) from error

    async def _defer(
        self,
        chat: _Request,
        record: billing_pb2.RecordUsageRequest,
        used: common_pb2.Usage,
        cache_hit: bool,
        error: ShepherdError,
    ) -> common_pb2.Money:
        """Billing is unreachable: spool the record durably and price it as billing will.

        The cost is the catalog's price for the usage (nothing for a cache hit), capped at the
        request's reservation exactly as billing caps it, so the answer states what the ledger
        will hold once the spool is replayed. Only when the spool cannot take the record is
        the answer withheld, with a status that tells the caller to retry with the same id.
        """
        try:
            await self._spool.put(record)
        except ShepherdError as full:
            raise ShepherdError(
                grpc.StatusCode.UNAVAILABLE,
                f"the answer was computed but could not be billed ({error.message};"
                f" {full.message}); retry with request_id {chat.request_id!r}:"
                " it is billed at most once",
            ) from error
        _log.warning(
            "billing unreachable; usage spooled for replay",
            extra={"request_id": chat.request_id, "tenant": chat.tenant, "error": error.message},
        )
        # The reservation stays until the record is billed (billing settles it then), so a
        # budget cannot be overspent by answers whose usage is still on its way.
        await self._quota.hold(chat.ticket, self._config.spool_hold_s)
        if cache_hit:
            return common_pb2.Money()
        cost = chat.model.price.cost_nano(used.prompt_tokens, used.completion_tokens)
        if chat.ticket.leased:
            cost = min(cost, chat.ticket.reserved_nano)
        return common_pb2.Money(nano_usd=cost)
