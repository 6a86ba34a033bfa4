"""The floor under every hop: what one grpc.aio call costs in CPU, busy and after a pause.

Why this exists: the gateway benchmark (bench/gateway.py) finds the mesh spending about three
times more CPU per request at concurrency 1 than at concurrency 32, and most of it in gRPC's
own threads and the event loop, not in Shepherd's code. This benchmark isolates that cost
with nothing of Shepherd in it: one grpc.aio server process (uvloop, as the services run)
echoing 100-byte messages, one grpc.aio client, both on 127.0.0.1, and CPU read precisely
(per thread, from /proc/<pid>/task/*/schedstat, in nanoseconds, not sampled at clock
ticks). It measures, per operation, client and server CPU and the server's split by thread
(the event-loop thread, gRPC's poller thread, gRPC core's event-engine thread pool), for:

- a unary call, back to back and with a pause between calls (the pause is the gap a mesh
  hop sees at concurrency 1 while the rest of the request runs elsewhere);
- one message each way on an open bidirectional stream, back to back and with the pause;
- a plain TCP echo on the same loop, with the pause: what the machine itself charges for
  waking two processes, with no gRPC at all.

`make bench-grpc-floor` runs it (about 30 s) and writes .build/bench/grpc_floor.json. It is
a measurement, with no target: docs/BENCHMARKS.md reads it against the mesh's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import uvloop

from bench.streaming import _git
from deploy.local.ports import free_port
from libs.config import REPO_ROOT

SERVICE = "shepherd.bench.Floor"
PAYLOAD = b"x" * 100
DEFAULT_OUTPUT = REPO_ROOT / ".build" / "bench" / "grpc_floor.json"


def _identity(data: bytes) -> bytes:
    return data


def thread_cpu_s(pid: int) -> dict[str, float]:
    """On-CPU seconds of each thread of `pid`, summed by thread name (exact, from schedstat)."""
    by_name: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            ns = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        group = "event_engine" if name.startswith("event_engine") else name
        by_name[group] = by_name.get(group, 0.0) + ns / 1e9
    return by_name


async def serve(grpc_port: int, tcp_port: int) -> None:
    """The echo server: a unary method, a bidirectional one, and a raw TCP echo."""

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def bidi(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async for message in requests:
            yield message

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
                    "Bidi": grpc.stream_stream_rpc_method_handler(bidi, _identity, _identity),
                },
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(len(PAYLOAD)):
            writer.write(data)

    tcp = await asyncio.start_server(echo, "127.0.0.1", tcp_port)
    print("ready", flush=True)
    async with tcp:
        await server.wait_for_termination()


async def measure(
    args: argparse.Namespace, server_pid: int, grpc_port: int, tcp_port: int
) -> list[dict[str, Any]]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    unary = channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity)
    bidi = channel.stream_stream(f"/{SERVICE}/Bidi", _identity, _identity)
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
    stream = bidi()
    for _ in range(200):  # warm both paths up
        await unary(PAYLOAD)
        await stream.write(PAYLOAD)
        await stream.read()

    async def one_unary() -> None:
        await unary(PAYLOAD)

    async def one_bidi() -> None:
        await stream.write(PAYLOAD)
        await stream.read()

    async def one_tcp() -> None:
        writer.write(PAYLOAD)
        await reader.readexactly(len(PAYLOAD))

    cases: list[tuple[str, Callable[[], Awaitable[None]], float]] = [
        ("unary call", one_unary, 0.0),
        ("unary call", one_unary, args.pause_ms / 1000),
        ("bidi stream message", one_bidi, 0.0),
        ("bidi stream message", one_bidi, args.pause_ms / 1000),
        ("TCP echo (no gRPC)", one_tcp, args.pause_ms / 1000),
    ]
    rows = []
    for name, operation, pause_s in cases:
        count = args.busy_ops if pause_s == 0 else args.paused_ops
        client_before = sum(thread_cpu_s(os.getpid()).values())
        server_before = thread_cpu_s(server_pid)
        began = time.perf_counter()
        latency = 0.0
        for _ in range(count):
            start = time.perf_counter()
            await operation()
            latency += time.perf_counter() - start
            if pause_s:
                await asyncio.sleep(pause_s)
        wall = time.perf_counter() - began
        client_ms = (sum(thread_cpu_s(os.getpid()).values()) - client_before) * 1000 / count
        server_after = thread_cpu_s(server_pid)
        threads = {
            name_: round(
                (server_after.get(name_, 0.0) - server_before.get(name_, 0.0)) * 1000 / count, 3
            )
            for name_ in server_after
        }
        rows.append(
            {
                "operation": name,
                "pause_ms": round(pause_s * 1000, 1),
                "ops": count,
                "mean_latency_ms": round(latency * 1000 / count, 3),
                "client_cpu_ms": round(client_ms, 3),
                "server_cpu_ms": round(sum(threads.values()), 3),
                "server_threads_ms": {k: v for k, v in sorted(threads.items()) if v >= 0.001},
                "wall_s": round(wall, 2),
            }
        )
        row = rows[-1]
        print(
            f"{name:22s} pause {row['pause_ms']:5.1f} ms  latency {row['mean_latency_ms']:6.3f} ms"
            f"  CPU client {row['client_cpu_ms']:.3f} + server {row['server_cpu_ms']:.3f} ms/op"
            f"  server threads {row['server_threads_ms']}",
            flush=True,
        )
    await stream.done_writing()
    writer.close()
    await channel.close()
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pause-ms", type=float, default=10.0, help="pause between paused ops (10)"
    )
    parser.add_argument(
        "--busy-ops", type=int, default=3000, help="back-to-back ops per case (3000)"
    )
    parser.add_argument("--paused-ops", type=int, default=500, help="paused ops per case (500)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--serve", nargs=2, type=int, metavar=("GRPC_PORT", "TCP_PORT"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        uvloop.run(serve(*args.serve))
        return 0
    grpc_port, tcp_port = free_port(), free_port()
    while tcp_port == grpc_port:
        tcp_port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_floor", "--serve", str(grpc_port), str(tcp_port)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            print("the echo server did not start", file=sys.stderr)
            return 1
        rows = uvloop.run(measure(args, server.pid, grpc_port, tcp_port))
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    result = {
        "benchmark": "grpc_floor",
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": _git("describe", "--always", "--dirty"),
        "grpcio": grpc.__version__,
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
