"""CPU per hosted call: the openai SDK's default httpx transport against aiohttp.

Why this exists: the scheduler makes one HTTP call per hosted request, and a streamed answer
is dozens of SSE chunks, each parsed by the transport and the SDK. On a busy scheduler that
CPU competes with queueing and batching, so the hosted client uses whichever transport costs
less per call. The SDK offers two: its default `httpx2` client
(`openai.DefaultAsyncHttpxClient`) and aiohttp (`openai.DefaultAioHttpClient`).

What it runs: the provider simulator (deploy/local/provider_sim.py) as its own process on
127.0.0.1, with no added latency and no rate limit, and in this process one `HostedClient`
(services/scheduler/hosted.py) per transport, built the way the scheduler builds them. Two
modes per transport:

* stream: `HostedClient.chat`, the scheduler's path: a streamed completion with the usage
  chunk, retries and breaker armed, trace headers, deltas counted;
* unary: the same pooled SDK client's `chat.completions.create(stream=False)`, one JSON
  answer, for comparison.

Each (transport, mode, concurrency) runs N calls closed-loop (each worker sends its next call
when the previous one is answered), in three rounds interleaved with the others after a
warm-up round; the median round is reported. CPU is this process's user+system time
(`time.process_time`) over the round divided by the calls, so the simulator's CPU and the
machine's other load do not count. Every call asks for the same completion (the simulator's
answer to it is 26 tokens), so both transports carry the same bytes.

`make bench-hosted` runs it and writes .build/bench/hosted_transport.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from deploy.local.provider_sim import SimProcess
from libs.config import REPO_ROOT
from libs.retry import RetryPolicy
from services.scheduler.hosted import HostedClient, HostedConfig, Transport

API_KEY = "sk-bench-hosted"
MODEL = "gpt-4.1"
MESSAGES = (("system", "Be brief."), ("user", "How many sheep are in the mesh tonight?"))
MAX_TOKENS = 32
TRANSPORTS: tuple[Transport, ...] = ("httpx", "aiohttp")
MODES = ("stream", "unary")
ROUNDS = 3
OUTPUT = REPO_ROOT / ".build" / "bench" / "hosted_transport.json"


@dataclass(frozen=True)
class Row:
    transport: str
    mode: str
    concurrency: int
    calls: int
    errors: int
    cpu_ms_per_call: float
    wall_ms_per_call: float
    calls_per_s: float


def make_client(base_url: str, transport: Transport) -> HostedClient:
    return HostedClient.create(
        HostedConfig(
            base_url=base_url,
            api_key=API_KEY,
            provider="sim",
            transport=transport,
            retry=RetryPolicy(attempts=1, attempt_timeout_s=30.0),
        )
    )


def step_for(client: HostedClient, mode: str) -> Callable[[], Awaitable[None]]:
    """One call of `mode` on `client`."""
    sdk = client.sdk
    assert sdk is not None
    messages = [{"role": role, "content": content} for role, content in MESSAGES]

    async def stream() -> None:
        await client.chat(
            MODEL,
            MESSAGES,
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            top_p=None,
            seed=7,
            deadline=time.monotonic() + 30.0,
        )

    async def unary() -> None:
        await sdk.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            seed=7,
            timeout=30.0,
        )

    return stream if mode == "stream" else unary


async def run_round(
    step: Callable[[], Awaitable[None]], calls: int, concurrency: int
) -> tuple[float, float, int]:
    """CPU ms per call, wall seconds and errors of `calls` calls by `concurrency` workers."""
    counter = iter(range(calls))
    errors = 0

    async def worker() -> None:
        nonlocal errors
        for _ in counter:
            try:
                await step()
            except Exception:
                errors += 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall
    return (time.process_time() - cpu) * 1000 / calls, wall, errors


async def measure(
    base_url: str, calls: int, warmup: int, levels: list[int], rounds: int
) -> list[Row]:
    clients = {transport: make_client(base_url, transport) for transport in TRANSPORTS}
    rows: list[Row] = []
    try:
        for concurrency in levels:
            samples: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
            for round_ in range(rounds + 1):  # round 0 warms up connections and code paths
                for transport, client in clients.items():
                    for mode in MODES:
                        n = calls if round_ else warmup
                        sample = await run_round(step_for(client, mode), n, concurrency)
                        if round_:
                            samples.setdefault((transport, mode), []).append(sample)
            for (name, mode), found in samples.items():
                cpu, wall, errors = sorted(found)[len(found) // 2]
                rows.append(
                    Row(
                        name,
                        mode,
                        concurrency,
                        calls,
                        errors,
                        round(cpu, 4),
                        round(wall * 1000 / calls * concurrency, 3),
                        round(calls / wall, 1),
                    )
                )
    finally:
        for client in clients.values():
            await client.aclose()
    return rows


def report(rows: list[Row]) -> tuple[str, dict[str, str]]:
    """The table, a ratio line per mode and level, and the cheapest transport per mode."""
    lines = [
        f"{'transport':<9} {'mode':<6} {'conc':>4} {'calls':>6} {'errors':>6}"
        f" {'cpu ms/call':>11} {'wall ms/call':>12} {'calls/s':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r.transport:<9} {r.mode:<6} {r.concurrency:>4} {r.calls:>6} {r.errors:>6}"
            f" {r.cpu_ms_per_call:>11.3f} {r.wall_ms_per_call:>12.3f} {r.calls_per_s:>8.1f}"
        )
    cheapest: dict[str, str] = {}
    for mode in MODES:
        totals: dict[str, float] = {t: 0.0 for t in TRANSPORTS}
        for concurrency in sorted({r.concurrency for r in rows}):
            cpu = {
                r.transport: r.cpu_ms_per_call
                for r in rows
                if r.mode == mode and r.concurrency == concurrency
            }
            for transport, value in cpu.items():
                totals[transport] += value
            lines.append(
                f"{mode} at concurrency {concurrency}: aiohttp / httpx CPU per call = "
                f"{cpu['aiohttp'] / cpu['httpx']:.2f}"
            )
        cheapest[mode] = min(totals, key=lambda t: totals[t])
    lines.append(
        f"CHEAPEST: stream {cheapest['stream']}, unary {cheapest['unary']} "
        "(the scheduler streams every hosted call)"
    )
    return "\n".join(lines), cheapest


def git_describe() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hosted_transport", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per measured round")
    parser.add_argument("--warmup", type=int, default=200, help="calls in the warm-up round")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="measured rounds (median)")
    args = parser.parse_args(argv)
    levels = [int(level) for level in args.concurrency.split(",") if level.strip()]
    started = time.time()
    with SimProcess(api_key=API_KEY, rpm=10**9, latency_ms=0) as sim:
        rows = asyncio.run(measure(sim.base_url, args.calls, args.warmup, levels, args.rounds))
    text, cheapest = report(rows)
    print(text)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(
        json.dumps(
            {
                "rows": [asdict(r) for r in rows],
                "cheapest": cheapest,
                "git": git_describe(),
                "duration_s": round(time.time() - started, 1),
            },
            indent=2,
        )
    )
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
