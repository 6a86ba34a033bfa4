"""Dynamic batching against one-at-a-time dispatch, measured through the real scheduler.

Why this exists: Shepherd's case for its own per-model queues is that batching requests
before they reach Triton buys throughput without costing tail latency. This benchmark checks
that claim end to end on the local stack instead of asserting it. It starts one real Triton
node serving `tiny_lm`, then, for each mode, a real `python -m services.scheduler` process
whose catalog differs only in `shepherd-tiny`'s batching settings:

* batched: `{max_batch_size: 32, max_queue_delay_ms: 5, preferred_batch_sizes: [8, 16, 32]}`
* one-at-a-time: `{max_batch_size: 1, max_queue_delay_ms: 0, preferred_batch_sizes: []}`

A closed-loop grpc.aio client calls `SchedulerService/Infer` at several concurrency levels,
records each request's latency and the batch size it ran in (`completion.placement`), and
prints throughput, p50/p99 latency and the mean batch size per mode and level, then the
batched/one-at-a-time ratios and whether the target holds: at least 4x the throughput at an
equal or better p99, judged at concurrency 32 and 64. The same figures go to a JSON file.
Two more columns keep the figures honest on a small shared machine: the rows per execution
Triton itself reports (so batching done inside Triton cannot pass unnoticed) and the cores the
client, the scheduler and Triton each kept busy (so a saturated machine shows as such).

It is a benchmark, not a test: `make bench` runs it, and it fails (exit 1) only when a mode
cannot run or more than 1% of a level's requests fail. A missed target is reported, not
failed, unless --require-target is given (exit 2). Only 127.0.0.1 is ever contacted: the
derived catalogs keep only shepherd-tiny's Triton deployments and no hosted provider.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import itertools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shepherd.common.v1 import common_pb2
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from deploy.local.ports import LOCALHOST, free_port
from deploy.local.processes import spawn, stop, tail
from deploy.local.triton import (
    TritonNode,
    TritonNodeConfig,
    TritonStartError,
    process_group_members,
)
from libs.config import DEFAULT_CATALOG, REPO_ROOT
from libs.credentials import Credentials
from libs.peers import PeerChannel

MODEL = "shepherd-tiny"
TRITON_MODEL = "tiny_lm"
BATCHED = "batched"
ONE_AT_A_TIME = "one-at-a-time"
MODES: Mapping[str, Mapping[str, Any]] = {
    BATCHED: {"max_batch_size": 32, "max_queue_delay_ms": 5, "preferred_batch_sizes": [8, 16, 32]},
    ONE_AT_A_TIME: {"max_batch_size": 1, "max_queue_delay_ms": 0, "preferred_batch_sizes": []},
}
TARGET_THROUGHPUT_RATIO = 4.0
JUDGED_LEVELS = (32, 64)
MAX_ERROR_RATE = 0.01
CALL_TIMEOUT_S = 30.0
WORKERS_PER_CHANNEL = 16
# The scheduler accepts only calls carrying the service token; the bench calls as the router.
BENCH_CREDENTIALS = Credentials(internal_tokens=("bench-" + uuid.uuid4().hex,))
MAX_TOKENS = 16
TRITON_READY_TIMEOUT_S = 180.0
SCHEDULER_READY_TIMEOUT_S = 60.0
DEFAULT_OUTPUT = REPO_ROOT / ".build" / "bench" / "batching.json"
ERROR_SAMPLES = 5
# Loopback only: never let an http_proxy/grpc_proxy setting route the client's calls elsewhere.
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)

# Short prompts of similar length: tiny_lm pads every row of a batch to its longest prompt, so
# wildly different lengths would make batch cost depend on luck rather than on batch size.
_VERBS = ("Summarise", "Explain", "Describe", "Define", "Compare", "Outline", "Name", "List")
_TOPICS = (
    "tides",
    "a compiler",
    "photosynthesis",
    "the water cycle",
    "gravity",
    "a hash map",
    "inflation",
    "volcanoes",
    "a B-tree",
    "jazz",
    "the moon",
    "recursion",
    "a gRPC stream",
)


class BenchError(RuntimeError):
    """A mode could not be measured; the message says why and shows the relevant log."""


@dataclass
class LoadResult:
    """What one closed-loop run observed."""

    requests: int
    ok: int
    errors: int
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    error_codes: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LevelStats:
    """One row of the results table."""

    mode: str
    concurrency: int
    requests: int
    ok: int
    errors: int
    error_rate: float
    error_codes: dict[str, int]
    error_samples: list[str]
    warmup_requests: int
    warmup_errors: int
    duration_s: float
    throughput_rps: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_mean_ms: float | None
    latency_max_ms: float | None
    mean_batch_size: float | None
    batch_size_histogram: dict[str, int]
    triton_rows_per_exec: float | None
    triton_calls_per_exec: float | None
    cpu_cores: dict[str, float]


@dataclass(frozen=True)
class Comparison:
    """Batched against one-at-a-time at one concurrency level."""

    concurrency: int
    throughput_ratio: float | None
    p99_ratio: float | None
    judged: bool
    holds: bool | None


def prompt(n: int, *, unique: bool = False) -> str:
    """A varied short user prompt for the n-th request; `unique` makes every n distinct."""
    verb = _VERBS[n % len(_VERBS)]
    topic = _TOPICS[(n // len(_VERBS)) % len(_TOPICS)]
    return (
        f"{verb} {topic} in one line (#{n:07d})."
        if unique
        else (f"{verb} {topic} in one line (#{n % 1000:03d}).")
    )


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) with linear interpolation, as numpy's default; None when empty."""
    if not sorted_values:
        return None
    rank = (len(sorted_values) - 1) * q
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


# -- catalogs ---------------------------------------------------------------------------------


def env_name(name: str) -> str:
    """The catalog's rule for a pool name inside SHEPHERD_POOL_<NAME>_NODES."""
    return "".join(ch if ch.isalnum() else "_" for ch in name).upper()


def bench_catalog(base: Mapping[str, Any], batching: Mapping[str, Any]) -> dict[str, Any]:
    """The base catalog cut down to shepherd-tiny's Triton deployments, with `batching` set.

    Other models and every hosted deployment are dropped, so no provider (and no API key, and
    no address off this machine) is needed; only the pools those deployments use are kept.
    Every other top-level section (defaults, tenants, ...) is kept as it is, so both modes
    differ in nothing but the batching settings.
    """
    models = base.get("models") or {}
    if MODEL not in models:
        raise BenchError(f"the catalog has no model {MODEL!r}; models: {', '.join(models)}")
    model = copy.deepcopy(dict(models[MODEL]))
    deployments = [d for d in model.get("deployments") or () if d.get("kind") == "triton"]
    if not deployments:
        raise BenchError(f"{MODEL!r} has no Triton deployment in the catalog")
    model["deployments"] = deployments
    model["batching"] = copy.deepcopy(dict(batching))
    # The hosted model its tokens are compared with in cost reports is not kept here.
    model.pop("hosted_equivalent", None)
    wanted_pools = {str(d.get("pool", "")) for d in deployments}
    pools = {k: copy.deepcopy(v) for k, v in (base.get("pools") or {}).items() if k in wanted_pools}
    missing = wanted_pools - set(pools)
    if missing:
        raise BenchError(f"{MODEL!r} uses pools missing from the catalog: {sorted(missing)}")
    catalog = {
        key: copy.deepcopy(value)
        for key, value in base.items()
        if key not in {"models", "pools", "providers"}
    }
    catalog["pools"] = pools
    catalog["providers"] = {}
    catalog["models"] = {MODEL: model}
    return catalog


def write_catalogs(base_path: Path, out_dir: Path, modes: Sequence[str]) -> dict[str, Path]:
    """One catalog file per mode, derived from the base catalog."""
    try:
        base = yaml.safe_load(base_path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise BenchError(f"cannot read the base catalog {base_path}: {error}") from None
    if not isinstance(base, dict):
        raise BenchError(f"{base_path} is not a YAML mapping")
    paths = {}
    for mode in modes:
        path = out_dir / f"catalog-{mode}.yaml"
        path.write_text(
            f"# Derived from {base_path} by bench.batching for the {mode} mode.\n"
            + yaml.safe_dump(bench_catalog(base, MODES[mode]), sort_keys=False)
        )
        paths[mode] = path
    return paths


def catalog_pools(path: Path) -> list[str]:
    return list((yaml.safe_load(path.read_text()) or {}).get("pools") or {})


# -- processes --------------------------------------------------------------------------------


class SchedulerProcess:
    """One `python -m services.scheduler` on a free loopback port."""

    def __init__(self, mode: str, catalog: Path, triton_grpc: str, log_path: Path) -> None:
        self.mode = mode
        self.catalog = catalog
        self.triton_grpc = triton_grpc
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def pid(self) -> int:
        """The scheduler's pid (setpriv execs it, so it is the spawned process itself)."""
        if self.proc is None:
            raise BenchError(f"the {self.mode} scheduler is not running")
        return self.proc.pid

    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "SHEPHERD_HOST": LOCALHOST,
            "SHEPHERD_SCHEDULER_PORT": str(self.port),
            "SHEPHERD_CATALOG": str(self.catalog),
            "SHEPHERD_INTERNAL_TOKEN": BENCH_CREDENTIALS.internal_tokens[0],
            # No trace export: it would cost CPU the measured processes need, and leave 127.0.0.1.
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",
            # No /metrics port: two schedulers run at once here, beside anything else.
            "SHEPHERD_SCHEDULER_METRICS_PORT": "0",
        }
        for pool in catalog_pools(self.catalog):
            env[f"SHEPHERD_POOL_{env_name(pool)}_NODES"] = self.triton_grpc
            env.pop(f"SHEPHERD_POOL_{env_name(pool)}_DNS", None)
        return env

    def start(self) -> SchedulerProcess:
        self.port = free_port()
        self.proc = spawn(
            [sys.executable, "-m", "services.scheduler"], env=self.env(), log_path=self.log_path
        )
        return self

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(
                f"the {self.mode} scheduler exited with status {self.proc.returncode}; "
                f"last lines of {self.log_path}:\n{tail(self.log_path, 30)}"
            )

    async def wait_serving(self, timeout_s: float) -> float:
        """Wait until grpc.health.v1 reports SERVING; returns the seconds waited."""
        began = time.monotonic()
        async with grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self.check_alive()
                try:
                    response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - began
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() - began > timeout_s:
                    raise BenchError(
                        f"the {self.mode} scheduler did not report SERVING on {self.address} "
                        f"within {timeout_s:.0f}s; last lines of {self.log_path}:\n"
                        + tail(self.log_path, 30)
                    )
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


# -- load -------------------------------------------------------------------------------------


def infer_request(request_id: str, n: int) -> scheduler_pb2.InferRequest:
    return scheduler_pb2.InferRequest(
        request_id=request_id,
        tenant="bench",
        model=MODEL,
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt(n))],
        params=common_pb2.GenerationParams(max_tokens=MAX_TOKENS, temperature=0),
        priority=common_pb2.PRIORITY_NORMAL,
    )


async def closed_loop(address: str, concurrency: int, total: int, tag: str) -> LoadResult:
    """`concurrency` workers, each sending its next request as soon as the last one answered,
    until `total` requests have been sent. One channel per WORKERS_PER_CHANNEL workers."""
    channel_count = max(1, math.ceil(concurrency / WORKERS_PER_CHANNEL))
    channels = [
        PeerChannel(grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS), BENCH_CREDENTIALS)
        for _ in range(channel_count)
    ]
    result = LoadResult(requests=total, ok=0, errors=0, duration_s=0.0)
    tickets = itertools.count()
    try:
        await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), 10.0) for ch in channels))
        stubs = [scheduler_pb2_grpc.SchedulerServiceStub(ch) for ch in channels]

        async def worker(index: int) -> None:
            stub = stubs[index % len(stubs)]
            while (n := next(tickets)) < total:
                request = infer_request(f"{tag}-{n}", n)
                began = time.perf_counter()
                try:
                    response = await stub.Infer(request, timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as error:
                    result.errors += 1
                    result.error_codes[error.code().name] += 1
                    if len(result.error_samples) < ERROR_SAMPLES:
                        result.error_samples.append(f"{error.code().name}: {error.details()}")
                    continue
                result.latencies_s.append(time.perf_counter() - began)
                result.batch_sizes.append(response.completion.placement.batch_size)
                result.ok += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        result.duration_s = time.perf_counter() - began
    finally:
        for channel in channels:
            await channel.close()
    return result


TRITON_COUNTERS = ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count")
# Loopback only: an empty ProxyHandler keeps http_proxy settings from routing the scrape away.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def read_triton_counters(metrics_url: str) -> dict[str, float] | None:
    """tiny_lm's request, row and execution counters from the node's Prometheus endpoint.

    Their deltas over a level say what Triton really executed: rows per execution is the
    batch size the model ran, and calls per execution shows how many separate scheduler calls
    Triton's own dynamic batcher merged. Where tiny_lm's config.pbtxt enables
    `dynamic_batching`, one-at-a-time dispatch from the scheduler still runs as small batches
    inside Triton, and these figures show it. None when the endpoint cannot be read.
    """
    try:
        with _NO_PROXY.open(metrics_url, timeout=5.0) as response:
            text = response.read().decode()
    except OSError:
        return None
    totals = dict.fromkeys(TRITON_COUNTERS, 0.0)
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in totals and f'model="{TRITON_MODEL}"' in rest:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def _per_exec(
    before: Mapping[str, float] | None, after: Mapping[str, float] | None, counter: str
) -> float | None:
    if before is None or after is None:
        return None
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    if executions <= 0:
        return None
    return round((after[counter] - before[counter]) / executions, 2)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """The machine a run measured, for its JSON: cores, platform, Python and load average."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def write_report(
    report: dict[str, Any], output: Path, where: str, *, failed: bool, require: bool, holds: bool
) -> int:
    """Write a run's JSON and say where; the exit status: 1 could not measure, 2 missed and
    --require-target, else 0 (a missed target is a finding, not a failure)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {output}; {where}")
    if failed:
        return 1
    if require and not holds:
        return 2
    return 0


def run_main(main: Callable[[], int], failures: tuple[type[BaseException], ...]) -> NoReturn:
    """Run a benchmark's main: one line and exit 1 when it cannot measure, 130 on Ctrl-C.

    Every benchmark stops the processes it started on the way out, so Ctrl-C says so.
    """
    try:
        sys.exit(main())
    except failures as error:
        print(f"FAILED: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; every process this run started has been stopped", file=sys.stderr)
        sys.exit(130)


def process_cpu_s(pids: Sequence[int]) -> float:
    """User plus system CPU seconds the given processes have used so far (vanished ones: 0)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # fields from the third on: state ppid ...
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLOCK_TICKS


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0.0
    # cpu user nice system idle iowait irq softirq steal ...: everything but idle and iowait.
    ticks = [int(v) for v in fields[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS


@dataclass(frozen=True)
class Snapshot:
    """Counters read just before and just after a measured level."""

    at: float
    triton: Mapping[str, float] | None
    cpu_s: Mapping[str, float]
    machine_busy_s: float

    @classmethod
    async def take(cls, node: TritonNode, scheduler_pid: int) -> Snapshot:
        """Triton's counters and the CPU time of the client (this process), the scheduler and
        the Triton node (tritonserver and its Python backend stubs)."""
        counters = await asyncio.to_thread(read_triton_counters, node.config.metrics_url)
        triton_pids = process_group_members(node.pgid) if node.pgid is not None else []
        times = os.times()
        cpu = {
            "client": times.user + times.system,
            "scheduler": process_cpu_s([scheduler_pid]),
            "triton": process_cpu_s(triton_pids),
        }
        return cls(at=time.monotonic(), triton=counters, cpu_s=cpu, machine_busy_s=machine_busy_s())


def cores_used(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """Mean cores each component kept busy over the level (2.0 is all of a 2-core machine).

    `other` is everything else on the machine over the same time: on a shared machine it says
    whether a level was measured while something else competed for the cores. The Triton
    figure misses backend stubs that exited during the level; none do here.
    """
    elapsed = after.at - before.at
    if elapsed <= 0:
        return {}
    used = {k: (after.cpu_s[k] - before.cpu_s.get(k, 0.0)) / elapsed for k in after.cpu_s}
    ours = sum(used.values())
    machine = (after.machine_busy_s - before.machine_busy_s) / elapsed
    used["other"] = max(0.0, machine - ours)
    used["total"] = ours + used["other"]
    return {k: round(v, 2) for k, v in used.items()}


def summarise(
    mode: str,
    concurrency: int,
    measured: LoadResult,
    warmup: LoadResult,
    before: Snapshot,
    after: Snapshot,
) -> LevelStats:
    latencies = sorted(measured.latencies_s)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000.0, 3)

    sizes = measured.batch_sizes
    return LevelStats(
        mode=mode,
        concurrency=concurrency,
        requests=measured.requests,
        ok=measured.ok,
        errors=measured.errors,
        error_rate=measured.errors / measured.requests if measured.requests else 0.0,
        error_codes=dict(measured.error_codes),
        error_samples=measured.error_samples,
        warmup_requests=warmup.requests,
        warmup_errors=warmup.errors,
        duration_s=round(measured.duration_s, 3),
        throughput_rps=round(measured.ok / measured.duration_s, 2) if measured.duration_s else 0,
        latency_p50_ms=ms(percentile(latencies, 0.50)),
        latency_p99_ms=ms(percentile(latencies, 0.99)),
        latency_mean_ms=ms(sum(latencies) / len(latencies)) if latencies else None,
        latency_max_ms=ms(latencies[-1]) if latencies else None,
        mean_batch_size=round(sum(sizes) / len(sizes), 2) if sizes else None,
        batch_size_histogram={str(k): v for k, v in sorted(Counter(sizes).items())},
        triton_rows_per_exec=_per_exec(before.triton, after.triton, "nv_inference_count"),
        triton_calls_per_exec=_per_exec(
            before.triton, after.triton, "nv_inference_request_success"
        ),
        cpu_cores=cores_used(before, after),
    )


# -- reporting --------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cores(cores: Mapping[str, float]) -> str:
    parts = [cores.get(k) for k in ("client", "scheduler", "triton", "other")]
    return "/".join("-" if v is None else f"{v:.2f}" for v in parts)


TABLE_HEADER = (
    f"{'mode':<14} {'conc':>4} {'requests':>8} {'errors':>6} {'req/s':>8} "
    f"{'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10} {'triton rows/exec':>16} "
    f"{'cores cl/sch/tri/oth':>20}"
)


def table_row(stats: LevelStats) -> str:
    return (
        f"{stats.mode:<14} {stats.concurrency:>4} {stats.requests:>8} {stats.errors:>6} "
        f"{stats.throughput_rps:>8.1f} {_fmt(stats.latency_p50_ms, '8.2f')} "
        f"{_fmt(stats.latency_p99_ms, '8.2f')} {_fmt(stats.mean_batch_size, '10.2f')} "
        f"{_fmt(stats.triton_rows_per_exec, '16.2f')} {_cores(stats.cpu_cores):>20}"
    )


def compare(results: Mapping[str, Sequence[LevelStats]], levels: Sequence[int]) -> list[Comparison]:
    """Batched/one-at-a-time ratios per level; the target is judged at JUDGED_LEVELS (or at
    the highest level run when none of those was)."""
    batched = {s.concurrency: s for s in results.get(BATCHED, ())}
    single = {s.concurrency: s for s in results.get(ONE_AT_A_TIME, ())}
    judged = [c for c in levels if c in JUDGED_LEVELS] or ([max(levels)] if levels else [])
    rows = []
    for level in levels:
        b, s = batched.get(level), single.get(level)
        throughput = _ratio(b.throughput_rps, s.throughput_rps) if b and s else None
        p99 = _ratio(b.latency_p99_ms, s.latency_p99_ms) if b and s else None
        holds = None
        if throughput is not None and p99 is not None:
            holds = throughput >= TARGET_THROUGHPUT_RATIO and p99 <= 1.0
        rows.append(
            Comparison(
                concurrency=level,
                throughput_ratio=None if throughput is None else round(throughput, 3),
                p99_ratio=None if p99 is None else round(p99, 3),
                judged=level in judged,
                holds=holds,
            )
        )
    return rows


def comparison_table(rows: Sequence[Comparison]) -> str:
    lines = [f"{'conc':>4} {'throughput b/o':>15} {'p99 b/o':>8}  target (>=4x req/s, p99 <=)"]
    for row in rows:
        verdict = {True: "holds", False: "not met", None: "no data"}[row.holds]
        if not row.judged:
            verdict += " (not judged at this level)"
        lines.append(
            f"{row.concurrency:>4} {_fmt(row.throughput_ratio, '14.2f')}x "
            f"{_fmt(row.p99_ratio, '7.2f')}x  {verdict}"
        )
    return "\n".join(lines)


def verdict(rows: Sequence[Comparison]) -> tuple[bool | None, str]:
    judged = [r for r in rows if r.judged]
    levels = ", ".join(str(r.concurrency) for r in judged) or "none"
    target = (
        f"at least {TARGET_THROUGHPUT_RATIO:g}x the throughput of one-at-a-time dispatch at an "
        f"equal or better p99, judged at concurrency {levels}"
    )
    if not judged or any(r.holds is None for r in judged):
        return None, f"VERDICT: cannot judge the target ({target}): a mode has no results."
    failing = [r for r in judged if not r.holds]
    if not failing:
        return True, f"VERDICT: target HOLDS ({target})."
    reasons = "; ".join(
        f"concurrency {r.concurrency}: {r.throughput_ratio:.2f}x throughput, "
        f"p99 ratio {r.p99_ratio:.2f}"
        for r in failing
    )
    return False, f"VERDICT: target NOT MET ({target}). {reasons}."


def _git_describe() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- driver -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    modes: tuple[str, ...]
    levels: tuple[int, ...]
    requests: int
    requests_c1: int
    warmup: int

    def requests_at(self, concurrency: int) -> int:
        return self.requests_c1 if concurrency == 1 else self.requests

    def warmup_at(self, concurrency: int) -> int:
        return max(self.warmup, 2 * concurrency)


async def measure_mode(
    mode: str,
    catalog: Path,
    node: TritonNode,
    plan: Plan,
    log_dir: Path,
    run_id: str,
    rows: list[LevelStats],
) -> None:
    """Start this mode's scheduler, run every level into `rows`, stop it.

    Rows are appended as levels finish, so a failure part-way keeps what was measured.
    """
    log_path = log_dir / f"scheduler-{mode}.log"
    scheduler = SchedulerProcess(mode, catalog, node.config.grpc_url, log_path)
    try:
        scheduler.start()
        ready_s = await scheduler.wait_serving(SCHEDULER_READY_TIMEOUT_S)
        print(f"[{mode}] scheduler SERVING on {scheduler.address} after {ready_s:.1f}s", flush=True)
        print(TABLE_HEADER, flush=True)
        for level in plan.levels:
            tag = f"bench-{run_id}-{mode}-c{level}"
            warm = await closed_loop(scheduler.address, level, plan.warmup_at(level), tag + "-w")
            scheduler.check_alive()
            if warm.errors:
                print(
                    f"[{mode}] warm-up at concurrency {level}: {warm.errors} of {warm.requests} "
                    f"failed, e.g. {warm.error_samples[:2]}",
                    flush=True,
                )
            before = await Snapshot.take(node, scheduler.pid)
            measured = await closed_loop(scheduler.address, level, plan.requests_at(level), tag)
            after = await Snapshot.take(node, scheduler.pid)
            scheduler.check_alive()
            stats = summarise(mode, level, measured, warm, before, after)
            rows.append(stats)
            print(table_row(stats), flush=True)
            if stats.error_rate > MAX_ERROR_RATE:
                raise BenchError(
                    f"{stats.errors} of {stats.requests} requests failed at concurrency {level} "
                    f"({stats.error_rate:.1%} > {MAX_ERROR_RATE:.0%}): {dict(stats.error_codes)}; "
                    f"e.g. {stats.error_samples[:3]}; log: {scheduler.log_path}"
                )
    finally:
        scheduler.stop()


async def run_modes(
    catalogs: Mapping[str, Path], node: TritonNode, plan: Plan, log_dir: Path
) -> tuple[dict[str, list[LevelStats]], dict[str, str]]:
    run_id = uuid.uuid4().hex[:8]
    results: dict[str, list[LevelStats]] = {}
    failures: dict[str, str] = {}
    for mode in plan.modes:
        print(f"\n[{mode}] batching {json.dumps(MODES[mode])}", flush=True)
        results[mode] = []
        try:
            await measure_mode(mode, catalogs[mode], node, plan, log_dir, run_id, results[mode])
        except BenchError as error:
            failures[mode] = str(error)
            print(f"[{mode}] FAILED: {error}", file=sys.stderr, flush=True)
    return results, failures


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas") from None
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one level, each at least 1")
    return levels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batching",
        description="Benchmark dynamic batching against one-at-a-time dispatch through the "
        "Shepherd scheduler, on a real local Triton node.",
    )
    parser.add_argument(
        "--concurrency",
        type=_levels,
        default=(1, 8, 32, 64),
        help="comma-separated closed-loop concurrency levels (default: 1,8,32,64)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=4000,
        help="measured requests per level above concurrency 1 (default: 4000)",
    )
    parser.add_argument(
        "--requests-c1",
        type=int,
        default=400,
        help="measured requests at concurrency 1, where each waits for the last (default: 400)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=64,
        help="unmeasured warm-up requests per level, at least 2x the concurrency (default: 64)",
    )
    parser.add_argument(
        "--modes",
        default=f"{BATCHED},{ONE_AT_A_TIME}",
        help=f"comma-separated modes to run (default: {BATCHED},{ONE_AT_A_TIME})",
    )
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG, help="base catalog")
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"JSON results file (default: {DEFAULT_OUTPUT.relative_to(REPO_ROOT)})",
    )
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="process logs (default: <output dir>/logs)"
    )
    parser.add_argument(
        "--require-target",
        action="store_true",
        help="exit with status 2 when the target does not hold",
    )
    args = parser.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    args.modes = modes
    if args.requests < 1 or args.requests_c1 < 1 or args.warmup < 0:
        parser.error("--requests and --requests-c1 must be at least 1, --warmup at least 0")
    return args


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """SIGTERM takes the same clean-up path as Ctrl-C: every process started is stopped."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan(args.modes, args.concurrency, args.requests, args.requests_c1, args.warmup)
    output: Path = args.output.resolve()
    log_dir: Path = (args.log_dir or output.parent / "logs").resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    began = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="shepherd-bench-") as tmp:
        catalogs = write_catalogs(args.catalog, Path(tmp), plan.modes)
        for name in ("triton.log", *(f"scheduler-{mode}.log" for mode in MODES)):
            (log_dir / name).unlink(missing_ok=True)  # logs are appended to: keep this run's
        node = TritonNode(
            TritonNodeConfig.with_free_ports(
                work_dir=Path(tmp) / "triton",
                model_control_mode="explicit",
                load_models=(TRITON_MODEL,),
                log_file=log_dir / "triton.log",
            )
        )
        try:
            node.start()
            waited = node.wait_ready(TRITON_READY_TIMEOUT_S)
            url = node.config.grpc_url
            print(f"triton {url} ready with {TRITON_MODEL} in {waited:.1f}s", flush=True)
            results, failures = asyncio.run(run_modes(catalogs, node, plan, log_dir))
        finally:
            node.stop()

    rows = compare(results, plan.levels) if not failures else []
    holds, verdict_line = verdict(rows) if rows else (None, "VERDICT: not judged: a mode failed.")
    print("\nAll results")
    print(TABLE_HEADER)
    for mode in plan.modes:
        for stats in results.get(mode, ()):
            print(table_row(stats))
    if rows:
        print("\nbatched / one-at-a-time (b/o)")
        print(comparison_table(rows))
    print("\n" + verdict_line)

    report = {
        "benchmark": "bench.batching",
        "started_at": started.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - began, 1),
        "git": _git_describe(),
        "machine": machine(load_before),
        "config": {
            "model": MODEL,
            "triton_model": TRITON_MODEL,
            "base_catalog": str(args.catalog),
            "modes": {mode: MODES[mode] for mode in plan.modes},
            "concurrency": list(plan.levels),
            "requests": plan.requests,
            "requests_c1": plan.requests_c1,
            "warmup": plan.warmup,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "call_timeout_s": CALL_TIMEOUT_S,
            "workers_per_channel": WORKERS_PER_CHANNEL,
            "max_error_rate": MAX_ERROR_RATE,
        },
        "results": {mode: [asdict(s) for s in results.get(mode, ())] for mode in plan.modes},
        "failures": failures,
        "comparison": [asdict(row) for row in rows],
        "target": {
            "throughput_ratio_at_least": TARGET_THROUGHPUT_RATIO,
            "p99_ratio_at_most": 1.0,
            "judged_at": [row.concurrency for row in rows if row.judged],
            "holds": holds,
        },
        "verdict": verdict_line,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {output}; logs in {log_dir}")

    if failures:
        for mode, message in failures.items():
            print(f"FAILED [{mode}]: {message}", file=sys.stderr)
        return 1
    if args.require_target and not holds:
        return 2
    return 0


if __name__ == "__main__":
    run_main(main, (BenchError, TritonStartError))
