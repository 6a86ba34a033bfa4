"""A soak: tens of thousands of requests through the whole local mesh, watching memory.

Why this exists: a leak no unit test sees shows after tens of thousands of requests: a
per-request entry in a dict nobody empties, a task set that only grows, a Redis key written
without a TTL. Issue 9 asks for a soak in `make bench` that reports each service's RSS and
Valkey's memory per request, so a leak shows as a number in a table rather than as an
out-of-memory kill in production, and so the memory Valkey needs for a production day can be
worked out from measured figures instead of guessed.

What it runs: the whole local mesh on free 127.0.0.1 ports with a provider simulator of its
own (bench/streaming.py's `mesh_with_simulator`: Valkey, a CPU Triton node, the simulator
answering after 5 ms, the four services), 8 tenants with API keys, half of them with budgets
and rate limits set through AdminService far above what the soak sends (so their admission
checks budgets and writes the rate-limit windows), then --requests (50,000) requests through
`RouterService` from --concurrency (32) closed-loop clients on long-lived channels. The mix,
per mille, shuffled in blocks of 1,000 with a fixed seed, so every run sends the same
requests and every 1,000 requests hold the exact mix; tenant = request number mod 8:

| kind | per mille | call | model | what it exercises |
|---|---:|---|---|---|
| miss | 420 | Chat | shepherd-echo | a unique prompt: Triton, then stored in the cache |
| hit | 220 | Chat | shepherd-echo | one of 64 prompts per tenant: a cache hit once answered |
| hosted | 150 | Chat | deepseek-v3.2, gemini-2.5-flash | the hosted API (simulator), stored |
| stream | 80 | ChatStream | shepherd-echo | streaming from a one-shot Triton model |
| stream-hosted | 60 | ChatStream | deepseek-v3.2 | SSE streaming from the hosted API |
| stream-tiny | 30 | ChatStream | shepherd-tiny-stream | a decoupled Triton model, token by token |
| sampled | 37 | Chat | shepherd-echo | temperature 0.8, no seed: never cached, a fresh seed |
| invalid | 3 | Chat | shepherd-echo | max_tokens over the limit, priority 99 or an empty message |

Invalid requests must be answered INVALID_ARGUMENT; every other request must be answered OK.

Sampling: after a warm-up of --warmup (2,000) requests and then every --sample-every (5,000)
requests, the clients finish what they have in flight (no new request starts until the
sample is read, so every sample sees the mesh at rest) and it reads the VmRSS and RssAnon
(from /proc/<pid>/status) of each service, Valkey, Triton (tritonserver and its backend
stubs, by process group), the simulator and this client; Valkey's INFO memory, DBSIZE and
keys with a TTL; the requests done and the errors by status. After the warm-up and at the
end it also takes a census of Valkey's keys by kind (ledger entries, cache entries, rate-limit
windows, leases, aggregates, limits, API keys): count, bytes (MEMORY USAGE) and TTL.

Report: RSS per process at start (after the warm-up), at the end, the growth in MiB and in KiB
per 1,000 requests, over the whole run and over its second half (a leak grows at the same
rate throughout; a process settling in grows early and stops); Valkey's used_memory growth
per request and keys per request, by key kind, and what the kinds that stay mean for a
production day (ledger entries are kept for the retention, 35 days by default; cache entries
for their TTL; rate-limit windows for 60 s); the ledger check (per tenant, GetTenantUsage's
billed requests, cache hits and cost against the OK answers, their cache hits and the sum of
their costs, to the nano-dollar); throughput and errors. A table on stdout and
.build/bench/soak.json (with markdown tables for docs/BENCHMARKS.md).

Judged on one VERDICT line: the ledger equals the answers, no error but the expected
INVALID_ARGUMENTs, every service's RSS flat (its growth over the second half at most
FLAT_KIB_PER_1K KiB per 1,000 requests) and no Valkey key without a TTL added per request.
It is a benchmark: a missed target exits 0 (2 with --require-target); it exits 1 when it
cannot measure (the mesh does not start, a process dies, more than 1% of requests fail
unexpectedly, or the run passes --max-minutes, 20 by default). Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import random
import re
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as redis
from shepherd.billing.v1 import admin_pb2, admin_pb2_grpc, billing_pb2, billing_pb2_grpc
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc

from bench.batching import CHANNEL_OPTIONS, machine, percentile, run_main, write_report
from bench.batching import prompt as batching_prompt
from bench.streaming import (
    SIM_LATENCY_MS,
    BadAnswer,
    BenchError,
    _git,
    _raise_keyboard_interrupt,
    _shards,
    error_name,
    find_sim_pids,
    mesh_with_simulator,
    prepare_run_dir,
    prompt,
    read_stream,
)
from deploy.local.launcher import SERVICES, LocalMesh
from deploy.local.provider_sim import SimProcess
from deploy.local.triton import TritonStartError, process_group_members
from libs.apikeys import issue_key_at
from libs.config import REPO_ROOT
from libs.server import open_redis

ECHO = "shepherd-echo"
TENANTS = tuple(f"soak-{i}" for i in range(8))
# The first half get budgets and rate limits (never reached): admission then checks budgets
# and writes the sliding rate-limit windows, as it does for a tenant in production.
LIMITED_TENANTS = TENANTS[:4]
HIT_POOL = 64  # repeated prompts per tenant
MAX_TOKENS = 16
HOSTED_MAX_TOKENS = 32
TINY_STREAM_MAX_TOKENS = 8
SAMPLED_TEMPERATURE = 0.8
CALL_TIMEOUT_S = 30.0
MAX_UNEXPECTED_ERROR_RATE = 0.01
ERROR_SAMPLES = 5
# "Flat": a service's RSS grows by at most this over the run's second half (64 bytes a
# request); a leak of a few hundred bytes per request, the size of one forgotten dict entry,
# is several times over it.
FLAT_KIB_PER_1K = 64.0
KIB = 1024
MIB = 1024 * 1024
DAY_S = 86_400
RATE_WINDOW_S = 60
DEFAULT_OUTPUT = REPO_ROOT / ".build" / "bench" / "soak.json"
# The processes whose memory is sampled, in table order; the first four are judged.
PROCESSES = (*SERVICES, "valkey", "triton", "simulator", "client")
SHORT = {
    "billing": "bi",
    "cache": "ca",
    "scheduler": "sch",
    "router": "rt",
    "valkey": "vk",
    "triton": "tri",
    "simulator": "sim",
    "client": "cl",
}


@dataclass(frozen=True)
class Kind:
    """One kind of request of the mix."""

    name: str
    per_mille: int
    models: tuple[str, ...]  # taken in turn by request number
    stream: bool
    what: str


KINDS = (
    Kind("miss", 420, (ECHO,), False, "a unique prompt: Triton, then stored in the cache"),
    Kind("hit", 220, (ECHO,), False, f"one of {HIT_POOL} prompts per tenant: a cache hit"),
    Kind("hosted", 150, ("deepseek-v3.2", "gemini-2.5-flash"), False, "the hosted API"),
    Kind("stream", 80, (ECHO,), True, "streaming from a one-shot Triton model"),
    Kind("stream-hosted", 60, ("deepseek-v3.2",), True, "SSE streaming from the hosted API"),
    Kind("stream-tiny", 30, ("shepherd-tiny-stream",), True, "a decoupled Triton model"),
    Kind("sampled", 37, (ECHO,), False, "temperature 0.8 and no seed: never cached"),
    Kind("invalid", 3, (ECHO,), False, "refused: INVALID_ARGUMENT"),
)
INVALID = "invalid"
EXPECTED_INVALID = "INVALID_ARGUMENT"
assert sum(k.per_mille for k in KINDS) == 1000


def plan(total: int, seed: int) -> list[Kind]:
    """The kind of every request: blocks of 1,000 holding the exact mix, each shuffled."""
    block = [kind for kind in KINDS for _ in range(kind.per_mille)]
    rng = random.Random(seed)
    kinds: list[Kind] = []
    while len(kinds) < total:
        rng.shuffle(block)
        kinds.extend(block)
    return kinds[:total]


def tenant_of(n: int) -> str:
    return TENANTS[n % len(TENANTS)]


def request_fields(n: int, kind: Kind, run_id: str) -> dict[str, Any]:
    """The fields of request n (Chat and ChatStream requests share them)."""
    model = kind.models[n % len(kind.models)]
    text = prompt(n)
    max_tokens = MAX_TOKENS
    temperature = 0.0
    priority = common_pb2.PRIORITY_NORMAL
    if kind.name == "hit":
        # Per tenant (n = 8q + t), q walks the pool: every prompt of it is sent again and again.
        text = batching_prompt((n // len(TENANTS)) % HIT_POOL)
    elif kind.name in ("hosted", "stream-hosted"):
        max_tokens = HOSTED_MAX_TOKENS
    elif kind.name == "stream-tiny":
        max_tokens = TINY_STREAM_MAX_TOKENS
    elif kind.name == "sampled":
        temperature = SAMPLED_TEMPERATURE
    elif kind.name == INVALID:
        variant = n % 3
        if variant == 0:
            max_tokens = 100_000  # over the model's max_output_tokens
        elif variant == 1:
            priority = 99  # not a Priority
        else:
            text = ""  # an empty message
    return {
        "model": model,
        "messages": [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
        "params": common_pb2.GenerationParams(max_tokens=max_tokens, temperature=temperature),
        "priority": priority,
        "request_id": f"soak-{run_id}-{n}",
    }


# -- load ---------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients observed so far."""

    ok: int = 0
    cache_hits: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # errors only, by status
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)  # kind -> status or OK
    ok_by_tenant: Counter[str] = field(default_factory=Counter)
    hits_by_tenant: Counter[str] = field(default_factory=Counter)
    cost_by_tenant: Counter[str] = field(default_factory=Counter)
    latencies_s: dict[str, list[float]] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.ok + sum(self.statuses.values())

    def unexpected(self) -> int:
        """Answers other than OK, or other than INVALID_ARGUMENT for an invalid request."""
        return sum(
            count
            for kind, statuses in self.by_kind.items()
            for status, count in statuses.items()
            if status != (EXPECTED_INVALID if kind == INVALID else "OK")
        )

    def add_ok(self, kind: Kind, tenant: str, cost_nano: int, hit: bool, took_s: float) -> None:
        self.ok += 1
        self.by_kind.setdefault(kind.name, Counter())["OK"] += 1
        self.ok_by_tenant[tenant] += 1
        self.cost_by_tenant[tenant] += cost_nano
        if hit:
            self.cache_hits += 1
            self.hits_by_tenant[tenant] += 1
        self.latencies_s.setdefault(kind.name, []).append(took_s)

    def add_error(self, kind: Kind, error: BaseException) -> None:
        name = error_name(error)
        self.statuses[name] += 1
        self.by_kind.setdefault(kind.name, Counter())[name] += 1
        expected = kind.name == INVALID and name == EXPECTED_INVALID
        if not expected and len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(f"{kind.name}: {name}: {str(error)[:300]}")


class Clients:
    """Long-lived channels to the router, shared by the workers, and each tenant's key."""

    def __init__(self, router: str, keys: Mapping[str, str], concurrency: int) -> None:
        self._channels = [
            grpc.aio.insecure_channel(router, options=CHANNEL_OPTIONS)
            for _ in range(_shards(concurrency))
        ]
        self.stubs = [router_pb2_grpc.RouterServiceStub(c) for c in self._channels]
        self.metadata = {t: (("authorization", f"Bearer {key}"),) for t, key in keys.items()}

    async def ready(self) -> None:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10.0) for c in self._channels))

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


async def send(
    stub: router_pb2_grpc.RouterServiceStub,
    n: int,
    kind: Kind,
    run_id: str,
    metadata: tuple[tuple[str, str], ...],
) -> tuple[int, bool]:
    """Request n; its billed cost and whether it was a cache hit."""
    fields = request_fields(n, kind, run_id)
    if kind.stream:
        call = stub.ChatStream(
            router_pb2.ChatStreamRequest(**fields), metadata=metadata, timeout=CALL_TIMEOUT_S
        )
        _, _, _, final = await read_stream(call)
        return final.cost.nano_usd, final.cache_hit
    response = await stub.Chat(
        router_pb2.ChatRequest(**fields), metadata=metadata, timeout=CALL_TIMEOUT_S
    )
    if not response.text:
        raise BadAnswer("an empty answer")
    return response.cost.nano_usd, response.cache_hit


async def run_chunk(
    clients: Clients,
    kinds: Sequence[Kind],
    indices: range,
    concurrency: int,
    run_id: str,
    tally: Tally,
) -> float:
    """Send requests `indices` from `concurrency` closed-loop workers; the wall time."""
    tickets = iter(indices)

    async def worker(i: int) -> None:
        stub = clients.stubs[i % len(clients.stubs)]
        for n in tickets:
            kind, tenant = kinds[n], tenant_of(n)
            began = time.perf_counter()
            try:
                cost, hit = await send(stub, n, kind, run_id, clients.metadata[tenant])
            except (grpc.aio.AioRpcError, BadAnswer) as error:
                tally.add_error(kind, error)
            else:
                tally.add_ok(kind, tenant, cost, hit, time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return time.perf_counter() - began


async def set_limits(billing: str, admin_key: str) -> None:
    """Budgets and rate limits for LIMITED_TENANTS, far above what the soak sends."""
    limits = admin_pb2.Limits(
        daily_budget=common_pb2.Money(nano_usd=10_000 * 10**9),
        monthly_budget=common_pb2.Money(nano_usd=100_000 * 10**9),
        requests_per_minute=10_000_000,
        tokens_per_minute=1_000_000_000,
    )
    async with grpc.aio.insecure_channel(billing, options=CHANNEL_OPTIONS) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        for tenant in LIMITED_TENANTS:
            await stub.SetTenantLimits(
                admin_pb2.SetTenantLimitsRequest(
                    tenant=tenant,
                    limits=admin_pb2.TenantLimits(
                        overall=limits,
                        models=[admin_pb2.ModelLimits(model=ECHO, limits=limits)],
                    ),
                ),
                metadata=(("authorization", f"Bearer {admin_key}"),),
                timeout=10.0,
            )


# -- sampling -----------------------------------------------------------------------------


def rss_kib(pids: Sequence[int]) -> tuple[int, int]:
    """VmRSS and RssAnon (KiB) of the given processes together (vanished ones: 0)."""
    rss = anon = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon += int(line.split()[1])
    return rss, anon


@dataclass
class Processes:
    """The pids memory is read from, by process name (Triton: its whole process group)."""

    pids: dict[str, list[int]]
    triton_pgid: int | None

    def members(self) -> dict[str, list[int]]:
        found = dict(self.pids)
        found["triton"] = process_group_members(self.triton_pgid) if self.triton_pgid else []
        return found


@dataclass(frozen=True)
class Sample:
    """Memory and progress read at one moment with no request in flight."""

    label: str
    requests: int
    elapsed_s: float
    load_s: float  # wall time spent sending requests so far
    rss_kib: dict[str, int]
    rss_anon_kib: dict[str, int]
    valkey: dict[str, int]
    ok: int
    errors: dict[str, int]


async def valkey_memory(client: redis.Redis) -> dict[str, int]:
    """What Valkey says it holds: used_memory (and its RSS, dataset share), keys, TTLs."""
    info = await client.info("memory")
    keyspace = await client.info("keyspace")
    db0 = keyspace.get("db0") or {}
    return {
        "used_memory": int(info["used_memory"]),
        "used_memory_rss": int(info["used_memory_rss"]),
        "used_memory_dataset": int(info.get("used_memory_dataset", 0)),
        "dbsize": int(await client.dbsize()),
        "expires": int(db0.get("expires", 0)) if isinstance(db0, dict) else 0,
    }


async def take_sample(
    label: str,
    processes: Processes,
    client: redis.Redis,
    tally: Tally,
    began: float,
    load_s: float,
) -> Sample:
    rss: dict[str, int] = {}
    anon: dict[str, int] = {}
    for name, pids in processes.members().items():
        rss[name], anon[name] = rss_kib(pids)
    return Sample(
        label=label,
        requests=tally.done,
        elapsed_s=round(time.monotonic() - began, 2),
        load_s=round(load_s, 2),
        rss_kib=rss,
        rss_anon_kib=anon,
        valkey=await valkey_memory(client),
        ok=tally.ok,
        errors=dict(tally.statuses),
    )


# Valkey keys by kind, first match wins (docs/ARCHITECTURE.md, "Where state lives").
_TENANT = r"^shepherd:t:\{[^}]*\}:"
KEY_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ledger entries", re.compile(_TENANT + r"request:")),
    ("cache entries", re.compile(r"^shepherd:cache:")),
    ("rate-limit windows", re.compile(_TENANT + r"(rpm|tpm|tpm_tokens)(:|$)")),
    ("leases", re.compile(_TENANT + r"(lease:|leases$)")),
    ("aggregates", re.compile(_TENANT + r"(day:|month:|totals$)")),
    ("limits", re.compile(_TENANT + r"limits$")),
    ("api keys", re.compile(r"^shepherd:auth:")),
)
OTHER = "other"


def key_kind(key: str) -> str:
    for name, pattern in KEY_KINDS:
        if pattern.match(key):
            return name
    return OTHER


@dataclass
class KindCensus:
    """Valkey's keys of one kind at one moment."""

    keys: int = 0
    bytes: int = 0  # MEMORY USAGE summed
    without_ttl: int = 0
    ttl_min_s: int | None = None
    ttl_max_s: int | None = None


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


async def census(client: redis.Redis) -> dict[str, KindCensus]:
    """Every key, by kind: how many, their bytes (MEMORY USAGE) and their TTLs."""
    keys = [
        k.decode() if isinstance(k, bytes) else str(k) async for k in client.scan_iter(count=2000)
    ]
    found: dict[str, KindCensus] = {name: KindCensus() for name, _ in KEY_KINDS}
    found[OTHER] = KindCensus()
    for batch in _batches(iter(keys), 1000):
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.memory_usage(key)
            pipe.ttl(key)
        answers = await pipe.execute()
        for i, key in enumerate(batch):
            used, ttl = answers[2 * i], answers[2 * i + 1]
            if used is None or ttl == -2:  # gone since the scan (a window, a lease)
                continue
            entry = found[key_kind(key)]
            entry.keys += 1
            entry.bytes += int(used)
            if ttl == -1:
                entry.without_ttl += 1
            else:
                entry.ttl_min_s = ttl if entry.ttl_min_s is None else min(entry.ttl_min_s, ttl)
                entry.ttl_max_s = ttl if entry.ttl_max_s is None else max(entry.ttl_max_s, ttl)
    return found


# -- driver -------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything a run found, kept as it goes so a failure still reports what it had."""

    samples: list[Sample] = field(default_factory=list)
    census_start: dict[str, KindCensus] = field(default_factory=dict)
    census_end: dict[str, KindCensus] = field(default_factory=dict)
    ledger: list[dict[str, Any]] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    load_s: float = 0.0
    warmup_load_s: float = 0.0


def boundaries(total: int, warmup: int, every: int) -> list[int]:
    """The request counts after which a sample is taken: the warm-up's end, every `every`
    requests after it (on round numbers), and the end."""
    points = [warmup] if 0 < warmup < total else []
    points.extend(range((warmup // every + 1) * every, total, every))
    points.append(total)
    return points


def print_sample(sample: Sample, previous: Sample | None) -> None:
    rps = "-"
    if previous is not None and sample.load_s > previous.load_s:
        rps = f"{(sample.requests - previous.requests) / (sample.load_s - previous.load_s):.0f}"
    cells = " ".join(f"{sample.rss_kib.get(p, 0) / KIB:6.1f}" for p in PROCESSES)
    errors = ",".join(f"{k} {v}" for k, v in sorted(sample.errors.items())) or "-"
    print(
        f"{sample.label:<8} {sample.requests:>7} {sample.elapsed_s:>7.0f} {rps:>6} {cells} "
        f"{sample.valkey['used_memory'] / MIB:8.1f} {sample.valkey['dbsize']:>7} {errors}",
        flush=True,
    )


SAMPLE_HEADER = (
    f"{'sample':<8} {'reqs':>7} {'s':>7} {'req/s':>6} "
    + " ".join(f"{SHORT[p]:>6}" for p in PROCESSES)
    + f" {'vk used':>8} {'keys':>7} errors   (RSS and used_memory in MiB)"
)


async def ledger_check(billing: str, admin_key: str, tally: Tally) -> list[dict[str, Any]]:
    """Each tenant's billed totals (GetTenantUsage, as an operator reads them) against what
    its clients were answered."""
    rows = []
    async with grpc.aio.insecure_channel(billing, options=CHANNEL_OPTIONS) as channel:
        stub = billing_pb2_grpc.BillingServiceStub(channel)
        for tenant in TENANTS:
            usage = await stub.GetTenantUsage(
                billing_pb2.GetTenantUsageRequest(tenant=tenant),
                metadata=(("authorization", f"Bearer {admin_key}"),),
                timeout=10.0,
            )
            billed_hits = sum(m.cache_hits for m in usage.models)
            row = {
                "tenant": tenant,
                "answered_ok": tally.ok_by_tenant[tenant],
                "billed_requests": usage.requests,
                "answered_cache_hits": tally.hits_by_tenant[tenant],
                "billed_cache_hits": billed_hits,
                "answered_cost_nano": tally.cost_by_tenant[tenant],
                "billed_cost_nano": usage.cost.nano_usd,
            }
            row["holds"] = (
                row["answered_ok"] == row["billed_requests"]
                and row["answered_cache_hits"] == row["billed_cache_hits"]
                and row["answered_cost_nano"] == row["billed_cost_nano"]
            )
            rows.append(row)
    return rows


async def soak(
    args: argparse.Namespace,
    mesh: LocalMesh,
    sim: SimProcess,
    run: Run,
    began: float,
    deadline: float,
) -> None:
    """Issue keys and limits, send the load chunk by chunk with a sample after each, then
    check the ledger. Everything found goes into `run` as soon as it is known."""
    assert mesh.triton is not None and mesh.valkey is not None and mesh.valkey.pid is not None
    triton = mesh.triton
    run_id = secrets.token_hex(4)
    keys = {tenant: await issue_key_at(mesh.redis_url, tenant) for tenant in TENANTS}
    await set_limits(mesh.address("billing"), mesh.config.admin_key)
    processes = Processes(
        pids={
            **{name: [proc.pid] for name, proc in mesh.services.items()},
            "valkey": [mesh.valkey.pid],
            "simulator": find_sim_pids(sim.api_key),
            "client": [os.getpid()],
        },
        triton_pgid=triton.pgid,
    )

    def check_alive() -> None:
        for name, proc in mesh.services.items():
            if proc.poll() is not None:
                raise BenchError(
                    f"the {name} service exited with status {proc.returncode}; see"
                    f" {mesh.log_dir / name}.log"
                )
        if not triton.is_running():
            raise BenchError(f"Triton exited; see {mesh.log_dir / 'triton.log'}")
        if sim.returncode is not None:
            raise BenchError(f"the provider simulator exited with status {sim.returncode}")

    kinds = plan(args.requests, args.seed)
    tally = run.tally
    client = open_redis(mesh.redis_url, 10.0)
    clients = Clients(mesh.address("router"), keys, args.concurrency)
    try:
        await clients.ready()
        print(SAMPLE_HEADER, flush=True)
        run.samples.append(await take_sample("idle", processes, client, tally, began, 0.0))
        print_sample(run.samples[-1], None)
        if args.warmup == 0:
            run.census_start = await census(client)
        done = 0
        load_began = time.monotonic()
        for point in boundaries(args.requests, args.warmup, args.sample_every):
            remaining = deadline - time.monotonic()
            try:
                took = await asyncio.wait_for(
                    run_chunk(clients, kinds, range(done, point), args.concurrency, run_id, tally),
                    timeout=max(remaining, 0.001),
                )
            except TimeoutError:
                raise BenchError(
                    f"the soak passed its bound of {args.max_minutes:g} minutes after"
                    f" {tally.done} of {args.requests} requests (it sends about"
                    f" {tally.done / (time.monotonic() - load_began):.0f} req/s here): the mesh"
                    " is stuck or this machine is too busy; see the mesh logs, or run fewer"
                    " requests (--requests) or allow more time (--max-minutes)"
                ) from None
            run.load_s += took
            done = point
            check_alive()
            unexpected = tally.unexpected()
            if unexpected > MAX_UNEXPECTED_ERROR_RATE * tally.done:
                raise BenchError(
                    f"{unexpected} of {tally.done} requests failed unexpectedly"
                    f" ({dict(tally.statuses)}), e.g. {tally.error_samples[:2]}"
                )
            label = (
                "warm-up"
                if point == args.warmup
                else ("end" if point == args.requests else "sample")
            )
            if label == "warm-up":
                run.warmup_load_s = run.load_s
            sample = await take_sample(label, processes, client, tally, began, run.load_s)
            print_sample(sample, run.samples[-1])
            run.samples.append(sample)
            if label == "warm-up":
                run.census_start = await census(client)
        run.census_end = await census(client)
        run.ledger = await ledger_check(mesh.address("billing"), mesh.config.admin_key, tally)
    finally:
        await clients.close()
        await client.aclose()


# -- reporting ----------------------------------------------------------------------------


def start_sample(samples: Sequence[Sample]) -> Sample:
    """The first sample after the warm-up (the idle one when there was no warm-up)."""
    return next((s for s in samples if s.label == "warm-up"), samples[0])


def slope_kib_per_1k(points: Sequence[tuple[int, int]]) -> float | None:
    """Least-squares growth (KiB per 1,000 requests) through (requests, KiB) points.

    A fit rather than end minus start: a Python process's RSS moves by a few hundred KiB
    between samples as its allocator takes and returns arenas, and one unlucky end point
    would otherwise read as growth.
    """
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return sxy / sxx * 1000


def memory_summary(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Per process: RSS at start and end, and its growth per request over the run (a fit
    through every sample after the warm-up) and over the run's second half (a fit through
    the samples from the one nearest the middle on). A leak grows at the same rate
    throughout; a process settling in grows early and then stops."""
    start, end = start_sample(samples), samples[-1]
    measured = [s for s in samples if s.requests >= start.requests]
    middle = min(measured, key=lambda s: abs(s.requests - (start.requests + end.requests) / 2))
    second_half = [s for s in measured if s.requests >= middle.requests]
    rows = []
    for name in PROCESSES:
        whole = slope_kib_per_1k([(s.requests, s.rss_kib[name]) for s in measured])
        half = slope_kib_per_1k([(s.requests, s.rss_kib[name]) for s in second_half])
        rows.append(
            {
                "process": name,
                "start_mib": round(start.rss_kib[name] / KIB, 1),
                "end_mib": round(end.rss_kib[name] / KIB, 1),
                "peak_mib": round(max(s.rss_kib[name] for s in samples) / KIB, 1),
                "growth_mib": round((end.rss_kib[name] - start.rss_kib[name]) / KIB, 2),
                "kib_per_1k": None if whole is None else round(whole, 1),
                "second_half_kib_per_1k": None if half is None else round(half, 1),
                "anon_start_mib": round(start.rss_anon_kib[name] / KIB, 1),
                "anon_end_mib": round(end.rss_anon_kib[name] / KIB, 1),
                "judged": name in SERVICES,
                "flat": None if half is None else half <= FLAT_KIB_PER_1K,
            }
        )
    return rows


def valkey_summary(
    samples: Sequence[Sample],
    start_census: Mapping[str, KindCensus],
    end_census: Mapping[str, KindCensus],
    load_rps: float,
    production_rps: float,
) -> dict[str, Any]:
    """Valkey's growth per request, by key kind, and what it means for a production day."""
    start, end = start_sample(samples), samples[-1]
    measured = end.requests - start.requests
    out: dict[str, Any] = {
        "measured_requests": measured,
        "used_memory_start": start.valkey["used_memory"],
        "used_memory_end": end.valkey["used_memory"],
        "used_memory_bytes_per_request": (
            round((end.valkey["used_memory"] - start.valkey["used_memory"]) / measured, 1)
            if measured
            else None
        ),
        "used_memory_rss_end": end.valkey["used_memory_rss"],
        "dbsize_start": start.valkey["dbsize"],
        "dbsize_end": end.valkey["dbsize"],
        "keys_per_request": (
            round((end.valkey["dbsize"] - start.valkey["dbsize"]) / measured, 4)
            if measured
            else None
        ),
    }
    kinds: list[dict[str, Any]] = []
    for name in [*(n for n, _ in KEY_KINDS), OTHER]:
        a, b = start_census.get(name, KindCensus()), end_census.get(name, KindCensus())
        kinds.append(
            {
                "kind": name,
                "keys_start": a.keys,
                "keys_end": b.keys,
                "keys_per_request": round((b.keys - a.keys) / measured, 4) if measured else None,
                "bytes_start": a.bytes,
                "bytes_end": b.bytes,
                "bytes_per_request": round((b.bytes - a.bytes) / measured, 1) if measured else None,
                "bytes_per_key": round(b.bytes / b.keys, 1) if b.keys else None,
                "without_ttl_start": a.without_ttl,
                "without_ttl_end": b.without_ttl,
                "ttl_min_s": b.ttl_min_s,
                "ttl_max_s": b.ttl_max_s,
            }
        )
    out["kinds"] = kinds
    out["no_ttl_keys_added"] = sum(k["without_ttl_end"] - k["without_ttl_start"] for k in kinds)
    out["production"] = production_day(kinds, load_rps, production_rps)
    return out


def production_day(
    kinds: Sequence[Mapping[str, Any]], load_rps: float, rps: float
) -> dict[str, Any]:
    """What the keys that stay would hold at `rps` requests per second, all day, every day.

    Ledger entries live for the retention (their TTL when written, 35 days by default), so
    a day's entries pile up 35 deep; cache entries live for their TTL (an hour); the rate-limit
    windows hold the last 60 s, so they scale with the rate, not with time (measured at the
    soak's own rate `load_rps` at the end of the run, then scaled).
    """
    by = {k["kind"]: k for k in kinds}
    per_day = rps * DAY_S
    ledger, cache, windows = by["ledger entries"], by["cache entries"], by["rate-limit windows"]
    retention_s = ledger["ttl_max_s"] or 0
    retention_days = round(retention_s / DAY_S) if retention_s else None
    ledger_day = (ledger["bytes_per_request"] or 0.0) * per_day
    cache_ttl_s = cache["ttl_max_s"] or 0
    cache_steady = (cache["bytes_per_request"] or 0.0) * rps * min(cache_ttl_s, DAY_S)
    windows_steady = windows["bytes_end"] / load_rps * rps if load_rps else None
    million_day = (ledger["bytes_per_request"] or 0.0) * 1_000_000
    return {
        "ledger_gib_steady_per_million_a_day": (
            round(million_day * retention_days / 2**30, 2) if retention_days else None
        ),
        "requests_per_s": round(rps, 1),
        "requests_per_day": round(per_day),
        "ledger_retention_days": retention_days,
        "ledger_bytes_per_request": ledger["bytes_per_request"],
        "ledger_gib_per_day": round(ledger_day / 2**30, 2),
        "ledger_gib_steady": (
            round(ledger_day * retention_days / 2**30, 1) if retention_days else None
        ),
        "cache_ttl_s": cache_ttl_s,
        "cache_bytes_per_request": cache["bytes_per_request"],
        "cache_gib_steady": round(cache_steady / 2**30, 2),
        "rate_windows_mib_steady": (
            round(windows_steady / MIB, 1) if windows_steady is not None else None
        ),
    }


def _cell(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def markdown_rss(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| process | start MiB | end MiB | peak MiB | growth MiB | KiB per 1k req |"
        " 2nd half KiB per 1k req | anon start → end MiB | flat |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        flat = "(not judged)"
        if r["judged"]:
            flat = "-" if r["flat"] is None else ("yes" if r["flat"] else "**no**")
        lines.append(
            f"| {r['process']} | {r['start_mib']:.1f} | {r['end_mib']:.1f} | {r['peak_mib']:.1f}"
            f" | {r['growth_mib']:+.2f} | {_cell(r['kib_per_1k'], '+.1f')}"
            f" | {_cell(r['second_half_kib_per_1k'], '+.1f')}"
            f" | {r['anon_start_mib']:.1f} → {r['anon_end_mib']:.1f} | {flat} |"
        )
    return "\n".join(lines)


def markdown_samples(samples: Sequence[Sample]) -> str:
    """Every sample: the RSS of each process and Valkey's memory as the run went on."""
    lines = [
        "| requests | req/s | " + " | ".join(PROCESSES) + " | Valkey used_memory | Valkey keys |",
        "|---:|---:|" + "---:|" * len(PROCESSES) + "---:|---:|",
    ]
    previous: Sample | None = None
    for s in samples:
        rps = "-"
        if previous is not None and s.load_s > previous.load_s:
            rps = f"{(s.requests - previous.requests) / (s.load_s - previous.load_s):.0f}"
        cells = " | ".join(f"{s.rss_kib[p] / KIB:.1f}" for p in PROCESSES)
        lines.append(
            f"| {s.requests:,}{'' if s.label == 'sample' else f' ({s.label})'} | {rps} | {cells}"
            f" | {s.valkey['used_memory'] / MIB:.1f} | {s.valkey['dbsize']:,} |"
        )
        previous = s
    return "\n".join(lines)


def _ttl(kind: Mapping[str, Any]) -> str:
    lo, hi = kind["ttl_min_s"], kind["ttl_max_s"]
    if hi is None:
        return "none"
    return f"{lo}-{hi} s" if hi < 3 * DAY_S else f"{lo / DAY_S:.1f}-{hi / DAY_S:.1f} d"


def markdown_valkey(summary: Mapping[str, Any]) -> str:
    lines = [
        "| key kind | keys after warm-up | keys at end | keys per request | bytes per request |"
        " bytes per key | TTL at end | keys without TTL |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for k in summary["kinds"]:
        if not k["keys_start"] and not k["keys_end"]:
            continue
        lines.append(
            f"| {k['kind']} | {k['keys_start']:,} | {k['keys_end']:,}"
            f" | {_cell(k['keys_per_request'], '.4f')} | {_cell(k['bytes_per_request'], '.1f')}"
            f" | {_cell(k['bytes_per_key'], '.0f')} | {_ttl(k)} | {k['without_ttl_end']} |"
        )
    lines.append(
        f"| **all (INFO used_memory, DBSIZE)** | {summary['dbsize_start']:,}"
        f" | {summary['dbsize_end']:,} | {_cell(summary['keys_per_request'], '.4f')}"
        f" | {_cell(summary['used_memory_bytes_per_request'], '.1f')} | | | |"
    )
    return "\n".join(lines)


def markdown_ledger(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| tenant | OK answers | billed requests | cache hits answered / billed |"
        " answered cost (nano-USD) | billed cost (nano-USD) | equal |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tenant']} | {r['answered_ok']:,} | {r['billed_requests']:,}"
            f" | {r['answered_cache_hits']:,} / {r['billed_cache_hits']:,}"
            f" | {r['answered_cost_nano']:,} | {r['billed_cost_nano']:,}"
            f" | {'yes' if r['holds'] else '**no**'} |"
        )
    return "\n".join(lines)


def markdown_kinds(tally: Tally) -> str:
    lines = [
        "| kind | per mille | OK | errors by status | p50 ms | p99 ms |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for kind in KINDS:
        statuses = tally.by_kind.get(kind.name, Counter())
        errors = ", ".join(f"{s} {c}" for s, c in sorted(statuses.items()) if s != "OK") or "-"
        lat = sorted(tally.latencies_s.get(kind.name, ()))
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        lines.append(
            f"| {kind.name} | {kind.per_mille} | {statuses['OK']:,} | {errors}"
            f" | {_cell(None if p50 is None else p50 * 1000, '.1f')}"
            f" | {_cell(None if p99 is None else p99 * 1000, '.1f')} |"
        )
    return "\n".join(lines)


def judge(
    rss: Sequence[Mapping[str, Any]],
    valkey: Mapping[str, Any] | None,
    ledger: Sequence[Mapping[str, Any]],
    tally: Tally,
) -> tuple[bool | None, list[str]]:
    """The VERDICT: None when there is nothing to judge."""
    if not rss or valkey is None or not ledger:
        return None, ["VERDICT: not judged: the run could not measure everything."]
    growing = [r["process"] for r in rss if r["judged"] and not r["flat"]]
    ledger_ok = all(r["holds"] for r in ledger)
    unexpected = tally.unexpected()
    no_ttl = valkey["no_ttl_keys_added"]
    # A new UTC day during the run adds each tenant's day aggregate; nothing else may stay.
    valkey_ok = no_ttl <= len(TENANTS)
    lines = [
        f"ledger = answers for every tenant (requests, cache hits, cost): "
        f"{'yes' if ledger_ok else 'NO'}",
        f"unexpected answers (not OK, or not INVALID_ARGUMENT for an invalid request): "
        f"{unexpected}",
        "services' RSS flat (2nd half <= "
        f"{FLAT_KIB_PER_1K:g} KiB per 1k requests): "
        + ("yes" if not growing else "NO: " + ", ".join(growing)),
        f"Valkey keys without a TTL added during the run: {no_ttl}",
    ]
    holds = ledger_ok and unexpected == 0 and not growing and valkey_ok
    lines.append(f"VERDICT: {'HOLDS' if holds else 'NOT MET'}.")
    return holds, lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="A soak through the whole local mesh: RSS per service and Valkey memory "
        "per request over tens of thousands of requests of a realistic mix.",
    )
    parser.add_argument("--requests", type=int, default=50_000, help="requests in all (50000)")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients (32)")
    parser.add_argument(
        "--warmup", type=int, default=2000, help="requests before the start sample (2000)"
    )
    parser.add_argument(
        "--sample-every", type=int, default=5000, help="requests between samples (5000)"
    )
    parser.add_argument("--seed", type=int, default=9, help="the mix's shuffle (9)")
    parser.add_argument(
        "--max-minutes", type=float, default=20.0, help="fail past this, mesh start included (20)"
    )
    parser.add_argument(
        "--production-rps",
        type=float,
        default=None,
        help="requests/s of the production day projected (default: this run's throughput)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="the mesh's files and logs, emptied first (default: <output dir>/soak-mesh)",
    )
    parser.add_argument(
        "--require-target", action="store_true", help="exit with status 2 when a target is missed"
    )
    args = parser.parse_args(argv)
    if min(args.requests, args.concurrency, args.sample_every) < 1 or args.warmup < 0:
        parser.error("--requests, --concurrency and --sample-every must be at least 1")
    if args.warmup >= args.requests:
        parser.error("--warmup must be below --requests")
    if args.max_minutes <= 0:
        parser.error("--max-minutes must be positive")
    return args


def report_tables(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """Every derived figure of a run, and its markdown; empty when it has no samples."""
    if len(run.samples) < 2:
        return {}
    start = start_sample(run.samples)
    measured = run.samples[-1].requests - start.requests
    measured_load_s = run.load_s - run.warmup_load_s
    load_rps = measured / measured_load_s if measured_load_s > 0 else 0.0
    rss = memory_summary(run.samples)
    valkey = None
    if run.census_end:
        valkey = valkey_summary(
            run.samples, run.census_start, run.census_end, load_rps, args.production_rps or load_rps
        )
    return {
        "measured_requests": measured,
        "measured_load_s": round(measured_load_s, 1),
        "throughput_rps": round(load_rps, 1),
        "rss": rss,
        "valkey": valkey,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    output: Path = args.output.resolve()
    run_dir: Path = (args.run_dir or output.parent / "soak-mesh").resolve()
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    began = time.monotonic()
    deadline = began + args.max_minutes * 60.0
    prepare_run_dir(run_dir, "soak")

    run = Run()
    failure = ""
    try:
        with mesh_with_simulator(run_dir, SIM_LATENCY_MS, {}) as (mesh, sim):
            asyncio.run(soak(args, mesh, sim, run, began, deadline))
    except (RuntimeError, TritonStartError) as error:  # BenchError, MeshStartError, the sim's
        failure = str(error)
        print(f"FAILED: {error}", file=sys.stderr, flush=True)

    derived = report_tables(run, args)
    tally = run.tally
    holds, lines = judge(derived.get("rss", []), derived.get("valkey"), run.ledger, tally)
    markdown = {"kinds": markdown_kinds(tally)}
    if derived:
        markdown["samples"] = markdown_samples(run.samples)
        markdown["rss"] = markdown_rss(derived["rss"])
    if derived.get("valkey"):
        markdown["valkey"] = markdown_valkey(derived["valkey"])
    if run.ledger:
        markdown["ledger"] = markdown_ledger(run.ledger)
    print(
        f"\n{tally.done:,} requests, {tally.ok:,} OK, {tally.cache_hits:,} cache hits,"
        f" errors {dict(tally.statuses) or 'none'}"
    )
    if derived:
        print(
            f"after the warm-up: {derived['measured_requests']:,} requests in"
            f" {derived['measured_load_s']:.0f} s of load, {derived['throughput_rps']:.0f} req/s"
        )
    titles = {
        "kinds": "Requests by kind",
        "samples": "Samples (RSS and used_memory in MiB)",
        "rss": "RSS per process (start = after the warm-up)",
        "valkey": "Valkey memory by key kind (per request after the warm-up)",
        "ledger": "Ledger against answers",
    }
    for key, title in titles.items():
        if key in markdown:
            print(f"\n{title}\n{markdown[key]}")
    if derived.get("valkey"):
        day = derived["valkey"]["production"]
        print(
            f"\nA production day at {day['requests_per_s']:g} req/s"
            f" ({day['requests_per_day']:,} requests): ledger {day['ledger_gib_per_day']} GiB a"
            f" day, {day['ledger_gib_steady']} GiB held over {day['ledger_retention_days']} days"
            f" of retention; cache {day['cache_gib_steady']} GiB held (TTL"
            f" {day['cache_ttl_s']} s); rate-limit windows {day['rate_windows_mib_steady']} MiB."
            f" Per million requests a day the ledger holds"
            f" {day['ledger_gib_steady_per_million_a_day']} GiB."
        )
    print()
    for line in lines:
        print(line)

    report = {
        "benchmark": "bench.soak",
        "started_at": started.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - began, 1),
        "git": _git("describe", "--always", "--dirty"),
        "git_head": _git("rev-parse", "--short", "HEAD"),
        "command": " ".join(["python -m bench.soak", *(argv or sys.argv[1:])]),
        "machine": machine(load_before),
        "config": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "warmup": args.warmup,
            "sample_every": args.sample_every,
            "seed": args.seed,
            "max_minutes": args.max_minutes,
            "tenants": list(TENANTS),
            "limited_tenants": list(LIMITED_TENANTS),
            "mix_per_mille": {k.name: k.per_mille for k in KINDS},
            "models": {k.name: list(k.models) for k in KINDS},
            "sim_latency_ms": SIM_LATENCY_MS,
            "flat_kib_per_1k": FLAT_KIB_PER_1K,
        },
        "samples": [asdict(s) for s in run.samples],
        "census_start": {k: asdict(v) for k, v in run.census_start.items()},
        "census_end": {k: asdict(v) for k, v in run.census_end.items()},
        **derived,
        "ledger": run.ledger,
        "requests": {
            "done": tally.done,
            "ok": tally.ok,
            "cache_hits": tally.cache_hits,
            "errors": dict(tally.statuses),
            "by_kind": {k: dict(v) for k, v in tally.by_kind.items()},
            "unexpected": tally.unexpected(),
            "error_samples": tally.error_samples,
        },
        "judged": {"holds": holds, "lines": lines},
        "markdown": markdown,
        "failure": failure,
    }
    return write_report(
        report,
        output,
        f"mesh logs in {run_dir / 'logs'}",
        failed=bool(failure),
        require=args.require_target,
        holds=bool(holds),
    )


if __name__ == "__main__":
    run_main(main, (BenchError,))
