"""The BillingService RPCs: price usage with the catalog, write it to the ledger, report it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from opentelemetry import metrics
from redis.exceptions import RedisError
from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc
from shepherd.common.v1 import common_pb2

from libs.accounts import InvalidRecord, utc_now
from libs.apikeys import valid_tenant
from libs.catalog import Catalog
from libs.errors import ShepherdError, invalid_argument
from libs.telemetry import child_span, set_tenant
from services.billing.costs import advice, bucket_pb, usage_of
from services.billing.ledger import Ledger, UsageEntry, report_range
from services.billing.pools import (
    PoolFiguresFull,
    PoolStore,
    day_hours,
    delta_violations,
    total,
)

TENANT_RULE = "is required: 1-64 letters, digits, '-' or '_'"
NANO_PER_USD = 1_000_000_000

# What billing records, by tenant and model, for dashboards (/metrics): tenants and catalog
# models are bounded sets; request ids are never attributes. Counted once per ledger entry
# written (a duplicate record adds nothing), from the same figures the ledger holds, into
# in-process totals that the metrics SDK reads when it collects (an addition per record on the
# request path, not a measurement).
_billed: dict[tuple[str, str], list[int]] = {}  # (tenant, model) -> totals, as _FIELDS
_FIELDS = ("cost_nano", "input", "output", "hit", "miss")


def _count(request: billing_pb2.RecordUsageRequest, model: str, cost_nano: int) -> None:
    """Add one newly billed record to the billing metrics."""
    totals = _billed.get((request.tenant, model))
    if totals is None:
        totals = _billed[(request.tenant, model)] = [0, 0, 0, 0, 0]
    totals[0] += cost_nano
    totals[1] += request.usage.prompt_tokens
    totals[2] += request.usage.completion_tokens
    totals[3 if request.cache_hit else 4] += 1


def _observe_cost(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    return [
        metrics.Observation(t[0] / NANO_PER_USD, {"tenant": tenant, "model": model})
        for (tenant, model), t in list(_billed.items())
    ]


def _observe_tokens(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    return [
        metrics.Observation(t[index], {"tenant": tenant, "model": model, "type": kind})
        for (tenant, model), t in list(_billed.items())
        for index, kind in ((1, "input"), (2, "output"))
    ]


def _observe_requests(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    return [
        metrics.Observation(t[index], {"tenant": tenant, "model": model, "cache_hit": hit})
        for (tenant, model), t in list(_billed.items())
        for index, hit in ((3, "true"), (4, "false"))
    ]


_meter = metrics.get_meter("shepherd.billing")
_meter.create_observable_counter(
    "shepherd.billing.cost.usd",
    callbacks=[_observe_cost],
    unit="{USD}",
    description="Cost billed, by tenant and model.",
)
_meter.create_observable_counter(
    "shepherd.billing.tokens",
    callbacks=[_observe_tokens],
    unit="{token}",
    description="Tokens billed, by tenant, model and type (input, output).",
)
_meter.create_observable_counter(
    "shepherd.billing.requests",
    callbacks=[_observe_requests],
    unit="{request}",
    description="Requests billed, by tenant, model and whether the cache answered.",
)


def unreachable(error: RedisError, what: str = "the billing ledger") -> ShepherdError:
    return ShepherdError(grpc.StatusCode.UNAVAILABLE, f"{what} is unreachable ({error})")


@dataclass(frozen=True)
class UsageReport:
    """A tenant's usage report, as BillingService/GetUsage and AdminService/GetTenantReport
    both answer it."""

    buckets: list[common_pb2.UsageBucket]
    total_cost: common_pb2.Money
    total_gpu_cost: common_pb2.Money
    advice: list[billing_pb2.CostAdvice]


async def usage_report(
    catalog: Catalog, ledger: Ledger, pools: PoolStore, tenant: str, start_day: str, end_day: str
) -> UsageReport:
    """A tenant's usage by day and model, with what self-hosting cost and the cost advisor
    (services/billing/costs.py)."""
    if not valid_tenant(tenant):
        raise invalid_argument([("tenant", TENANT_RULE)])
    first, last = report_range(start_day, end_day, utc_now().date())
    try:
        buckets = await ledger.report(tenant, first, last)
        names = {
            model.self_hosted[0].pool
            for b in buckets
            if (model := catalog.models.get(b.model)) is not None and model.self_hosted
        }
        hours = day_hours(first, last)
        measured = {name: total(name, await pools.hours(name, hours)) for name in sorted(names)}
    except RedisError as error:
        raise unreachable(error) from error
    rows = [bucket_pb(catalog, b) for b in buckets]
    return UsageReport(
        buckets=rows,
        total_cost=common_pb2.Money(nano_usd=sum(b.cost.nano_usd for b in rows)),
        total_gpu_cost=common_pb2.Money(nano_usd=sum(b.gpu_cost.nano_usd for b in rows)),
        advice=advice(catalog, buckets, measured, (last - first).days + 1),
    )


# The most records one RecordUsageBatch may carry: bounds the work and memory of one call.
MAX_BATCH_RECORDS = 1_000
# The most tokens one record may report, prompt or completion: far above any model's window.
MAX_RECORD_TOKENS = 100_000_000
# The most GPU time one record may report: a day of a thousand GPUs.
MAX_RECORD_GPU_US = 86_400 * 1_000 * 1_000_000


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    """Prices usage and keeps the ledger."""

    def __init__(self, catalog: Catalog, ledger: Ledger, pools: PoolStore) -> None:
        self._catalog = catalog
        self._ledger = ledger
        self._pools = pools

    async def RecordUsage(
        self, request: billing_pb2.RecordUsageRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.RecordUsageResponse:
        return await self._record(request)

    async def RecordUsageBatch(
        self, request: billing_pb2.RecordUsageBatchRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.RecordUsageBatchResponse:
        """Each record as RecordUsage would bill it, concurrently; a bad one fails alone."""
        if len(request.records) > MAX_BATCH_RECORDS:
            raise invalid_argument(
                [
                    (
                        "records",
                        f"at most {MAX_BATCH_RECORDS} records per call, not {len(request.records)}",
                    )
                ]
            )
        outcomes = await asyncio.gather(
            *(self._record(record) for record in request.records), return_exceptions=True
        )
        response = billing_pb2.RecordUsageBatchResponse()
        for outcome in outcomes:
            if isinstance(outcome, billing_pb2.RecordUsageResponse):
                response.outcomes.add(recorded=outcome)
            elif isinstance(outcome, ShepherdError):
                response.outcomes.add(
                    failure=billing_pb2.RecordUsageFailure(
                        code=outcome.code.value[0], message=outcome.message
                    )
                )
            else:
                raise outcome  # a bug, not a bad record: INTERNAL for the whole call
        return response

    async def _record(
        self, request: billing_pb2.RecordUsageRequest
    ) -> billing_pb2.RecordUsageResponse:
        """Bill one record inside a span of its own request's trace (see `child_span`)."""
        with child_span("billing.record", request.traceparent) as span:
            span.set_attribute("shepherd.request_id", request.request_id)
            if valid_tenant(request.tenant):
                set_tenant(request.tenant)
            return await self._record_one(request)

    async def _record_one(
        self, request: billing_pb2.RecordUsageRequest
    ) -> billing_pb2.RecordUsageResponse:
        """Validate, price and bill one record; raises ShepherdError with the caller's status."""
        violations = []
        if not request.request_id:
            violations.append(("request_id", "is required; the ledger is idempotent on it"))
        elif len(request.request_id) > 128:
            violations.append(("request_id", "must be at most 128 characters"))
        if not valid_tenant(request.tenant):
            violations.append(("tenant", TENANT_RULE))
        if request.usage.prompt_tokens < 0 or request.usage.completion_tokens < 0:
            violations.append(("usage", "token counts cannot be negative"))
        elif max(request.usage.prompt_tokens, request.usage.completion_tokens) > MAX_RECORD_TOKENS:
            # No request consumes this many; a count this large is a caller's bug, and the
            # ledger's aggregates must never be fed a value that could overflow them.
            violations.append(("usage", f"token counts must be at most {MAX_RECORD_TOKENS:,}"))
        if not 0 <= request.gpu_us <= MAX_RECORD_GPU_US:
            violations.append(("gpu_us", f"must be between 0 and {MAX_RECORD_GPU_US:,}"))
        if violations:
            raise invalid_argument(violations)
        model = self._catalog.resolve(request.model)
        cost = 0
        if not request.cache_hit:
            cost = model.price.cost_nano(
                request.usage.prompt_tokens, request.usage.completion_tokens
            )
        # What it cost us: GPU time on a self-hosted node at its pool's price. A cache hit
        # used none; a hosted deployment has none; a deployment this catalog does not know
        # (renamed meanwhile) keeps its GPU time, priced at nothing rather than guessed.
        deployment = self._catalog.deployment(model, request.deployment)
        gpu_us = 0 if request.cache_hit else request.gpu_us
        if gpu_us and deployment is not None and deployment.kind == "hosted":
            raise invalid_argument(
                [("gpu_us", f"{request.deployment} is a hosted API: it has no GPU time")]
            )
        self_hosted = (
            not request.cache_hit and deployment is not None and deployment.kind == "triton"
        )
        gpu_cost = (
            self._catalog.pools[deployment.pool].gpu_cost_nano(gpu_us)
            if self_hosted and deployment is not None
            else 0
        )
        entry = UsageEntry(
            request_id=request.request_id,
            tenant=request.tenant,
            model=model.name,
            deployment=request.deployment,
            prompt_tokens=request.usage.prompt_tokens,
            completion_tokens=request.usage.completion_tokens,
            cost_nano=cost,
            cache_hit=request.cache_hit,
            recorded_at=utc_now(),
            fingerprint=request.fingerprint,
            coalesced=request.coalesced and request.cache_hit,
            self_hosted=self_hosted,
            gpu_us=gpu_us,
            gpu_cost_nano=gpu_cost,
        )
        try:
            recorded = await self._ledger.record(entry)
        except InvalidRecord as error:
            raise invalid_argument([("usage", str(error))]) from error
        except RedisError as error:
            raise ShepherdError(
                grpc.StatusCode.UNAVAILABLE,
                f"the billing ledger is unreachable ({error}); retry with the same request_id,"
                " which is billed at most once",
            ) from error
        if recorded.conflict:
            raise invalid_argument(
                [
                    (
                        "request_id",
                        f"{request.request_id!r} was already billed for a different request of"
                        " this tenant; a new request needs a new id",
                    )
                ]
            )
        if not recorded.duplicate:
            _count(request, model.name, recorded.cost_nano)
        return billing_pb2.RecordUsageResponse(
            cost=common_pb2.Money(nano_usd=recorded.cost_nano),
            duplicate=recorded.duplicate,
            capped=recorded.capped,
            gpu_cost=common_pb2.Money(nano_usd=recorded.gpu_cost_nano),
        )

    async def GetTenantUsage(
        self, request: billing_pb2.GetTenantUsageRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetTenantUsageResponse:
        if not valid_tenant(request.tenant):
            raise invalid_argument([("tenant", TENANT_RULE)])
        try:
            totals = await self._ledger.tenant_totals(request.tenant)
        except RedisError as error:
            raise unreachable(error) from error
        return billing_pb2.GetTenantUsageResponse(
            tenant=request.tenant,
            requests=totals.overall.requests,
            usage=usage_of(totals.overall),
            cost=common_pb2.Money(nano_usd=totals.overall.cost_nano),
            coalesced=totals.overall.coalesced,
            gpu_us=totals.overall.gpu_us,
            gpu_cost=common_pb2.Money(nano_usd=totals.overall.gpu_cost_nano),
            models=[
                billing_pb2.ModelUsage(
                    model=name,
                    requests=t.requests,
                    usage=usage_of(t),
                    cost=common_pb2.Money(nano_usd=t.cost_nano),
                    cache_hits=t.cache_hits,
                    coalesced=t.coalesced,
                    gpu_us=t.gpu_us,
                    gpu_cost=common_pb2.Money(nano_usd=t.gpu_cost_nano),
                )
                for name, t in sorted(totals.models.items())
            ],
        )

    async def GetUsage(
        self, request: billing_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetUsageResponse:
        report = await usage_report(
            self._catalog,
            self._ledger,
            self._pools,
            request.tenant,
            request.start_day,
            request.end_day,
        )
        return billing_pb2.GetUsageResponse(
            tenant=request.tenant,
            buckets=report.buckets,
            total_cost=report.total_cost,
            total_gpu_cost=report.total_gpu_cost,
            advice=report.advice,
        )

    async def RecordPoolUsage(
        self, request: billing_pb2.RecordPoolUsageRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.RecordPoolUsageResponse:
        """A scheduler's figures of its pools (services/billing/pools.py)."""
        violations = delta_violations(request)
        if violations:
            raise invalid_argument(violations)
        try:
            recorded = await self._pools.record(request)
        except PoolFiguresFull as error:
            raise invalid_argument([("deltas", str(error))]) from error
        except RedisError as error:
            raise unreachable(error, "the pool usage store") from error
        return billing_pb2.RecordPoolUsageResponse(duplicate=bool(request.deltas) and not recorded)
