"""What streaming through the mesh costs: time to first token, total latency and throughput.

Why this exists: `RouterService/ChatStream` puts four services (router, cache, scheduler,
billing, with Redis for keys and quotas) between a caller and the model. A caller that streams
cares first about when the first token arrives, so the mesh must add little to it, and
streaming must not cost throughput against the unary `Chat`. This benchmark measures both
against the same model called directly, on the whole local mesh (`deploy/local/launcher.py`'s
`LocalMesh` on free 127.0.0.1 ports: Valkey, a CPU Triton node, the four services) and a
provider simulator. Three comparisons, each as p50/p99 time to first token (TTFT: until the
first delta with non-empty text), p50/p99 total latency and requests per second:

1. Self-hosted: `ChatStream` on `shepherd-tiny-stream` (alias `tiny-stream`) against
   `tritonclient.grpc.aio`'s `stream_infer` straight to the node's `tiny_lm_stream`: one
   request of one row, with the prompt rendered as the scheduler renders it
   (`render_prompt`), the same max_tokens, temperature 0 and seed 0. At concurrency 1 and 32.
   The catalog's `shepherd-tiny-stream` batches with `max_queue_delay_ms: 5`, so at
   concurrency 1 each request waits those 5 ms for company. That is reported, and the mesh is
   measured a second time on a copy of the model whose delay is 0 (`bench-tiny-stream-d0`),
   so that what the mesh itself adds shows. Target: **the mesh adds at most 3 ms of TTFT at
   p50, at concurrency 1, judged with delay 0** (mesh p50 minus direct p50). One more row at
   concurrency 1, `SchedulerService/InferStream` called as the router calls it, splits what
   the mesh adds between the scheduler and the router's side (auth, quota, cache, billing).
2. `ChatStream` against unary `RouterService/Chat` through the mesh on `shepherd-tiny-stream`
   at concurrency 32. Target: **streaming throughput no worse than unary**: the ratio is
   reported, and a ratio of at least 0.95 counts as no worse (rounds on this machine move by
   a few percent; the per-round ratios are printed alongside).
3. Hosted: `ChatStream` on `deepseek-v3.2` (catalog delay 10 ms, and a copy with delay 0,
   `bench-deepseek-d0`) against a direct SSE call to the simulator with the official `openai`
   `AsyncOpenAI` client (`stream=True`, `include_usage`, aiohttp transport: what the
   scheduler sends), at concurrency 1 and 8. No target; the figures are reported.

The delay-0 copies live in one derived catalog (the shipped catalog plus the two copies),
passed to every service through SHEPHERD_CATALOG as the integration tests do, so one mesh
serves both delays and nothing else differs between them. The simulator is started here,
not by the launcher, with a rate limit high enough never to answer 429 whatever this run
sends; it keeps the launcher's 5 ms latency.

Method: closed loop, N workers each sending the next request when the last one has ended.
Within one comparison every path gets the same prompts (distinct from each other, similar in
length), so each does identical work; `CACHE_POLICY_BYPASS` keeps the cache from answering
or storing, and every mesh answer is checked to be no cache hit. Each path first sends an
unmeasured warm-up; the measured requests are then split into rounds, and the paths of one
comparison take turns round by round (in rotating order), so a noisy neighbour hits them
alike. Percentiles are over all rounds' requests; req/s is successful requests over the
rounds' wall time.

It is a benchmark, not a test: a missed target is reported and exits 0 (2 with
--require-target); it exits 1 when it cannot measure (the mesh does not start or a process
dies, or more than 1% of a path's requests fail). `make bench-streaming` runs it and writes
.build/bench/streaming.json. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import grpc
import numpy as np
import openai
import tritonclient.grpc.aio as triton
import yaml
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from bench.batching import (
    CHANNEL_OPTIONS,
    machine,
    machine_busy_s,
    percentile,
    process_cpu_s,
    run_main,
    write_report,
)
from bench.batching import prompt as batching_prompt
from deploy.local.launcher import SERVICES, LocalMesh, MeshConfig
from deploy.local.ports import free_ports
from deploy.local.provider_sim import SimProcess
from deploy.local.triton import TritonStartError, process_group_members
from libs.apikeys import issue_key_at
from libs.config import DEFAULT_CATALOG, REPO_ROOT
from libs.credentials import Credentials
from services.scheduler.triton import render_prompt

STREAM_MODEL = "shepherd-tiny-stream"
STREAM_MODEL_D0 = "bench-tiny-stream-d0"
TRITON_MODEL = "tiny_lm_stream"
HOSTED_MODEL = "deepseek-v3.2"
HOSTED_MODEL_D0 = "bench-deepseek-d0"
TENANT = "bench-streaming"
MAX_TOKENS = 16
# Above the simulator's longest answer (41 tokens), so no hosted answer is cut.
HOSTED_MAX_TOKENS = 64
TARGET_TTFT_ADDED_MS = 3.0
# "No worse than unary": streaming throughput at least this share of unary's.
TARGET_STREAM_UNARY_RATIO = 0.95
MAX_ERROR_RATE = 0.01
CALL_TIMEOUT_S = 30.0
WORKERS_PER_CHANNEL = 16
ERROR_SAMPLES = 5
SIM_LATENCY_MS = 5.0  # the launcher's simulator latency
SIM_RPM = 10_000_000  # never rate limited
MESH_START_TIMEOUT_S = 240.0
IDLE_S = 3.0
WARMUP_BASE = 1_000_000  # warm-up prompts never repeat a measured one
DEFAULT_OUTPUT = REPO_ROOT / ".build" / "bench" / "streaming.json"


class BenchError(RuntimeError):
    """Something could not be measured; the message says why."""


class BadAnswer(Exception):
    """A call ended without error but its answer is not what the benchmark asked for."""


def prompt(n: int) -> str:
    """The n-th user prompt: short, of similar length, and distinct for every n."""
    return batching_prompt(n, unique=True)


# -- the catalog ------------------------------------------------------------------------------


def bench_catalog(base: dict[str, Any]) -> dict[str, Any]:
    """The shipped catalog plus delay-0 copies of the streaming and the hosted model.

    Each copy differs from its model only in `max_queue_delay_ms` (and has no aliases, and a
    Triton deployment name of its own), so measuring both in one mesh isolates the delay.
    """
    catalog = copy.deepcopy(base)
    models = catalog.get("models") or {}
    for name in (STREAM_MODEL, HOSTED_MODEL):
        if name not in models:
            raise BenchError(f"the catalog has no model {name!r}; models: {', '.join(models)}")
    for source, target in ((STREAM_MODEL, STREAM_MODEL_D0), (HOSTED_MODEL, HOSTED_MODEL_D0)):
        model = copy.deepcopy(models[source])
        model["aliases"] = []
        model["batching"] = {**(model.get("batching") or {}), "max_queue_delay_ms": 0}
        for deployment in model.get("deployments") or ():
            if deployment.get("kind") == "triton":
                deployment["name"] = f"{deployment.get('pool', 'local')}/{TRITON_MODEL}-d0"
        models[target] = model
    return catalog


def catalog_delay_ms(catalog: dict[str, Any], model: str) -> int:
    """A model's max_queue_delay_ms as the catalog sets it (its own, else the defaults')."""
    own = (catalog["models"][model].get("batching") or {}).get("max_queue_delay_ms")
    if own is not None:
        return int(own)
    return int(((catalog.get("defaults") or {}).get("batching") or {}).get("max_queue_delay_ms", 0))


# -- one request on each path -----------------------------------------------------------------


async def read_stream(call: Any) -> tuple[float, float, str, Any]:
    """Read a ChatStream or InferStream call: when the first text came, when it ended, the
    whole text and the final chunk (both streams have the same delta/final shape)."""
    first: float | None = None
    parts: list[str] = []
    final: Any = None
    async for chunk in call:
        if chunk.HasField("delta"):
            if first is None and chunk.delta.text:
                first = time.perf_counter()
            parts.append(chunk.delta.text)
        else:
            final = chunk.final
    ended = time.perf_counter()
    if final is None:
        raise BadAnswer("the stream ended without a final chunk")
    if first is None:
        raise BadAnswer("no delta carried text")
    return first, ended, "".join(parts), final


@dataclass(frozen=True)
class Answer:
    """What one successful call observed."""

    ttft_s: float | None  # None for unary Chat, which has no first token of its own
    total_s: float
    text: str
    batch_size: int  # the mesh's batch (placement.batch_size); 0 on a direct path


Call = Callable[[int], Awaitable[Answer]]


class Route:
    """One way of answering a prompt (a row of the table): opens clients, makes calls."""

    group: str  # "triton" or "hosted"
    path: str  # how it is called
    model: str
    delay_ms: int | None  # the mesh's max_queue_delay_ms; None on a direct path
    via_mesh: bool

    async def open(self, concurrency: int) -> list[Call]:
        """One call function per worker (workers share a channel per WORKERS_PER_CHANNEL)."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    @property
    def key(self) -> str:
        delay = "" if self.delay_ms is None else f"/d{self.delay_ms}"
        return f"{self.group}/{self.path}/{self.model}{delay}"


def _shards(concurrency: int) -> int:
    return max(1, math.ceil(concurrency / WORKERS_PER_CHANNEL))


CacheMode = Literal["bypass", "hit", "fill"]
# What a mesh request asks of the cache, and what its answer must say.
_CACHE_POLICY = {
    # CACHE_POLICY_BYPASS: never answered from the cache nor stored; a cache hit is an error.
    "bypass": common_pb2.CACHE_POLICY_BYPASS,
    # The default policy on a prompt answered before: the answer must be a cache hit.
    "hit": common_pb2.CACHE_POLICY_UNSPECIFIED,
    # The default policy, whatever the answer: to store answers that "hit" then finds.
    "fill": common_pb2.CACHE_POLICY_UNSPECIFIED,
}


class MeshRoute(Route):
    """`RouterService/ChatStream` (or unary `Chat`) with the tenant's API key.

    `cache` says what the request asks of the cache (see `_CACHE_POLICY`); the streaming
    benchmark always bypasses it, the gateway benchmark also measures cache hits.
    """

    via_mesh = True

    def __init__(
        self,
        group: str,
        router: str,
        api_key: str,
        model: str,
        delay_ms: int,
        *,
        unary: bool,
        cache: CacheMode = "bypass",
    ) -> None:
        self.group = group
        kind = "mesh Chat" if unary else "mesh ChatStream"
        self.path = {
            "bypass": f"{kind} (unary)" if unary else kind,
            "hit": f"{kind} (cache hit)",
            "fill": f"{kind} (cache fill)",
        }[cache]
        self.model = model
        self.delay_ms = delay_ms
        self._router = router
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._unary = unary
        self._cache = cache
        self._max_tokens = MAX_TOKENS if group == "triton" else HOSTED_MAX_TOKENS
        self._channels: list[grpc.aio.Channel] = []

    async def open(self, concurrency: int) -> list[Call]:
        self._channels = [
            grpc.aio.insecure_channel(self._router, options=CHANNEL_OPTIONS)
            for _ in range(_shards(concurrency))
        ]
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10.0) for c in self._channels))
        stubs = [router_pb2_grpc.RouterServiceStub(c) for c in self._channels]
        return [self._caller(stubs[i % len(stubs)]) for i in range(concurrency)]

    def _caller(self, stub: router_pb2_grpc.RouterServiceStub) -> Call:
        def fields(n: int) -> dict[str, Any]:
            return {
                "model": self.model,
                "messages": [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt(n))],
                "params": common_pb2.GenerationParams(max_tokens=self._max_tokens, temperature=0),
                "priority": common_pb2.PRIORITY_NORMAL,
                "cache_policy": _CACHE_POLICY[self._cache],
            }

        def check_cache(cache_hit: bool) -> None:
            if self._cache == "bypass" and cache_hit:
                raise BadAnswer("answered from the cache despite CACHE_POLICY_BYPASS")
            if self._cache == "hit" and not cache_hit:
                raise BadAnswer("not a cache hit, on a prompt answered before")

        async def stream(n: int) -> Answer:
            request = router_pb2.ChatStreamRequest(**fields(n))
            began = time.perf_counter()
            call = stub.ChatStream(request, metadata=self._metadata, timeout=CALL_TIMEOUT_S)
            first, ended, text, final = await read_stream(call)
            check_cache(final.cache_hit)
            return Answer(first - began, ended - began, text, final.placement.batch_size)

        async def unary(n: int) -> Answer:
            request = router_pb2.ChatRequest(**fields(n))
            began = time.perf_counter()
            response = await stub.Chat(request, metadata=self._metadata, timeout=CALL_TIMEOUT_S)
            ended = time.perf_counter()
            check_cache(response.cache_hit)
            if not response.text:
                raise BadAnswer("empty answer")
            return Answer(None, ended - began, response.text, response.placement.batch_size)

        return unary if self._unary else stream

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels = []


class SchedulerRoute(Route):
    """`SchedulerService/InferStream` with the service token, as the router calls it.

    Not one of the targets: it splits what the mesh adds into the scheduler's share (queue,
    batcher, Triton stream) and the router's (authentication, quota, cache, billing, one more
    hop), so a missed TTFT target says where to look.
    """

    group = "triton"
    path = "scheduler InferStream"
    via_mesh = True

    def __init__(self, scheduler: str, token: str, model: str, delay_ms: int) -> None:
        self.model = model
        self.delay_ms = delay_ms
        self._scheduler = scheduler
        self._metadata = Credentials(internal_tokens=(token,)).outbound_metadata()
        self._channels: list[grpc.aio.Channel] = []

    async def open(self, concurrency: int) -> list[Call]:
        self._channels = [
            grpc.aio.insecure_channel(self._scheduler, options=CHANNEL_OPTIONS)
            for _ in range(_shards(concurrency))
        ]
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10.0) for c in self._channels))
        stubs = [scheduler_pb2_grpc.SchedulerServiceStub(c) for c in self._channels]
        return [self._caller(stubs[i % len(stubs)]) for i in range(concurrency)]

    def _caller(self, stub: scheduler_pb2_grpc.SchedulerServiceStub) -> Call:
        async def call(n: int) -> Answer:
            request = scheduler_pb2.InferStreamRequest(
                request_id=uuid.uuid4().hex,
                tenant=TENANT,
                model=self.model,
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt(n))],
                params=common_pb2.GenerationParams(max_tokens=MAX_TOKENS, temperature=0),
                priority=common_pb2.PRIORITY_NORMAL,
            )
            began = time.perf_counter()
            call = stub.InferStream(request, metadata=self._metadata, timeout=CALL_TIMEOUT_S)
            first, ended, text, final = await read_stream(call)
            return Answer(first - began, ended - began, text, final.placement.batch_size)

        return call

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels = []


def triton_inputs(n: int) -> list[triton.InferInput]:
    """The tensors the scheduler sends for prompt n alone: one row, the prompt rendered by
    `render_prompt`, MAX_TOKENS, temperature 0 and seed 0."""
    tensors = []
    for name, dtype, data in (
        (
            "PROMPT",
            "BYTES",
            np.array([[render_prompt((("user", prompt(n)),)).encode()]], dtype=np.object_),
        ),
        ("MAX_TOKENS", "INT32", np.array([[MAX_TOKENS]], dtype=np.int32)),
        ("TEMPERATURE", "FP32", np.array([[0.0]], dtype=np.float32)),
        ("SEED", "INT64", np.array([[0]], dtype=np.int64)),
    ):
        tensor = triton.InferInput(name, [1, 1], dtype)
        tensor.set_data_from_numpy(data)
        tensors.append(tensor)
    return tensors


TRITON_OUTPUTS = ("TEXT", "PROMPT_TOKENS", "COMPLETION_TOKENS", "FINISH_REASON")


class TritonRoute(Route):
    """Straight to the node, what the scheduler sends for one request alone: `stream_infer`
    on a decoupled model, or (`stream=False`) a unary `infer`."""

    group = "triton"
    delay_ms = None
    via_mesh = False

    def __init__(self, url: str, model: str = TRITON_MODEL, *, stream: bool = True) -> None:
        self.model = model
        self.path = "direct stream_infer" if stream else "direct infer"
        self._url = url
        self._stream = stream
        self._clients: list[triton.InferenceServerClient] = []

    async def open(self, concurrency: int) -> list[Call]:
        self._clients = [
            triton.InferenceServerClient(url=self._url) for _ in range(_shards(concurrency))
        ]
        return [self._caller(self._clients[i % len(self._clients)]) for i in range(concurrency)]

    def _caller(self, client: triton.InferenceServerClient) -> Call:
        outputs = [triton.InferRequestedOutput(name) for name in TRITON_OUTPUTS]

        async def unary(n: int) -> Answer:
            began = time.perf_counter()
            result = await client.infer(
                self.model, triton_inputs(n), outputs=outputs, client_timeout=CALL_TIMEOUT_S
            )
            ended = time.perf_counter()
            text = result.as_numpy("TEXT").reshape(-1)[0].decode()
            if not result.as_numpy("FINISH_REASON").reshape(-1)[0]:
                raise BadAnswer("the row did not finish")
            return Answer(None, ended - began, text, 0)

        async def call(n: int) -> Answer:
            request = {
                "model_name": self.model,
                "inputs": triton_inputs(n),
                "outputs": outputs,
            }

            async def requests() -> AsyncIterator[dict[str, Any]]:
                yield request  # one request, then the stream is half-closed

            began = time.perf_counter()
            first: float | None = None
            parts: list[str] = []
            finished = False
            responses = client.stream_infer(requests(), stream_timeout=CALL_TIMEOUT_S)
            try:
                async for result, error in responses:
                    if error is not None:
                        raise error
                    piece = result.as_numpy("TEXT").reshape(-1)[0].decode()
                    if piece:
                        if first is None:
                            first = time.perf_counter()
                        parts.append(piece)
                    if result.as_numpy("FINISH_REASON").reshape(-1)[0]:
                        finished = True
                        break  # where the scheduler, too, ends a row
            finally:
                responses.cancel()
            ended = time.perf_counter()
            if not finished:
                raise BadAnswer("the stream ended before the row finished")
            if first is None:
                raise BadAnswer("no response carried text")
            return Answer(first - began, ended - began, "".join(parts), 0)

        return call if self._stream else unary

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        self._clients = []


class SseRoute(Route):
    """The simulator straight through the official SDK, as the scheduler's hosted client asks:
    a stream by SSE, or (`stream=False`) one JSON completion."""

    group = "hosted"
    model = HOSTED_MODEL
    delay_ms = None
    via_mesh = False

    def __init__(self, base_url: str, api_key: str, *, stream: bool = True) -> None:
        self.path = "direct SSE (openai)" if stream else "direct JSON (openai)"
        self._base_url = base_url
        self._api_key = api_key
        self._stream = stream
        self._client: openai.AsyncOpenAI | None = None

    async def open(self, concurrency: int) -> list[Call]:
        client = openai.AsyncOpenAI(
            api_key=self._api_key,
            base_url=self._base_url,
            max_retries=0,
            http_client=openai.DefaultAioHttpClient(),
        )
        self._client = client

        async def unary(n: int) -> Answer:
            began = time.perf_counter()
            completion = await client.chat.completions.create(
                model=HOSTED_MODEL,
                messages=[{"role": "user", "content": prompt(n)}],
                max_tokens=HOSTED_MAX_TOKENS,
                temperature=0,
                timeout=CALL_TIMEOUT_S,
            )
            ended = time.perf_counter()
            text = completion.choices[0].message.content if completion.choices else None
            if not text:
                raise BadAnswer("no text in the completion")
            return Answer(None, ended - began, text, 0)

        async def call(n: int) -> Answer:
            began = time.perf_counter()
            first: float | None = None
            parts: list[str] = []
            stream = await client.chat.completions.create(
                model=HOSTED_MODEL,
                messages=[{"role": "user", "content": prompt(n)}],
                max_tokens=HOSTED_MAX_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                timeout=CALL_TIMEOUT_S,
            )
            async with stream:
                async for chunk in stream:
                    if not chunk.choices or chunk.choices[0].delta is None:
                        continue
                    piece = chunk.choices[0].delta.content
                    if piece:
                        if first is None:
                            first = time.perf_counter()
                        parts.append(piece)
            ended = time.perf_counter()
            if first is None:
                raise BadAnswer("no chunk carried text")
            return Answer(first - began, ended - began, "".join(parts), 0)

        return [call if self._stream else unary] * concurrency

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


# -- measuring --------------------------------------------------------------------------------


def error_name(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}"
    return type(error).__name__


@dataclass
class RoundResult:
    """One closed-loop run of one path over a range of prompts."""

    answers: dict[int, Answer] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0


async def closed_loop(calls: Sequence[Call], indices: Sequence[int]) -> RoundResult:
    """One worker per call function, each sending its next prompt when the last one ended."""
    result = RoundResult()
    tickets = iter(indices)

    async def worker(call: Call) -> None:
        for n in tickets:
            try:
                result.answers[n] = await call(n)
            except Exception as error:
                name = error_name(error)
                result.errors[name] += 1
                if len(result.error_samples) < ERROR_SAMPLES:
                    result.error_samples.append(f"{name}: {str(error)[:300]}")

    began = time.perf_counter()
    await asyncio.gather(*(worker(call) for call in calls))
    result.wall_s = time.perf_counter() - began
    return result


class CpuMeter(Protocol):
    """CPU seconds used so far by each component a benchmark splits out, by name."""

    def cpu_s(self) -> dict[str, float]: ...


@dataclass
class Pids:
    """The processes whose CPU the cores column splits out."""

    mesh: list[int]  # the four services and Valkey
    triton_pgid: int | None
    sim: list[int]

    def cpu_s(self) -> dict[str, float]:
        times = os.times()
        triton_pids = process_group_members(self.triton_pgid) if self.triton_pgid else []
        return {
            "client": times.user + times.system,
            "mesh": process_cpu_s(self.mesh),
            "triton": process_cpu_s(triton_pids),
            "sim": process_cpu_s(self.sim),
        }


@dataclass
class Series:
    """One path at one concurrency: every round's answers together."""

    path: Route
    concurrency: int
    answers: dict[int, Answer] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    requests: int = 0
    wall_s: float = 0.0
    round_rps: list[float] = field(default_factory=list)
    warmup_requests: int = 0
    warmup_errors: int = 0
    cpu_s: Counter[str] = field(default_factory=Counter)
    busy_s: float = 0.0

    def add(self, result: RoundResult, requests: int) -> None:
        self.answers.update(result.answers)
        self.errors.update(result.errors)
        self.error_samples.extend(result.error_samples[: ERROR_SAMPLES - len(self.error_samples)])
        self.requests += requests
        self.wall_s += result.wall_s
        self.round_rps.append(len(result.answers) / result.wall_s if result.wall_s else 0.0)


@dataclass(frozen=True)
class Row:
    """One row of the results table, as the JSON keeps it."""

    key: str
    group: str
    path: str
    model: str
    delay_ms: int | None
    concurrency: int
    requests: int
    ok: int
    errors: int
    error_rate: float
    error_codes: dict[str, int]
    error_samples: list[str]
    warmup_requests: int
    warmup_errors: int
    wall_s: float
    throughput_rps: float
    round_rps: list[float]
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    ttft_mean_ms: float | None
    total_p50_ms: float | None
    total_p99_ms: float | None
    total_mean_ms: float | None
    mean_batch_size: float | None
    same_text_as_direct: float | None
    cpu_cores: dict[str, float]
    cpu_ms_per_request: dict[str, float]


def _ms(values: Sequence[float], q: float) -> float | None:
    value = percentile(sorted(values), q)
    return None if value is None else round(value * 1000.0, 3)


def _mean_ms(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values) * 1000.0, 3) if values else None


def summarise(series: Series, direct: Series | None) -> Row:
    answers = list(series.answers.values())
    ttft = [a.ttft_s for a in answers if a.ttft_s is not None]
    total = [a.total_s for a in answers]
    errors = sum(series.errors.values())
    same: float | None = None
    if direct is not None and direct is not series:
        shared = [n for n in series.answers if n in direct.answers]
        if shared:
            matching = sum(series.answers[n].text == direct.answers[n].text for n in shared)
            same = round(matching / len(shared), 4)
    cores: dict[str, float] = {}
    if series.wall_s > 0:
        cores = {k: round(v / series.wall_s, 2) for k, v in series.cpu_s.items()}
        other = max(0.0, series.busy_s - sum(series.cpu_s.values()))
        cores["other"] = round(other / series.wall_s, 2)
    path = series.path
    return Row(
        key=f"{path.key}/c{series.concurrency}",
        group=path.group,
        path=path.path,
        model=path.model,
        delay_ms=path.delay_ms,
        concurrency=series.concurrency,
        requests=series.requests,
        ok=len(answers),
        errors=errors,
        error_rate=round(errors / series.requests, 4) if series.requests else 0.0,
        error_codes=dict(series.errors),
        error_samples=series.error_samples,
        warmup_requests=series.warmup_requests,
        warmup_errors=series.warmup_errors,
        wall_s=round(series.wall_s, 3),
        throughput_rps=round(len(answers) / series.wall_s, 2) if series.wall_s else 0.0,
        round_rps=[round(r, 2) for r in series.round_rps],
        ttft_p50_ms=_ms(ttft, 0.50),
        ttft_p99_ms=_ms(ttft, 0.99),
        ttft_mean_ms=_mean_ms(ttft),
        total_p50_ms=_ms(total, 0.50),
        total_p99_ms=_ms(total, 0.99),
        total_mean_ms=_mean_ms(total),
        mean_batch_size=(
            round(sum(a.batch_size for a in answers) / len(answers), 2)
            if answers and path.via_mesh
            else None
        ),
        same_text_as_direct=same,
        cpu_cores=cores,
        cpu_ms_per_request=(
            {k: round(v * 1000.0 / len(answers), 3) for k, v in series.cpu_s.items()}
            if answers
            else {}
        ),
    )


@dataclass(frozen=True)
class Comparison:
    """The paths that take turns, at one concurrency."""

    name: str
    paths: tuple[Route, ...]
    concurrency: int
    requests: int


async def measure(
    comparison: Comparison,
    rounds: int,
    warmup: int,
    pids: CpuMeter,
    check_alive: Callable[[], None],
) -> list[Series]:
    """Warm every path up, then run the rounds, the paths taking turns in rotating order."""
    c = comparison.concurrency
    series = [Series(path, c) for path in comparison.paths]
    calls: list[list[Call]] = []
    try:
        for path in comparison.paths:
            calls.append(await path.open(c))
        warm = max(warmup, 2 * c)
        for s, path_calls in zip(series, calls, strict=True):
            result = await closed_loop(path_calls, range(WARMUP_BASE, WARMUP_BASE + warm))
            s.warmup_requests, s.warmup_errors = warm, sum(result.errors.values())
            if s.warmup_errors:
                print(
                    f"  warm-up {s.path.key} c={c}: {s.warmup_errors} of {warm} failed, "
                    f"e.g. {result.error_samples[:2]}",
                    flush=True,
                )
            check_alive()
        bounds = [comparison.requests * r // rounds for r in range(rounds + 1)]
        for r in range(rounds):
            indices = range(bounds[r], bounds[r + 1])
            order = list(range(len(series)))
            order = order[r % len(order) :] + order[: r % len(order)]
            for i in order:
                before, busy = pids.cpu_s(), machine_busy_s()
                result = await closed_loop(calls[i], indices)
                after = pids.cpu_s()
                series[i].busy_s += machine_busy_s() - busy
                series[i].cpu_s.update({k: after[k] - before[k] for k in after})
                series[i].add(result, len(indices))
                check_alive()
    finally:
        for path in comparison.paths:
            await path.close()
    return series


# -- reporting --------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-".rjust(len(format(0.0, spec))) if value is None else format(value, spec)


TABLE_HEADER = (
    f"{'path':<21} {'model':<20} {'delay':>5} {'conc':>4} {'reqs':>5} {'err':>4} "
    f"{'req/s':>7} {'ttft p50':>8} {'ttft p99':>8} {'tot p50':>8} {'tot p99':>8} "
    f"{'batch':>5}  cores cl/mesh/tri/sim/oth"
)


def table_row(row: Row) -> str:
    cores = "/".join(
        f"{row.cpu_cores.get(k, 0.0):.2f}" for k in ("client", "mesh", "triton", "sim", "other")
    )
    delay = "-" if row.delay_ms is None else str(row.delay_ms)
    return (
        f"{row.path:<21} {row.model:<20} {delay:>5} {row.concurrency:>4} {row.requests:>5} "
        f"{row.errors:>4} {row.throughput_rps:>7.1f} {_fmt(row.ttft_p50_ms, '8.2f')} "
        f"{_fmt(row.ttft_p99_ms, '8.2f')} {_fmt(row.total_p50_ms, '8.2f')} "
        f"{_fmt(row.total_p99_ms, '8.2f')} {_fmt(row.mean_batch_size, '5.1f')}  {cores}"
    )


def markdown_table(rows: Sequence[Row]) -> str:
    """The same table, ready for docs/BENCHMARKS.md."""
    lines = [
        "| path | model | delay ms | conc | requests | errors | req/s | TTFT p50 ms | "
        "TTFT p99 ms | total p50 ms | total p99 ms | mean batch | cores cl/mesh/tri/sim/oth |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for r in rows:
        cores = "/".join(
            f"{r.cpu_cores.get(k, 0.0):.2f}" for k in ("client", "mesh", "triton", "sim", "other")
        )
        lines.append(
            f"| {r.path} | {r.model} | {'-' if r.delay_ms is None else r.delay_ms} | "
            f"{r.concurrency} | {r.requests} | {r.errors} | {r.throughput_rps:.1f} | "
            f"{cell(r.ttft_p50_ms)} | {cell(r.ttft_p99_ms)} | {cell(r.total_p50_ms)} | "
            f"{cell(r.total_p99_ms)} | "
            f"{'-' if r.mean_batch_size is None else f'{r.mean_batch_size:.1f}'} | {cores} |"
        )
    return "\n".join(lines)


def find(rows: Sequence[Row], key: str) -> Row | None:
    return next((r for r in rows if r.key == key), None)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f} ms"


def judge(rows: Sequence[Row], delays: dict[str, int]) -> dict[str, Any]:
    """The two targets' verdicts and the hosted figures, as lines and as data."""
    out: dict[str, Any] = {"lines": []}
    lines: list[str] = out["lines"]
    direct = find(rows, f"triton/direct stream_infer/{TRITON_MODEL}/c1")
    d0 = find(rows, f"triton/mesh ChatStream/{STREAM_MODEL_D0}/d0/c1")
    dflt = find(rows, f"triton/mesh ChatStream/{STREAM_MODEL}/d{delays[STREAM_MODEL]}/c1")
    sched = find(rows, f"triton/scheduler InferStream/{STREAM_MODEL_D0}/d0/c1")

    # Target 1: TTFT added by the mesh at concurrency 1, judged with delay 0.
    def added(mesh: Row | None, attr: str) -> float | None:
        if mesh is None or direct is None:
            return None
        return _diff(getattr(mesh, attr), getattr(direct, attr))

    info = {
        "added_ttft_p50_ms_delay0": added(d0, "ttft_p50_ms"),
        "added_ttft_p99_ms_delay0": added(d0, "ttft_p99_ms"),
        "added_ttft_p50_ms_catalog_delay": added(dflt, "ttft_p50_ms"),
        "added_ttft_p99_ms_catalog_delay": added(dflt, "ttft_p99_ms"),
        "added_total_p50_ms_delay0": added(d0, "total_p50_ms"),
        "scheduler_ttft_p50_ms_delay0": added(sched, "ttft_p50_ms"),
        "router_side_ttft_p50_ms_delay0": (
            _diff(d0.ttft_p50_ms, sched.ttft_p50_ms) if d0 and sched else None
        ),
        "catalog_delay_ms": delays[STREAM_MODEL],
        "target_ms": TARGET_TTFT_ADDED_MS,
    }
    judged = info["added_ttft_p50_ms_delay0"]
    holds1 = None if judged is None else judged <= TARGET_TTFT_ADDED_MS
    info["holds"] = holds1
    out["ttft_added"] = info
    lines.append(
        f"TTFT added by the mesh at c=1 (mesh minus direct): p50 {_signed(judged)} with delay 0,"
        f" {_signed(info['added_ttft_p50_ms_catalog_delay'])} with the catalog's"
        f" {delays[STREAM_MODEL]} ms delay; p99 {_signed(info['added_ttft_p99_ms_delay0'])}"
        f" with delay 0, {_signed(info['added_ttft_p99_ms_catalog_delay'])} with"
        f" {delays[STREAM_MODEL]} ms"
    )
    lines.append(
        f"  of which the scheduler alone (InferStream minus direct):"
        f" {_signed(info['scheduler_ttft_p50_ms_delay0'])}, and the router's side (ChatStream"
        f" minus InferStream): {_signed(info['router_side_ttft_p50_ms_delay0'])}"
    )
    target1 = (
        f"the mesh adds at most {TARGET_TTFT_ADDED_MS:g} ms of TTFT at p50, concurrency 1, delay 0"
    )
    if holds1 is None:
        lines.append(f"VERDICT ttft: cannot judge ({target1}): a path has no results.")
    else:
        lines.append(
            f"VERDICT ttft: target {'HOLDS' if holds1 else 'NOT MET'} ({target1}):"
            f" {_signed(judged)}"
        )

    # Target 2: ChatStream throughput no worse than unary Chat, at concurrency 32.
    delay = delays[STREAM_MODEL]
    stream = find(rows, f"triton/mesh ChatStream/{STREAM_MODEL}/d{delay}/c32")
    unary = find(rows, f"triton/mesh Chat (unary)/{STREAM_MODEL}/d{delay}/c32")
    ratio = (
        round(stream.throughput_rps / unary.throughput_rps, 3)
        if stream and unary and unary.throughput_rps
        else None
    )
    per_round = (
        [round(s / u, 3) for s, u in zip(stream.round_rps, unary.round_rps, strict=True) if u]
        if stream and unary
        else []
    )
    holds2 = None if ratio is None else ratio >= TARGET_STREAM_UNARY_RATIO
    out["stream_vs_unary"] = {
        "ratio": ratio,
        "per_round": per_round,
        "target_at_least": TARGET_STREAM_UNARY_RATIO,
        "holds": holds2,
    }
    if ratio is None:
        lines.append("VERDICT throughput: cannot judge (a path has no results).")
    else:
        assert stream is not None and unary is not None

        def cpu(row: Row, who: str) -> str:
            return f"{row.cpu_ms_per_request.get(who, 0.0):.2f}"

        lines.append(
            f"ChatStream / Chat throughput at c=32: {ratio:.3f}"
            f" (per round: {', '.join(f'{x:.3f}' for x in per_round)}); CPU ms per request,"
            f" ChatStream vs Chat: mesh {cpu(stream, 'mesh')} vs {cpu(unary, 'mesh')},"
            f" client {cpu(stream, 'client')} vs {cpu(unary, 'client')},"
            f" triton {cpu(stream, 'triton')} vs {cpu(unary, 'triton')}"
        )
        lines.append(
            f"VERDICT throughput: target {'HOLDS' if holds2 else 'NOT MET'} (ChatStream no worse"
            f" than unary Chat, ratio >= {TARGET_STREAM_UNARY_RATIO:g}): {ratio:.3f}"
        )

    # Hosted: no target, the added latency is reported.
    hosted = []
    for c in sorted({r.concurrency for r in rows if r.group == "hosted"}):
        base = find(rows, f"hosted/direct SSE (openai)/{HOSTED_MODEL}/c{c}")
        for model, d in ((HOSTED_MODEL, delays[HOSTED_MODEL]), (HOSTED_MODEL_D0, 0)):
            mesh = find(rows, f"hosted/mesh ChatStream/{model}/d{d}/c{c}")
            if base is None or mesh is None:
                continue
            entry: dict[str, Any] = {
                "concurrency": c,
                "model": model,
                "delay_ms": d,
                "added_ttft_p50_ms": _diff(mesh.ttft_p50_ms, base.ttft_p50_ms),
                "added_ttft_p99_ms": _diff(mesh.ttft_p99_ms, base.ttft_p99_ms),
                "added_total_p50_ms": _diff(mesh.total_p50_ms, base.total_p50_ms),
            }
            hosted.append(entry)
            lines.append(
                f"hosted (no target) c={c} {model} (delay {d} ms): the mesh adds"
                f" {_signed(entry['added_ttft_p50_ms'])} TTFT p50,"
                f" {_signed(entry['added_ttft_p99_ms'])} TTFT p99,"
                f" {_signed(entry['added_total_p50_ms'])} total p50"
            )
    out["hosted"] = hosted
    out["holds"] = None if holds1 is None or holds2 is None else holds1 and holds2
    return out


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- driver -----------------------------------------------------------------------------------


def find_sim_pids(api_key: str) -> list[int]:
    """The simulator's pid, by its command line (its key is unique to this run)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"deploy.local.provider_sim" in argv and api_key.encode() in argv:
            found.append(int(entry.name))
    return found


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas") from None
    if any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError(f"{text!r}: every level must be at least 1")
    return levels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.streaming",
        description="TTFT, total latency and throughput of streaming through the Shepherd mesh "
        "against calling the model directly, on a local mesh.",
    )
    parser.add_argument("--requests-c1", type=int, default=200, help="measured at c=1 (200)")
    parser.add_argument("--requests", type=int, default=1000, help="measured at c=32 (1000)")
    parser.add_argument(
        "--hosted-requests", type=int, default=200, help="measured per hosted level (200)"
    )
    parser.add_argument(
        "--hosted-concurrency", type=_levels, default=(1, 8), help="hosted levels (1,8)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (4)")
    parser.add_argument(
        "--warmup", type=int, default=32, help="warm-up requests per path, at least 2x conc (32)"
    )
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG, help="base catalog")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="the mesh's files and logs, emptied first (default: <output dir>/streaming-mesh)",
    )
    parser.add_argument(
        "--require-target", action="store_true", help="exit with status 2 when a target is missed"
    )
    args = parser.parse_args(argv)
    if min(args.requests_c1, args.requests, args.hosted_requests, args.rounds) < 1:
        parser.error("request counts and --rounds must be at least 1")
    if min(args.requests_c1, args.requests, args.hosted_requests) < args.rounds:
        parser.error("every request count must be at least --rounds")
    return args


async def idle_cores(pids: CpuMeter, seconds: float) -> dict[str, float]:
    """Mean cores each component used over `seconds` with no request in flight."""
    before, busy, began = pids.cpu_s(), machine_busy_s(), time.perf_counter()
    await asyncio.sleep(seconds)
    after, elapsed = pids.cpu_s(), time.perf_counter() - began
    used = {k: (after[k] - before[k]) / elapsed for k in after}
    used["other"] = max(0.0, (machine_busy_s() - busy) / elapsed - sum(used.values()))
    return {k: round(v, 3) for k, v in used.items()}


def prepare_run_dir(run_dir: Path, benchmark: str) -> None:
    """Empty a benchmark's mesh directory for a new run, refusing one that is not its own.

    A marker file says the directory was made by `bench.<benchmark>`, so a mistyped
    --run-dir pointing at anything else is refused instead of deleted.
    """
    marker = run_dir / f".bench-{benchmark}"
    if run_dir.exists() and any(run_dir.iterdir()) and not marker.exists():
        raise BenchError(f"{run_dir} is not empty and not an earlier run's: give another --run-dir")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    marker.write_text(f"made by bench.{benchmark}; emptied at the start of every run\n")


@contextlib.contextmanager
def mesh_with_simulator(
    run_dir: Path, sim_latency_ms: float, extra_env: Mapping[str, str], *, http: bool = False
) -> Iterator[tuple[LocalMesh, SimProcess]]:
    """The whole local mesh on free ports, with a provider simulator of our own; both stop.

    `http` also gives the router its OpenAI-compatible HTTP edge, on a free port.

    The simulator is never rate limited (SIM_RPM) and nothing exports traces (an exporter
    would cost CPU the measured processes need). Prints when the mesh is up and how long it
    took, so a slow start is visible.
    """
    began = time.monotonic()
    sim = SimProcess(
        api_key="sim-" + secrets.token_hex(8),
        rpm=SIM_RPM,
        latency_ms=sim_latency_ms,
        log_path=run_dir / "logs" / "provider_sim.log",
    )
    mesh: LocalMesh | None = None
    try:
        print("starting the provider simulator and the mesh...", flush=True)
        sim.start()
        *ports, http_port = free_ports(len(SERVICES) + 1)
        mesh = LocalMesh(
            MeshConfig(
                run_dir=run_dir,
                # Not MeshConfig.ephemeral: its free_port() per service can hand out one port
                # twice, and gRPC's SO_REUSEPORT then lets two services share it (seen here:
                # router and scheduler on one port). free_ports() holds each until all are
                # chosen.
                service_ports=dict(zip(SERVICES, ports, strict=True)),
                http_port=http_port if http else 0,
                # A key of our own simulator: the launcher then starts none of its own, so
                # the services are told where it is and its key here.
                hosted_api_key=sim.api_key,
                extra_env={
                    **extra_env,
                    "SHEPHERD_HOSTED_API_KEY": sim.api_key,
                    "SHEPHERD_PROVIDER_HOLYSHEEP_BASE_URL": sim.base_url,
                    "OTEL_EXPORTER_OTLP_ENDPOINT": "",
                },
            )
        )
        mesh.start(timeout_s=MESH_START_TIMEOUT_S)
        assert mesh.triton is not None
        print(
            f"mesh up in {time.monotonic() - began:.1f}s: router {mesh.address('router')},"
            f" triton {mesh.triton.config.grpc_url}, simulator {sim.base_url}",
            flush=True,
        )
        yield mesh, sim
    finally:
        if mesh is not None:
            mesh.stop()
        sim.stop()


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """SIGTERM takes the same clean-up path as Ctrl-C: every process started is stopped."""
    raise KeyboardInterrupt


async def run_all(
    args: argparse.Namespace,
    mesh: LocalMesh,
    sim: SimProcess,
    delays: dict[str, int],
    rows: list[Row],
    idle: dict[str, float],
) -> None:
    """Every comparison in turn; rows are appended as they finish, so a failure keeps them.

    First the cores every component keeps busy with no load at all (into `idle`): what the
    mesh spends on its own loops, so the cores column under load can be read against it.
    """
    assert mesh.triton is not None and mesh.valkey is not None and mesh.valkey.pid is not None
    api_key = await issue_key_at(mesh.redis_url, TENANT)
    router = mesh.address("router")
    pids = Pids(
        mesh=[p.pid for p in mesh.services.values()] + [mesh.valkey.pid],
        triton_pgid=mesh.triton.pgid,
        sim=find_sim_pids(sim.api_key),
    )

    def check_alive() -> None:
        for name, proc in mesh.services.items():
            if proc.poll() is not None:
                raise BenchError(
                    f"the {name} service exited with status {proc.returncode}; see"
                    f" {mesh.log_dir / name}.log"
                )
        if sim.returncode is not None:
            raise BenchError(f"the provider simulator exited with status {sim.returncode}")

    def mesh_route(group: str, model: str, *, unary: bool = False) -> MeshRoute:
        return MeshRoute(group, router, api_key, model, delays[model], unary=unary)

    triton_url = mesh.triton.config.grpc_url
    comparisons = [
        Comparison(
            "self-hosted, c=1",
            (
                mesh_route("triton", STREAM_MODEL),
                mesh_route("triton", STREAM_MODEL_D0),
                SchedulerRoute(
                    mesh.address("scheduler"),
                    mesh.config.internal_token,
                    STREAM_MODEL_D0,
                    delays[STREAM_MODEL_D0],
                ),
                TritonRoute(triton_url),
            ),
            1,
            args.requests_c1,
        ),
        Comparison(
            "self-hosted, c=32",
            (
                mesh_route("triton", STREAM_MODEL),
                mesh_route("triton", STREAM_MODEL, unary=True),
                mesh_route("triton", STREAM_MODEL_D0),
                TritonRoute(triton_url),
            ),
            32,
            args.requests,
        ),
        *(
            Comparison(
                f"hosted, c={c}",
                (
                    mesh_route("hosted", HOSTED_MODEL),
                    mesh_route("hosted", HOSTED_MODEL_D0),
                    SseRoute(sim.base_url, sim.api_key),
                ),
                c,
                args.hosted_requests,
            )
            for c in args.hosted_concurrency
        ),
    ]
    idle.update(await idle_cores(pids, IDLE_S))
    print(
        f"idle for {IDLE_S:g}s before any load, cores cl/mesh/tri/sim/oth: "
        + "/".join(f"{idle.get(k, 0.0):.2f}" for k in ("client", "mesh", "triton", "sim", "other")),
        flush=True,
    )
    print(TABLE_HEADER, flush=True)
    for comparison in comparisons:
        began = time.monotonic()
        series = await measure(comparison, args.rounds, args.warmup, pids, check_alive)
        direct = next((s for s in series if not s.path.via_mesh), None)
        found = [summarise(s, direct) for s in series]
        rows.extend(found)
        for row in found:
            print(table_row(row), flush=True)
        print(f"  ({comparison.name}: {time.monotonic() - began:.0f}s)", flush=True)
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
    run_dir: Path = (args.run_dir or output.parent / "streaming-mesh").resolve()
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    began = time.monotonic()

    try:
        base = yaml.safe_load(args.catalog.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise BenchError(f"cannot read the base catalog {args.catalog}: {error}") from None
    if not isinstance(base, dict):
        raise BenchError(f"{args.catalog} is not a YAML mapping")
    catalog = bench_catalog(base)
    delays = {
        name: catalog_delay_ms(catalog, name)
        for name in (STREAM_MODEL, STREAM_MODEL_D0, HOSTED_MODEL, HOSTED_MODEL_D0)
    }
    prepare_run_dir(run_dir, "streaming")
    catalog_path = run_dir / "catalog.yaml"
    catalog_path.write_text(
        f"# Derived from {args.catalog} by bench.streaming: plus {STREAM_MODEL_D0} and"
        f" {HOSTED_MODEL_D0}, copies with max_queue_delay_ms 0.\n"
        + yaml.safe_dump(catalog, sort_keys=False)
    )

    rows: list[Row] = []
    idle: dict[str, float] = {}
    failure = ""
    try:
        with mesh_with_simulator(
            run_dir, SIM_LATENCY_MS, {"SHEPHERD_CATALOG": str(catalog_path)}
        ) as (mesh, sim):
            asyncio.run(run_all(args, mesh, sim, delays, rows, idle))
    except (RuntimeError, TritonStartError) as error:  # BenchError, MeshStartError, the sim's
        failure = str(error)
        print(f"FAILED: {error}", file=sys.stderr, flush=True)

    judged = judge(rows, delays)
    print("\nAll results (ms; delay is the mesh's max_queue_delay_ms)")
    print(TABLE_HEADER)
    for row in rows:
        print(table_row(row))
    print()
    for line in judged["lines"]:
        print(line)
    if failure:
        print("VERDICT: not judged: the run could not measure everything (see FAILED above).")

    report = {
        "benchmark": "bench.streaming",
        "started_at": started.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - began, 1),
        "git": _git("describe", "--always", "--dirty"),
        "git_head": _git("rev-parse", "--short", "HEAD"),
        "machine": machine(load_before),
        "config": {
            "base_catalog": str(args.catalog),
            "delays_ms": delays,
            "requests_c1": args.requests_c1,
            "requests_c32": args.requests,
            "hosted_requests": args.hosted_requests,
            "hosted_concurrency": list(args.hosted_concurrency),
            "rounds": args.rounds,
            "warmup": args.warmup,
            "max_tokens": MAX_TOKENS,
            "hosted_max_tokens": HOSTED_MAX_TOKENS,
            "temperature": 0,
            "cache_policy": "CACHE_POLICY_BYPASS",
            "sim_latency_ms": SIM_LATENCY_MS,
            "call_timeout_s": CALL_TIMEOUT_S,
            "workers_per_channel": WORKERS_PER_CHANNEL,
            "max_error_rate": MAX_ERROR_RATE,
        },
        "idle_cores": idle,
        "rows": [asdict(row) for row in rows],
        "markdown": markdown_table(rows),
        "judged": judged,
        "failure": failure,
    }
    return write_report(
        report,
        output,
        f"mesh logs in {run_dir / 'logs'}",
        failed=bool(failure),
        require=args.require_target,
        holds=judged["holds"],
    )


if __name__ == "__main__":
    run_main(main, (BenchError,))
