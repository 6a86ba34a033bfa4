"""The response store in Redis, failing open.

The cache only ever saves work; it must never cause a request to fail. When Redis is slow or
down, a lookup is a miss and a store is skipped, both logged, and the request goes on to a
backend as if there were no cache.
"""

from __future__ import annotations

import logging

import redis.asyncio as redis
from redis.exceptions import RedisError
from shepherd.common.v1 import common_pb2

_log = logging.getLogger(__name__)


class ResponseStore:
    """Gets and puts serialised completions under cache keys."""

    def __init__(self, client: redis.Redis, default_ttl_s: int) -> None:
        self._client = client
        self._default_ttl_s = default_ttl_s

    async def get(self, key: str) -> common_pb2.Completion | None:
        """Return the stored completion, or None on a miss or when Redis is unreachable."""
        try:
            raw = await self._client.get(key)
        except RedisError as error:
            _log.warning("cache lookup failed open", extra={"error": str(error)})
            return None
        if raw is None:
            return None
        return common_pb2.Completion.FromString(raw)

    async def put(self, key: str, completion: common_pb2.Completion, ttl_s: int) -> bool:
        """Store a completion for ttl_s seconds (the default when 0); False if Redis failed."""
        try:
            await self._client.set(
                key, completion.SerializeToString(), ex=ttl_s or self._default_ttl_s
            )
        except RedisError as error:
            _log.warning("cache store failed open", extra={"error": str(error)})
            return False
        return True
