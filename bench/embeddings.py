"""Embedding throughput through the whole mesh against calling Triton directly.

`make bench-embeddings` starts the local mesh (bench/streaming.py's mesh_with_simulator) and
runs closed loops at concurrency 32 (EMBEDDINGS_ARGS='--concurrency 64' to change):

1. mesh: `RouterService/Embed` calls on shepherd-embed, each with one input (unique, so every
   call is a cache miss and runs the whole path: API key, budget reservation, cache lookup
   and lease, the scheduler's queue and batcher, Triton, billing, cache store);
2. direct, one row: `ModelInfer` on embed_tiny, one input per request, as a client would call
   Triton by hand (embed_tiny has no dynamic batching of its own: Shepherd batches);
3. direct, full batches: `ModelInfer` with 32 inputs per request, the model's ceiling when it
   is always fed full batches.

For each: inputs per second, p50/p99 latency per call, and the mean batch Triton executed
(its inference and execution counts). The headline is mesh / direct-one-row throughput: the
mesh gives callers who send one input at a time the batching they would otherwise have to do
themselves. Results go to .build/bench/embeddings.json; docs/BENCHMARKS.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
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
from shepherd.router.v1 import router_pb2, router_pb2_grpc

from bench.batching import machine, percentile, run_main, write_report
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
            inputs += await call(n)
            latencies.append(time.perf_counter() - began)

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
) -> dict[str, Any]:
    """Warm the route, then one closed loop, with Triton's batch counts around it."""
    await closed_loop(call, concurrency, min(WARMUP, total))
    inferences, executions = triton_counts(url)
    result = await closed_loop(call, concurrency, total)
    after_inferences, after_executions = triton_counts(url)
    ran = after_executions - executions
    result["route"] = name
    result["triton_executions"] = ran
    result["mean_batch"] = round((after_inferences - inferences) / ran, 2) if ran else None
    print(
        f"{name:>22}: {result['inputs_per_s']:>8} inputs/s  p50 {result['p50_ms']:>7} ms"
        f"  p99 {result['p99_ms']:>7} ms  mean batch {result['mean_batch']}",
        flush=True,
    )
    return result


async def measure(mesh: LocalMesh, concurrency: int, total: int) -> list[dict[str, Any]]:
    assert mesh.triton is not None
    url = mesh.triton.config.grpc_url
    key = await issue_key_at(mesh.redis_url, f"bench-{uuid.uuid4().hex[:8]}")
    md = (("authorization", f"Bearer {key}"),)
    rows = []
    async with grpc.aio.insecure_channel(mesh.address("router")) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)

        async def mesh_call(n: int) -> int:
            response = await stub.Embed(
                router_pb2.EmbedRequest(model=MODEL, inputs=[text(n)]),
                metadata=md,
                timeout=CALL_TIMEOUT_S,
            )
            if len(response.embeddings) != 1 or response.cache_hit:
                raise BenchError(f"unexpected answer: {response}")
            return 1

        rows.append(await measure_route("mesh, one input", mesh_call, url, concurrency, total))

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
    mesh_row, one_row, full = rows
    ratio = round(mesh_row["inputs_per_s"] / one_row["inputs_per_s"], 2)
    ceiling = round(mesh_row["inputs_per_s"] / full["inputs_per_s"], 2)
    print(
        f"\nthrough the mesh / direct one row at concurrency {args.concurrency}: {ratio}x;"
        f" the mesh reaches {ceiling:.0%} of the model's full-batch ceiling"
    )
    report = {
        "benchmark": "embeddings",
        "command": "make bench-embeddings",
        "machine": machine(load),
        "concurrency": args.concurrency,
        "routes": rows,
        "mesh_over_direct_one_row": ratio,
        "mesh_over_direct_full_batches": ceiling,
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
