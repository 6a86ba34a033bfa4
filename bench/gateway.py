"""What the mesh itself costs per request, measured the way gateways are measured.

Why this exists: Shepherd puts four Python services (router, cache, scheduler, billing, with
Valkey for keys, quotas and the cache) between a caller and a model. Issue 11 asks to cut the
mesh's own cost per request four-fold, and to publish it as the field publishes gateway
benchmarks: the latency a gateway adds over calling the backend directly (p50 and p99 at
concurrency 1), the CPU it burns per request, and the throughput it sustains at a latency
bound. Behind a real model the model's cost hides the gateway's, so, as public gateway
benchmarks put a mock backend behind the gateway under test, the self-hosted path here runs
`shepherd-echo`: Triton model `echo_lm`, which answers with the start of its prompt
(tiny_lm's interface and tokenizer, next to no work), batched like shepherd-tiny (5 ms max
queue delay, which a lone request on an idle model does not wait out).

It starts one whole local mesh (`deploy/local/launcher.py`'s `LocalMesh` on free 127.0.0.1
ports, the shipped catalog: Valkey, a CPU Triton node, the four services) and a provider
simulator with no latency and a rate limit nothing reaches, issues an API key for tenant
`bench-gateway`, and measures with a closed-loop client (N workers, each sending its next
request when the last one answered):

a. Added latency at concurrency 1, mesh minus direct, p50 and p99, three comparisons:
   - Triton, cache miss: `RouterService/Chat` on shepherd-echo with `CACHE_POLICY_BYPASS`
     against `tritonclient.grpc.aio` `infer` straight to echo_lm with the prompt rendered as
     the scheduler renders it (`render_prompt`), the same MAX_TOKENS, temperature 0, seed 0;
   - cache hit: `Chat` on shepherd-echo with the default cache policy, on prompts answered
     (and so stored) just before; every answer must say `cache_hit`. Same direct baseline;
   - hosted: `Chat` on deepseek-v3.2 (bypass) against the official `openai` `AsyncOpenAI`
     (aiohttp transport, as the scheduler uses) calling the simulator, not streamed. The
     mesh's side is whatever a hosted request costs through the mesh with the shipped
     catalog (deepseek-v3.2's 10 ms batching delay, which a hosted model no longer waits).
   The paths of one comparison get the same prompts and take turns round by round in
   rotating order (bench/streaming.py's `measure`), so drift and noisy neighbours hit them
   alike; each path's answer text is checked against the direct one (`same_text_as_direct`).
b. CPU milliseconds per request of every process, read from /proc over each path's rounds:
   router, scheduler, cache, billing, valkey, triton (tritonserver and its Python backend
   stubs, by process group), simulator and this client. The four services together are the
   headline "mesh CPU ms/req".
c. Throughput frontier: mesh (`Chat`, shepherd-echo, bypass) against direct Triton (echo_lm)
   at each concurrency level (1, 4, 16, 32, 64, 128, 256 by default; level 1 is comparison a's),
   as req/s, p50, p99 and the cores each process used; the frontier is, per path, the highest
   req/s measured whose p99 stays under 10, 50 and 100 ms.
d. `--profile`: one more mesh level (not counted in c) with py-spy recording each of the four
   services (`bench/pyspy.py`): collapsed stacks and a flame graph per service under
   .build/bench/profiles/, and the top frames by self and by inclusive time, printed.
e. `--plot`: p50 and p99 latency against throughput for both paths, as a PNG.
f. Targets, each judged on one VERDICT line: mesh CPU per request across the four services
   at concurrency 1: Triton cache miss <= 1.5 ms, hosted <= 2 ms, cache hit <= 0.8 ms; added
   latency at concurrency 1 on the Triton path: p50 <= 2 ms and p99 <= 5 ms; mesh throughput
   >= 800 req/s (its p99 is reported).

It is a benchmark, not a test: a missed target is reported and exits 0 (2 with
--require-target); it exits 1 only when it cannot measure (the mesh does not start, a process
dies, more than 1% of a path's requests fail, or a requested profile cannot be recorded).
Everything goes to .build/bench/gateway.json, with git describe, the date and the load
average. `make bench-gateway` runs it; only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.batching import machine, process_cpu_s, run_main, write_report
from bench.pyspy import Recorder, py_spy_binary, summaries_text, write_profiles
from bench.streaming import (
    HOSTED_MODEL,
    MAX_ERROR_RATE,
    WARMUP_BASE,
    BenchError,
    CacheMode,
    Comparison,
    MeshRoute,
    Row,
    SseRoute,
    TritonRoute,
    _diff,
    _git,
    _levels,
    _raise_keyboard_interrupt,
    closed_loop,
    fail_on_errors,
    find,
    find_sim_pids,
    idle_cores,
    measure,
    mesh_with_simulator,
    prepare_run_dir,
    summarise,
)
from deploy.local.launcher import LocalMesh
from deploy.local.triton import TritonStartError, process_group_members
from libs.apikeys import issue_key_at
from libs.catalog import load_catalog
from libs.config import DEFAULT_CATALOG, REPO_ROOT

ECHO_MODEL = "shepherd-echo"
ECHO_TRITON_MODEL = "echo_lm"
TENANT = "bench-gateway"
# The upstream answers at once: what is measured is the mesh, not a simulated provider.
SIM_LATENCY_MS = 0.0
MESH_START_TIMEOUT_S = 240.0
IDLE_S = 3.0
FILL_CONCURRENCY = 8

# The processes CPU is split out for, in table order; the first four are the mesh.
MESH = ("router", "scheduler", "cache", "billing")
COMPONENTS = (*MESH, "valkey", "triton", "simulator", "client")
SHORT = {
    "router": "rt",
    "scheduler": "sch",
    "cache": "ca",
    "billing": "bi",
    "valkey": "vk",
    "triton": "tri",
    "simulator": "sim",
    "client": "cl",
    "other": "oth",
}

TARGET_MESH_CPU_MS = {"triton": 1.5, "hosted": 2.0, "cache hit": 0.8}
TARGET_ADDED_P50_MS = 2.0
TARGET_ADDED_P99_MS = 5.0
TARGET_THROUGHPUT_RPS = 800.0
P99_BOUNDS_MS = (10.0, 50.0, 100.0)

OUTPUT_DIR = REPO_ROOT / ".build" / "bench"
DEFAULT_OUTPUT = OUTPUT_DIR / "gateway.json"
DEFAULT_PLOT = OUTPUT_DIR / "gateway.png"
DEFAULT_PROFILE_DIR = OUTPUT_DIR / "profiles"

# Row keys (bench/streaming.py's Route.key plus the concurrency).
MESH_MISS = f"triton/mesh Chat (unary)/{ECHO_MODEL}/d{{delay}}/c{{c}}"
MESH_HIT = f"triton/mesh Chat (cache hit)/{ECHO_MODEL}/d{{delay}}/c1"
DIRECT_TRITON = f"triton/direct infer/{ECHO_TRITON_MODEL}/c{{c}}"
MESH_HOSTED = f"hosted/mesh Chat (unary)/{HOSTED_MODEL}/d{{delay}}/c1"
DIRECT_HOSTED = f"hosted/direct JSON (openai)/{HOSTED_MODEL}/c1"


@dataclass
class Components:
    """The processes of the run, by component: what `measure` reads CPU time from."""

    pids: dict[str, list[int]]
    triton_pgid: int | None

    def cpu_s(self) -> dict[str, float]:
        times = os.times()
        used = {name: process_cpu_s(pids) for name, pids in self.pids.items()}
        triton = process_group_members(self.triton_pgid) if self.triton_pgid else []
        used["triton"] = process_cpu_s(triton)
        used["client"] = times.user + times.system
        return used


def mesh_cpu_ms(row: Row | None) -> float | None:
    """The four services' CPU per request: the headline figure."""
    if row is None or not row.cpu_ms_per_request:
        return None
    return round(sum(row.cpu_ms_per_request.get(name, 0.0) for name in MESH), 3)


# -- measuring --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What every measurement needs from the running mesh."""

    router: str
    api_key: str
    triton_url: str
    sim_url: str
    sim_key: str
    echo_delay_ms: int
    hosted_delay_ms: int
    components: Components
    check_alive: Callable[[], None]

    def mesh(self, model: str, delay_ms: int, cache: CacheMode = "bypass") -> MeshRoute:
        """Unary `Chat` through the router on `model`."""
        group = "hosted" if model == HOSTED_MODEL else "triton"
        return MeshRoute(group, self.router, self.api_key, model, delay_ms, unary=True, cache=cache)

    def direct_triton(self) -> TritonRoute:
        return TritonRoute(self.triton_url, ECHO_TRITON_MODEL, stream=False)


async def fill_cache(setup: Setup, indices: Sequence[int]) -> None:
    """Answer every prompt the cache-hit path will send once, so the cache holds them all."""
    route = setup.mesh(ECHO_MODEL, setup.echo_delay_ms, cache="fill")
    try:
        calls = await route.open(FILL_CONCURRENCY)
        result = await closed_loop(calls, indices)
    finally:
        await route.close()
    if result.errors:
        raise BenchError(
            f"filling the cache: {sum(result.errors.values())} of {len(indices)} failed,"
            f" e.g. {result.error_samples[:2]}"
        )


async def run_comparison(
    comparison: Comparison, args: argparse.Namespace, setup: Setup, rows: list[Row]
) -> list[Row]:
    """Measure one comparison, print its rows, keep them, and stop the run on errors."""
    began = time.monotonic()
    series = await measure(
        comparison, args.rounds, args.warmup, setup.components, setup.check_alive
    )
    direct = next((s for s in series if not s.path.via_mesh), None)
    found = [summarise(s, direct) for s in series]
    rows.extend(found)
    for row in found:
        print(table_row(row), flush=True)
    print(f"  ({comparison.name}: {time.monotonic() - began:.0f}s)", flush=True)
    fail_on_errors(found)
    return found


async def profile_level(args: argparse.Namespace, setup: Setup, mesh: LocalMesh) -> dict[str, Any]:
    """One more mesh level with py-spy on each service; returns the profile summaries."""
    c = args.profile_concurrency
    route = setup.mesh(ECHO_MODEL, setup.echo_delay_ms)
    recorder = Recorder(
        {name: mesh.services[name].pid for name in MESH}, args.profile_dir, args.profile_rate
    )
    try:
        calls = await route.open(c)
        await closed_loop(calls, range(WARMUP_BASE, WARMUP_BASE + max(args.warmup, 2 * c)))
        await recorder.start()
        try:
            result = await closed_loop(calls, range(args.profile_requests))
        finally:
            profiles = await recorder.stop()
    finally:
        await route.close()
    setup.check_alive()
    rps = len(result.answers) / result.wall_s if result.wall_s else 0.0
    title = (
        f"RouterService/Chat on {ECHO_MODEL}, c={c}, {args.profile_requests} requests,"
        f" {rps:.0f} req/s while profiled, git {_git('rev-parse', '--short', 'HEAD')}"
    )
    summaries = write_profiles(profiles, args.profile_dir, title, top=args.profile_top)
    text = summaries_text(summaries)
    print(f"\nProfile ({title}); flame graphs in {args.profile_dir}:\n{text}", flush=True)
    return {
        "title": title,
        "concurrency": c,
        "requests": args.profile_requests,
        "errors": sum(result.errors.values()),
        "throughput_rps_while_profiled": round(rps, 1),
        "rate_hz": args.profile_rate,
        "dir": str(args.profile_dir),
        "summaries": [asdict(s) for s in summaries],
        "text": text,
    }


async def run_all(
    args: argparse.Namespace,
    setup: Setup,
    mesh: LocalMesh,
    rows: list[Row],
    report: dict[str, Any],
) -> None:
    """Every measurement in turn; rows are appended as they finish, so a failure keeps them."""
    report["idle_cores"] = await idle_cores(setup.components, IDLE_S)
    print(
        f"idle for {IDLE_S:g}s before any load, cores "
        + " ".join(f"{SHORT[k]} {report['idle_cores'].get(k, 0.0):.3f}" for k in COMPONENTS),
        flush=True,
    )
    print(TABLE_HEADER, flush=True)

    # a, b: concurrency 1. The cache-hit path's prompts (measured and warm-up) are answered
    # once first, so each of its requests finds its answer stored.
    warm_c1 = max(args.warmup, 2)
    await fill_cache(setup, [*range(args.requests_c1), *range(WARMUP_BASE, WARMUP_BASE + warm_c1)])
    await run_comparison(
        Comparison(
            "self-hosted and cache hit, c=1",
            (
                setup.mesh(ECHO_MODEL, setup.echo_delay_ms),
                setup.mesh(ECHO_MODEL, setup.echo_delay_ms, cache="hit"),
                setup.direct_triton(),
            ),
            1,
            args.requests_c1,
        ),
        args,
        setup,
        rows,
    )
    await run_comparison(
        Comparison(
            "hosted, c=1",
            (
                setup.mesh(HOSTED_MODEL, setup.hosted_delay_ms),
                SseRoute(setup.sim_url, setup.sim_key, stream=False),
            ),
            1,
            args.hosted_requests,
        ),
        args,
        setup,
        rows,
    )
    # c: the throughput frontier (level 1 is the comparison above).
    for c in args.concurrency:
        if c == 1:
            continue
        await run_comparison(
            Comparison(
                f"throughput, c={c}",
                (setup.mesh(ECHO_MODEL, setup.echo_delay_ms), setup.direct_triton()),
                c,
                args.requests,
            ),
            args,
            setup,
            rows,
        )
    # d: the profile, last, so py-spy's own CPU disturbs no measured level.
    if args.profile:
        report["profile"] = await profile_level(args, setup, mesh)


# -- reporting --------------------------------------------------------------------------------

TABLE_HEADER = (
    f"{'path':<22} {'model':<14} {'conc':>4} {'reqs':>5} {'err':>3} {'req/s':>7} "
    f"{'p50 ms':>7} {'p99 ms':>7} {'batch':>5} {'mesh cpu':>8}  "
    "cpu ms/req rt/sch/ca/bi | vk/tri/sim/cl   cores rt/sch/ca/bi/vk/tri/sim/cl/oth"
)


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_row(row: Row) -> str:
    cpu = row.cpu_ms_per_request
    mesh = "/".join(f"{cpu.get(k, 0.0):.2f}" for k in MESH)
    rest = "/".join(f"{cpu.get(k, 0.0):.2f}" for k in COMPONENTS[4:])
    cores = "/".join(f"{row.cpu_cores.get(k, 0.0):.2f}" for k in (*COMPONENTS, "other"))
    return (
        f"{row.path:<22} {row.model:<14} {row.concurrency:>4} {row.requests:>5} {row.errors:>3} "
        f"{row.throughput_rps:>7.1f} {_cell(row.total_p50_ms, '7.2f'):>7} "
        f"{_cell(row.total_p99_ms, '7.2f'):>7} {_cell(row.mean_batch_size, '5.1f'):>5} "
        f"{_cell(mesh_cpu_ms(row), '8.3f'):>8}  {mesh} | {rest}   {cores}"
    )


def latency_table(rows: Sequence[Row], directs: dict[str, Row | None]) -> str:
    """Markdown: the concurrency-1 comparisons, with what the mesh adds over its direct path."""
    lines = [
        "| path | model | requests | errors | req/s | p50 ms | p99 ms | added p50 ms |"
        " added p99 ms | mesh CPU ms/req | same text as direct |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = directs.get(r.key)
        added50 = _diff(r.total_p50_ms, base.total_p50_ms) if base else None
        added99 = _diff(r.total_p99_ms, base.total_p99_ms) if base else None
        lines.append(
            f"| {r.path} | {r.model} | {r.requests} | {r.errors} | {r.throughput_rps:.1f} |"
            f" {_cell(r.total_p50_ms, '.2f')} | {_cell(r.total_p99_ms, '.2f')} |"
            f" {_cell(added50, '+.2f')} | {_cell(added99, '+.2f')} |"
            f" {_cell(mesh_cpu_ms(r), '.3f')} | {_cell(r.same_text_as_direct, '.2f')} |"
        )
    return "\n".join(lines)


def cpu_table(rows: Sequence[Row]) -> str:
    """Markdown: CPU ms per request of every process, per path and level."""
    lines = [
        "| path | conc | "
        + " | ".join(COMPONENTS[:4])
        + " | **mesh** | "
        + " | ".join(COMPONENTS[4:])
        + " |",
        "|---|---:|" + "---:|" * (len(COMPONENTS) + 1),
    ]
    for r in rows:
        cpu = r.cpu_ms_per_request
        lines.append(
            f"| {r.path} ({r.model}) | {r.concurrency} | "
            + " | ".join(f"{cpu.get(k, 0.0):.3f}" for k in COMPONENTS[:4])
            + f" | **{_cell(mesh_cpu_ms(r), '.3f')}** | "
            + " | ".join(f"{cpu.get(k, 0.0):.3f}" for k in COMPONENTS[4:])
            + " |"
        )
    return "\n".join(lines)


def throughput_table(rows: Sequence[Row]) -> str:
    """Markdown: the frontier's levels, mesh and direct, with the cores each process used."""
    lines = [
        "| path | conc | requests | errors | req/s | p50 ms | p99 ms | mean batch | mesh CPU"
        " ms/req | cores rt/sch/ca/bi/vk/tri/sim/cl/oth |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cores = "/".join(f"{r.cpu_cores.get(k, 0.0):.2f}" for k in (*COMPONENTS, "other"))
        lines.append(
            f"| {r.path} | {r.concurrency} | {r.requests} | {r.errors} |"
            f" {r.throughput_rps:.1f} | {_cell(r.total_p50_ms, '.2f')} |"
            f" {_cell(r.total_p99_ms, '.2f')} | {_cell(r.mean_batch_size, '.1f')} |"
            f" {_cell(mesh_cpu_ms(r), '.3f')} | {cores} |"
        )
    return "\n".join(lines)


def frontier(rows: Sequence[Row]) -> dict[str, list[dict[str, Any]]]:
    """Per path, for each p99 bound, the highest req/s measured with p99 under it."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, rows_of in (
        ("mesh", [r for r in rows if r.path == "mesh Chat (unary)"]),
        ("direct", [r for r in rows if r.path == "direct infer"]),
    ):
        entries = []
        for bound in P99_BOUNDS_MS:
            under = [r for r in rows_of if r.total_p99_ms is not None and r.total_p99_ms < bound]
            best = max(under, key=lambda r: r.throughput_rps, default=None)
            entries.append(
                {
                    "p99_under_ms": bound,
                    "throughput_rps": best.throughput_rps if best else None,
                    "concurrency": best.concurrency if best else None,
                    "p99_ms": best.total_p99_ms if best else None,
                }
            )
        out[name] = entries
    return out


def frontier_table(front: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| p99 under | " + " | ".join(front) + " |",
        "|---|" + "---:|" * len(front),
    ]
    for i, bound in enumerate(P99_BOUNDS_MS):
        cells = []
        for entries in front.values():
            e = entries[i]
            cells.append(
                "none"
                if e["throughput_rps"] is None
                else f"{e['throughput_rps']:.0f} req/s (c={e['concurrency']},"
                f" p99 {e['p99_ms']:.1f} ms)"
            )
        lines.append(f"| {bound:g} ms | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict(name: str, target: str, value: float | None, holds: bool | None, unit: str) -> str:
    if holds is None or value is None:
        return f"VERDICT {name}: cannot judge ({target}): a path has no results."
    return f"VERDICT {name}: target {'HOLDS' if holds else 'NOT MET'} ({target}): {value:.3f}{unit}"


def judge(rows: Sequence[Row], delays: dict[str, int]) -> dict[str, Any]:
    """Every target's verdict, as lines and as data."""
    echo, hosted = delays[ECHO_MODEL], delays[HOSTED_MODEL]
    miss = find(rows, MESH_MISS.format(delay=echo, c=1))
    hit = find(rows, MESH_HIT.format(delay=echo))
    direct = find(rows, DIRECT_TRITON.format(c=1))
    mesh_hosted = find(rows, MESH_HOSTED.format(delay=hosted))
    targets: dict[str, dict[str, Any]] = {}

    def target(name: str, text: str, value: float | None, limit: float, unit: str) -> None:
        holds = None if value is None else value <= limit
        targets[name] = {"target": text, "value": value, "limit": limit, "holds": holds}

    for path, row in (("triton", miss), ("hosted", mesh_hosted), ("cache hit", hit)):
        limit = TARGET_MESH_CPU_MS[path]
        target(
            f"cpu {path}",
            f"mesh CPU per request, {path}, c=1, router+scheduler+cache+billing <= {limit:g} ms",
            mesh_cpu_ms(row),
            limit,
            " ms",
        )
    added50 = _diff(miss.total_p50_ms, direct.total_p50_ms) if miss and direct else None
    added99 = _diff(miss.total_p99_ms, direct.total_p99_ms) if miss and direct else None
    target(
        "latency p50",
        f"added latency at c=1 over direct Triton, p50 <= {TARGET_ADDED_P50_MS:g} ms",
        added50,
        TARGET_ADDED_P50_MS,
        " ms",
    )
    target(
        "latency p99",
        f"added latency at c=1 over direct Triton, p99 <= {TARGET_ADDED_P99_MS:g} ms",
        added99,
        TARGET_ADDED_P99_MS,
        " ms",
    )
    mesh_levels = [r for r in rows if r.path == "mesh Chat (unary)" and r.group == "triton"]
    best = max(mesh_levels, key=lambda r: r.throughput_rps, default=None)
    targets["throughput"] = {
        "target": f"mesh throughput >= {TARGET_THROUGHPUT_RPS:g} req/s (shepherd-echo, bypass)",
        "value": best.throughput_rps if best else None,
        "limit": TARGET_THROUGHPUT_RPS,
        "holds": None if best is None else best.throughput_rps >= TARGET_THROUGHPUT_RPS,
        "concurrency": best.concurrency if best else None,
        "p99_ms": best.total_p99_ms if best else None,
    }
    lines = []
    for name, t in targets.items():
        holds = t["holds"]
        if name == "throughput":
            extra = f" at c={t['concurrency']}, p99 {t['p99_ms']} ms" if best else ""
            if holds is None:
                lines.append(f"VERDICT {name}: cannot judge ({t['target']}): no mesh level.")
            else:
                lines.append(
                    f"VERDICT {name}: target {'HOLDS' if holds else 'NOT MET'} ({t['target']}):"
                    f" {t['value']:.1f} req/s{extra}"
                )
        else:
            lines.append(_verdict(name, t["target"], t["value"], holds, " ms"))
    return {
        "targets": targets,
        "added_latency_ms": {
            "triton_p50": added50,
            "triton_p99": added99,
            "cache_hit_p50": _diff(hit.total_p50_ms, direct.total_p50_ms)
            if hit and direct
            else None,
            "cache_hit_p99": _diff(hit.total_p99_ms, direct.total_p99_ms)
            if hit and direct
            else None,
            **_hosted_added(rows, hosted),
        },
        "holds": all(t["holds"] for t in targets.values()),
        "lines": lines,
    }


def _hosted_added(rows: Sequence[Row], delay: int) -> dict[str, float | None]:
    mesh = find(rows, MESH_HOSTED.format(delay=delay))
    base = find(rows, DIRECT_HOSTED)
    if mesh is None or base is None:
        return {"hosted_p50": None, "hosted_p99": None}
    return {
        "hosted_p50": _diff(mesh.total_p50_ms, base.total_p50_ms),
        "hosted_p99": _diff(mesh.total_p99_ms, base.total_p99_ms),
    }


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """p50 and p99 latency against throughput, mesh and direct, each point labelled with its
    concurrency; the frontier's p99 bounds as dotted lines."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for name, path_name, colour in (
        ("mesh", "mesh Chat (unary)", "tab:red"),
        ("direct Triton", "direct infer", "tab:blue"),
    ):
        levels = sorted(
            (r for r in rows if r.path == path_name and r.group == "triton"),
            key=lambda r: r.concurrency,
        )
        if not levels:
            continue
        x = [r.throughput_rps for r in levels]
        for q, style in (("p50", "-o"), ("p99", "--s")):
            y = [getattr(r, f"total_{q}_ms") for r in levels]
            ax.plot(x, y, style, color=colour, label=f"{name} {q}", markersize=4)
        for r in levels:
            ax.annotate(
                f"c={r.concurrency}",
                (r.throughput_rps, r.total_p99_ms),
                textcoords="offset points",
                xytext=(3, 4),
                fontsize=7,
                color=colour,
            )
    for bound in P99_BOUNDS_MS:
        ax.axhline(bound, color="grey", linestyle=":", linewidth=0.8)
        ax.annotate(
            f"{bound:g} ms",
            (0, bound),
            xycoords=("axes fraction", "data"),
            xytext=(2, 2),
            textcoords="offset points",
            fontsize=7,
            color="grey",
        )
    # Both axes logarithmic: the mesh and the direct path are an order of magnitude apart.
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("throughput (requests/s, log scale)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# -- driver -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway",
        description="The mesh's own cost per request (added latency, CPU per process, "
        "throughput frontier) against calling Triton and the hosted API directly.",
    )
    parser.add_argument(
        "--concurrency",
        type=_levels,
        default=(1, 4, 16, 32, 64, 128, 256),
        help="throughput levels (1,4,16,32,64,128,256); level 1 is always measured",
    )
    parser.add_argument(
        "--requests", type=int, default=1500, help="measured per path at each level > 1 (1500)"
    )
    parser.add_argument(
        "--requests-c1", type=int, default=500, help="measured per path at c=1 (500)"
    )
    parser.add_argument(
        "--hosted-requests", type=int, default=300, help="measured per hosted path (300)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (4)")
    parser.add_argument(
        "--warmup", type=int, default=32, help="warm-up requests per path, at least 2x conc (32)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the four services with py-spy during one more mesh level",
    )
    parser.add_argument(
        "--profile-concurrency", type=int, default=32, help="the profiled level's (32)"
    )
    parser.add_argument(
        "--profile-requests", type=int, default=1500, help="requests while profiled (1500)"
    )
    parser.add_argument("--profile-rate", type=int, default=100, help="samples per second (100)")
    parser.add_argument("--profile-top", type=int, default=10, help="frames listed (10)")
    parser.add_argument(
        "--profile-dir", type=Path, default=DEFAULT_PROFILE_DIR, help="collapsed stacks, SVGs"
    )
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="latency/throughput PNG")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="the mesh's files and logs, emptied first (default: <output dir>/gateway-mesh)",
    )
    parser.add_argument(
        "--require-target", action="store_true", help="exit with status 2 when a target is missed"
    )
    args = parser.parse_args(argv)
    counts = (args.requests_c1, args.requests, args.hosted_requests, args.profile_requests)
    if min(*counts, args.rounds, args.profile_concurrency, args.profile_rate) < 1:
        parser.error("request counts, --rounds and the profile settings must be at least 1")
    if min(args.requests_c1, args.requests, args.hosted_requests) < args.rounds:
        parser.error("every request count must be at least --rounds")
    if args.profile and py_spy_binary() is None:
        parser.error("--profile needs py-spy (a dev dependency: pip install -e '.[dev]')")
    args.profile_dir = args.profile_dir.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    output: Path = args.output.resolve()
    run_dir: Path = (args.run_dir or output.parent / "gateway-mesh").resolve()
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    began = time.monotonic()
    prepare_run_dir(run_dir, "gateway")
    if args.profile:
        shutil.rmtree(args.profile_dir, ignore_errors=True)

    catalog = load_catalog(DEFAULT_CATALOG, env={})
    if ECHO_MODEL not in catalog.models or HOSTED_MODEL not in catalog.models:
        raise BenchError(f"the shipped catalog needs {ECHO_MODEL} and {HOSTED_MODEL}")
    # The batching delay each mesh path waits at most: part of its row key, and reported.
    delays = {
        name: int(catalog.models[name].batching.max_queue_delay_ms)
        for name in (ECHO_MODEL, HOSTED_MODEL)
    }

    rows: list[Row] = []
    report: dict[str, Any] = {}
    failure = ""
    try:
        with mesh_with_simulator(run_dir, SIM_LATENCY_MS, {}) as (mesh, sim):
            assert mesh.triton is not None and mesh.valkey is not None
            assert mesh.valkey.pid is not None
            triton = mesh.triton
            services = mesh.services

            def check_alive() -> None:
                for name, proc in services.items():
                    if proc.poll() is not None:
                        raise BenchError(
                            f"the {name} service exited with status {proc.returncode}; see"
                            f" {run_dir / 'logs' / name}.log"
                        )
                if not triton.is_running():
                    raise BenchError(f"Triton exited; see {run_dir / 'logs' / 'triton.log'}")
                if sim.returncode is not None:
                    raise BenchError(f"the provider simulator exited with status {sim.returncode}")

            setup = Setup(
                router=mesh.address("router"),
                api_key=asyncio.run(issue_key_at(mesh.redis_url, TENANT)),
                triton_url=triton.config.grpc_url,
                sim_url=sim.base_url,
                sim_key=sim.api_key,
                echo_delay_ms=delays[ECHO_MODEL],
                hosted_delay_ms=delays[HOSTED_MODEL],
                components=Components(
                    pids={
                        **{name: [services[name].pid] for name in MESH},
                        "valkey": [mesh.valkey.pid],
                        "simulator": find_sim_pids(sim.api_key),
                    },
                    triton_pgid=triton.pgid,
                ),
                check_alive=check_alive,
            )
            asyncio.run(run_all(args, setup, mesh, rows, report))
    except (RuntimeError, TritonStartError) as error:  # BenchError, ProfileError, start errors
        failure = str(error)
        print(f"FAILED: {error}", file=sys.stderr, flush=True)

    git = _git("describe", "--always", "--dirty")
    judged = judge(rows, delays)
    front = frontier(rows)
    c1_keys = (
        MESH_MISS.format(delay=delays[ECHO_MODEL], c=1),
        MESH_HIT.format(delay=delays[ECHO_MODEL]),
        DIRECT_TRITON.format(c=1),
        MESH_HOSTED.format(delay=delays[HOSTED_MODEL]),
        DIRECT_HOSTED,
    )
    c1_rows = [r for key in c1_keys if (r := find(rows, key)) is not None]
    directs = {
        c1_keys[0]: find(rows, c1_keys[2]),
        c1_keys[1]: find(rows, c1_keys[2]),
        c1_keys[3]: find(rows, c1_keys[4]),
    }
    levels = sorted(
        (
            r
            for r in rows
            if r.group == "triton" and r.path in {"mesh Chat (unary)", "direct infer"}
        ),
        key=lambda r: (r.path != "mesh Chat (unary)", r.concurrency),
    )
    markdown = {
        "latency_c1": latency_table(c1_rows, directs),
        "cpu_ms_per_request": cpu_table([*c1_rows, *(r for r in levels if r.concurrency > 1)]),
        "throughput": throughput_table(levels),
        "frontier": frontier_table(front),
    }
    plotted = ""
    if levels:
        try:
            plot(
                levels,
                args.plot.resolve(),
                f"Shepherd mesh vs direct Triton (echo_lm), closed loop, git {git},"
                f" {started:%Y-%m-%d}",
            )
            plotted = str(args.plot.resolve())
        except (ImportError, OSError, ValueError) as error:
            print(f"no plot: {error}", file=sys.stderr)

    print("\nAdded latency at concurrency 1 (ms)")
    print(markdown["latency_c1"])
    print("\nCPU ms per request, per process")
    print(markdown["cpu_ms_per_request"])
    print("\nThroughput levels")
    print(markdown["throughput"])
    print("\nFrontier: the highest req/s whose p99 stays under each bound")
    print(markdown["frontier"])
    print()
    for line in judged["lines"]:
        print(line)
    if failure:
        print("VERDICT: not judged: the run could not measure everything (see FAILED above).")

    report.update(
        {
            "benchmark": "bench.gateway",
            "started_at": started.isoformat(timespec="seconds"),
            "wall_s": round(time.monotonic() - began, 1),
            "git": git,
            "git_head": _git("rev-parse", "--short", "HEAD"),
            "command": " ".join(["python -m bench.gateway", *(argv or sys.argv[1:])]),
            "machine": machine(load_before),
            "config": {
                "models": {
                    "self_hosted": ECHO_MODEL,
                    "triton": ECHO_TRITON_MODEL,
                    "hosted": HOSTED_MODEL,
                },
                "delays_ms": delays,
                "concurrency": list(args.concurrency),
                "requests": args.requests,
                "requests_c1": args.requests_c1,
                "hosted_requests": args.hosted_requests,
                "rounds": args.rounds,
                "warmup": args.warmup,
                "sim_latency_ms": SIM_LATENCY_MS,
                "max_error_rate": MAX_ERROR_RATE,
                "p99_bounds_ms": list(P99_BOUNDS_MS),
            },
            "rows": [asdict(row) for row in rows],
            "frontier": front,
            "judged": judged,
            "markdown": markdown,
            "plot": plotted,
            "failure": failure,
        }
    )
    return write_report(
        report,
        output,
        f"plot {plotted or 'none'}; mesh logs in {run_dir / 'logs'}",
        failed=bool(failure),
        require=args.require_target,
        holds=judged["holds"],
    )


if __name__ == "__main__":
    run_main(main, (BenchError,))
