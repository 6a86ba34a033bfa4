"""The CacheService RPCs: an exact response cache, private to each tenant unless shared.

The cache validates its own input even though only the router calls it: the tenant decides
the namespace a key lives in (services/cache/keys.py), a Store may only write into the
caller's own namespace, and an answer a hosted API produced is never returned to a request
that must stay on self-hosted nodes (its own flag or its tenant's catalog policy).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator

import grpc
from redis.exceptions import RedisError
from shepherd.cache.v1 import cache_pb2, cache_pb2_grpc
from shepherd.common.v1 import common_pb2

from libs.apikeys import valid_tenant
from libs.catalog import Catalog, Price
from libs.errors import ShepherdError, invalid_argument
from libs.fingerprint import is_cacheable
from libs.generation import cache_policy_violations, message_violations, sampling_violations
from libs.server import text
from libs.telemetry import set_tenant
from services.cache.flights import Flights, lease_key
from services.cache.keys import KEY_PREFIX, cache_key, key_namespace, namespace
from services.cache.stats import CacheStats
from services.cache.store import ResponseStore

_log = logging.getLogger(__name__)
_TENANT_RULE = "is required: letters, digits, '-' or '_'"
# Model family names, as the catalog writes them (no Redis glob characters).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """Exact response cache keyed by namespace, model family and canonical request, with
    single-flight leases for identical requests in flight (services/cache/flights.py)."""

    def __init__(
        self, catalog: Catalog, store: ResponseStore, flights: Flights, stats: CacheStats
    ) -> None:
        self._catalog = catalog
        self._store = store
        self._flights = flights
        self._stats = stats
        # List prices by deployment, to count what an answer served from the cache saved.
        self._prices: dict[str, Price] = {}
        for model in catalog.models.values():
            for deployment in model.deployments:
                self._prices.setdefault(deployment.name, model.price)

    def _saved(self, completion: common_pb2.Completion) -> None:
        price = self._prices.get(completion.placement.deployment)
        if price is not None:
            usage = completion.usage
            self._stats.count(
                "saved_nano", price.cost_nano(usage.prompt_tokens, usage.completion_tokens)
            )

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.LookupResponse:
        violations = []
        if not request.model_family:
            violations.append(("model_family", "is required"))
        if not valid_tenant(request.tenant):
            violations.append(("tenant", _TENANT_RULE))
        # The cache owns its input too: an unknown role or policy is refused, never keyed.
        violations.extend(message_violations(request.messages))
        violations.extend(cache_policy_violations(request.policy, "policy"))
        violations.extend(sampling_violations(request.params))
        if violations:
            raise invalid_argument(violations)
        set_tenant(request.tenant)
        if not is_cacheable(request.policy, request.params):
            return cache_pb2.LookupResponse(cacheable=False, outcome=cache_pb2.LOOKUP_OUTCOME_MISS)
        space = namespace(self._catalog, request.tenant, request.model_family)
        key = cache_key(space, request.model_family, request.messages, request.params)
        stay_home = (
            request.self_hosted_only or self._catalog.tenant(request.tenant).self_hosted_only
        )
        miss = cache_pb2.LookupResponse(
            cacheable=True, key=key, outcome=cache_pb2.LOOKUP_OUTCOME_MISS
        )
        try:
            # A request that must stay on self-hosted nodes never follows a leader: the
            # leader's answer may come from a hosted API. It may lead, since its own answer
            # cannot.
            found = await self._flights.lookup(key, lead=True)
        except RedisError as error:
            _log.warning("cache lookup failed open", extra={"error": str(error)})
            return miss
        if found.kind == "hit":
            assert found.completion is not None
            if stay_home and found.completion.placement.kind != common_pb2.BACKEND_KIND_TRITON:
                # Computed (or possibly computed) off Shepherd's own nodes: a miss here.
                self._stats.count("misses")
                return miss
            self._stats.count("hits")
            self._saved(found.completion)
            return cache_pb2.LookupResponse(
                cacheable=True,
                key=key,
                hit=True,
                completion=found.completion,
                outcome=cache_pb2.LOOKUP_OUTCOME_HIT,
            )
        self._stats.count("misses")
        if found.kind == "lead":
            self._stats.count("leases")
            return cache_pb2.LookupResponse(
                cacheable=True,
                key=key,
                outcome=cache_pb2.LOOKUP_OUTCOME_LEAD,
                lease_token=found.token,
                lease_ms=self._flights.lease_ms,
            )
        if found.kind == "follow" and not stay_home:
            return cache_pb2.LookupResponse(
                cacheable=True,
                key=key,
                outcome=cache_pb2.LOOKUP_OUTCOME_FOLLOW,
                lease_ms=self._flights.lease_ms,
            )
        return miss

    def _own_key(self, key: str, tenant: str) -> None:
        """Refuse a key that is not a cache key of the caller's own namespace."""
        violations = []
        parsed = key_namespace(key)
        if parsed is None:
            violations.append(("key", "must be a key returned by Lookup"))
        if not valid_tenant(tenant):
            violations.append(("tenant", _TENANT_RULE))
        if violations:
            raise invalid_argument(violations)
        set_tenant(tenant)
        assert parsed is not None
        space, family = parsed
        if space != namespace(self._catalog, tenant, family):
            raise ShepherdError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"tenant {tenant!r} may not use cache namespace {space!r}:"
                " use the key Lookup returned for this tenant",
            )

    async def Store(
        self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.StoreResponse:
        if request.ttl_seconds < 0:
            raise invalid_argument([("ttl_seconds", "cannot be negative")])
        self._own_key(request.key, request.tenant)
        if not request.lease_token:
            stored = await self._store.put(request.key, request.completion, request.ttl_seconds)
            return cache_pb2.StoreResponse(stored=stored)
        # TTL precedence: the request's (the router sends the model's catalog TTL when it has
        # one), else SHEPHERD_CACHE_TTL_S.
        ttl = (request.ttl_seconds or self._store.default_ttl_s) if request.keep else 0
        try:
            await self._flights.finish(request.key, request.lease_token, request.completion, ttl)
        except RedisError as error:
            _log.warning("cache store failed open", extra={"error": str(error)})
            return cache_pb2.StoreResponse(stored=False)
        return cache_pb2.StoreResponse(stored=request.keep)

    async def Follow(
        self, request: cache_pb2.FollowRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cache_pb2.FollowResponse]:
        self._own_key(request.key, request.tenant)
        try:
            holder = await self._flights.blocking.get(lease_key(request.key))
        except RedisError as error:
            _log.warning("follow failed open", extra={"error": str(error)})
            holder = None
        if holder is None:
            # The leader finished (or died) between the lookup and now: look up again.
            yield cache_pb2.FollowResponse(end=cache_pb2.FollowEnd(lease_expired=True))
            return
        async for event in self._flights.follow(request.key, text(holder)):
            if event.HasField("completion"):
                self._stats.count("coalesced")
                self._saved(event.completion)
            elif event.HasField("end") and event.end.lease_expired:
                self._stats.count("leases_expired")
            yield event

    async def Publish(
        self,
        request_iterator: AsyncIterator[cache_pb2.PublishRequest],
        context: grpc.aio.ServicerContext,
    ) -> cache_pb2.PublishResponse:
        published = 0
        checked: tuple[str, str] | None = None
        async for piece in request_iterator:
            if checked != (piece.key, piece.tenant):
                self._own_key(piece.key, piece.tenant)
                checked = (piece.key, piece.tenant)
            try:
                if not await self._flights.publish(piece.key, piece.lease_token, piece.text):
                    break  # no longer the leader: nobody follows this stream
            except RedisError as error:
                _log.warning("publish failed open", extra={"error": str(error)})
                break
            published += 1
        return cache_pb2.PublishResponse(published=published)

    async def Renew(
        self, request: cache_pb2.RenewRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.RenewResponse:
        self._own_key(request.key, request.tenant)
        try:
            return cache_pb2.RenewResponse(
                renewed=await self._flights.renew(request.key, request.lease_token)
            )
        except RedisError as error:
            _log.warning("renew failed open", extra={"error": str(error)})
            return cache_pb2.RenewResponse(renewed=False)

    async def Abandon(
        self, request: cache_pb2.AbandonRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.AbandonResponse:
        self._own_key(request.key, request.tenant)
        try:
            released = await self._flights.abandon(
                request.key, request.lease_token, request.code, request.message
            )
        except RedisError as error:
            _log.warning("abandon failed open", extra={"error": str(error)})
            released = False
        return cache_pb2.AbandonResponse(released=released)

    async def GetStats(
        self, request: cache_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.GetStatsResponse:
        try:
            return await self._stats.report()
        except RedisError as error:
            raise ShepherdError(
                grpc.StatusCode.UNAVAILABLE, f"the cache store is unreachable ({error})"
            ) from error

    async def Purge(
        self, request: cache_pb2.PurgeRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.PurgeResponse:
        target = request.WhichOneof("target")
        if target == "key":
            if key_namespace(request.key) is None:
                raise invalid_argument([("key", "must be a cache key (as Lookup returns)")])
            pattern = None
        elif target == "family":
            if not _NAME.fullmatch(request.family):
                raise invalid_argument([("family", "must be a model family name")])
            pattern = f"{KEY_PREFIX}:*:{request.family}:*"
        elif target == "tenant":
            if not valid_tenant(request.tenant):
                raise invalid_argument([("tenant", _TENANT_RULE)])
            pattern = f"{KEY_PREFIX}:tenant:{request.tenant}:*"
        else:
            raise invalid_argument([("target", "set one of key, family or tenant")])
        try:
            if pattern is None:
                deleted = await self._store.delete([request.key])
            else:
                deleted = await self._store.delete_matching(pattern)
        except RedisError as error:
            raise ShepherdError(
                grpc.StatusCode.UNAVAILABLE, f"the cache store is unreachable ({error})"
            ) from error
        _log.info("cache purged", extra={"target": target, "deleted": deleted})
        return cache_pb2.PurgeResponse(deleted=deleted)
