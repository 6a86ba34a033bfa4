"""The usage ledger: one entry per (tenant, request id), and the reports read from it.

Recording is one atomic script (`libs/accounts.py`): the entry is created only if it does not
exist, the request's reservation is settled, and the tenant's daily, monthly and running
aggregates move only when the entry was created. Recording the same request twice, from a
retry or from two router replicas, therefore bills once; the same id with a different
request (fingerprint) is a conflict, never a silent free answer. Request ids are scoped by
tenant, so one tenant's ids can never collide with another's.

Per-request entries expire after the retention period (35 days by default); the daily
aggregates, which reports read, stay. Amounts are integer nano-USD; Redis's HINCRBY keeps
them exact up to 9.2 billion dollars.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from libs.accounts import Accounts, Aggregate, Recorded
from libs.errors import invalid_argument

MAX_REPORT_DAYS = 366


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
    recorded_at: dt.datetime
    fingerprint: str = ""
    coalesced: bool = False  # shared from an identical request in flight: a cache hit
    # Ran on a self-hosted node: its GPU time (GPU-microseconds) and what that cost.
    self_hosted: bool = False
    gpu_us: int = 0
    gpu_cost_nano: int = 0


@dataclass(frozen=True)
class TenantTotals:
    """A tenant's running totals, overall and per model."""

    overall: Aggregate
    models: dict[str, Aggregate]


@dataclass(frozen=True)
class Bucket:
    """One tenant's usage of one model on one UTC day."""

    day: str
    model: str
    usage: Aggregate


class Ledger:
    """Writes the ledger and reads reports, through the tenant accounts."""

    def __init__(self, accounts: Accounts, retention_s: int) -> None:
        self._accounts = accounts
        self._retention_s = retention_s

    async def record(self, entry: UsageEntry) -> Recorded:
        """Bill `entry` once; a later record of the same (tenant, id) reports the first."""
        return await self._accounts.record(
            tenant=entry.tenant,
            request_id=entry.request_id,
            fingerprint=entry.fingerprint,
            model=entry.model,
            deployment=entry.deployment,
            prompt_tokens=entry.prompt_tokens,
            completion_tokens=entry.completion_tokens,
            cost_nano=entry.cost_nano,
            cache_hit=entry.cache_hit,
            now=entry.recorded_at,
            retention_s=self._retention_s,
            coalesced=entry.coalesced,
            gpu_us=entry.gpu_us,
            gpu_cost_nano=entry.gpu_cost_nano,
            self_hosted=entry.self_hosted,
        )

    async def tenant_totals(self, tenant: str) -> TenantTotals:
        """A tenant's running totals; an unknown tenant has all-zero totals."""
        overall, models = await self._accounts.totals(tenant)
        return TenantTotals(overall=overall, models=models)

    async def report(self, tenant: str, first: dt.date, last: dt.date) -> list[Bucket]:
        """Usage per day and model from first to last (inclusive), ordered by day and model."""
        days = await self._accounts.days(tenant, first, last)
        return [
            Bucket(day=day, model=model, usage=usage)
            for day, models in days
            for model, usage in sorted(models.items())
            if usage.requests
        ]


def _day(value: str, field: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise invalid_argument([(field, f"{value!r} must be a date written YYYY-MM-DD")]) from None


def report_range(start_day: str, end_day: str, today: dt.date) -> tuple[dt.date, dt.date]:
    """A report's days, first to last (by default the 30 days up to today), validated."""
    last = _day(end_day, "end_day") if end_day else today
    if start_day:
        first = _day(start_day, "start_day")
    else:
        # Thirty days, or fewer when end_day is within thirty days of the first date there is.
        first = last - dt.timedelta(days=min(29, (last - dt.date.min).days))
    if first > last:
        raise invalid_argument([("start_day", f"{first} is after end_day {last}")])
    if (last - first).days + 1 > MAX_REPORT_DAYS:
        raise invalid_argument([("start_day", f"a report covers at most {MAX_REPORT_DAYS} days")])
    return first, last
