"""The cache's counters, kept per process and added to shared totals in Redis once a second.

Why in Redis: operators ask one replica (GetStats) and expect the whole cache's figures.
Why not on every lookup: an HINCRBY per lookup would double the cache's Redis round trips;
counting in memory and flushing the increments once a second costs one pipeline a second.
Entries and bytes per family are read when asked (a bounded SCAN), since they change with
every store and expiry and nobody needs them between calls.

Each count also goes to this process's metrics (/metrics, libs/metrics.py):
`shepherd.cache.events` by event (hit, miss, coalesced, lease, lease_expired; the hit ratio is
(hit + coalesced) / (hit + coalesced + miss), as GetStats computes it) and
`shepherd.cache.cost_saved.usd`, the list price of the answers served from the cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable

import redis.asyncio as redis
from opentelemetry import metrics
from redis.exceptions import RedisError
from shepherd.cache.v1 import cache_pb2
from shepherd.common.v1 import common_pb2

from libs.server import text
from services.cache.keys import KEY_PREFIX, key_namespace

_log = logging.getLogger(__name__)
STATS_KEY = "shepherd:cache:stats"
FIELDS = ("hits", "misses", "coalesced", "leases", "leases_expired", "saved_nano")
# The most entries GetStats scans to count entries and bytes per family.
MAX_SCANNED = 200_000
NANO_PER_USD = 1_000_000_000

_EVENTS = {
    "hits": "hit",
    "misses": "miss",
    "coalesced": "coalesced",
    "leases": "lease",
    "leases_expired": "lease_expired",
}
# Every count since the process started, read when metrics are collected: a count costs an
# integer addition on the request path, not a metrics-SDK measurement.
_counted: Counter[str] = Counter()


def _events(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    return [
        metrics.Observation(_counted[name], {"event": event}) for name, event in _EVENTS.items()
    ]


def _saved(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    return [metrics.Observation(_counted["saved_nano"] / NANO_PER_USD)]


_meter = metrics.get_meter("shepherd.cache")
_meter.create_observable_counter(
    "shepherd.cache.events",
    callbacks=[_events],
    unit="{event}",
    description="Lookups by outcome (hit, miss), coalesced followers, leases taken and expired.",
)
_meter.create_observable_counter(
    "shepherd.cache.cost_saved.usd",
    callbacks=[_saved],
    unit="{USD}",
    description="List price of the answers served from the cache instead of computed.",
)


class CacheStats:
    """Counters since the cache's data was created; see the module docstring."""

    def __init__(self, client: redis.Redis, flush_s: float = 1.0) -> None:
        self._client = client
        self._flush_s = flush_s
        self._pending: Counter[str] = Counter()

    def count(self, name: str, n: int = 1) -> None:
        self._pending[name] += n
        _counted[name] += n

    async def run(self) -> None:
        """Flush the increments once a second, for ever (a supervised loop)."""
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, Counter()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for name, n in pending.items():
                    pipe.hincrby(STATS_KEY, name, n)
                await pipe.execute()
        except RedisError as error:
            self._pending.update(pending)  # kept for the next flush
            _log.warning("cache stats flush failed", extra={"error": str(error)})

    async def report(self) -> cache_pb2.GetStatsResponse:
        """The shared totals plus this process's unflushed counts, and entries per family."""
        raw = await self._client.hgetall(STATS_KEY)
        totals = Counter({text(k): int(v) for k, v in raw.items()})
        totals.update(self._pending)
        families: dict[str, list[int]] = {}
        keys = []
        async for key in self._client.scan_iter(match=f"{KEY_PREFIX}:*", count=1000):
            keys.append(text(key))
            if len(keys) >= MAX_SCANNED:
                break
        sizes = []
        for start in range(0, len(keys), 1000):
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys[start : start + 1000]:
                    pipe.strlen(key)
                sizes.extend(await pipe.execute())
        for key, size in zip(keys, sizes, strict=True):
            parsed = key_namespace(key)
            if parsed is None or not size:
                continue
            entry = families.setdefault(parsed[1], [0, 0])
            entry[0] += 1
            entry[1] += int(size)
        served = totals["hits"] + totals["coalesced"]
        asked = served + totals["misses"]
        return cache_pb2.GetStatsResponse(
            hits=totals["hits"],
            misses=totals["misses"],
            coalesced=totals["coalesced"],
            leases=totals["leases"],
            leases_expired=totals["leases_expired"],
            hit_ratio=served / asked if asked else 0.0,
            cost_saved=common_pb2.Money(nano_usd=totals["saved_nano"]),
            families=[
                cache_pb2.FamilyStats(family=name, entries=n, bytes=size)
                for name, (n, size) in sorted(families.items())
            ],
        )
