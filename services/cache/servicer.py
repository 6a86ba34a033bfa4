"""The CacheService RPCs."""

from __future__ import annotations

import grpc
from shepherd.cache.v1 import cache_pb2, cache_pb2_grpc

from libs.errors import invalid_argument
from services.cache.keys import KEY_PREFIX, cache_key, is_cacheable
from services.cache.store import ResponseStore


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """Exact response cache keyed by model family and canonical request."""

    def __init__(self, store: ResponseStore) -> None:
        self._store = store

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.LookupResponse:
        if not request.model_family:
            raise invalid_argument([("model_family", "is required")])
        if not is_cacheable(request.policy, request.params):
            return cache_pb2.LookupResponse(cacheable=False)
        key = cache_key(request.model_family, request.messages, request.params)
        completion = await self._store.get(key)
        if completion is None:
            return cache_pb2.LookupResponse(cacheable=True, key=key)
        return cache_pb2.LookupResponse(cacheable=True, key=key, hit=True, completion=completion)

    async def Store(
        self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.StoreResponse:
        violations = []
        if not request.key.startswith(KEY_PREFIX + ":"):
            violations.append(("key", "must be a key returned by Lookup"))
        if request.ttl_seconds < 0:
            violations.append(("ttl_seconds", "cannot be negative"))
        if violations:
            raise invalid_argument(violations)
        stored = await self._store.put(request.key, request.completion, request.ttl_seconds)
        return cache_pb2.StoreResponse(stored=stored)
