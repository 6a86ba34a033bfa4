"""The usage ledger in Redis, idempotent by request id.

One Lua script records a request and adds it to the tenant's totals atomically: the entry for
the request id is created only if it does not exist, and the totals move only when it was
created. Recording the same request twice, from a retry or from two router replicas, therefore
bills once, and a crash between the two steps cannot happen because there are no two steps.
Amounts are integer nano-USD; Redis's HINCRBY keeps them exact up to 9.2 billion dollars.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as redis

_RECORD = """
local entry = KEYS[1]
local totals = KEYS[2]
if redis.call('EXISTS', entry) == 1 then
  return {0, redis.call('HGET', entry, 'cost_nano')}
end
redis.call('HSET', entry, 'tenant', ARGV[1], 'model', ARGV[2], 'deployment', ARGV[3],
  'prompt_tokens', ARGV[4], 'completion_tokens', ARGV[5], 'cost_nano', ARGV[6],
  'cache_hit', ARGV[7], 'recorded_at', ARGV[8])
local model = 'model:' .. ARGV[2] .. ':'
redis.call('HINCRBY', totals, 'requests', 1)
redis.call('HINCRBY', totals, 'prompt_tokens', ARGV[4])
redis.call('HINCRBY', totals, 'completion_tokens', ARGV[5])
redis.call('HINCRBY', totals, 'cost_nano', ARGV[6])
redis.call('HINCRBY', totals, model .. 'requests', 1)
redis.call('HINCRBY', totals, model .. 'prompt_tokens', ARGV[4])
redis.call('HINCRBY', totals, model .. 'completion_tokens', ARGV[5])
redis.call('HINCRBY', totals, model .. 'cost_nano', ARGV[6])
redis.call('HINCRBY', totals, model .. 'cache_hits', ARGV[7])
return {1, ARGV[6]}
"""

KEY_PREFIX = "shepherd:billing"


@dataclass(frozen=True)
class UsageEntry:
    """One request's usage as it goes into the ledger."""

    request_id: str
    tenant: str
    model: str
    deployment: str
    prompt_tokens: int
    completion_tokens: int
    cost_nano: int
    cache_hit: bool
    recorded_at_ms: int


@dataclass(frozen=True)
class Totals:
    """Running totals for one tenant or one tenant's model."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nano: int = 0
    cache_hits: int = 0


@dataclass(frozen=True)
class TenantTotals:
    """A tenant's totals, overall and per model."""

    overall: Totals
    models: dict[str, Totals]


class Ledger:
    """Reads and writes the usage ledger through a Redis client created at start-up."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._record = client.register_script(_RECORD)

    async def record(self, entry: UsageEntry) -> tuple[int, bool]:
        """Bill `entry` once; return (the cost billed for its request id, whether a duplicate)."""
        created, cost = await self._record(
            keys=[
                f"{KEY_PREFIX}:request:{entry.request_id}",
                f"{KEY_PREFIX}:tenant:{entry.tenant}",
            ],
            args=[
                entry.tenant,
                entry.model,
                entry.deployment,
                entry.prompt_tokens,
                entry.completion_tokens,
                entry.cost_nano,
                int(entry.cache_hit),
                entry.recorded_at_ms,
            ],
        )
        return int(cost), not bool(created)

    async def tenant_totals(self, tenant: str) -> TenantTotals:
        """Read a tenant's totals; an unknown tenant has all-zero totals."""
        raw = await self._client.hgetall(f"{KEY_PREFIX}:tenant:{tenant}")
        fields = {k.decode(): int(v) for k, v in raw.items()}
        per_model: dict[str, dict[str, int]] = {}
        for key, value in fields.items():
            if key.startswith("model:"):
                model, _, field = key[len("model:") :].rpartition(":")
                per_model.setdefault(model, {})[field] = value
        overall = Totals(
            requests=fields.get("requests", 0),
            prompt_tokens=fields.get("prompt_tokens", 0),
            completion_tokens=fields.get("completion_tokens", 0),
            cost_nano=fields.get("cost_nano", 0),
            cache_hits=sum(m.get("cache_hits", 0) for m in per_model.values()),
        )
        return TenantTotals(
            overall=overall, models={name: Totals(**vals) for name, vals in per_model.items()}
        )
