"""What the OpenAI-compatible HTTP edge costs against the gRPC API, on the same mesh.

Why this exists: issue 15 puts an HTTP edge (services/router/http_edge.py) beside the
router's gRPC API, on the same pipeline and event loop, and asks that it cost at most 1.3x
the gRPC path's CPU per request in the router process (LiteLLM's proxy was measured at about
17-20 ms of CPU per request). This benchmark measures, on one whole local mesh
(`bench/streaming.py`'s `mesh_with_simulator`, with the router's HTTP port on):

a. Added latency at concurrency 1 (p50 and p99, path minus direct) of four ways into the
   mesh against calling Triton directly:
   - `RouterService/Chat` (gRPC, unary) and POST /v1/chat/completions (HTTP, JSON);
   - `RouterService/ChatStream` (gRPC) and the same POST with `stream: true` (HTTP, SSE);
   - direct: `tritonclient.grpc.aio` `infer` straight to `echo_lm`, the prompt rendered as the
     scheduler renders it.
   All on `shepherd-echo` (the gateway benchmark's mock backend: a model that echoes its
   prompt, so the model's cost does not hide the mesh's), the cache bypassed
   (`CACHE_POLICY_BYPASS` on gRPC, `x-shepherd-cache-policy: bypass` on HTTP), temperature 0,
   the same max_tokens, and the same prompts for every path; each answer's text is checked
   against the direct one (`same text`).
b. Throughput at concurrency 32 of the same five paths.
c. CPU milliseconds per request of every process, read from /proc over each path's rounds:
   router, scheduler, cache, billing, Valkey, Triton, client. The router's is the figure the
   target is about: HTTP JSON over gRPC Chat, and HTTP SSE over gRPC ChatStream, at each
   concurrency. Target: **at most 1.3x**.

The HTTP client is aiohttp with keep-alive connections (one per worker), as an SDK keeps
them; the gRPC client shares a channel per 16 workers (bench/streaming.py). Paths take turns
round by round in rotating order (bench/streaming.py's `measure`), so drift and noisy
neighbours hit them alike.

It is a benchmark, not a test: a missed target is reported and exits 0 (2 with
--require-target); it exits 1 only when it cannot measure (the mesh does not start, a process
dies, more than 1% of a path's requests fail). Results go to .build/bench/http_edge.json.
`make bench-http-edge` runs it (HTTP_EDGE_ARGS='--requests 4000' to change); only 127.0.0.1
is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

from bench.batching import machine, run_main, write_report
from bench.gateway import ECHO_MODEL, ECHO_TRITON_MODEL, MESH, Components, mesh_cpu_ms
from bench.streaming import (
    CALL_TIMEOUT_S,
    MAX_ERROR_RATE,
    MAX_TOKENS,
    Answer,
    BadAnswer,
    BenchError,
    Call,
    Comparison,
    MeshRoute,
    Route,
    Row,
    TritonRoute,
    _git,
    _levels,
    _raise_keyboard_interrupt,
    find_sim_pids,
    idle_cores,
    measure,
    mesh_with_simulator,
    prepare_run_dir,
    prompt,
    summarise,
)
from deploy.local.triton import TritonStartError
from libs.apikeys import issue_key_at
from libs.catalog import load_catalog
from libs.config import DEFAULT_CATALOG, REPO_ROOT

TENANT = "bench-http-edge"
TARGET_CPU_RATIO = 1.3
SIM_LATENCY_MS = 0.0
IDLE_S = 3.0
DEFAULT_OUTPUT = REPO_ROOT / ".build" / "bench" / "http_edge.json"
COMPONENTS = (*MESH, "valkey", "triton", "client")
SHORT = {
    "router": "rt",
    "scheduler": "sch",
    "cache": "ca",
    "billing": "bi",
    "valkey": "vk",
    "triton": "tri",
    "client": "cl",
}

GRPC_UNARY, GRPC_STREAM = "mesh Chat (unary)", "mesh ChatStream"
HTTP_UNARY, HTTP_STREAM = "HTTP JSON", "HTTP SSE"
DIRECT = "direct infer"
# Each HTTP path and the gRPC path it is judged against.
PAIRS = ((HTTP_UNARY, GRPC_UNARY), (HTTP_STREAM, GRPC_STREAM))


class HttpRoute(Route):
    """POST /v1/chat/completions on the router's HTTP edge, as JSON or as SSE."""

    group = "triton"
    via_mesh = True

    def __init__(self, base_url: str, api_key: str, model: str, delay_ms: int, *, stream: bool):
        self.path = HTTP_STREAM if stream else HTTP_UNARY
        self.model = model
        self.delay_ms = delay_ms
        self._url = f"{base_url}/chat/completions"
        self._headers = {
            "authorization": f"Bearer {api_key}",
            "content-type": "application/json",
            "x-shepherd-cache-policy": "bypass",
            "x-shepherd-priority": "normal",
        }
        self._stream = stream
        self._session: aiohttp.ClientSession | None = None

    async def open(self, concurrency: int) -> list[Call]:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),
        )
        self._session = session

        def body(n: int) -> bytes:
            return json.dumps(
                {
                    "model": self.model,
                    "messages": [{"role": "user", "content": prompt(n)}],
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                    "stream": self._stream,
                }
            ).encode()

        async def unary(n: int) -> Answer:
            began = time.perf_counter()
            async with session.post(self._url, data=body(n), headers=self._headers) as response:
                raw = await response.read()
                ended = time.perf_counter()
                if response.status != 200:
                    raise BadAnswer(f"HTTP {response.status}: {raw[:200]!r}")
            answer = json.loads(raw)
            extra = answer["shepherd"]
            if extra["cache_hit"]:
                raise BadAnswer("answered from the cache despite the bypass header")
            text = answer["choices"][0]["message"]["content"]
            return Answer(None, ended - began, text, extra["placement"]["batch_size"])

        async def stream(n: int) -> Answer:
            began = time.perf_counter()
            first: float | None = None
            parts: list[str] = []
            extra: dict[str, Any] | None = None
            done = False
            async with session.post(self._url, data=body(n), headers=self._headers) as response:
                if response.status != 200:
                    raise BadAnswer(f"HTTP {response.status}: {(await response.read())[:200]!r}")
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[len(b"data: ") :].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise BadAnswer(f"error event: {chunk['error']}")
                    if chunk["choices"]:
                        piece = chunk["choices"][0]["delta"].get("content")
                        if piece:
                            first = first or time.perf_counter()
                            parts.append(piece)
                    else:
                        extra = chunk["shepherd"]
            ended = time.perf_counter()
            if not done or extra is None:
                raise BadAnswer("the stream ended without its usage chunk and [DONE]")
            if first is None:
                raise BadAnswer("no chunk carried text")
            if extra["cache_hit"]:
                raise BadAnswer("answered from the cache despite the bypass header")
            return Answer(
                first - began, ended - began, "".join(parts), extra["placement"]["batch_size"]
            )

        return [stream if self._stream else unary] * concurrency

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# -- reporting --------------------------------------------------------------------------------


def _cell(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _added(row: Row, direct: Row | None) -> tuple[float | None, float | None]:
    if direct is None or row.total_p50_ms is None or row.total_p99_ms is None:
        return None, None
    assert direct.total_p50_ms is not None and direct.total_p99_ms is not None
    return (
        round(row.total_p50_ms - direct.total_p50_ms, 3),
        round(row.total_p99_ms - direct.total_p99_ms, 3),
    )


def table(rows: Sequence[Row]) -> str:
    """One markdown table of every row, for docs/BENCHMARKS.md."""
    lines = [
        "| path | conc | requests | errors | req/s | p50 ms | p99 ms | added p50 ms |"
        " added p99 ms | TTFT p50 ms | router CPU ms/req | mesh CPU ms/req | same text |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        direct = next(
            (r for r in rows if r.path == DIRECT and r.concurrency == row.concurrency), None
        )
        added = _added(row, direct) if row.path != DIRECT else (None, None)
        lines.append(
            f"| {row.path} | {row.concurrency} | {row.requests} | {row.errors} |"
            f" {row.throughput_rps:.1f} | {_cell(row.total_p50_ms)} | {_cell(row.total_p99_ms)} |"
            f" {_cell(added[0], '+.2f')} | {_cell(added[1], '+.2f')} |"
            f" {_cell(row.ttft_p50_ms)} |"
            f" {_cell(row.cpu_ms_per_request.get('router'), '.3f')} |"
            f" {_cell(mesh_cpu_ms(row), '.3f')} |"
            f" {_cell(row.same_text_as_direct)} |"
        )
    return "\n".join(lines)


def cpu_table(rows: Sequence[Row]) -> str:
    """CPU ms per request of every process."""
    lines = [
        "| path | conc | " + " | ".join(COMPONENTS) + " |",
        "|---|---:|" + "---:|" * len(COMPONENTS),
    ]
    for row in rows:
        cells = " | ".join(_cell(row.cpu_ms_per_request.get(k), ".3f") for k in COMPONENTS)
        lines.append(f"| {row.path} | {row.concurrency} | {cells} |")
    return "\n".join(lines)


def judge(rows: Sequence[Row], levels: Sequence[int]) -> dict[str, Any]:
    """The router's CPU per request through HTTP over gRPC, per pair and level: <= 1.3x."""
    verdicts: list[dict[str, Any]] = []
    lines: list[str] = []
    for c in levels:
        for http, grpc_path in PAIRS:
            http_row = next((r for r in rows if r.path == http and r.concurrency == c), None)
            grpc_row = next((r for r in rows if r.path == grpc_path and r.concurrency == c), None)
            http_cpu = http_row.cpu_ms_per_request.get("router") if http_row else None
            grpc_cpu = grpc_row.cpu_ms_per_request.get("router") if grpc_row else None
            ratio = round(http_cpu / grpc_cpu, 3) if http_cpu and grpc_cpu else None
            holds = ratio is not None and ratio <= TARGET_CPU_RATIO
            verdicts.append(
                {
                    "pair": f"{http} / {grpc_path}",
                    "concurrency": c,
                    "http_router_cpu_ms": http_cpu,
                    "grpc_router_cpu_ms": grpc_cpu,
                    "ratio": ratio,
                    "holds": holds,
                }
            )
            lines.append(
                f"VERDICT router CPU {http} / {grpc_path}, c={c}:"
                f" {'target met' if holds else 'target NOT MET'}"
                f" (<= {TARGET_CPU_RATIO}x): {_cell(http_cpu, '.3f')} /"
                f" {_cell(grpc_cpu, '.3f')} ms = {_cell(ratio, '.2f')}x"
            )
    return {"verdicts": verdicts, "lines": lines, "holds": all(v["holds"] for v in verdicts)}


# -- driver -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http_edge",
        description="The router's OpenAI-compatible HTTP edge against its gRPC API and direct "
        "Triton: added latency, throughput and CPU per request, on a local mesh.",
    )
    parser.add_argument("--requests-c1", type=int, default=500, help="measured at c=1 (500)")
    parser.add_argument("--requests", type=int, default=2000, help="measured per level (2000)")
    parser.add_argument("--concurrency", type=_levels, default=(32,), help="levels above 1 (32)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (4)")
    parser.add_argument("--warmup", type=int, default=64, help="warm-up requests per path (64)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="the mesh's files and logs, emptied first (default: <output dir>/http-edge-mesh)",
    )
    parser.add_argument(
        "--require-target", action="store_true", help="exit with status 2 when a target is missed"
    )
    args = parser.parse_args(argv)
    if min(args.requests_c1, args.requests, args.rounds) < 1:
        parser.error("request counts and --rounds must be at least 1")
    if min(args.requests_c1, args.requests) < args.rounds:
        parser.error("every request count must be at least --rounds")
    return args


async def run_all(
    args: argparse.Namespace,
    routes: dict[str, Any],
    components: Components,
    check_alive: Any,
    rows: list[Row],
    report: dict[str, Any],
) -> None:
    """Idle cores first, then each level's comparison; rows are kept as they finish."""
    report["idle_cores"] = await idle_cores(components, IDLE_S)
    print(
        f"idle for {IDLE_S:g}s, cores "
        + " ".join(f"{SHORT[k]} {report['idle_cores'].get(k, 0.0):.3f}" for k in COMPONENTS),
        flush=True,
    )
    for c, requests in ((1, args.requests_c1), *((c, args.requests) for c in args.concurrency)):
        comparison = Comparison(
            f"c={c}",
            (
                routes["grpc_unary"](),
                routes["http_unary"](),
                routes["grpc_stream"](),
                routes["http_stream"](),
                routes["direct"](),
            ),
            c,
            requests,
        )
        began = time.monotonic()
        series = await measure(comparison, args.rounds, args.warmup, components, check_alive)
        direct = next((s for s in series if not s.path.via_mesh), None)
        found = [summarise(s, direct) for s in series]
        rows.extend(found)
        print(f"\nc={c} ({time.monotonic() - began:.0f}s)", flush=True)
        print(table(found), flush=True)
        failing = [r for r in found if r.error_rate > MAX_ERROR_RATE]
        if failing:
            raise BenchError(
                "; ".join(
                    f"{r.key}: {r.errors} of {r.requests} failed ({r.error_codes}),"
                    f" e.g. {r.error_samples[:2]}"
                    for r in failing
                )
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    output: Path = args.output.resolve()
    run_dir: Path = (args.run_dir or output.parent / "http-edge-mesh").resolve()
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    began = time.monotonic()
    prepare_run_dir(run_dir, "http_edge")
    catalog = load_catalog(DEFAULT_CATALOG, env={})
    if ECHO_MODEL not in catalog.models:
        raise BenchError(f"the shipped catalog needs {ECHO_MODEL}")
    delay = int(catalog.models[ECHO_MODEL].batching.max_queue_delay_ms)

    rows: list[Row] = []
    report: dict[str, Any] = {}
    failure = ""
    try:
        with mesh_with_simulator(run_dir, SIM_LATENCY_MS, {}, http=True) as (mesh, sim):
            assert mesh.triton is not None and mesh.valkey is not None
            assert mesh.valkey.pid is not None
            triton, services = mesh.triton, mesh.services
            api_key = asyncio.run(issue_key_at(mesh.redis_url, TENANT))
            router = mesh.address("router")

            def check_alive() -> None:
                for name, proc in services.items():
                    if proc.poll() is not None:
                        raise BenchError(
                            f"the {name} service exited with status {proc.returncode}; see"
                            f" {run_dir / 'logs' / name}.log"
                        )
                if not triton.is_running():
                    raise BenchError(f"Triton exited; see {run_dir / 'logs' / 'triton.log'}")

            routes = {
                "grpc_unary": lambda: MeshRoute(
                    "triton", router, api_key, ECHO_MODEL, delay, unary=True
                ),
                "grpc_stream": lambda: MeshRoute(
                    "triton", router, api_key, ECHO_MODEL, delay, unary=False
                ),
                "http_unary": lambda: HttpRoute(
                    mesh.openai_base_url, api_key, ECHO_MODEL, delay, stream=False
                ),
                "http_stream": lambda: HttpRoute(
                    mesh.openai_base_url, api_key, ECHO_MODEL, delay, stream=True
                ),
                "direct": lambda: TritonRoute(
                    triton.config.grpc_url, ECHO_TRITON_MODEL, stream=False
                ),
            }
            components = Components(
                pids={
                    **{name: [services[name].pid] for name in MESH},
                    "valkey": [mesh.valkey.pid],
                    "simulator": find_sim_pids(sim.api_key),
                },
                triton_pgid=triton.pgid,
            )
            asyncio.run(run_all(args, routes, components, check_alive, rows, report))
    except (RuntimeError, TritonStartError) as error:  # BenchError, MeshStartError, the sim's
        failure = str(error)
        print(f"FAILED: {error}", file=sys.stderr, flush=True)

    levels = (1, *args.concurrency)
    judged = judge(rows, levels)
    markdown = {"results": table(rows), "cpu_ms_per_request": cpu_table(rows)}
    print("\nAll results (ms)")
    print(markdown["results"])
    print("\nCPU ms per request, per process")
    print(markdown["cpu_ms_per_request"])
    print()
    for line in judged["lines"]:
        print(line)
    report.update(
        {
            "benchmark": "http_edge",
            "command": " ".join(
                ["python -m bench.http_edge", *(argv if argv is not None else sys.argv[1:])]
            ),
            "git": _git("describe", "--always", "--dirty"),
            "started_utc": started.isoformat(timespec="seconds"),
            "duration_s": round(time.monotonic() - began, 1),
            "machine": machine(load_before),
            "model": ECHO_MODEL,
            "max_queue_delay_ms": delay,
            "target_cpu_ratio": TARGET_CPU_RATIO,
            "verdicts": judged["verdicts"],
            "rows": [asdict(row) for row in rows],
            "markdown": markdown,
            "failure": failure,
        }
    )
    return write_report(
        report,
        output,
        "docs/BENCHMARKS.md (HTTP edge) explains it",
        failed=bool(failure),
        require=args.require_target,
        holds=judged["holds"],
    )


if __name__ == "__main__":
    run_main(main, (BenchError,))
