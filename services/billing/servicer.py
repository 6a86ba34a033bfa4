"""The BillingService RPCs: price usage with the catalog and write it to the ledger."""

from __future__ import annotations

import time

import grpc
from redis.exceptions import RedisError
from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc
from shepherd.common.v1 import common_pb2

from libs.catalog import Catalog
from libs.errors import ShepherdError, invalid_argument
from services.billing.ledger import Ledger, Totals, UsageEntry


def _usage(totals: Totals) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=totals.prompt_tokens,
        completion_tokens=totals.completion_tokens,
        total_tokens=totals.prompt_tokens + totals.completion_tokens,
    )


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    """Prices usage and keeps the ledger."""

    def __init__(self, catalog: Catalog, ledger: Ledger) -> None:
        self._catalog = catalog
        self._ledger = ledger

    async def RecordUsage(
        self, request: billing_pb2.RecordUsageRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.RecordUsageResponse:
        violations = []
        if not request.request_id:
            violations.append(("request_id", "is required; the ledger is idempotent on it"))
        if not request.tenant:
            violations.append(("tenant", "is required"))
        if request.usage.prompt_tokens < 0 or request.usage.completion_tokens < 0:
            violations.append(("usage", "token counts cannot be negative"))
        if violations:
            raise invalid_argument(violations)
        model = self._catalog.resolve(request.model)
        cost = 0
        if not request.cache_hit:
            cost = model.price.cost_nano(
                request.usage.prompt_tokens, request.usage.completion_tokens
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
            recorded_at_ms=int(time.time() * 1000),
        )
        try:
            billed, duplicate = await self._ledger.record(entry)
        except RedisError as error:
            raise ShepherdError(
                grpc.StatusCode.UNAVAILABLE,
                f"the billing ledger is unreachable ({error}); retry with the same request_id,"
                " which is billed at most once",
            ) from error
        return billing_pb2.RecordUsageResponse(
            cost=common_pb2.Money(nano_usd=billed), duplicate=duplicate
        )

    async def GetTenantUsage(
        self, request: billing_pb2.GetTenantUsageRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetTenantUsageResponse:
        if not request.tenant:
            raise invalid_argument([("tenant", "is required")])
        try:
            totals = await self._ledger.tenant_totals(request.tenant)
        except RedisError as error:
            raise ShepherdError(
                grpc.StatusCode.UNAVAILABLE, f"the billing ledger is unreachable ({error})"
            ) from error
        return billing_pb2.GetTenantUsageResponse(
            tenant=request.tenant,
            requests=totals.overall.requests,
            usage=_usage(totals.overall),
            cost=common_pb2.Money(nano_usd=totals.overall.cost_nano),
            models=[
                billing_pb2.ModelUsage(
                    model=name,
                    requests=t.requests,
                    usage=_usage(t),
                    cost=common_pb2.Money(nano_usd=t.cost_nano),
                    cache_hits=t.cache_hits,
                )
                for name, t in sorted(totals.models.items())
            ],
        )
