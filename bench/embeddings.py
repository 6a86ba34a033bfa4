"""Embedding throughput through the whole mesh against calling Triton directly.

`make bench-embeddings` starts the local mesh (bench/streaming.py's mesh_with_simulator) and
runs closed loops at concurrency 32 (EMBEDDINGS_ARGS='--concurrency 64' to change):

1. mesh, one input: `RouterService/Embed` on shepherd-embed, one input per call, unique, so
   every call is a cache miss and runs the whole path (API key, budget reservation, cache
   lookup and lease, the scheduler's queue and batcher, Triton, billing, cache store);
2. mesh, one input, cache bypass: the same without the cache's two calls;
3. mesh, 32 inputs: 32 inputs per call, which the scheduler fans out as rows;
4. direct, one row: `ModelInfer` on embed_tiny, one input per request, as a client would call
   Triton by hand (embed_tiny has no dynamic batching of its own: Shepherd batches);
5. direct, 32 rows: 32 inputs per request, the model fed full batches by its caller.

For each: inputs per second, p50/p99 latency per call, the mean batch Triton executed (its
inference and execution counts) and, through the mesh, the CPU its processes spent per call.
The headline is mesh / direct throughput at one input per call, and at 32. Results go to
.build/bench/embeddings.json; docs/BENCHMARKS.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as tritonclient
import tritonclient.grpc.aio as triton
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc

from bench.batching import machine, percentile, process_cpu_s, run_main, write_report
from bench.streaming import mesh_with_simulator
from deploy.local.launcher import LocalMesh
from libs.apikeys import issue_key_at

MODEL, TRITON_MODEL = "shepherd-embed", "embed_tiny"
OUTPUT = Path(".build/bench/embeddings.json")
CALL_TIMEOUT_S = 60.0
WARMUP = 200


class BenchError(RuntimeError):
    """The benchmark could not measure."""


def text(n: int) -> str:
    """A short input like a search query, unique per call so nothing is cached."""
    return f"which harbour town ships amber and wool, question {n} {uuid.uuid4().hex[:8]}"


def triton_counts(url: str) -> tuple[int, int]:
    """(inferences, executions) Triton counted for embed_tiny so far."""
    client = tritonclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(TRITON_MODEL).model_stats[0]
        return int(stats.inference_count), int(stats.execution_count)
    finally:
        client.close()


async def closed_loop(
    call: Callable[[int], Awaitable[int]], concurrency: int, total: int
) -> dict[str, Any]:
    """`total` calls, `concurrency` at a time; each returns the inputs it embedded."""
    latencies: list[float] = []
    inputs = 0
    counter = iter(range(total))

    async def worker() -> None:
        nonlocal inputs
        for n in counter:
            began = time.perf_counter()
            embedded = await call(n)  # not `inputs += await ...`: that reads `inputs` first
            latencies.append(time.perf_counter() - began)
            inputs += embedded

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    ordered = sorted(latencies)
    return {
        "calls": total,
        "inputs": inputs,
        "seconds": round(elapsed, 3),
        "inputs_per_s": round(inputs / elapsed, 1),
        "p50_ms": round((percentile(ordered, 0.5) or 0) * 1000, 2),
        "p99_ms": round((percentile(ordered, 0.99) or 0) * 1000, 2),
    }


async def measure_route(
    name: str,
    call: Callable[[int], Awaitable[int]],
    url: str,
    concurrency: int,
    total: int,
    pids: Sequence[int] = (),
) -> dict[str, Any]:
    """Warm the route, then one closed loop, with Triton's batch counts around it."""
    await closed_loop(call, concurrency, min(WARMUP, total))
    inferences, executions = triton_counts(url)
    cpu = process_cpu_s(pids)
    result = await closed_loop(call, concurrency, total)
    cpu = process_cpu_s(pids) - cpu
    after_inferences, after_executions = triton_counts(url)
    ran = after_executions - executions
    result["route"] = name
    result["triton_executions"] = ran
    result["mean_batch"] = round((after_inferences - inferences) / ran, 2) if ran else None
    result["mesh_cpu_ms_per_call"] = round(cpu * 1000 / total, 2) if pids else None
    print(
        f"{name:>30}: {result['inputs_per_s']:>8} inputs/s  p50 {result['p50_ms']:>7} ms"
        f"  p99 {result['p99_ms']:>7} ms  mean batch {result['mean_batch']}"
        f"  mesh CPU ms/call {result['mesh_cpu_ms_per_call']}",
        flush=True,
    )
    return result


async def measure(mesh: LocalMesh, concurrency: int, total: int) -> list[dict[str, Any]]:
    assert mesh.triton is not None
    url = mesh.triton.config.grpc_url
    key = await issue_key_at(mesh.redis_url, f"bench-{uuid.uuid4().hex[:8]}")
    md = (("authorization", f"Bearer {key}"),)
    pids = [process.pid for process in mesh.services.values()]
    if mesh.valkey is not None and mesh.valkey.pid is not None:
        pids.append(mesh.valkey.pid)
    rows = []
    async with grpc.aio.insecure_channel(mesh.address("router")) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)

        async def mesh_call(inputs: int, policy: int, n: int) -> int:
            response = await stub.Embed(
                router_pb2.EmbedRequest(
                    model=MODEL,
                    inputs=[text(n * inputs + i) for i in range(inputs)],
                    cache_policy=policy,
                ),
                metadata=md,
                timeout=CALL_TIMEOUT_S,
            )
            if len(response.embeddings) != inputs or response.cache_hit:
                raise BenchError(f"unexpected answer: {response}")
            return inputs

        auto, bypass = common_pb2.CACHE_POLICY_AUTO, common_pb2.CACHE_POLICY_BYPASS
        for name, inputs, policy, calls in (
            ("mesh, one input", 1, auto, total),
            ("mesh, one input, cache bypass", 1, bypass, total),
            (f"mesh, {concurrency} inputs", concurrency, auto, max(total // concurrency, 50)),
        ):
            rows.append(
                await measure_route(
                    name,
                    functools.partial(mesh_call, inputs, policy),
                    url,
                    concurrency,
                    calls,
                    pids,
                )
            )

    async with triton.InferenceServerClient(url) as client:

        async def direct(rows_per_call: int, n: int) -> int:
            data = np.array(
                [[text(n * rows_per_call + i).encode()] for i in range(rows_per_call)],
                dtype=np.object_,
            )
            tensor = triton.InferInput("TEXT", [rows_per_call, 1], "BYTES")
            tensor.set_data_from_numpy(data)
            result = await client.infer(TRITON_MODEL, [tensor], client_timeout=CALL_TIMEOUT_S)
            return int(result.as_numpy("EMBEDDING").shape[0])

        rows.append(
            await measure_route(
                "direct, one row",
                lambda n: direct(1, n),
                url,
                concurrency,
                total,
            )
        )
        rows.append(
            await measure_route(
                f"direct, {concurrency} rows",
                lambda n: direct(concurrency, n),
                url,
                concurrency,
                max(total // concurrency, 50),
            )
        )
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--requests", type=int, default=3000, help="measured calls per route")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="shepherd-bench-embed-") as run_dir,
        mesh_with_simulator(Path(run_dir), 0.0, {}) as (mesh, _),
    ):
        rows = asyncio.run(measure(mesh, args.concurrency, args.requests))
    mesh_one, _, mesh_many, direct_one, direct_many = rows
    ratio = round(mesh_one["inputs_per_s"] / direct_one["inputs_per_s"], 3)
    many = round(mesh_many["inputs_per_s"] / direct_many["inputs_per_s"], 3)
    print(
        f"\nthrough the mesh / direct, at concurrency {args.concurrency}: {ratio}x with one input"
        f" per call, {many}x with {args.concurrency} inputs per call"
    )
    report = {
        "benchmark": "embeddings",
        "command": "make bench-embeddings",
        "machine": machine(load),
        "concurrency": args.concurrency,
        "routes": rows,
        "mesh_over_direct_one_input": ratio,
        "mesh_over_direct_full_batches": many,
    }
    return write_report(
        report,
        args.output,
        "docs/BENCHMARKS.md records a run",
        failed=False,
        require=False,
        holds=True,
    )


if __name__ == "__main__":
    run_main(main, (BenchError,))
