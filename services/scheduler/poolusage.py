"""Each Triton pool's figures per UTC hour, as this scheduler sees them, reported to billing.

Who owns the pool-hour figures, and why here. A pool's utilisation and batch fill need what
only the scheduler knows: every execution it ran (including those whose requests were never
billed: failed, cancelled, or answered before their time was known), how many rows each
carried against its model's max batch size, and how many nodes the pool has right now (DNS
can add and remove them). Billing could rebuild GPU time from the ledger, but not executions,
idle capacity or the pool's size. So the scheduler counts, and billing, the one owner of usage
state in Redis, stores: the hot path adds to a few integers in memory (`executed`), and once a
second (`SHEPHERD_SCHEDULER_POOL_USAGE_INTERVAL_S`) one `BillingService/RecordPoolUsage` call
carries every pool-hour that changed. Nothing waits on it, and the scheduler stays without
Redis access.

Exactly once. Each report has this process's reporter id and a sequence number; billing
records a (pool, reporter, sequence) once. A report that failed (billing down, or its answer
lost) is sent again as it was, until billing takes it, while new figures gather for the next
one; so a retried report never counts twice and a slow billing loses nothing. Figures wait in
memory meanwhile (one entry per pool and hour), and a scheduler that dies loses at most the
figures of its last interval.

Wall time. Each entry carries the interval the scheduler observed the pool in (cut at UTC
hour boundaries) and the pool's GPUs then; billing counts a moment of wall time once however
many scheduler replicas observed it (services/billing/pools.py), so the pool's capacity is its
wall time times its GPUs, not times its replicas.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc

from libs.catalog import Catalog, Deployment
from services.scheduler.nodes import NodePool

_log = logging.getLogger(__name__)

HOUR_US = 3_600_000_000
REPORT_TIMEOUT_S = 5.0


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class _Hour:
    """What one pool did in one UTC hour since the last report."""

    from_us: int = 0
    to_us: int = 0
    gpus: int = 0
    busy_gpu_us: int = 0
    executions: int = 0
    rows: int = 0
    batch_slots: int = 0


class PoolUsage:
    """Counts executions per pool and hour, and reports them to billing (see above)."""

    def __init__(
        self,
        pools: Mapping[str, NodePool],
        catalog: Catalog,
        billing: billing_pb2_grpc.BillingServiceStub,
        interval_s: float = 1.0,
    ) -> None:
        self._pools = pools
        self._billing = billing
        self.interval_s = interval_s
        self._max_batch = {
            d.name: model.batching.max_batch_size
            for model in catalog.models.values()
            for d in model.self_hosted
        }
        self._hours: dict[tuple[str, int], _Hour] = {}
        self._observed_us = now_us()
        self._sequence = 0
        self._outstanding: billing_pb2.RecordPoolUsageRequest | None = None
        self.reporter = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._failing = False

    def executed(self, deployment: Deployment, rows: int, gpu_us: int) -> None:
        """One execution of `rows` rows took `gpu_us` GPU-microseconds (the hot path)."""
        hour = self._hour(deployment.pool, now_us() // HOUR_US)
        hour.busy_gpu_us += gpu_us
        hour.executions += 1
        hour.rows += rows
        hour.batch_slots += self._max_batch.get(deployment.name, rows)

    def _hour(self, pool: str, hour: int) -> _Hour:
        entry = self._hours.get((pool, hour))
        if entry is None:
            entry = self._hours[(pool, hour)] = _Hour()
        return entry

    def _observe(self, until_us: int) -> None:
        """Every pool was observed from the last call until `until_us`, with its GPUs now."""
        start = self._observed_us
        for name, pool in self._pools.items():
            gpus = sum(not node.gone for node in pool.nodes.values()) * pool.pool.gpus_per_node
            at = start
            while at < until_us:
                hour = at // HOUR_US
                end = min(until_us, (hour + 1) * HOUR_US)
                entry = self._hour(name, hour)
                if not entry.to_us:
                    entry.from_us = at
                entry.to_us = end
                entry.gpus = gpus
                at = end
        self._observed_us = max(start, until_us)

    def _next_report(self) -> billing_pb2.RecordPoolUsageRequest | None:
        """The figures gathered since the last report, as the next one (None when none)."""
        self._observe(now_us())
        hours, self._hours = self._hours, {}
        deltas = []
        for (pool, _), entry in sorted(hours.items()):
            if not entry.to_us:  # executions counted after the last observation
                entry.from_us = entry.to_us = self._observed_us
            deltas.append(
                billing_pb2.PoolUsageDelta(
                    pool=pool,
                    from_unix_us=entry.from_us,
                    to_unix_us=entry.to_us,
                    gpus=entry.gpus,
                    busy_gpu_us=entry.busy_gpu_us,
                    executions=entry.executions,
                    rows=entry.rows,
                    batch_slots=entry.batch_slots,
                )
            )
        if not deltas:
            return None
        self._sequence += 1
        return billing_pb2.RecordPoolUsageRequest(
            reporter=self.reporter, sequence=self._sequence, deltas=deltas
        )

    async def report(self) -> bool:
        """Send the outstanding report, else the next one; False when billing did not take it."""
        if self._outstanding is None:
            self._outstanding = self._next_report()
            if self._outstanding is None:
                return True
        try:
            await self._billing.RecordPoolUsage(self._outstanding, timeout=REPORT_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            if not self._failing:
                self._failing = True
                _log.warning(
                    "billing did not take the pool usage report; it is sent again",
                    extra={"error": f"{error.code().name}: {error.details()}"},
                )
            return False
        if self._failing:
            self._failing = False
            _log.info("billing takes pool usage reports again")
        self._outstanding = None
        return True

    async def run(self) -> None:
        """Report every interval, for the life of the service (supervised)."""
        while True:
            await asyncio.sleep(self.interval_s)
            await self.report()

    async def close(self) -> None:
        """At shutdown: one last try to deliver what was gathered."""
        for _ in range(2):  # the outstanding report, then the figures since it
            if not await self.report():
                _log.warning("pool usage not reported at shutdown", extra={"last": self._sequence})
                return
