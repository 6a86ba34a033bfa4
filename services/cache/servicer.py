"""The CacheService RPCs: an exact response cache, private to each tenant unless shared.

The cache validates its own input even though only the router calls it: the tenant decides
the namespace a key lives in (services/cache/keys.py), a Store may only write into the
caller's own namespace, and an answer a hosted API produced is never returned to a request
that must stay on self-hosted nodes (its own flag or its tenant's catalog policy).
"""

from __future__ import annotations

import grpc
from shepherd.cache.v1 import cache_pb2, cache_pb2_grpc
from shepherd.common.v1 import common_pb2

from libs.apikeys import valid_tenant
from libs.catalog import Catalog
from libs.errors import ShepherdError, invalid_argument
from libs.fingerprint import is_cacheable
from libs.generation import cache_policy_violations, message_violations, sampling_violations
from services.cache.keys import cache_key, key_namespace, namespace
from services.cache.store import ResponseStore

_TENANT_RULE = "is required: letters, digits, '-' or '_'"


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """Exact response cache keyed by namespace, model family and canonical request."""

    def __init__(self, catalog: Catalog, store: ResponseStore) -> None:
        self._catalog = catalog
        self._store = store

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
        if not is_cacheable(request.policy, request.params):
            return cache_pb2.LookupResponse(cacheable=False)
        space = namespace(self._catalog, request.tenant, request.model_family)
        key = cache_key(space, request.model_family, request.messages, request.params)
        completion = await self._store.get(key)
        if completion is None:
            return cache_pb2.LookupResponse(cacheable=True, key=key)
        stay_home = (
            request.self_hosted_only or self._catalog.tenant(request.tenant).self_hosted_only
        )
        if stay_home and completion.placement.kind != common_pb2.BACKEND_KIND_TRITON:
            # Computed (or possibly computed) off Shepherd's own nodes: a miss for this request.
            return cache_pb2.LookupResponse(cacheable=True, key=key)
        return cache_pb2.LookupResponse(cacheable=True, key=key, hit=True, completion=completion)

    async def Store(
        self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.StoreResponse:
        violations = []
        parsed = key_namespace(request.key)
        if parsed is None:
            violations.append(("key", "must be a key returned by Lookup"))
        if not valid_tenant(request.tenant):
            violations.append(("tenant", _TENANT_RULE))
        if request.ttl_seconds < 0:
            violations.append(("ttl_seconds", "cannot be negative"))
        if violations:
            raise invalid_argument(violations)
        assert parsed is not None
        space, family = parsed
        if space != namespace(self._catalog, request.tenant, family):
            raise ShepherdError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"tenant {request.tenant!r} may not write to cache namespace {space!r}:"
                " store under the key Lookup returned for this tenant",
            )
        stored = await self._store.put(request.key, request.completion, request.ttl_seconds)
        return cache_pb2.StoreResponse(stored=stored)
