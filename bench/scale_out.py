"""Scheduler scale-out: throughput with 1, 2 and 3 replicas, and a simulation at scale.

`make bench-scale-out` (SCALE_OUT_ARGS to change the defaults) runs two parts.

1. Measured, on this machine: one local mesh whose schedulers form a cluster
   (SHEPHERD_SCHEDULER_CLUSTER), with a catalog of `--models` chat models on the Triton model
   echo_lm (cheap, so the mesh's own cost is what is measured). For 1, then 2, then 3
   scheduler replicas (replicas are added to the running mesh and the test waits until every
   replica and the router see them), `--concurrency` closed-loop callers send unary
   `RouterService/Chat` calls with unique prompts, spread over the models, through the one
   router for `--seconds`: requests per second, p50/p99 latency, errors, and which replica
   served how many requests. On two cores every process shares the same CPU, so adding a
   replica cannot add capacity here; the figures show what the scale-out machinery costs and
   that the load spreads, not the speed-up a cluster of machines gets.
2. Simulated, in code, with the scheduler's own functions: 100 models, 50 nodes, 10 replicas.
   Assignment balance (models per replica, by libs/membership.owner_of); models that move
   when a replica fails, against modulo hashing (the rejected alternative); placement
   decisions per second of one pool leader: the placer's own choice of node and victims
   (services/scheduler/placement.py) over 50 synthetic nodes, and the Redis scripts a
   decision adds (the unload mark, the slot take), timed against the mesh's Valkey.

Results go to .build/bench/scale_out.json; docs/BENCHMARKS.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import os
import random
import statistics
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import yaml
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from bench.batching import machine, percentile, process_cpu_s, run_main, write_report
from deploy.local.launcher import LocalMesh, MeshConfig
from deploy.local.ports import free_port
from deploy.local.valkey import ValkeyConfig, ValkeyServer
from libs.apikeys import issue_key_at
from libs.catalog import load_catalog
from libs.config import DEFAULT_CATALOG
from libs.credentials import Credentials
from libs.membership import owner_of
from libs.peers import open_channel
from libs.server import open_redis
from services.scheduler.cluster import Cluster, ClusterConfig
from services.scheduler.nodes import ModelOnNode, ModelState, Node
from services.scheduler.placement import Placer, _victims

OUTPUT = Path(".build/bench/scale_out.json")
TENANT = "bench-scale-out"
MAX_ERROR_RATE = 0.01


class BenchError(RuntimeError):
    """The benchmark could not measure."""


def bench_catalog(path: Path, models: int) -> Path:
    """The shipped catalog plus `models` copies of shepherd-echo (no aliases of their own)."""
    data = yaml.safe_load(DEFAULT_CATALOG.read_text())
    echo = data["models"]["shepherd-echo"]
    for n in range(models):
        entry = copy.deepcopy(echo)
        entry.pop("aliases", None)
        data["models"][f"echo-{n}"] = entry
    path.write_text(yaml.safe_dump(data))
    return path


async def wait_members(mesh: LocalMesh, count: int) -> None:
    """Until the first replica sees `count` members, then a little more: the router polls
    every 0.5 s."""
    deadline = time.monotonic() + 60
    while len((await mesh.scheduler_assignments(mesh.address("scheduler"))).members) != count:
        if time.monotonic() > deadline:
            raise BenchError(f"the cluster never reached {count} replicas")
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)


async def closed_loop(
    mesh: LocalMesh, api_key: str, models: list[str], concurrency: int, seconds: float, tag: str
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    served: Counter[str] = Counter()
    stop_at = time.monotonic() + seconds
    metadata = (("authorization", f"Bearer {api_key}"),)
    async with grpc.aio.insecure_channel(mesh.address("router")) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)

        async def worker(n: int) -> None:
            i = 0
            while time.monotonic() < stop_at:
                i += 1
                request = router_pb2.ChatRequest(
                    model=models[(n + i) % len(models)],
                    messages=[
                        common_pb2.ChatMessage(
                            role=common_pb2.ROLE_USER, content=f"{tag} {n} {i} {uuid.uuid4().hex}"
                        )
                    ],
                    params=common_pb2.GenerationParams(max_tokens=8),
                )
                started = time.perf_counter()
                try:
                    await stub.Chat(request, metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError as error:
                    errors[error.code().name] += 1
                    continue
                latencies.append(time.perf_counter() - started)

        schedulers = [mesh.services["scheduler"].pid, *(r.process.pid for r in mesh.schedulers)]
        router = [mesh.services["router"].pid]
        cpu_before = process_cpu_s(schedulers), process_cpu_s(router)
        began = time.monotonic()
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        elapsed = time.monotonic() - began
        cpu_after = process_cpu_s(schedulers), process_cpu_s(router)
    for replica in [mesh.address("scheduler"), *(r.address for r in mesh.schedulers)]:
        credentials = Credentials(internal_tokens=(mesh.config.internal_token,), admin_keys=())
        async with open_channel(replica, credentials) as channel:
            stats = await scheduler_pb2_grpc.SchedulerServiceStub(channel).GetStats(
                scheduler_pb2.GetStatsRequest(), timeout=5
            )
        served[stats.replica_id] = sum(m.completed for m in stats.models if m.model in models)
    ordered = sorted(latencies)
    total = len(latencies) + sum(errors.values())
    return {
        "requests": total,
        "answered": len(latencies),
        "errors": dict(errors),
        "error_rate": round(sum(errors.values()) / total, 4) if total else 0.0,
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round((percentile(ordered, 0.5) or 0) * 1000, 2),
        "p99_ms": round((percentile(ordered, 0.99) or 0) * 1000, 2),
        # CPU per answered request, all scheduler replicas together, and the router: what the
        # scale-out machinery costs, which a busy machine's throughput cannot show.
        "scheduler_cpu_ms_per_request": round(
            (cpu_after[0] - cpu_before[0]) / max(1, len(latencies)) * 1000, 3
        ),
        "router_cpu_ms_per_request": round(
            (cpu_after[1] - cpu_before[1]) / max(1, len(latencies)) * 1000, 3
        ),
        "completed_per_replica_cumulative": dict(served),
    }


def bench_mesh(run_dir: Path, catalog: Path, cluster: str) -> LocalMesh:
    env = {
        "SHEPHERD_CATALOG": str(catalog),
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "OTEL_SDK_DISABLED": "true",
    }
    if cluster:
        env["SHEPHERD_SCHEDULER_CLUSTER"] = cluster
    return LocalMesh(MeshConfig.ephemeral(run_dir, extra_env=env))


async def measured(args: argparse.Namespace, run_dir: Path) -> list[dict[str, Any]]:
    """First one scheduler with scale-out off (the default), then the cluster of 1, 2, 3."""
    catalog = bench_catalog(run_dir / "catalog.yaml", args.models)
    models = [f"echo-{n}" for n in range(args.models)]
    rows = []
    print("starting the mesh, scale-out off...", flush=True)
    mesh = bench_mesh(run_dir / "single", catalog, "")
    await asyncio.to_thread(mesh.start, 240)
    try:
        api_key = await issue_key_at(mesh.redis_url, TENANT)
        await closed_loop(mesh, api_key, models, 4, 1.0, "warm")
        row = await closed_loop(mesh, api_key, models, args.concurrency, args.seconds, "off")
        row = {"replicas": 1, "scale_out": False, **row}
        print(
            f"1 replica, scale-out off: {row['requests_per_s']} req/s, p50 {row['p50_ms']} ms,"
            f" p99 {row['p99_ms']} ms, errors {row['errors'] or 0}, scheduler CPU"
            f" {row['scheduler_cpu_ms_per_request']} ms/request",
            flush=True,
        )
        rows.append(row)
    finally:
        await asyncio.to_thread(mesh.stop)
    print("starting the mesh, scale-out on...", flush=True)
    mesh = bench_mesh(run_dir / "cluster", catalog, "bench")
    await asyncio.to_thread(mesh.start, 240)
    try:
        api_key = await issue_key_at(mesh.redis_url, TENANT)
        await closed_loop(mesh, api_key, models, 4, 1.0, "warm")
        for replicas in range(1, args.replicas + 1):
            if replicas > 1:
                await asyncio.to_thread(mesh.add_scheduler)
                await wait_members(mesh, replicas)
            view = await mesh.scheduler_assignments(mesh.address("scheduler"))
            owners = Counter(a.replica_id for a in view.models if a.model in models)
            row = await closed_loop(
                mesh, api_key, models, args.concurrency, args.seconds, f"r{replicas}"
            )
            row = {
                "replicas": replicas,
                "scale_out": True,
                "models_per_replica": dict(owners),
                **row,
            }
            print(
                f"{replicas} replica(s): {row['requests_per_s']} req/s, p50 {row['p50_ms']} ms,"
                f" p99 {row['p99_ms']} ms, errors {row['errors'] or 0}, owners {dict(owners)},"
                f" scheduler CPU {row['scheduler_cpu_ms_per_request']} ms/request",
                flush=True,
            )
            if row["error_rate"] > MAX_ERROR_RATE:
                raise BenchError(f"{replicas} replicas: error rate {row['error_rate']:.1%}")
            rows.append(row)
        return rows
    finally:
        await asyncio.to_thread(mesh.stop)


def modulo_owner(model: str, members: list[str]) -> str:
    digest = hashlib.blake2b(model.encode(), digest_size=8).digest()
    return members[int.from_bytes(digest, "big") % len(members)]


def assignment_simulation(models: int, replicas: int) -> dict[str, Any]:
    names = [f"model-{n}" for n in range(models)]
    members = [f"replica-{n}" for n in range(replicas)]
    owners = {m: owner_of(m, members) for m in names}
    load = Counter(owners.values())
    counts = [load.get(r, 0) for r in members]
    failed = members[3]
    rest = [r for r in members if r != failed]
    moved = sum(owners[m] != owner_of(m, rest) for m in names)
    modulo_moved = sum(modulo_owner(m, members) != modulo_owner(m, rest) for m in names)
    joined = [*members, "replica-new"]
    moved_on_join = sum(owners[m] != owner_of(m, joined) for m in names)
    started = time.perf_counter()
    rounds = 200
    for _ in range(rounds):
        for m in names:
            owner_of(m, members)
    per_owner_us = (time.perf_counter() - started) / (rounds * models) * 1e6
    return {
        "models_per_replica": {
            "min": min(counts),
            "max": max(counts),
            "mean": models / replicas,
            "stdev": round(statistics.pstdev(counts), 2),
        },
        "moves_when_one_replica_fails": moved,
        "models_the_failed_replica_owned": load.get(failed, 0),
        "moves_with_modulo_hashing": modulo_moved,
        "moves_when_one_replica_joins": moved_on_join,
        "owner_lookup_us": round(per_owner_us, 2),
    }


def placement_simulation(models: int, nodes: int, seconds: float) -> dict[str, Any]:
    """The leader's decision (which node, which victims) over `nodes` synthetic full nodes."""
    catalog = load_catalog(DEFAULT_CATALOG)
    pool = next(iter(catalog.pools.values()))
    deployment = next(
        d for m in catalog.models.values() for d in m.deployments if d.kind == "triton"
    )
    rng = random.Random(7)
    fleet = []
    for n in range(nodes):
        node = Node(pool, f"10.0.{n // 250}.{n % 250}:8001", None)
        node.memory_total_mb = 16_000
        for k in rng.sample(range(models), 6):  # six of the hundred models on each node
            node.models[f"model-{k}"] = ModelOnNode(
                f"model-{k}",
                2_600,
                ModelState.READY,
                inflight=rng.choice((0, 0, 1)),
                last_used=rng.random(),
            )
        fleet.append(node)
    decisions = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(100):
            Placer._choose(fleet, deployment, may_evict=True)
            decisions += 1
    cpu_rate = decisions / (time.perf_counter() - started)
    sample = _victims(fleet[0], deployment)
    return {
        "nodes": nodes,
        "models": models,
        "decisions_per_s_cpu": round(cpu_rate),
        "victims_per_decision_sample": len(sample or []),
    }


async def redis_costs(redis_url: str, seconds: float) -> dict[str, Any]:
    """Round trips a batch (slot take, claim) and an eviction (mark) add, against Valkey."""
    client = open_redis(redis_url, 2.0)
    cluster = Cluster(
        ClusterConfig(name="bench-sim", redis_url=redis_url, replica_id="sim", advertise="x:1"),
        client,
        ["m"],
        ["p"],
    )
    try:
        await cluster.beat()
        timings: dict[str, list[float]] = {"slot": [], "mark": [], "claim": []}
        stop_at = time.monotonic() + seconds
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            holder = cluster.holder_id()
            t0 = time.perf_counter()
            await cluster.acquire_slot("p", "node", 1_000_000, holder, ["m"])
            t1 = time.perf_counter()
            await cluster.mark_unloading("p", f"node-{n}", "m")
            t2 = time.perf_counter()
            await cluster.claim([("t", f"r{n}-{k}") for k in range(8)], 5.0)
            t3 = time.perf_counter()
            timings["slot"].append(t1 - t0)
            timings["mark"].append(t2 - t1)
            timings["claim"].append(t3 - t2)
            await client.hdel("shepherd:scheduler:{bench-sim}:pool:p:node:node:holders", holder)
        mark_ms = statistics.median(timings["mark"]) * 1000
        return {
            "slot_take_p50_ms": round(statistics.median(timings["slot"]) * 1000, 3),
            "claim_8_requests_p50_ms": round(statistics.median(timings["claim"]) * 1000, 3),
            "unload_mark_p50_ms": round(mark_ms, 3),
            "decisions_per_s_redis_bound": round(1000 / (2 * mark_ms)),
        }
    finally:
        await client.flushdb()
        await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--models", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp:
        rows = asyncio.run(measured(args, Path(tmp)))
        # The mesh is gone, its Valkey too: the Redis costs are timed on a Valkey of their own.
        valkey = ValkeyServer(ValkeyConfig(port=free_port(), data_dir=Path(tmp) / "valkey")).start()
        try:
            costs = asyncio.run(redis_costs(valkey.config.url, 2.0))
        finally:
            valkey.stop()
    simulation = {
        "assignment": assignment_simulation(100, 10),
        "placement": placement_simulation(100, 50, 2.0),
        "redis": costs,
    }
    print("simulation:", simulation, flush=True)
    report = {
        "measured": rows,
        "simulation": simulation,
        "args": vars(args),
        "machine": machine(load_before),
    }
    return write_report(
        report, OUTPUT, "docs/BENCHMARKS.md records a run", failed=False, require=False, holds=True
    )


if __name__ == "__main__":
    run_main(main, (BenchError, OSError))
