"""Fair share between tenants, end to end: a real Triton node and a real scheduler process.

The claim under test: one tenant flooding a model does not make another tenant wait. The
model batches up to 4 requests, flushes a short batch after 100 ms, and may run one batch at
a time (each costs 64 decoded tokens per row, ~15-20 ms on an idle 2-core machine). A quiet
tenant sends requests one at a time, first alone, then while a flooding tenant keeps 128
requests outstanding (closed loop, well over ten times as many requests per second).

Why each wait is what it is:

* Alone, a quiet request finds the model idle, so it goes at once (the batcher does not make
  a lone request wait out the max queue delay, 100 ms, when no batch is running).
* Under the flood the queue is always due, so a request waits only for a slot. With fair share
  the quiet tenant (lifted to the flooder's counter when it arrives, then behind it as soon as
  the flooder is charged) gets a place in the very next batch, so it waits at most about one
  batch's run (~20 ms). The bound "loaded p99 <= 2x the max queue delay" (200 ms) thus holds
  until a busy machine makes a batch some ten times slower.
* The flooder's own requests wait behind the ~31 batches its outstanding requests make
  (~500 ms). Under earliest deadline first alone, a quiet request (same timeout, so a later
  deadline than everything queued) would wait that long too: the test checks that this
  counterfactual wait breaks the bound, so it would fail without fair share (it does: with the
  tenant counters ignored, the quiet tenant's p99 was ~600 ms). A slower machine only makes
  this wait longer; a machine twice as fast would still break the bound.

All numbers come from the scheduler's own per-tenant GetStats, the thing operators read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from deploy.local.triton import TritonNode
from tests.support.scheduler import (
    SchedulerProcess,
    catalog,
    infer_request,
    internal_channel,
    model_repository,
    start_node,
)

MODEL = "chat"
BATCH_SIZE = 4
MAX_QUEUE_DELAY_MS = 100
FLOOD_CALLERS = 128  # the flooder's outstanding requests: 32 batches' worth
QUIET_REQUESTS = 15
QUIET_GAP_S = 0.15  # pause between a quiet tenant's requests
MAX_TOKENS = 64  # every request's cost (tiny_lm decodes exactly max_tokens here)
TIMEOUT_S = 30.0
PHASE_LIMIT_S = 90.0  # bounds each phase, so a broken scheduler fails instead of hanging


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonNode]:
    repository = model_repository(tmp_path_factory.mktemp("repo"), ["tiny_fair"])
    started = start_node(tmp_path_factory.mktemp("node"), repository, load=["tiny_fair"])
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def scheduler(tmp_path: Path, node: TritonNode) -> Iterator[SchedulerProcess]:
    data = catalog(
        [node.config.grpc_url],
        {
            MODEL: {
                "model": "tiny_fair",
                "batching": {
                    "max_batch_size": BATCH_SIZE,
                    "max_queue_delay_ms": MAX_QUEUE_DELAY_MS,
                },
            }
        },
        pool={"max_inflight_batches": 1},
    )
    process = SchedulerProcess(tmp_path / "scheduler", data)
    try:
        yield process.start()
    finally:
        process.stop()


@pytest.fixture
async def stub(
    scheduler: SchedulerProcess,
) -> AsyncIterator[scheduler_pb2_grpc.SchedulerServiceStub]:
    # Calls as the router does, with the internal service token the test scheduler expects.
    channel = internal_channel(scheduler.address)
    try:
        yield scheduler_pb2_grpc.SchedulerServiceStub(channel)
    finally:
        await channel.close()


async def infer(
    stub: scheduler_pb2_grpc.SchedulerServiceStub, tenant: str, request_id: str
) -> scheduler_pb2.InferResponse:
    request = infer_request(MODEL, request_id=request_id, tenant=tenant, max_tokens=MAX_TOKENS)
    return await stub.Infer(request, timeout=TIMEOUT_S)


async def tenant_stats(
    stub: scheduler_pb2_grpc.SchedulerServiceStub,
) -> dict[str, scheduler_pb2.TenantQueueStats]:
    response = await stub.GetStats(scheduler_pb2.GetStatsRequest(model=MODEL), timeout=5)
    [model] = response.models
    return {entry.tenant: entry for entry in model.tenants}


async def quiet_sequence(stub: scheduler_pb2_grpc.SchedulerServiceStub, tenant: str) -> None:
    """One request at a time, with a pause between them."""
    for index in range(QUIET_REQUESTS):
        reply = await infer(stub, tenant, f"{tenant}-{index}")
        assert reply.completion.usage.completion_tokens == MAX_TOKENS
        await asyncio.sleep(QUIET_GAP_S)


async def test_a_flooding_tenant_does_not_delay_a_quiet_one(
    stub: scheduler_pb2_grpc.SchedulerServiceStub,
) -> None:
    # Warm the model and the scheduler's latency estimate; this tenant is not measured.
    for index in range(4):
        await infer(stub, "warm-up", f"warm-{index}")

    # Phase 1: the quiet tenant alone. The model is idle, so its requests go at once.
    await asyncio.wait_for(quiet_sequence(stub, "b-alone"), PHASE_LIMIT_S)

    # Phase 2: the same sequence while tenant "a" floods.
    stop = asyncio.Event()
    flood_done = 0

    async def flood(caller: int) -> None:
        nonlocal flood_done
        for index in range(10_000):  # bounded; ends when the quiet tenant is done
            if stop.is_set():
                return
            await infer(stub, "a", f"a-{caller}-{index}")
            flood_done += 1

    flooders = [asyncio.create_task(flood(caller)) for caller in range(FLOOD_CALLERS)]
    try:
        started = time.monotonic()
        while flood_done < 2 * FLOOD_CALLERS:  # steady state: every caller has cycled
            assert time.monotonic() - started < PHASE_LIMIT_S, "the flood never got going"
            assert not any(task.done() for task in flooders), "a flooding call failed"
            await asyncio.sleep(0.02)
        flood_before = flood_done
        phase_started = time.monotonic()
        await asyncio.wait_for(quiet_sequence(stub, "b-loaded"), PHASE_LIMIT_S)
        phase_s = time.monotonic() - phase_started
        flood_during = flood_done - flood_before
        during_stats = await tenant_stats(stub)
    finally:
        stop.set()
        ended = await asyncio.wait_for(
            asyncio.gather(*flooders, return_exceptions=True), PHASE_LIMIT_S
        )
    failures = [outcome for outcome in ended if isinstance(outcome, BaseException)]
    assert not failures, f"flooding calls failed: {failures[:3]}"

    stats = await tenant_stats(stub)
    alone, loaded, flooder = stats["b-alone"], stats["b-loaded"], during_stats["a"]
    print(
        f"\nqueue wait p99: b alone {alone.queue_wait_p99_ms:.1f} ms, b under flood "
        f"{loaded.queue_wait_p99_ms:.1f} ms (p50 {loaded.queue_wait_p50_ms:.1f}); flooder "
        f"p50 {flooder.queue_wait_p50_ms:.1f} ms, p99 {flooder.queue_wait_p99_ms:.1f} ms; "
        f"{flood_during} flood requests vs {QUIET_REQUESTS} quiet ones in {phase_s:.2f} s"
    )

    for quiet in (alone, loaded):
        assert (quiet.admitted, quiet.completed) == (QUIET_REQUESTS, QUIET_REQUESTS)
        assert quiet.queue_depth == 0
    assert flooder.queue_depth > 0 and stats["a"].completed == stats["a"].admitted

    # The contention was real: the flood sent over ten times as many requests, and its own
    # requests waited so long that a quiet request served in arrival-deadline order (waiting
    # as long) would break the bound below.
    assert flood_during >= 10 * QUIET_REQUESTS
    # Alone, a quiet request does not wait out the max queue delay on an idle model.
    assert alone.queue_wait_p99_ms < 0.5 * MAX_QUEUE_DELAY_MS
    assert flooder.queue_wait_p50_ms > 2 * MAX_QUEUE_DELAY_MS

    # Fair share: under the flood a quiet request waits no more than twice the max queue
    # delay, and far less than the flooder's own requests.
    assert loaded.queue_wait_p99_ms <= 2 * MAX_QUEUE_DELAY_MS
    assert flooder.queue_wait_p50_ms >= 3 * loaded.queue_wait_p99_ms
