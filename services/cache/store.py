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
        self.default_ttl_s = default_ttl_s

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
                key, completion.SerializeToString(), ex=ttl_s or self.default_ttl_s
            )
        except RedisError as error:
            _log.warning("cache store failed open", extra={"error": str(error)})
            return False
        return True

    async def delete(self, keys: list[str]) -> int:
        """Delete entries; raises RedisError (an operator's purge must say it failed)."""
        return int(await self._client.unlink(*keys)) if keys else 0

    async def delete_matching(self, pattern: str) -> int:
        """Delete every entry whose key matches `pattern`, a thousand at a time."""
        deleted = 0
        batch: list[str] = []
        async for key in self._client.scan_iter(match=pattern, count=1000):
            batch.append(key.decode() if isinstance(key, bytes) else key)
            if len(batch) >= 1000:
                deleted += await self.delete(batch)
                batch = []
        return deleted + await self.delete(batch)
