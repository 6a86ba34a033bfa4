"""The RouterService RPCs: the request path from the caller to a backend and back.

Chat runs, in order: authenticate the key to a tenant, resolve the model alias, validate,
reserve the worst-case cost and a place in the tenant's rate limits, look the request up in
the tenant's cache, hand it to the scheduler on a miss, bill the usage (settling the
reservation), store the answer, and answer with the text, usage, cost, placement and trace
id. Billing comes before storing: an answer that could not be billed must not become a free
cache hit for the retry.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc
from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc
from shepherd.cache.v1 import cache_pb2, cache_pb2_grpc
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from libs.catalog import Catalog
from libs.errors import ShepherdError, from_rpc_error
from libs.fingerprint import request_fingerprint
from libs.server import outbound_timeout
from libs.telemetry import current_trace_id
from services.router.auth import Authenticator
from services.router.config import RouterConfig
from services.router.quota import Quota
from services.router.validation import resolved_params

_log = logging.getLogger(__name__)
_BILLING_ATTEMPTS = 3


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """Shepherd's public API."""

    def __init__(
        self,
        config: RouterConfig,
        catalog: Catalog,
        authenticator: Authenticator,
        quota: Quota,
        scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
        cache: cache_pb2_grpc.CacheServiceStub,
        billing: billing_pb2_grpc.BillingServiceStub,
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._auth = authenticator
        self._quota = quota
        self._scheduler = scheduler
        self._cache = cache
        self._billing = billing

    async def Chat(
        self, request: router_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ChatResponse:
        tenant = await self._auth.tenant_for(context.invocation_metadata())
        if not request.model:
            raise ShepherdError(
                grpc.StatusCode.INVALID_ARGUMENT, "model is required (call ListModels to see them)"
            )
        model = self._catalog.resolve(request.model)
        params = resolved_params(request, model)
        request_id = request.request_id or uuid.uuid4().hex
        fingerprint = request_fingerprint(model.name, request.messages, params)
        ticket = await self._quota.admit(
            tenant=tenant,
            request_id=request_id,
            fingerprint=fingerprint,
            model=model,
            messages=request.messages,
            max_tokens=params.max_tokens,
            timeout_s=outbound_timeout(context, self._config.default_timeout_s),
        )
        try:
            lookup = await self._lookup(request, tenant, model.family, params, context)
            cache_hit = lookup.hit
            if cache_hit:
                completion = lookup.completion
            else:
                completion = await self._infer(
                    request_id, tenant, model.name, request, params, context
                )
        except BaseException:
            # Nothing was generated for the caller: give the reservation back at once. (Once
            # there is an answer, billing settles it; if billing fails the reservation stays
            # for the retry, or expires.)
            await self._quota.release(ticket)
            raise

        cost = await self._bill(
            request_id, tenant, model.name, fingerprint, completion, cache_hit, context
        )
        if lookup.cacheable and not cache_hit:
            await self._store(tenant, lookup.key, completion, model.cache_ttl_s)
        return router_pb2.ChatResponse(
            request_id=request_id,
            model=model.name,
            text=completion.text,
            finish_reason=completion.finish_reason,
            usage=completion.usage,
            cost=cost,
            placement=completion.placement,
            cache_hit=cache_hit,
            trace_id=current_trace_id(),
        )

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        await self._auth.tenant_for(context.invocation_metadata())
        return router_pb2.ListModelsResponse(
            models=[
                router_pb2.ModelInfo(
                    name=model.name,
                    aliases=model.aliases,
                    family=model.family,
                    input_price_per_million=common_pb2.Money(
                        nano_usd=model.price.input_nano_per_million
                    ),
                    output_price_per_million=common_pb2.Money(
                        nano_usd=model.price.output_nano_per_million
                    ),
                    deployments=[d.name for d in model.deployments],
                )
                for model in self._catalog.models.values()
            ]
        )

    async def GetUsage(
        self, request: router_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.GetUsageResponse:
        tenant = await self._auth.tenant_for(context.invocation_metadata())
        try:
            report = await self._billing.GetUsage(
                billing_pb2.GetUsageRequest(
                    tenant=tenant, start_day=request.start_day, end_day=request.end_day
                ),
                timeout=outbound_timeout(context, self._config.billing_timeout_s),
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "billing") from error
        return router_pb2.GetUsageResponse(
            tenant=tenant, buckets=report.buckets, total_cost=report.total_cost
        )

    async def _lookup(
        self,
        request: router_pb2.ChatRequest,
        tenant: str,
        family: str,
        params: common_pb2.GenerationParams,
        context: grpc.aio.ServicerContext,
    ) -> cache_pb2.LookupResponse:
        """Ask the cache; any cache failure is a miss, since the cache only saves work.

        The cache applies the tenant's own policy (cache scope, self-hosted only) itself.
        """
        try:
            return await self._cache.Lookup(
                cache_pb2.LookupRequest(
                    model_family=family,
                    messages=request.messages,
                    params=params,
                    policy=request.cache_policy,
                    tenant=tenant,
                    self_hosted_only=request.self_hosted_only,
                ),
                timeout=outbound_timeout(context, self._config.cache_timeout_s),
            )
        except grpc.aio.AioRpcError as error:
            _log.warning("cache lookup failed open", extra={"error": error.details()})
            return cache_pb2.LookupResponse()

    async def _store(
        self, tenant: str, key: str, completion: common_pb2.Completion, ttl_s: int
    ) -> None:
        try:
            await self._cache.Store(
                cache_pb2.StoreRequest(
                    key=key, completion=completion, ttl_seconds=ttl_s, tenant=tenant
                ),
                timeout=self._config.cache_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            _log.warning("cache store failed open", extra={"error": error.details()})

    async def _infer(
        self,
        request_id: str,
        tenant: str,
        model: str,
        request: router_pb2.ChatRequest,
        params: common_pb2.GenerationParams,
        context: grpc.aio.ServicerContext,
    ) -> common_pb2.Completion:
        try:
            response = await self._scheduler.Infer(
                scheduler_pb2.InferRequest(
                    request_id=request_id,
                    tenant=tenant,
                    model=model,
                    messages=request.messages,
                    params=params,
                    priority=request.priority,
                    self_hosted_only=request.self_hosted_only,
                ),
                timeout=outbound_timeout(context, self._config.default_timeout_s),
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "scheduler") from error
        return response.completion

    async def _bill(
        self,
        request_id: str,
        tenant: str,
        model: str,
        fingerprint: str,
        completion: common_pb2.Completion,
        cache_hit: bool,
        context: grpc.aio.ServicerContext,
    ) -> common_pb2.Money:
        """Record usage, retrying briefly: the ledger is idempotent on (tenant, request_id)."""
        record = billing_pb2.RecordUsageRequest(
            request_id=request_id,
            tenant=tenant,
            model=model,
            deployment=completion.placement.deployment,
            usage=completion.usage,
            cache_hit=cache_hit,
            fingerprint=fingerprint,
        )
        for attempt in range(1, _BILLING_ATTEMPTS + 1):
            try:
                response = await self._billing.RecordUsage(
                    record, timeout=self._config.billing_timeout_s
                )
                return response.cost
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise from_rpc_error(error, "billing") from error
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == _BILLING_ATTEMPTS:
                    raise ShepherdError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the answer was computed but could not be billed ({error.details()});"
                        f" retry with request_id {request_id!r}: it is billed at most once",
                    ) from error
                await asyncio.sleep(0.05 * attempt)
        raise AssertionError("unreachable")
