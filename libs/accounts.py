"""Tenant accounts in Redis: one key layout and the atomic scripts that move money.

Why one module: the router reserves (budgets, rate limits) and billing settles (the ledger),
and both touch the same counters. Keeping the layout and every script that writes it in one
place is what makes "Σ committed ≤ budget, to the nano-dollar" something one can read and
check, instead of an agreement between two services.

Layout. Every key of a tenant starts with `shepherd:t:{<tenant>}:`; the braces are a Redis
Cluster hash tag, so a tenant's keys share a slot and every script below touches one slot.

- `limits`: budgets and rate limits (`day`, `month`, `rpm`, `tpm`, and `model:<m>:<same>`).
- `day:<YYYY-MM-DD>`, `month:<YYYY-MM>`: the period's requests, tokens, cost, cache hits and
  reserved money, overall and per model (`model:<m>:<field>`); and what self-hosting cost:
  GPU-microseconds, their cost at the pool's price, and the requests and tokens that ran on
  self-hosted nodes.
- `totals`: running totals since the first request.
- `request:<id>`: the ledger entry of one request, kept for the retention period.
- `lease:<id>`, `leases`: a reservation in flight, and every lease by expiry time.
- `rpm[:<m>]`, `tpm[:<m>]`, `tpm_tokens[:<m>]`: the sliding 60-second rate-limit windows.

Money moves in three steps, each one script, so each is atomic:
1. admit (router, before dispatch): the request id must not be known with another request
   body (fingerprint); requests and tokens per minute are checked on sliding windows; the
   request's worst-case cost must fit in every budget that applies, counting what is spent
   and what other requests in flight have reserved. Then the window entries and a lease are
   written. A lease expires: if its router dies, the next script of that tenant releases it.
2. record (billing, after the answer): the ledger entry is created once per (tenant, request
   id); the lease is released; the actual cost, never more than was reserved, is added to
   the aggregates of the period the request was admitted in; the token window settles from
   the estimate to the actual count.
3. release (router, when a request fails before any token was generated): the lease goes
   and its window entry settles to zero tokens.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis.asyncio as redis

from libs.scripts import GroupedScript
from libs.server import text

WINDOW_MS = 60_000
# Fields of the limits hash, per scope: the tenant ("") or one model ("model:<m>:").
LIMIT_FIELDS = ("day", "month", "rpm", "tpm")
AGGREGATE_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cost_nano", "cache_hits")


def tenant_prefix(tenant: str) -> str:
    """The prefix of every key of `tenant` (a hash tag: one Redis Cluster slot per tenant)."""
    return f"shepherd:t:{{{tenant}}}:"


def day_id(at: dt.datetime) -> str:
    return at.strftime("%Y-%m-%d")


def month_id(at: dt.datetime) -> str:
    return at.strftime("%Y-%m")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def period_end(period: str, at: dt.datetime) -> dt.datetime:
    """When the day or month containing `at` ends (UTC): when its budget resets."""
    start = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return start + dt.timedelta(days=1)
    first = start.replace(day=1)
    return (first + dt.timedelta(days=32)).replace(day=1)


# Shared by every script: release a lease (giving back its reservation and settling its token
# windows) and sweep the tenant's expired leases. ARGV[1] is always the tenant's key prefix.
_PRELUDE = """
local P = ARGV[1]
-- Money stays exact: Lua numbers are doubles (exact to 2^53 only), so an amount is split into
-- billions and the rest, each exact, and written back to Redis only as the caller's strings.
local function split(s)
  if type(s) == 'table' then return s[1], s[2] end
  s = tostring(s or '0')
  if #s <= 9 or string.sub(s, 1, 1) == '-' then return 0, tonumber(s) end
  return tonumber(string.sub(s, 1, -10)), tonumber(string.sub(s, -9))
end
local function sum(a, b)
  local ah, al = split(a)
  local bh, bl = split(b)
  local hi, lo = ah + bh, al + bl
  if lo >= 1e9 then hi, lo = hi + 1, lo - 1e9 end
  return {hi, lo}
end
local function above(x, limit)
  local lh, ll = split(limit)
  return x[1] > lh or (x[1] == lh and x[2] > ll)
end
local function release(id, tokens)
  local lease = P .. 'lease:' .. id
  local f = redis.call('HMGET', lease, 'amount', 'model', 'day', 'month',
    'tpm_member', 'tpm_tokens', 'tpm_scopes')
  redis.call('ZREM', P .. 'leases', id)
  if not f[1] then return nil end
  redis.call('DEL', lease)
  for _, agg in ipairs(f[1] ~= '0' and {P .. 'day:' .. f[3], P .. 'month:' .. f[4]} or {}) do
    redis.call('HINCRBY', agg, 'reserved_nano', '-' .. f[1])
    redis.call('HINCRBY', agg, 'model:' .. f[2] .. ':reserved_nano', '-' .. f[1])
  end
  if tokens >= 0 and f[7] and f[7] ~= '' then
    local delta = tokens - tonumber(f[6])
    for scope in string.gmatch(f[7], '[^,]+') do
      local suffix = ''
      if scope == 'm' then suffix = ':' .. f[2] end
      if redis.call('ZSCORE', P .. 'tpm' .. suffix, f[5]) then
        redis.call('HINCRBY', P .. 'tpm_tokens' .. suffix, f[5], delta)
        redis.call('HINCRBY', P .. 'tpm_tokens' .. suffix, '_sum', delta)
      end
    end
  end
  return f
end
local function sweep(now)
  local expired = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now, 'LIMIT', 0, 256)
  for _, id in ipairs(expired) do release(id, -1) end
end
"""

# KEYS[1] = limits. ARGV: prefix, request id, fingerprint, model, now ms, day, month,
# worst-case cost (nano-USD), estimated tokens, lease ms, window member, window ms.
_ADMIT = (
    _PRELUDE
    + """
local id, fp, model = ARGV[2], ARGV[3], ARGV[4]
local now, day, month = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local worst, tokens = ARGV[8], tonumber(ARGV[9])
local lease_ms, member, window = tonumber(ARGV[10]), ARGV[11], tonumber(ARGV[12])
sweep(now)
local billed = redis.call('HGET', P .. 'request:' .. id, 'fingerprint')
local lease = P .. 'lease:' .. id
local inflight = redis.call('HGET', lease, 'fingerprint')
local known = billed or inflight
if known and known ~= fp then return {'conflict'} end
local raw = redis.call('HGETALL', KEYS[1])
local limits = {}
for i = 1, #raw, 2 do limits[raw[i]] = raw[i + 1] end
local function cap(name)
  local value = limits[name]
  if value and value ~= '0' then return value end
  return nil
end
local mp = 'model:' .. model .. ':'
local scopes = {{'t', '', ''}, {'m', mp, ':' .. model}}
for _, s in ipairs(scopes) do
  local limit = tonumber(cap(s[2] .. 'rpm'))
  if limit then
    local key = P .. 'rpm' .. s[3]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
    if redis.call('ZCARD', key) >= limit then
      local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      return {'rpm', s[1], limit, tonumber(oldest[2]) + window - now}
    end
  end
end
local tpm_scopes = {}
for _, s in ipairs(scopes) do
  local limit = tonumber(cap(s[2] .. 'tpm'))
  if limit then
    if tokens > limit then return {'tpm_never', s[1], limit, 0} end
    local key, counts = P .. 'tpm' .. s[3], P .. 'tpm_tokens' .. s[3]
    local old = redis.call('ZRANGEBYSCORE', key, '-inf', now - window)
    if #old > 0 then
      local freed = 0
      for _, m in ipairs(old) do
        freed = freed + (tonumber(redis.call('HGET', counts, m)) or 0)
        redis.call('HDEL', counts, m)
      end
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
      redis.call('HINCRBY', counts, '_sum', -freed)
    end
    local used = tonumber(redis.call('HGET', counts, '_sum')) or 0
    if used + tokens > limit then
      local need, wait = used + tokens - limit, window
      local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
      for i = 1, #entries, 2 do
        need = need - (tonumber(redis.call('HGET', counts, entries[i])) or 0)
        if need <= 0 then
          wait = tonumber(entries[i + 1]) + window - now
          break
        end
      end
      return {'tpm', s[1], limit, wait}
    end
    table.insert(tpm_scopes, s)
  end
end
if not known then
  for _, s in ipairs(scopes) do
    for _, per in ipairs({{'day', day}, {'month', month}}) do
      local limit = cap(s[2] .. per[1])
      if limit then
        local v = redis.call('HMGET', P .. per[1] .. ':' .. per[2],
          s[2] .. 'cost_nano', s[2] .. 'reserved_nano')
        local spent, reserved = v[1] or '0', v[2] or '0'
        if above(sum(sum(spent, reserved), worst), limit) then
          return {'budget', s[1], limit, per[1], spent, reserved}
        end
      end
    end
  end
end
for _, s in ipairs(scopes) do
  if cap(s[2] .. 'rpm') then
    redis.call('ZADD', P .. 'rpm' .. s[3], now, member)
    redis.call('PEXPIRE', P .. 'rpm' .. s[3], window)
  end
end
local names = {}
for _, s in ipairs(tpm_scopes) do
  local key, counts = P .. 'tpm' .. s[3], P .. 'tpm_tokens' .. s[3]
  -- Idempotent for a member: the same call run twice (a retried command) counts it once.
  local before = tonumber(redis.call('HGET', counts, member)) or 0
  redis.call('ZADD', key, now, member)
  redis.call('HSET', counts, member, tokens)
  redis.call('HINCRBY', counts, '_sum', tokens - before)
  redis.call('PEXPIRE', key, window)
  redis.call('PEXPIRE', counts, window)
  table.insert(names, s[1])
end
if billed then return {'billed'} end
if inflight then
  redis.call('ZADD', P .. 'leases', now + lease_ms, id)
  return {'reused'}
end
redis.call('HSET', lease, 'fingerprint', fp, 'amount', worst, 'model', model, 'day', day,
  'month', month, 'tpm_member', member, 'tpm_tokens', tokens,
  'tpm_scopes', table.concat(names, ','))
redis.call('ZADD', P .. 'leases', now + lease_ms, id)
for _, agg in ipairs({P .. 'day:' .. day, P .. 'month:' .. month}) do
  redis.call('HINCRBY', agg, 'reserved_nano', worst)
  redis.call('HINCRBY', agg, mp .. 'reserved_nano', worst)
end
return {'admitted'}
"""
)

# KEYS[1] = the ledger entry. ARGV: prefix, request id, fingerprint, model, deployment,
# prompt tokens, completion tokens, cost, cache hit (0/1), now ms, day, month, retention s,
# coalesced (0/1), GPU microseconds, GPU cost (nano-USD), self-hosted (0/1).
_RECORD = (
    _PRELUDE
    + """
local id, fp, model = ARGV[2], ARGV[3], ARGV[4]
local prompt, completion, cost = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local hit = tonumber(ARGV[9])
local coalesced = ARGV[14] == '1' and 1 or 0
local gpu_us, gpu_cost = ARGV[15] or '0', ARGV[16] or '0'
local self_hosted = ARGV[17] == '1' and 1 or 0
local entry = KEYS[1]
-- Validate everything before the first write: a script that fails half-way leaves what it
-- wrote (Redis does not roll back), and partial aggregates would poison every later report.
local function count(s, most)
  return #s >= 1 and #s <= most and not string.find(s, '%D')
end
if not (count(ARGV[6], 12) and count(ARGV[7], 12) and count(ARGV[8], 19)
    and (ARGV[9] == '0' or ARGV[9] == '1') and count(ARGV[10], 15)
    and ARGV[11] ~= '' and ARGV[12] ~= '' and count(ARGV[13], 10)
    and count(gpu_us, 15) and count(gpu_cost, 19)) then
  return {'invalid', '0', '0', 'a count or amount is not a whole number in range'}
end
local totals = redis.call('HMGET', P .. 'totals', 'cost_nano', 'gpu_cost_nano')
if above(sum(totals[1] or '0', cost), '9223372036854775807') then
  return {'invalid', '0', '0', "the tenant's running cost total would overflow"}
end
if above(sum(totals[2] or '0', gpu_cost), '9223372036854775807') then
  return {'invalid', '0', '0', "the tenant's running GPU cost total would overflow"}
end
local existing = redis.call('HMGET', entry, 'fingerprint', 'cost_nano', 'capped',
  'gpu_cost_nano')
if existing[2] then
  if fp ~= '' and existing[1] and existing[1] ~= '' and existing[1] ~= fp then
    return {'conflict', '0', '0'}
  end
  return {'duplicate', existing[2], existing[3] or '0', existing[4] or '0'}
end
local day, month, capped = ARGV[11], ARGV[12], 0
local lease = release(id, prompt + completion)
if lease then
  day, month = lease[3], lease[4]
  if above({split(cost)}, lease[1]) then
    cost = lease[1]
    capped = 1
  end
end
redis.call('HSET', entry, 'fingerprint', fp, 'model', model, 'deployment', ARGV[5],
  'prompt_tokens', prompt, 'completion_tokens', completion, 'cost_nano', cost,
  'cache_hit', hit, 'capped', capped, 'recorded_at', ARGV[10], 'day', day,
  'coalesced', coalesced, 'gpu_us', gpu_us, 'gpu_cost_nano', gpu_cost,
  'self_hosted', self_hosted)
redis.call('EXPIRE', entry, tonumber(ARGV[13]))
for _, agg in ipairs({P .. 'day:' .. day, P .. 'month:' .. month, P .. 'totals'}) do
  for _, prefix in ipairs({'', 'model:' .. model .. ':'}) do
    redis.call('HINCRBY', agg, prefix .. 'requests', 1)
    redis.call('HINCRBY', agg, prefix .. 'prompt_tokens', prompt)
    redis.call('HINCRBY', agg, prefix .. 'completion_tokens', completion)
    redis.call('HINCRBY', agg, prefix .. 'cost_nano', cost)
    redis.call('HINCRBY', agg, prefix .. 'cache_hits', hit)
    if coalesced == 1 then redis.call('HINCRBY', agg, prefix .. 'coalesced', 1) end
    if gpu_us ~= '0' then redis.call('HINCRBY', agg, prefix .. 'gpu_us', gpu_us) end
    if gpu_cost ~= '0' then redis.call('HINCRBY', agg, prefix .. 'gpu_cost_nano', gpu_cost) end
    if self_hosted == 1 then
      redis.call('HINCRBY', agg, prefix .. 'self_hosted_requests', 1)
      redis.call('HINCRBY', agg, prefix .. 'self_hosted_prompt_tokens', prompt)
      redis.call('HINCRBY', agg, prefix .. 'self_hosted_completion_tokens', completion)
    end
  end
end
return {'recorded', cost, tostring(capped), gpu_cost}
"""
)

# KEYS[1] = the lease. ARGV: prefix, request id.
_RELEASE = _PRELUDE + "\nif release(ARGV[2], 0) then return 1 end\nreturn 0\n"

# KEYS[1] = the leases set. ARGV: prefix, now ms. Returns the leases still open.
_SWEEP = _PRELUDE + "\nsweep(tonumber(ARGV[2]))\nreturn redis.call('ZCARD', KEYS[1])\n"


@dataclass(frozen=True)
class Admission:
    """What admitting a request decided.

    `outcome` is one of: admitted (a new lease), reused (a retry of a request in flight
    reuses its lease), billed (a retry of a request already billed: nothing is reserved and
    the ledger will say duplicate), conflict (the id is known with another body), rpm, tpm,
    tpm_never (the request alone exceeds the limit) or budget.
    """

    outcome: str
    scope: str = ""  # "t" the tenant, "m" the tenant's use of the model
    limit: int = 0
    retry_after_ms: int = 0
    period: str = ""  # for budget: "day" or "month"
    spent: int = 0
    reserved: int = 0

    @property
    def accepted(self) -> bool:
        return self.outcome in ("admitted", "reused", "billed")


class InvalidRecord(ValueError):
    """The ledger script refused a record before writing anything (a caller's bug)."""


@dataclass(frozen=True)
class Recorded:
    """What recording a request's usage did."""

    cost_nano: int
    duplicate: bool
    conflict: bool = False
    capped: bool = False
    gpu_cost_nano: int = 0


@dataclass(frozen=True)
class Limits:
    """Caps on a tenant or on its use of one model; 0 means no cap."""

    day_nano: int = 0
    month_nano: int = 0
    rpm: int = 0
    tpm: int = 0

    def fields(self, prefix: str) -> dict[str, int]:
        values = (self.day_nano, self.month_nano, self.rpm, self.tpm)
        return {prefix + name: v for name, v in zip(LIMIT_FIELDS, values, strict=True) if v > 0}


@dataclass(frozen=True)
class TenantLimits:
    overall: Limits = Limits()
    models: Mapping[str, Limits] = field(default_factory=dict)


@dataclass(frozen=True)
class Aggregate:
    """Usage over one period, overall or for one model."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nano: int = 0
    cache_hits: int = 0
    reserved_nano: int = 0
    coalesced: int = 0
    # GPU time attributed (GPU-microseconds) and its cost at the pool's price; and the
    # requests and tokens served on self-hosted nodes (not cache hits), which the
    # hosted-equivalent cost is priced from.
    gpu_us: int = 0
    gpu_cost_nano: int = 0
    self_hosted_requests: int = 0
    self_hosted_prompt_tokens: int = 0
    self_hosted_completion_tokens: int = 0


def _aggregates(raw: Mapping[bytes | str, bytes | str]) -> tuple[Aggregate, dict[str, Aggregate]]:
    """Split an aggregate hash into the overall figures and the per-model ones."""
    overall: dict[str, int] = {}
    models: dict[str, dict[str, int]] = {}
    for key, value in raw.items():
        name = text(key)
        if name.startswith("model:"):
            model, _, figure = name[len("model:") :].rpartition(":")
            models.setdefault(model, {})[figure] = int(value)
        else:
            overall[name] = int(value)
    known = set(Aggregate.__dataclass_fields__)

    def build(values: dict[str, int]) -> Aggregate:
        return Aggregate(**{k: v for k, v in values.items() if k in known})

    return build(overall), {m: build(v) for m, v in models.items()}


class Accounts:
    """Tenant accounts through a Redis client created at start-up."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        # Every request runs these two: concurrent calls share a pipeline (libs/scripts.py).
        self._admit = GroupedScript(client, _ADMIT)
        self._record = GroupedScript(client, _RECORD)
        self._release = client.register_script(_RELEASE)
        self._sweep = client.register_script(_SWEEP)

    async def admit(
        self,
        *,
        tenant: str,
        request_id: str,
        fingerprint: str,
        model: str,
        worst_cost_nano: int,
        estimated_tokens: int,
        lease_ms: int,
        member: str,
        now: dt.datetime,
    ) -> Admission:
        """Check and take the request's place in the rate windows and budgets, atomically."""
        prefix = tenant_prefix(tenant)
        result = await self._admit(
            keys=[prefix + "limits"],
            args=[
                prefix,
                request_id,
                fingerprint,
                model,
                int(now.timestamp() * 1000),
                day_id(now),
                month_id(now),
                worst_cost_nano,
                estimated_tokens,
                lease_ms,
                member,
                WINDOW_MS,
            ],
        )
        outcome = result[0].decode()
        if outcome in ("rpm", "tpm", "tpm_never"):
            return Admission(
                outcome,
                scope=result[1].decode(),
                limit=int(result[2]),
                retry_after_ms=int(result[3]),
            )
        if outcome == "budget":
            return Admission(
                outcome,
                scope=result[1].decode(),
                limit=int(result[2]),
                period=result[3].decode(),
                spent=int(result[4]),
                reserved=int(result[5]),
            )
        return Admission(outcome)

    async def hold(self, tenant: str, request_id: str, now: dt.datetime, seconds: float) -> bool:
        """Push a live lease's expiry to `seconds` from now (never earlier); False if none."""
        until = int(now.timestamp() * 1000 + seconds * 1000)
        changed = await self._client.zadd(
            tenant_prefix(tenant) + "leases", {request_id: until}, xx=True, gt=True, ch=True
        )
        return bool(changed)

    async def release(self, tenant: str, request_id: str) -> bool:
        """Give back a request's reservation when it failed before generating anything."""
        prefix = tenant_prefix(tenant)
        return bool(
            await self._release(keys=[prefix + "lease:" + request_id], args=[prefix, request_id])
        )

    async def record(
        self,
        *,
        tenant: str,
        request_id: str,
        fingerprint: str,
        model: str,
        deployment: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost_nano: int,
        cache_hit: bool,
        now: dt.datetime,
        retention_s: int,
        coalesced: bool = False,
        gpu_us: int = 0,
        gpu_cost_nano: int = 0,
        self_hosted: bool = False,
    ) -> Recorded:
        """Bill one request once: ledger entry, lease settled, aggregates, token windows."""
        prefix = tenant_prefix(tenant)
        result = await self._record(
            keys=[prefix + "request:" + request_id],
            args=[
                prefix,
                request_id,
                fingerprint,
                model,
                deployment,
                prompt_tokens,
                completion_tokens,
                cost_nano,
                int(cache_hit),
                int(now.timestamp() * 1000),
                day_id(now),
                month_id(now),
                retention_s,
                int(coalesced),
                gpu_us,
                gpu_cost_nano,
                int(self_hosted),
            ],
        )
        outcome, cost, capped = result[:3]
        kind = outcome.decode()
        if kind == "invalid":
            raise InvalidRecord(f"the ledger refused the record: {result[3].decode()}")
        return Recorded(
            cost_nano=int(cost),
            duplicate=kind != "recorded",
            conflict=kind == "conflict",
            capped=capped in (b"1", 1),
            gpu_cost_nano=int(result[3]) if len(result) > 3 else 0,
        )

    async def open_leases(self, tenant: str, now: dt.datetime) -> int:
        """Release the tenant's expired leases; return how many are still open."""
        prefix = tenant_prefix(tenant)
        return int(
            await self._sweep(keys=[prefix + "leases"], args=[prefix, int(now.timestamp() * 1000)])
        )

    async def limits(self, tenant: str) -> TenantLimits:
        raw = await self._client.hgetall(tenant_prefix(tenant) + "limits")
        overall: dict[str, int] = {}
        models: dict[str, dict[str, int]] = {}
        for key, value in raw.items():
            name = text(key)
            if name.startswith("model:"):
                model, _, limit = name[len("model:") :].rpartition(":")
                models.setdefault(model, {})[limit] = int(value)
            else:
                overall[name] = int(value)

        def build(values: dict[str, int]) -> Limits:
            return Limits(
                day_nano=values.get("day", 0),
                month_nano=values.get("month", 0),
                rpm=values.get("rpm", 0),
                tpm=values.get("tpm", 0),
            )

        return TenantLimits(build(overall), {m: build(v) for m, v in sorted(models.items())})

    async def set_limits(self, tenant: str, limits: TenantLimits) -> None:
        """Replace the tenant's limits in one transaction: every router sees them at once."""
        mapping = limits.overall.fields("")
        for model, model_limits in limits.models.items():
            mapping.update(model_limits.fields(f"model:{model}:"))
        key = tenant_prefix(tenant) + "limits"
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if mapping:
                pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
            await pipe.execute()

    async def period(
        self, tenant: str, period: str, period_id: str
    ) -> tuple[Aggregate, dict[str, Aggregate]]:
        """One period's aggregates: overall, and per model."""
        return _aggregates(
            await self._client.hgetall(f"{tenant_prefix(tenant)}{period}:{period_id}")
        )

    async def days(
        self, tenant: str, first: dt.date, last: dt.date
    ) -> list[tuple[str, dict[str, Aggregate]]]:
        """The per-model aggregates of every day from first to last, inclusive."""
        prefix = tenant_prefix(tenant)
        ids = [(first + dt.timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]
        async with self._client.pipeline(transaction=False) as pipe:
            for day in ids:
                pipe.hgetall(f"{prefix}day:{day}")
            raws = await pipe.execute()
        return [(day, _aggregates(raw)[1]) for day, raw in zip(ids, raws, strict=True)]

    async def totals(self, tenant: str) -> tuple[Aggregate, dict[str, Aggregate]]:
        """Running totals since the tenant's first request."""
        return _aggregates(await self._client.hgetall(tenant_prefix(tenant) + "totals"))
