"""Triton pools' usage per UTC hour: what the schedulers report, counted once, read back.

The schedulers count (services/scheduler/poolusage.py): GPU time attributed to requests,
executions, rows and batch slots, and the wall time they observed each pool in, with its
GPUs. Billing keeps it, as it keeps every other usage figure, so reports read one store.

Layout. Every key of a pool starts with `shepherd:pool:{<pool>}:` (a Redis Cluster hash tag:
one slot per pool, so the script touches one slot):

- `hour:<unix hour>`: busy_gpu_us, wall_us, capacity_gpu_us, executions, rows and
  batch_slots of that UTC hour (hours since the epoch), kept for RETENTION_S;
- `hours`: the hours that have figures (a sorted set), so a report reads only those;
- `covered`: the moment (µs since the epoch) up to which the pool's wall time is counted;
- `reporter:<id>`: the last report sequence recorded from one scheduler process (a day).

Counted once. A report is recorded only if its sequence is above the reporter's last, so a
report sent again after a lost answer adds nothing. Wall time is counted once however many
scheduler replicas watch a pool: an interval adds only the part after `covered`, and moves
it on. So two replicas reporting the same second count it once, and a second nobody observed
(every scheduler down) counts as no capacity at all: utilisation is measured over the time the
pool was watched.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

import redis.asyncio as redis
from shepherd.billing.v1 import billing_pb2

from libs.server import text

HOUR_US = 3_600_000_000
RETENTION_S = 400 * 86_400
REPORTER_TTL_S = 86_400
MAX_DELTAS = 1_000
# Far above anything real, and far inside int64 and a Lua double: one delta adds at most
# 10^15 to a figure (an hour of wall time times MAX_GPUS is 3.6 * 10^14), so one report adds
# at most 10^18.
MAX_FIGURE = 10**15
MAX_GPUS = 100_000
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

# KEYS[1] = the reporter's key, KEYS[2] = the pool's `covered` key, KEYS[3] = its `hours`.
# ARGV: prefix, sequence, retention s, reporter ttl s, then per delta: unix hour, from µs,
# to µs, GPUs, busy GPU-µs, executions, rows, batch slots (whole numbers, checked by the
# caller).
_RECORD_POOL = """
local P, seq = ARGV[1], tonumber(ARGV[2])
if seq <= tonumber(redis.call('GET', KEYS[1]) or '0') then return 0 end
-- Lua numbers are doubles: every figure here is below 2^53, and written back as digits.
local function digits(x) return string.format('%.0f', x) end
local covered = tonumber(redis.call('GET', KEYS[2]) or '0')
-- Check before the first write (Redis does not roll a script back): no figure may come near
-- int64's end. One report adds at most 10^18 to a figure (checked by the caller), so a figure
-- below 8 * 10^18 before it stays below int64's 9.2 * 10^18 after it.
local names = {'wall_us', 'capacity_gpu_us', 'busy_gpu_us', 'executions', 'rows', 'batch_slots'}
for i = 5, #ARGV, 8 do
  local now = redis.call('HMGET', P .. 'hour:' .. ARGV[i], unpack(names))
  for j = 1, #names do
    if tonumber(now[j] or '0') >= 8e18 then return -1 end
  end
end
for i = 5, #ARGV, 8 do
  local from, to, gpus = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local wall = to - math.max(from, covered)
  if wall < 0 then wall = 0 end
  if to > covered then covered = to end
  local key = P .. 'hour:' .. ARGV[i]
  redis.call('HINCRBY', key, 'wall_us', digits(wall))
  redis.call('HINCRBY', key, 'capacity_gpu_us', digits(wall * gpus))
  redis.call('HINCRBY', key, 'busy_gpu_us', ARGV[i + 4])
  redis.call('HINCRBY', key, 'executions', ARGV[i + 5])
  redis.call('HINCRBY', key, 'rows', ARGV[i + 6])
  redis.call('HINCRBY', key, 'batch_slots', ARGV[i + 7])
  redis.call('EXPIRE', key, ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[i], ARGV[i])
end
local oldest = tonumber(ARGV[5]) - tonumber(ARGV[3]) / 3600
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. digits(oldest))
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('SET', KEYS[2], digits(covered), 'EX', ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
return 1
"""


def pool_prefix(pool: str) -> str:
    return f"shepherd:pool:{{{pool}}}:"


def hour_name(hour: int) -> str:
    """A unix hour as the UTC hour it is, YYYY-MM-DDTHH."""
    return dt.datetime.fromtimestamp(hour * 3600, dt.UTC).strftime("%Y-%m-%dT%H")


def day_hours(first: dt.date, last: dt.date) -> range:
    """The unix hours of the UTC days first to last, inclusive."""
    start = dt.datetime(first.year, first.month, first.day, tzinfo=dt.UTC)
    end = dt.datetime(last.year, last.month, last.day, tzinfo=dt.UTC)  # 9999-12-31 has no next
    return range(int(start.timestamp()) // 3600, int(end.timestamp()) // 3600 + 24)


@dataclass(frozen=True)
class PoolHour:
    """One pool's figures over one UTC hour (`hour`, hours since the epoch), or summed over
    several (`hour` -1)."""

    pool: str
    hour: int
    busy_gpu_us: int = 0
    wall_us: int = 0
    capacity_gpu_us: int = 0
    executions: int = 0
    rows: int = 0
    batch_slots: int = 0

    @property
    def utilisation(self) -> float:
        return self.busy_gpu_us / self.capacity_gpu_us if self.capacity_gpu_us else 0.0

    @property
    def batch_fill(self) -> float:
        return self.rows / self.batch_slots if self.batch_slots else 0.0


_FIGURES = tuple(f.name for f in fields(PoolHour) if f.name not in ("pool", "hour"))


def total(pool: str, hours: Sequence[PoolHour]) -> PoolHour:
    """The figures of many hours of one pool, summed."""
    return PoolHour(pool, -1, **{name: sum(getattr(h, name) for h in hours) for name in _FIGURES})


def delta_violations(request: billing_pb2.RecordPoolUsageRequest) -> list[tuple[str, str]]:
    """What is wrong with a report, checked before anything is written."""
    violations = []
    if not _NAME.match(request.reporter):
        violations.append(("reporter", "is required: 1-128 letters, digits, '.', '-' or '_'"))
    if request.sequence < 1:
        violations.append(("sequence", "must be at least 1"))
    if len(request.deltas) > MAX_DELTAS:
        violations.append(("deltas", f"at most {MAX_DELTAS} per report"))
    for index, delta in enumerate(request.deltas):
        where = f"deltas[{index}]"
        if not _NAME.match(delta.pool) or len(delta.pool) > 64:
            violations.append((f"{where}.pool", "must be a pool name from the catalog"))
        if not 0 <= delta.from_unix_us <= delta.to_unix_us < 2**53:
            violations.append((f"{where}.to_unix_us", "the interval must end after it starts"))
        elif delta.from_unix_us // HOUR_US != max(delta.from_unix_us, delta.to_unix_us - 1) // (
            HOUR_US
        ):
            violations.append((f"{where}.to_unix_us", "the interval must lie within one hour"))
        if not 0 <= delta.gpus <= MAX_GPUS:
            violations.append((f"{where}.gpus", f"must be between 0 and {MAX_GPUS:,}"))
        for name in ("busy_gpu_us", "executions", "rows", "batch_slots"):
            if not 0 <= getattr(delta, name) <= MAX_FIGURE:
                violations.append((f"{where}.{name}", f"must be between 0 and {MAX_FIGURE:,}"))
    return violations


class PoolFiguresFull(ValueError):
    """A pool-hour's figures would overflow; nothing of that pool was written."""


class PoolStore:
    """The pools' hourly figures in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._record = client.register_script(_RECORD_POOL)

    async def record(self, request: billing_pb2.RecordPoolUsageRequest) -> bool:
        """Add a (checked) report; True if it was new for at least one of its pools."""
        by_pool: dict[str, list[billing_pb2.PoolUsageDelta]] = {}
        for delta in request.deltas:
            by_pool.setdefault(delta.pool, []).append(delta)
        recorded = False
        for pool, deltas in by_pool.items():
            prefix = pool_prefix(pool)
            args: list[int | str] = [prefix, request.sequence, RETENTION_S, REPORTER_TTL_S]
            for delta in sorted(deltas, key=lambda d: d.from_unix_us):
                args += [
                    delta.from_unix_us // HOUR_US,
                    delta.from_unix_us,
                    delta.to_unix_us,
                    delta.gpus,
                    delta.busy_gpu_us,
                    delta.executions,
                    delta.rows,
                    delta.batch_slots,
                ]
            new = int(
                await self._record(
                    keys=[
                        prefix + "reporter:" + request.reporter,
                        prefix + "covered",
                        prefix + "hours",
                    ],
                    args=args,
                )
            )
            if new < 0:
                raise PoolFiguresFull(f"pool {pool!r}: an hour's figures would overflow")
            recorded = recorded or bool(new)
        return recorded

    async def hours(self, pool: str, hours: range) -> list[PoolHour]:
        """The pool's figures of each hour in `hours` that has any, in order."""
        prefix = pool_prefix(pool)
        members = await self._client.zrangebyscore(prefix + "hours", hours.start, hours.stop - 1)
        present = [int(hour) for hour in members if isinstance(hour, bytes | str)]
        async with self._client.pipeline(transaction=False) as pipe:
            for hour in present:
                pipe.hgetall(f"{prefix}hour:{hour}")
            raws = await pipe.execute()
        found = []
        for hour, raw in zip(present, raws, strict=True):
            if raw:
                values = {text(k): int(v) for k, v in raw.items()}
                found.append(
                    PoolHour(pool, hour, **{k: v for k, v in values.items() if k in _FIGURES})
                )
        return found
