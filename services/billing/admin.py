"""AdminService: operators manage tenants' keys, budgets and rate limits, and read reports.

It lives in the billing service because budgets are money, and money has one owner. Every
call needs an admin key (libs/credentials.py); the key store is shared with the router, and
budgets and limits are read by the router's admission script from the same Redis keys, so a
change here takes effect on every router replica at once (a revoked key within the router's
key cache time, 2 s by default and never more than 5 s).
"""

from __future__ import annotations

import grpc
from redis.exceptions import RedisError
from shepherd.billing.v1 import admin_pb2, admin_pb2_grpc
from shepherd.common.v1 import common_pb2

from libs.accounts import (
    Accounts,
    Aggregate,
    Limits,
    TenantLimits,
    day_id,
    month_id,
    period_end,
    utc_now,
)
from libs.apikeys import KeyInfo, KeyStore, valid_tenant
from libs.catalog import Catalog
from libs.errors import ShepherdError, invalid_argument
from services.billing.ledger import Ledger, report_range
from services.billing.pools import PoolHour, PoolStore, day_hours, hour_name, total
from services.billing.servicer import TENANT_RULE, unreachable, usage_report

_PERIODS = (
    ("day", admin_pb2.BUDGET_PERIOD_DAY, day_id),
    ("month", admin_pb2.BUDGET_PERIOD_MONTH, month_id),
)


def _info(info: KeyInfo) -> admin_pb2.ApiKeyInfo:
    return admin_pb2.ApiKeyInfo(
        key_id=info.key_id,
        prefix=info.prefix,
        tenant=info.tenant,
        created_unix_ms=info.created_unix_ms,
    )


def _limits_pb(limits: Limits) -> admin_pb2.Limits:
    return admin_pb2.Limits(
        daily_budget=common_pb2.Money(nano_usd=limits.day_nano),
        monthly_budget=common_pb2.Money(nano_usd=limits.month_nano),
        requests_per_minute=limits.rpm,
        tokens_per_minute=limits.tpm,
    )


def _tenant_limits_pb(limits: TenantLimits) -> admin_pb2.TenantLimits:
    return admin_pb2.TenantLimits(
        overall=_limits_pb(limits.overall),
        models=[
            admin_pb2.ModelLimits(model=model, limits=_limits_pb(model_limits))
            for model, model_limits in limits.models.items()
        ],
    )


def _limits(pb: admin_pb2.Limits, where: str, violations: list[tuple[str, str]]) -> Limits:
    values = {
        "daily_budget": pb.daily_budget.nano_usd,
        "monthly_budget": pb.monthly_budget.nano_usd,
        "requests_per_minute": pb.requests_per_minute,
        "tokens_per_minute": pb.tokens_per_minute,
    }
    for name, value in values.items():
        if value < 0:
            violations.append((f"{where}.{name}", "cannot be negative (0 means no cap)"))
    return Limits(
        day_nano=max(0, pb.daily_budget.nano_usd),
        month_nano=max(0, pb.monthly_budget.nano_usd),
        rpm=max(0, pb.requests_per_minute),
        tpm=max(0, pb.tokens_per_minute),
    )


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Keys, budgets, limits and reports, for callers holding an admin key."""

    def __init__(
        self,
        catalog: Catalog,
        keys: KeyStore,
        accounts: Accounts,
        ledger: Ledger,
        pools: PoolStore,
    ) -> None:
        self._catalog = catalog
        self._keys = keys
        self._accounts = accounts
        self._ledger = ledger
        self._pools = pools

    async def IssueKey(
        self, request: admin_pb2.IssueKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.IssueKeyResponse:
        if not valid_tenant(request.tenant):
            raise invalid_argument([("tenant", TENANT_RULE)])
        try:
            key, info = await self._keys.issue(request.tenant)
        except RedisError as error:
            raise unreachable(error, "the key store") from error
        return admin_pb2.IssueKeyResponse(key=key, info=_info(info))

    async def ListKeys(
        self, request: admin_pb2.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListKeysResponse:
        if request.tenant and not valid_tenant(request.tenant):
            raise invalid_argument([("tenant", "must be letters, digits, '-' or '_', or empty")])
        try:
            keys = await self._keys.list(request.tenant)
        except RedisError as error:
            raise unreachable(error, "the key store") from error
        return admin_pb2.ListKeysResponse(keys=[_info(k) for k in keys])

    async def RevokeKey(
        self, request: admin_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeKeyResponse:
        if not request.key_id.startswith("key_"):
            raise invalid_argument([("key_id", "is required: the key_id ListKeys shows")])
        try:
            info = await self._keys.revoke(request.key_id)
        except RedisError as error:
            raise unreachable(error, "the key store") from error
        if info is None:
            raise ShepherdError(
                grpc.StatusCode.NOT_FOUND,
                f"no key has id {request.key_id!r} (it may be revoked already); see ListKeys",
            )
        return admin_pb2.RevokeKeyResponse(info=_info(info))

    async def SetTenantLimits(
        self, request: admin_pb2.SetTenantLimitsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetTenantLimitsResponse:
        violations: list[tuple[str, str]] = []
        if not valid_tenant(request.tenant):
            violations.append(("tenant", TENANT_RULE))
        overall = _limits(request.limits.overall, "limits.overall", violations)
        models: dict[str, Limits] = {}
        for index, entry in enumerate(request.limits.models):
            where = f"limits.models[{index}]"
            try:
                name = self._catalog.resolve(entry.model).name
            except ShepherdError as error:
                violations.append((f"{where}.model", error.message))
                continue
            if name in models:
                violations.append((f"{where}.model", f"{name} is listed twice"))
            models[name] = _limits(entry.limits, f"{where}.limits", violations)
        if violations:
            raise invalid_argument(violations)
        limits = TenantLimits(overall=overall, models=dict(sorted(models.items())))
        try:
            await self._accounts.set_limits(request.tenant, limits)
        except RedisError as error:
            raise unreachable(error, "the accounts store") from error
        return admin_pb2.SetTenantLimitsResponse(limits=_tenant_limits_pb(limits))

    async def GetTenantLimits(
        self, request: admin_pb2.GetTenantLimitsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetTenantLimitsResponse:
        if not valid_tenant(request.tenant):
            raise invalid_argument([("tenant", TENANT_RULE)])
        now = utc_now()
        response = admin_pb2.GetTenantLimitsResponse()
        try:
            # Releasing expired leases first, so "reserved" never shows money of a dead router.
            response.open_reservations = await self._accounts.open_leases(request.tenant, now)
            limits = await self._accounts.limits(request.tenant)
            periods = {
                name: await self._accounts.period(request.tenant, name, to_id(now))
                for name, _, to_id in _PERIODS
            }
        except RedisError as error:
            raise unreachable(error, "the accounts store") from error
        response.limits.CopyFrom(_tenant_limits_pb(limits))
        scopes: list[tuple[str, Limits]] = [("", limits.overall), *limits.models.items()]
        for model, model_limits in scopes:
            for name, period, to_id in _PERIODS:
                overall, per_model = periods[name]
                figures = per_model.get(model, Aggregate()) if model else overall
                response.budgets.append(
                    admin_pb2.BudgetStatus(
                        model=model,
                        period=period,
                        period_id=to_id(now),
                        limit=common_pb2.Money(
                            nano_usd=model_limits.day_nano
                            if name == "day"
                            else model_limits.month_nano
                        ),
                        spent=common_pb2.Money(nano_usd=figures.cost_nano),
                        reserved=common_pb2.Money(nano_usd=figures.reserved_nano),
                        resets_unix_ms=int(period_end(name, now).timestamp() * 1000),
                    )
                )
        return response

    async def GetTenantReport(
        self, request: admin_pb2.GetTenantReportRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetTenantReportResponse:
        report = await usage_report(
            self._catalog,
            self._ledger,
            self._pools,
            request.tenant,
            request.start_day,
            request.end_day,
        )
        return admin_pb2.GetTenantReportResponse(
            tenant=request.tenant,
            buckets=report.buckets,
            total_cost=report.total_cost,
            total_gpu_cost=report.total_gpu_cost,
            advice=report.advice,
        )

    async def GetPoolReport(
        self, request: admin_pb2.GetPoolReportRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetPoolReportResponse:
        """Each pool by UTC hour, and over the range (services/billing/pools.py)."""
        if request.pool and request.pool not in self._catalog.pools:
            raise invalid_argument(
                [
                    (
                        "pool",
                        f"unknown pool {request.pool!r}; the catalog has "
                        f"{', '.join(sorted(self._catalog.pools))}",
                    )
                ]
            )
        first, last = report_range(request.start_day, request.end_day, utc_now().date())
        hours = day_hours(first, last)
        names = [request.pool] if request.pool else sorted(self._catalog.pools)
        response = admin_pb2.GetPoolReportResponse()
        try:
            for name in names:
                figures = await self._pools.hours(name, hours)
                response.hours.extend(self._pool_usage(f, hour_name(f.hour)) for f in figures)
                response.pools.append(self._pool_usage(total(name, figures), ""))
        except RedisError as error:
            raise unreachable(error, "the pool usage store") from error
        return response

    def _pool_usage(self, figures: PoolHour, hour: str) -> admin_pb2.PoolUsage:
        pool = self._catalog.pools.get(figures.pool)
        price = pool.gpu_cost_nano if pool is not None else (lambda _us: 0)
        return admin_pb2.PoolUsage(
            pool=figures.pool,
            hour=hour,
            busy_gpu_us=figures.busy_gpu_us,
            wall_us=figures.wall_us,
            capacity_gpu_us=figures.capacity_gpu_us,
            utilisation=figures.utilisation,
            executions=figures.executions,
            rows=figures.rows,
            batch_fill=figures.batch_fill,
            capacity_cost=common_pb2.Money(nano_usd=price(figures.capacity_gpu_us)),
            busy_cost=common_pb2.Money(nano_usd=price(figures.busy_gpu_us)),
        )
