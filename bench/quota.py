"""What budgets and rate limits cost per request: CPU and Redis round trips.

Why this exists: the reservation before dispatch (budgets, requests and tokens per minute)
and its settlement after the answer sit on every request's path. The target is at most
0.3 ms of CPU and at most 2 Redis round trips added per request. The benchmark measures
exactly those two figures against a real Valkey server on 127.0.0.1, in this process, which
runs the same code the router and billing run:

* baseline: what billing did before budgets existed, one ledger record per request
  (`Accounts.record` with no reservation to settle);
* with quota: the router's `Quota.admit` (worst-case pricing, one admission script checking
  two budgets per scope, requests and tokens per minute, and writing the lease) followed by
  billing's `Accounts.record` settling that lease, with every limit configured so that every
  check runs and none refuses.

CPU is this process's user+system time (`time.process_time`) over N requests, so the
machine's other load does not count; Valkey's own CPU is reported apart, from its
/proc/<pid>/stat. Round trips are counted at the client: every command the Redis client
sends, and every pipeline (libs/scripts.py groups concurrent script calls into one). Each
mode runs sequentially (concurrency 1) and with 32 requests in flight. Both modes
run interleaved, three rounds each, and the median round is reported, so a noisy neighbour
hits both alike.

`make bench-quota` runs it and writes .build/bench/quota.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from shepherd.common.v1 import common_pb2

from deploy.local.ports import free_port
from deploy.local.valkey import ValkeyConfig, ValkeyServer
from libs.accounts import Accounts, Limits, TenantLimits, utc_now
from libs.catalog import load_catalog
from libs.config import DEFAULT_CATALOG, REPO_ROOT
from services.router.config import QuotaConfig
from services.router.quota import Quota

TARGET_CPU_MS = 0.3
TARGET_ROUND_TRIPS = 2
MODEL = "gpt-4.1"
ROUNDS = 3
OUTPUT = REPO_ROOT / ".build" / "bench" / "quota.json"
CLOCK_TICKS = 100  # os.sysconf("SC_CLK_TCK") on Linux


@dataclass(frozen=True)
class Row:
    mode: str
    concurrency: int
    requests: int
    cpu_ms_per_request: float
    redis_cpu_ms_per_request: float
    round_trips_per_request: float
    wall_s: float


class CountingRedis(redis.Redis):
    """A Redis client that counts its round trips: one per command, one per pipeline."""

    sent = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        CountingRedis.sent += 1
        return await super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        async def counted(raise_on_error: bool = True) -> Any:
            CountingRedis.sent += 1
            return await execute(raise_on_error=raise_on_error)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe


def valkey_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def run_round(
    step: Callable[[int], Awaitable[None]], requests: int, concurrency: int, valkey_pid: int
) -> tuple[float, float, float, float]:
    """(CPU ms, Valkey CPU ms, round trips) per request, and the wall time."""
    counter = iter(range(requests))

    async def worker() -> None:
        for n in counter:
            await step(n)

    sent, cpu, valkey, wall = (
        CountingRedis.sent,
        time.process_time(),
        valkey_cpu_s(valkey_pid),
        time.perf_counter(),
    )
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall
    return (
        (time.process_time() - cpu) * 1000 / requests,
        (valkey_cpu_s(valkey_pid) - valkey) * 1000 / requests,
        (CountingRedis.sent - sent) / requests,
        wall,
    )


async def measure(url: str, valkey_pid: int, requests: int) -> list[Row]:
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=5.0)
    client = CountingRedis.from_pool(pool)
    accounts = Accounts(client)
    quota = Quota(accounts, QuotaConfig(fail_open=False, lease_grace_s=30.0, budget_wait_s=0.0))
    model = load_catalog(DEFAULT_CATALOG, env={}).models[MODEL]
    messages = [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="How many sheep?")]
    huge = Limits(day_nano=10**17, month_nano=10**18, rpm=10**9, tpm=10**12)
    run = uuid.uuid4().hex[:8]

    async def bill(tenant: str, request_id: str) -> None:
        """What billing does once the answer is in: the ledger script (settling any lease)."""
        await accounts.record(
            tenant=tenant,
            request_id=request_id,
            fingerprint="fp",
            model=MODEL,
            deployment="holysheep/gpt-4.1",
            prompt_tokens=12,
            completion_tokens=64,
            cost_nano=536_000,
            cache_hit=False,
            now=utc_now(),
            retention_s=86_400,
        )

    def baseline(tenant: str) -> Callable[[int], Awaitable[None]]:
        async def step(n: int) -> None:
            await bill(tenant, f"{run}-{n}")

        return step

    def with_quota(tenant: str) -> Callable[[int], Awaitable[None]]:
        async def step(n: int) -> None:
            await quota.admit(
                tenant=tenant,
                request_id=f"{run}-{n}",
                fingerprint="fp",
                model=model,
                messages=messages,
                max_tokens=64,
                timeout_s=30.0,
            )
            await bill(tenant, f"{run}-{n}")

        return step

    rows: list[Row] = []
    try:
        for concurrency in (1, 32):
            samples: dict[str, list[tuple[float, float, float, float]]] = {
                "baseline": [],
                "quota": [],
            }
            for round_ in range(ROUNDS + 1):  # round 0 warms up scripts and connections
                for mode, make in (("baseline", baseline), ("quota", with_quota)):
                    tenant = f"bench-{mode}-{concurrency}-{round_}"
                    if mode == "quota":
                        await accounts.set_limits(
                            tenant, TenantLimits(overall=huge, models={MODEL: huge})
                        )
                    sample = await run_round(make(tenant), requests, concurrency, valkey_pid)
                    if round_:
                        samples[mode].append(sample)
            for mode, found in samples.items():
                cpu, valkey, trips, wall = sorted(found)[len(found) // 2]
                rows.append(
                    Row(
                        mode,
                        concurrency,
                        requests,
                        round(cpu, 4),
                        round(valkey, 4),
                        trips,
                        round(wall, 3),
                    )
                )
    finally:
        await client.aclose()
    return rows


def report(rows: list[Row]) -> tuple[str, bool]:
    lines = [
        f"{'mode':<9} {'conc':>4} {'requests':>8} {'cpu ms/req':>10} {'valkey ms/req':>13}"
        f" {'redis trips/req':>15} {'wall s':>7}"
    ]
    for r in rows:
        lines.append(
            f"{r.mode:<9} {r.concurrency:>4} {r.requests:>8} {r.cpu_ms_per_request:>10.3f}"
            f" {r.redis_cpu_ms_per_request:>13.3f} {r.round_trips_per_request:>15.2f}"
            f" {r.wall_s:>7.2f}"
        )
    holds = True
    for concurrency in sorted({r.concurrency for r in rows}):
        base, quota = (
            next(r for r in rows if r.mode == mode and r.concurrency == concurrency)
            for mode in ("baseline", "quota")
        )
        cpu = quota.cpu_ms_per_request - base.cpu_ms_per_request
        trips = quota.round_trips_per_request - base.round_trips_per_request
        ok = cpu <= TARGET_CPU_MS and trips <= TARGET_ROUND_TRIPS
        holds &= ok
        lines.append(
            f"added at concurrency {concurrency}: {cpu:.3f} ms CPU (target <= {TARGET_CPU_MS}),"
            f" {trips:.2f} Redis round trips (target <= {TARGET_ROUND_TRIPS}),"
            f" {quota.redis_cpu_ms_per_request - base.redis_cpu_ms_per_request:.3f} ms Valkey CPU"
            f" -> {'holds' if ok else 'MISSED'}"
        )
    lines.append(f"VERDICT: target {'HOLDS' if holds else 'MISSED'}")
    return "\n".join(lines), holds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quota", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="requests per round")
    parser.add_argument("--require-target", action="store_true", help="exit 2 when missed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as data_dir:
        server = ValkeyServer(ValkeyConfig(port=free_port(), data_dir=Path(data_dir))).start()
        try:
            assert server.pid is not None
            rows = asyncio.run(measure(server.config.url, server.pid, args.requests))
        finally:
            server.stop()
    text, holds = report(rows)
    print(text)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps({"rows": [asdict(r) for r in rows], "holds": holds}, indent=2))
    return 2 if args.require_target and not holds else 0


if __name__ == "__main__":
    sys.exit(main())
