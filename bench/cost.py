"""Cost truth under load: how full tiny_lm's batches are and how busy its pool is, at several
concurrency levels, next to the throughput; and what measuring GPU time costs per batch.

Why this exists: the seeds' case for a scheduler is that GPUs without one sit "60-70 %"
wasted. Shepherd now measures that itself (issue 16): every Triton execution's time is
attributed to the requests in it, and the schedulers report each pool's busy time, capacity
(wall time times GPUs), executions and rows per hour to billing. This benchmark drives that
path and reads the pool report back as an operator would, so the figures are the product's own:

a. One real Triton node serving tiny_lm (the shipped repository), a Valkey, the real billing
   service and the real scheduler, started here on free 127.0.0.1 ports. The catalog is the
   shipped one cut down to shepherd-tiny's Triton deployment with its shipped batching (max
   batch 32, 5 ms, preferred 8/16/32), pool reports every 0.25 s.
b. Per concurrency level (1, 8, 32, 64 by default), a closed loop of `SchedulerService/Infer`
   (bench/batching.py's `closed_loop`: N workers, each sending its next request when the last
   one answered), between two pool reports observed in `AdminService/GetPoolReport`: the
   throughput and latency, the mean batch the answers saw, and from the report the batch fill
   (rows per execution over the max batch size) and the utilisation (GPU time attributed over
   wall time times GPUs) of that window, next to Triton's own compute time over the same wall
   time (they should agree: the utilisation is Triton's statistics, attributed).
c. What the truth costs: the answer of a batch waits for one statistics read from its node.
   READS reads of tiny_lm's statistics, one after the other, from this process: the latency of
   one, and the CPU it costs the caller (the scheduler's side) and Triton.

It is a benchmark, not a test: it exits 1 only when it cannot measure (a process does not
start or dies, more than 1 % of a level's requests fail). `make bench-cost` runs it; the
table goes to stdout and everything to .build/bench/cost.json. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import tritonclient.grpc.aio as triton
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shepherd.billing.v1 import admin_pb2, admin_pb2_grpc
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from bench.batching import (
    BENCH_CREDENTIALS,
    CHANNEL_OPTIONS,
    MAX_ERROR_RATE,
    MODES,
    TRITON_MODEL,
    BenchError,
    SchedulerProcess,
    _git_describe,
    _levels,
    bench_catalog,
    closed_loop,
    machine,
    percentile,
    process_cpu_s,
    run_main,
    write_report,
)
from deploy.local.ports import LOCALHOST, free_port
from deploy.local.processes import spawn, stop, tail
from deploy.local.triton import (
    TritonNode,
    TritonNodeConfig,
    TritonStartError,
    process_group_members,
)
from deploy.local.valkey import ValkeyConfig, ValkeyServer
from libs.config import DEFAULT_CATALOG, REPO_ROOT
from libs.peers import PeerChannel

ADMIN_KEY = "bench-admin-" + os.urandom(8).hex()
REPORT_INTERVAL_S = 0.25
READS = 2000
DEFAULT_OUTPUT = REPO_ROOT / ".build" / "bench" / "cost.json"
POOL = "local"


@dataclass(frozen=True)
class Level:
    """One row of the table."""

    concurrency: int
    requests: int
    errors: int
    throughput_rps: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    mean_batch: float | None
    executions: int
    batch_fill: float
    utilisation: float
    triton_compute_over_wall: float
    window_s: float
    statistics_reads_per_batch: float


class BillingProcess:
    """`python -m services.billing` on a free port, for the pool report."""

    def __init__(self, catalog: Path, redis_url: str, log_path: Path) -> None:
        self.address = f"{LOCALHOST}:{free_port()}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "SHEPHERD_HOST": LOCALHOST,
            "SHEPHERD_BILLING_PORT": self.address.rsplit(":", 1)[1],
            "SHEPHERD_CATALOG": str(catalog),
            "REDIS_URL": redis_url,
            "SHEPHERD_INTERNAL_TOKEN": BENCH_CREDENTIALS.internal_tokens[0],
            "SHEPHERD_ADMIN_KEYS": ADMIN_KEY,
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, timeout_s: float = 60.0) -> None:
        self.proc = spawn(
            [sys.executable, "-m", "services.billing"], env=self.env, log_path=self.log_path
        )
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise BenchError("billing exited:\n" + tail(self.log_path, 30))
                try:
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError("billing never became ready:\n" + tail(self.log_path, 30))
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


class ReportingScheduler(SchedulerProcess):
    """bench.batching's scheduler, reporting its pool to billing every REPORT_INTERVAL_S."""

    def __init__(self, billing: str, *args: Any) -> None:
        super().__init__(*args)
        self.billing = billing

    def env(self) -> dict[str, str]:
        return {
            **super().env(),
            "SHEPHERD_BILLING_ADDR": self.billing,
            "SHEPHERD_SCHEDULER_POOL_USAGE_INTERVAL_S": str(REPORT_INTERVAL_S),
        }


class PoolReport:
    """AdminService/GetPoolReport for the pool, as an operator reads it."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = admin_pb2_grpc.AdminServiceStub(channel)

    async def read(self) -> admin_pb2.PoolUsage:
        today = datetime.datetime.now(datetime.UTC).date()
        response = await self._stub.GetPoolReport(
            admin_pb2.GetPoolReportRequest(
                pool=POOL,
                start_day=(today - datetime.timedelta(days=1)).isoformat(),
                end_day=today.isoformat(),
            ),
            metadata=(("authorization", f"Bearer {ADMIN_KEY}"),),
            timeout=5,
        )
        return response.pools[0]

    async def next(self) -> tuple[float, admin_pb2.PoolUsage]:
        """The moment the scheduler's next report lands, and the figures then."""
        first = await self.read()
        deadline = time.monotonic() + 30
        while (now := await self.read()).wall_us == first.wall_us:
            if time.monotonic() > deadline:
                raise BenchError("the scheduler stopped reporting its pool")
            await asyncio.sleep(0.01)
        return time.monotonic(), now

    async def settled(self, *, latest: bool) -> tuple[float, admin_pb2.PoolUsage]:
        """A report once the busy time has stopped growing (every execution is in): the
        first report that shows the final figure, or (`latest`) the one that confirmed it,
        just now, so that a window starting there starts now."""
        at, figures = await self.next()
        while True:
            later_at, later = await self.next()
            if later.busy_gpu_us == figures.busy_gpu_us:
                return (later_at, later) if latest else (at, figures)
            at, figures = later_at, later


async def metering(address: str) -> tuple[int, int]:
    """The scheduler's (statistics reads, batches measured) over its nodes (GetStats)."""
    async with PeerChannel(
        grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS), BENCH_CREDENTIALS
    ) as channel:
        stats = await scheduler_pb2_grpc.SchedulerServiceStub(channel).GetStats(
            scheduler_pb2.GetStatsRequest(), timeout=5
        )
    return (
        sum(node.statistics_reads for node in stats.nodes),
        sum(node.metered_batches for node in stats.nodes),
    )


async def triton_compute_ns(client: triton.InferenceServerClient) -> int:
    """tiny_lm's compute time as Triton reports it: input, infer and output of every
    execution (per batch size)."""
    stats = await client.get_inference_statistics(TRITON_MODEL)
    return sum(
        size.compute_input.ns + size.compute_infer.ns + size.compute_output.ns
        for entry in stats.model_stats
        for size in entry.batch_stats
    )


async def measure_level(
    concurrency: int,
    requests: int,
    warmup: int,
    scheduler: SchedulerProcess,
    report: PoolReport,
    client: triton.InferenceServerClient,
    max_batch: int,
) -> Level:
    tag = f"cost-{os.urandom(4).hex()}-c{concurrency}"
    await closed_loop(scheduler.address, concurrency, warmup, tag + "-w")
    started, before = await report.settled(latest=True)
    compute_before = await triton_compute_ns(client)
    metered_before = await metering(scheduler.address)
    load = await closed_loop(scheduler.address, concurrency, requests, tag)
    scheduler.check_alive()
    ended, after = await report.settled(latest=False)
    compute = await triton_compute_ns(client) - compute_before
    metered = await metering(scheduler.address)
    reads, metered_batches = (metered[0] - metered_before[0], metered[1] - metered_before[1])
    window = ended - started
    busy = after.busy_gpu_us - before.busy_gpu_us
    capacity = after.capacity_gpu_us - before.capacity_gpu_us
    executions = after.executions - before.executions
    rows = after.rows - before.rows
    latencies = sorted(load.latencies_s)
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    return Level(
        concurrency=concurrency,
        requests=load.requests,
        errors=load.errors,
        throughput_rps=round(load.ok / load.duration_s, 1) if load.duration_s else 0.0,
        latency_p50_ms=round(p50 * 1000, 2) if p50 is not None else None,
        latency_p99_ms=round(p99 * 1000, 2) if p99 is not None else None,
        mean_batch=round(statistics.fmean(load.batch_sizes), 2) if load.batch_sizes else None,
        executions=executions,
        batch_fill=round(rows / (executions * max_batch), 4) if executions else 0.0,
        utilisation=round(busy / capacity, 4) if capacity else 0.0,
        triton_compute_over_wall=round(compute / 1000 / (window * 1e6), 4) if window else 0.0,
        window_s=round(window, 2),
        statistics_reads_per_batch=round(reads / metered_batches, 2) if metered_batches else 0.0,
    )


async def read_cost(node: TritonNode, reads: int) -> dict[str, float]:
    """One statistics read of tiny_lm: latency, and CPU for the caller and for Triton."""
    triton_pids = process_group_members(node.pgid) if node.pgid is not None else []
    async with triton.InferenceServerClient(node.config.grpc_url) as client:
        for _ in range(50):
            await client.get_inference_statistics(TRITON_MODEL)
        times, triton_cpu = os.times(), process_cpu_s(triton_pids)
        began = time.perf_counter()
        latencies = []
        for _ in range(reads):
            one = time.perf_counter()
            await client.get_inference_statistics(TRITON_MODEL)
            latencies.append(time.perf_counter() - one)
        wall = time.perf_counter() - began
        after = os.times()
    caller = (after.user + after.system) - (times.user + times.system)
    latencies.sort()
    return {
        "reads": reads,
        "latency_p50_ms": round((percentile(latencies, 0.5) or 0) * 1000, 3),
        "latency_p99_ms": round((percentile(latencies, 0.99) or 0) * 1000, 3),
        "caller_cpu_ms_per_read": round(caller / reads * 1000, 3),
        "triton_cpu_ms_per_read": round(
            (process_cpu_s(triton_pids) - triton_cpu) / reads * 1000, 3
        ),
        "reads_per_s": round(reads / wall, 1),
    }


HEADER = (
    "| conc | requests | errors | req/s | p50 ms | p99 ms | mean batch | executions "
    "| batch fill | utilisation | Triton compute / wall | window s | reads / batch |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def row(level: Level) -> str:
    def show(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    return (
        f"| {level.concurrency} | {level.requests} | {level.errors} | {level.throughput_rps:.1f}"
        f" | {show(level.latency_p50_ms, '.2f')} | {show(level.latency_p99_ms, '.2f')}"
        f" | {show(level.mean_batch, '.2f')} | {level.executions} | {level.batch_fill:.1%}"
        f" | {level.utilisation:.1%} | {level.triton_compute_over_wall:.1%}"
        f" | {level.window_s:.2f} | {level.statistics_reads_per_batch:.2f} |"
    )


async def run(args: argparse.Namespace, work: Path, log_dir: Path) -> dict[str, Any]:
    base = yaml.safe_load(DEFAULT_CATALOG.read_text())
    catalog = bench_catalog(base, MODES["batched"])
    max_batch = int(catalog["models"]["shepherd-tiny"]["batching"]["max_batch_size"])
    catalog_path = work / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    valkey = ValkeyServer(ValkeyConfig(port=free_port(), data_dir=work / "valkey"))
    node = TritonNode(
        TritonNodeConfig.with_free_ports(
            work_dir=work / "triton",
            model_control_mode="explicit",
            load_models=(TRITON_MODEL,),
            log_file=log_dir / "triton-cost.log",
        )
    )
    billing: BillingProcess | None = None
    scheduler: SchedulerProcess | None = None
    try:
        valkey.start()
        node.start()
        node.wait_ready(180.0)
        billing = BillingProcess(catalog_path, valkey.config.url, log_dir / "billing-cost.log")
        await billing.start()
        scheduler = ReportingScheduler(
            billing.address,
            "cost",
            catalog_path,
            node.config.grpc_url,
            log_dir / "scheduler-cost.log",
        ).start()
        await scheduler.wait_serving(60.0)
        print(f"triton {node.config.grpc_url}, billing {billing.address}, scheduler "
              f"{scheduler.address}", flush=True)  # fmt: skip
        levels = []
        print(HEADER, flush=True)
        async with (
            grpc.aio.insecure_channel(billing.address, options=CHANNEL_OPTIONS) as channel,
            triton.InferenceServerClient(node.config.grpc_url) as client,
        ):
            report = PoolReport(channel)
            for concurrency in args.concurrency:
                requests = args.requests_c1 if concurrency == 1 else args.requests
                level = await measure_level(
                    concurrency,
                    requests,
                    max(args.warmup, 2 * concurrency),
                    scheduler,
                    report,
                    client,
                    max_batch,
                )
                levels.append(level)
                print(row(level), flush=True)
                if level.errors > MAX_ERROR_RATE * level.requests:
                    raise BenchError(f"{level.errors} of {level.requests} requests failed")
        cost = await read_cost(node, args.reads)
        print(
            f"\nOne statistics read of {TRITON_MODEL} ({cost['reads']} in a row): latency p50"
            f" {cost['latency_p50_ms']} ms, p99 {cost['latency_p99_ms']} ms; CPU"
            f" {cost['caller_cpu_ms_per_read']} ms for the caller,"
            f" {cost['triton_cpu_ms_per_read']} ms for Triton",
            flush=True,
        )
        return {"levels": [asdict(level) for level in levels], "statistics_read": cost}
    finally:
        if scheduler is not None:
            scheduler.stop()
        if billing is not None:
            billing.stop()
        node.stop()
        valkey.stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cost",
        description="Batch fill and utilisation of tiny_lm's pool at several concurrency "
        "levels, from Shepherd's own pool report, next to throughput; and the cost of the "
        "statistics read that measures each batch's GPU time.",
    )
    parser.add_argument("--concurrency", type=_levels, default=(1, 8, 32, 64))
    parser.add_argument("--requests", type=int, default=4000, help="per level above 1 (4000)")
    parser.add_argument("--requests-c1", type=int, default=400, help="at concurrency 1 (400)")
    parser.add_argument("--warmup", type=int, default=32, help="warm-up requests per level")
    parser.add_argument("--reads", type=int, default=READS, help=f"statistics reads ({READS})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results")
    args = parser.parse_args(argv)
    if min(args.requests, args.requests_c1, args.reads) < 1 or args.warmup < 0:
        parser.error("request and read counts must be at least 1, --warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    output: Path = args.output.resolve()
    log_dir = output.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shepherd-bench-cost-") as tmp:
        results = asyncio.run(run(args, Path(tmp), log_dir))
    report = {
        "benchmark": "bench.cost",
        "command": "python -m bench.cost " + " ".join(sys.argv[1:]),
        "started_at": started.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - began, 1),
        "git": _git_describe(),
        "machine": machine(load_before),
        "config": {
            "model": "shepherd-tiny",
            "triton_model": TRITON_MODEL,
            "batching": MODES["batched"],
            "report_interval_s": REPORT_INTERVAL_S,
            "concurrency": list(args.concurrency),
            "requests": args.requests,
            "requests_c1": args.requests_c1,
        },
        **results,
    }
    return write_report(
        report, output, f"logs in {log_dir}", failed=False, require=False, holds=True
    )


if __name__ == "__main__":
    run_main(main, (BenchError, TritonStartError, json.JSONDecodeError))
