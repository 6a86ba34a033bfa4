"""TritonBackend.run against a real Triton node: a batch in, each request's events out.

Why: the dispatcher hands a batch to one backend and relays each row's events to its caller
as they come, so the backend must keep its promises for both kinds of Triton model. For the
streaming tiny_lm_stream (decoupled) and the one-shot tiny_lm: per row, deltas and then
exactly one Final, usage cumulative, and the same answer either way. A node that cannot run
the batch fails before anything reaches a caller (so the batch may go elsewhere); a request
whose caller left gets nothing more; and when nobody is left the Triton stream is cancelled,
which Triton's own statistics show by the model executing for a fraction of a full run.

The node is real (tritonserver from the nvidia-pytriton wheel, started here), and so are the
NodePool and Lease the dispatcher would hand over; PendingRequests are built directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc.aio as triton
from opentelemetry.trace import INVALID_SPAN_CONTEXT
from shepherd.common.v1 import common_pb2

from deploy.local.ports import free_port
from deploy.local.triton import TritonNode, process_group_members
from libs.catalog import Deployment, Pool
from libs.errors import ShepherdError
from services.scheduler.events import Delta, Event, Failed, Final
from services.scheduler.gputime import Execution, executions
from services.scheduler.nodes import HealthConfig, Lease, NodePool
from services.scheduler.queue import PendingRequest
from services.scheduler.triton import NodeUnavailable, TritonBackend, infer
from tests.support.scheduler import start_node, streaming_model_repository

PLAIN = "tiny_lm"
STREAM = "tiny_lm_stream"
LONG = "tiny_lm_stream_long"  # every row streams exactly max_tokens (ignore_eos)
MODELS = (PLAIN, STREAM, LONG)
POOL = "gpu"
# Rows that end at different steps, one asking for no token at all.
LIMITS = [16, 1, 8, 0, 12]
RUN_LIMIT_S = 60  # every run of a batch here must end within this


def _deployment(model: str) -> Deployment:
    return Deployment(name=f"{POOL}/{model}", kind="triton", backend_model=model, pool=POOL)


def _node_stopped(node: TritonNode) -> None:
    pgid = node.pgid
    # A few seconds' grace, then the group is killed: the cancellation tests leave slow
    # executions behind, and Triton would wait them out (its exit timeout, and more).
    node.stop(timeout_s=3.0)
    assert pgid is not None and process_group_members(pgid) == []


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonNode]:
    root = tmp_path_factory.mktemp("triton-backend")
    repository = streaming_model_repository(root / "repository", [LONG])
    started = start_node(root / "work", repository, load=MODELS)
    try:
        yield started
    finally:
        _node_stopped(started)


def _pool(address: str) -> NodePool:
    """The dispatcher's own NodePool over one node (not started: no polling needed here)."""
    return NodePool(
        Pool(name=POOL, nodes=(address,)),
        [_deployment(model) for model in MODELS],
        HealthConfig(),
        placement=None,
    )


@pytest.fixture
async def pool(node: TritonNode) -> AsyncIterator[NodePool]:
    nodes = _pool(node.config.grpc_url)
    try:
        yield nodes
    finally:
        await nodes.close()


def _lease(pool: NodePool, model: str) -> Lease:
    """A slot on the pool's only node, as NodePool.acquire grants it."""
    (node,) = pool.nodes.values()
    node.inflight += 1  # what the grant does; the backend gives the slot back
    return Lease(pool, node, _deployment(model))


def _batch(limits: Sequence[int], timeout_s: float = 60.0, **params: Any) -> list[PendingRequest]:
    now = time.monotonic()
    return [
        PendingRequest(
            request_id=f"r{row}",
            tenant="t",
            messages=(("user", f"tell me something about number {row}"),),
            params=common_pb2.GenerationParams(max_tokens=limit, **params),
            deadline=now + timeout_s,
            span_context=INVALID_SPAN_CONTEXT,
        )
        for row, limit in enumerate(limits)
    ]


async def _collect(
    backend: TritonBackend, lease: Lease, batch: Sequence[PendingRequest]
) -> list[tuple[int, Event]]:
    async with asyncio.timeout(RUN_LIMIT_S):
        return [pair async for pair in backend.run(lease, batch)]


def _per_row(events: list[tuple[int, Event]], rows: int) -> list[list[Event]]:
    grouped: list[list[Event]] = [[] for _ in range(rows)]
    for row, event in events:
        grouped[row].append(event)
    return grouped


def _check_row(events: list[Event]) -> tuple[list[Delta], Final]:
    """Deltas, then exactly one Final (and nothing after it); usage cumulative."""
    *deltas, final = events
    assert isinstance(final, Final), events
    assert all(isinstance(delta, Delta) and delta.text for delta in deltas), events
    completion = [delta.usage.completion_tokens for delta in deltas]  # type: ignore[union-attr]
    assert completion == sorted(set(completion)), "usage is cumulative: it only grows"
    for delta in deltas:
        usage = delta.usage  # type: ignore[union-attr]
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert final.completion.text == "".join(delta.text for delta in deltas)  # type: ignore[union-attr]
    if deltas:
        assert final.completion.usage == deltas[-1].usage  # type: ignore[union-attr]
    return deltas, final  # type: ignore[return-value]


async def _plain_answers(lease: Lease, limits: Sequence[int], **params: Any) -> list[Any]:
    """tiny_lm's one-shot answers for the same rows, through today's infer()."""
    batch = _batch(limits, **params)
    plain = _deployment(PLAIN)
    return await infer(lease.node.client, lease.address, plain, batch, 30.0)


@pytest.mark.asyncio
async def test_streaming_model_yields_deltas_then_one_final_per_row(pool: NodePool) -> None:
    lease = _lease(pool, STREAM)
    batch = _batch(LIMITS)
    events = await _collect(TritonBackend(), lease, batch)
    expected = await _plain_answers(lease, LIMITS)
    for row, row_events in enumerate(_per_row(events, len(batch))):
        deltas, final = _check_row(row_events)
        answer = final.completion
        assert (answer.text, answer.finish_reason, answer.usage) == (
            expected[row].text,
            expected[row].finish_reason,
            expected[row].usage,
        ), f"row {row}: streamed and one-shot answers differ"
        # One decoding step, one token, one delta: the final count is the deltas' sum.
        assert len(deltas) == answer.usage.completion_tokens
        gpu = answer.placement
        assert gpu.batch_gpu_us > 0 and gpu.batch_id
        assert answer.placement == common_pb2.Placement(
            deployment=f"{POOL}/{STREAM}",
            kind=common_pb2.BACKEND_KIND_TRITON,
            node=lease.address,
            backend_model=STREAM,
            batch_size=len(batch),
            gpu_us=gpu.gpu_us,
            batch_gpu_us=gpu.batch_gpu_us,
            batch_id=gpu.batch_id,
        )
    # Rows that finish early have all their text before the longer ones finish streaming;
    # their Finals wait for the batch's end, when their share of its GPU time is known.
    last_text = {
        row: index for index, (row, event) in enumerate(events) if isinstance(event, Delta)
    }
    finals = [index for index, (_, event) in enumerate(events) if isinstance(event, Final)]
    assert min(last_text.values()) < max(last_text.values()) - 1, "early rows end first"
    assert min(finals) > max(last_text.values()), "Finals come when the batch has ended"
    print(f"{len(events)} events for {len(batch)} rows, last text at {last_text}")


@pytest.mark.asyncio
async def test_sampled_stream_equals_the_one_shot_answer(pool: NodePool) -> None:
    lease = _lease(pool, STREAM)
    params = {"temperature": 0.9, "seed": 7}
    events = await _collect(TritonBackend(), lease, _batch(LIMITS, **params))
    expected = await _plain_answers(lease, LIMITS, **params)
    for row, row_events in enumerate(_per_row(events, len(LIMITS))):
        _, final = _check_row(row_events)
        assert final.completion.text == expected[row].text
        assert final.completion.usage == expected[row].usage


@pytest.mark.asyncio
async def test_one_shot_model_yields_the_whole_text_then_final(pool: NodePool) -> None:
    lease = _lease(pool, PLAIN)
    batch = _batch(LIMITS)
    events = await _collect(TritonBackend(), lease, batch)
    expected = await _plain_answers(lease, LIMITS)
    for row, row_events in enumerate(_per_row(events, len(batch))):
        deltas, final = _check_row(row_events)
        answer = common_pb2.Completion()
        answer.CopyFrom(final.completion)
        for name in ("gpu_us", "batch_gpu_us", "batch_id"):
            answer.placement.ClearField(name)
        assert answer == expected[row]
        assert [delta.text for delta in deltas] == ([expected[row].text] if LIMITS[row] else [])
        assert final.completion.placement.batch_size == len(batch)


@pytest.mark.asyncio
async def test_a_node_that_is_down_raises_before_yielding() -> None:
    nodes = _pool(f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        for model in (PLAIN, STREAM):
            run = TritonBackend().run(_lease(nodes, model), _batch([4, 4]))
            with pytest.raises(NodeUnavailable):
                async with asyncio.timeout(RUN_LIMIT_S):
                    await anext(run)
    finally:
        await nodes.close()


@pytest.mark.asyncio
async def test_a_streaming_node_that_went_down_raises_before_yielding(tmp_path: Path) -> None:
    """The model was known to stream (remembered), then its node died: retry elsewhere."""
    repository = streaming_model_repository(tmp_path / "repository", [])
    doomed = start_node(tmp_path / "work", repository, load=[STREAM])
    nodes = _pool(doomed.config.grpc_url)
    backend = TritonBackend()
    try:
        assert await _collect(backend, _lease(nodes, STREAM), _batch([2]))
        _node_stopped(doomed)
        run = backend.run(_lease(nodes, STREAM), _batch([2]))
        with pytest.raises(NodeUnavailable):
            async with asyncio.timeout(RUN_LIMIT_S):
                await anext(run)
    finally:
        doomed.stop()
        await nodes.close()


@pytest.mark.asyncio
async def test_an_unknown_model_fails_before_yielding(pool: NodePool) -> None:
    run = TritonBackend().run(_lease(pool, "no_such_model"), _batch([2]))
    with pytest.raises(ShepherdError) as info:
        async with asyncio.timeout(RUN_LIMIT_S):
            await anext(run)
    print(f"unknown model: {info.value.code} {info.value.message}")


@pytest.mark.asyncio
async def test_a_row_whose_caller_left_gets_no_more_events(pool: NodePool) -> None:
    batch = _batch([64, 64, 64])
    lease = _lease(pool, LONG)
    after_drop: list[tuple[int, Event]] = []
    dropped = False
    before = await _stats(lease.node.client)
    async with asyncio.timeout(RUN_LIMIT_S):
        async for row, event in TritonBackend().run(lease, batch):
            if dropped:
                after_drop.append((row, event))
            elif row == 1:
                batch[1].events.outcome.cancel()  # what the RPC handler does when its caller goes
                dropped = True
    await _settled(lease.node.client, before)  # later tests measure LONG's executions
    assert dropped
    assert all(row != 1 for row, _ in after_drop), "the dropped row got more events"
    for row in (0, 2):
        events = [event for r, event in after_drop if r == row]
        assert isinstance(events[-1], Final)
        assert events[-1].completion.usage.completion_tokens == 64


@pytest.fixture(scope="module")
async def full_run(node: TritonNode) -> tuple[float, int]:
    """(wall seconds, model execution ns) of LONG_BATCH run to its end, the faster of two."""
    runs = []
    async with triton.InferenceServerClient(url=node.config.grpc_url) as client:
        nodes = _pool(node.config.grpc_url)
        try:
            for _ in range(2):
                before = await _stats(client)
                started = time.monotonic()
                events = await _collect(TritonBackend(), _lease(nodes, LONG), _batch(LONG_BATCH))
                wall_s = time.monotonic() - started
                assert sum(isinstance(event, Final) for _, event in events) == len(LONG_BATCH)
                after = await _settled(client, before)
                runs.append((wall_s, after[1] - before[1]))
        finally:
            await nodes.close()
    return min(run[0] for run in runs), min(run[1] for run in runs)


LONG_BATCH = [256] * 32  # the longest stream tiny_lm_stream_long has: 32 rows, 256 steps


async def _stats(client: triton.InferenceServerClient) -> tuple[int, int]:
    """LONG's (execution_count, compute_infer ns) from Triton's statistics."""
    stats = (await client.get_inference_statistics(LONG, as_json=True))["model_stats"][0]
    compute = stats["inference_stats"].get("compute_infer", {})
    return int(stats.get("execution_count", 0)), int(compute.get("ns", 0))


async def _settled(
    client: triton.InferenceServerClient, before: tuple[int, int]
) -> tuple[int, int]:
    """Statistics once the next execution is recorded (when execute() returns; 30 s at most)."""
    deadline = time.monotonic() + 30
    while (stats := await _stats(client))[0] <= before[0]:
        assert time.monotonic() < deadline, "the execution was never recorded"
        await asyncio.sleep(0.02)
    assert stats[0] == before[0] + 1
    return stats


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["every caller left", "consumer closed the generator"])
async def test_the_stream_is_cancelled_when_nobody_wants_it(
    node: TritonNode, pool: NodePool, full_run: tuple[float, int], how: str
) -> None:
    """After the first event nobody wants the rest: the model must stop decoding.

    Triton times each execution of the model (compute_infer: execute() called to returned),
    and a streaming model's execute() returns only when it stops decoding. Run to its end,
    this batch keeps the model busy for `full`; if the stream were not cancelled, the model
    would decode all 256 steps again. Under half of `full` proves it stopped; noise only
    slows a run down, so the best of up to three attempts counts.
    """
    full_s, full_ns = full_run
    spent: list[int] = []
    async with triton.InferenceServerClient(url=node.config.grpc_url) as client:
        for _ in range(3):
            batch = _batch(LONG_BATCH)
            before = await _stats(client)
            run = TritonBackend().run(_lease(pool, LONG), batch)
            async with asyncio.timeout(RUN_LIMIT_S):
                await anext(run)
                if how == "every caller left":
                    for item in batch:
                        item.events.outcome.cancel()
                    assert [pair async for pair in run] == [], "events for nobody"
                else:
                    await run.aclose()
            spent.append((await _settled(client, before))[1] - before[1])
            if spent[-1] < full_ns / 2:
                break
    print(
        f"{how}: full run {full_s * 1e3:.0f} ms wall, {full_ns / 1e6:.0f} ms executing; "
        f"cancelled after the first event: {', '.join(f'{ns / 1e6:.0f}' for ns in spent)} ms"
    )
    assert min(spent) < full_ns / 2


@pytest.mark.asyncio
async def test_a_deadline_mid_stream_fails_the_unfinished_rows(
    pool: NodePool, full_run: tuple[float, int]
) -> None:
    """A third of a full run's time: some tokens arrive, then the deadline ends the stream."""
    full_s, _ = full_run
    batch = _batch(LONG_BATCH, timeout_s=full_s / 3)
    lease = _lease(pool, LONG)
    events: list[tuple[int, Event]] = []
    before = await _stats(lease.node.client)
    try:
        async with asyncio.timeout(RUN_LIMIT_S):
            async for pair in TritonBackend().run(lease, batch):
                events.append(pair)
    except ShepherdError as error:
        # On a slow machine not even the first step came in time: nothing was sent, so the
        # failure is raised for the dispatcher to answer every row with.
        assert not events
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
        pytest.skip("the deadline passed before the first step on this machine")
    await _settled(lease.node.client, before)  # the model stopped: its execution ended
    for row, row_events in enumerate(_per_row(events, len(batch))):
        *deltas, last = row_events
        assert all(isinstance(delta, Delta) for delta in deltas)
        assert isinstance(last, Failed), f"row {row} ended with {last}"
        assert last.error.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert deltas, "the failure came after output"
        assert last.usage == deltas[-1].usage  # type: ignore[union-attr]
        assert 0 < last.usage.completion_tokens < 256


async def _executions(client: triton.InferenceServerClient, model: str) -> dict[int, Execution]:
    """Triton's own counters of `model`, per batch size."""
    return executions((await client.get_inference_statistics(model)).model_stats)


async def _recorded(
    client: triton.InferenceServerClient, model: str, before: dict[int, Execution], batches: int
) -> dict[int, Execution]:
    """Triton's counters once `batches` more executions are recorded (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        now = await _executions(client, model)
        done = sum(e.count for e in now.values()) - sum(e.count for e in before.values())
        if done >= batches:
            assert done == batches
            return now
        assert time.monotonic() < deadline, f"{done} of {batches} executions recorded"
        await asyncio.sleep(0.02)


def _increase_ns(before: dict[int, Execution], after: dict[int, Execution]) -> int:
    return sum(e.ns for e in after.values()) - sum(e.ns for e in before.values())


def _finals(events: list[tuple[int, Event]], rows: int) -> list[common_pb2.Completion]:
    finals: dict[int, common_pb2.Completion] = {}
    for row, event in events:
        if isinstance(event, Final):
            finals[row] = event.completion
    assert sorted(finals) == list(range(rows)), "every row ends with a Final"
    return [finals[row] for row in range(rows)]


@pytest.mark.asyncio
@pytest.mark.parametrize("model", [PLAIN, STREAM])
async def test_a_batch_splits_the_execution_triton_reports_among_its_rows_by_tokens(
    pool: NodePool, model: str
) -> None:
    """The batch's GPU time is its execution's time as Triton reports it, to the
    microsecond, and the rows' shares follow their tokens and add up to it exactly."""
    lease = _lease(pool, model)
    client = lease.node.client
    before = await _executions(client, model)
    events = await _collect(TritonBackend(), lease, _batch(LIMITS))
    ns = _increase_ns(before, await _recorded(client, model, before, 1))
    answers = _finals(events, len(LIMITS))
    placements = [answer.placement for answer in answers]
    batch_us = placements[0].batch_gpu_us
    assert {(p.batch_id, p.batch_gpu_us) for p in placements} == {
        (placements[0].batch_id, batch_us)
    }
    assert abs(batch_us - ns / 1000) < 1, (batch_us, ns)
    assert sum(p.gpu_us for p in placements) == batch_us
    tokens = [answer.usage.total_tokens for answer in answers]
    for placement, used in zip(placements, tokens, strict=True):
        assert abs(placement.gpu_us - batch_us * used / sum(tokens)) < 1
    print(f"{model}: {batch_us} us for tokens {tokens}: {[p.gpu_us for p in placements]}")


@pytest.mark.asyncio
@pytest.mark.parametrize("model", [PLAIN, STREAM])
async def test_a_batch_of_one_gets_the_whole_execution(pool: NodePool, model: str) -> None:
    lease = _lease(pool, model)
    client = lease.node.client
    before = await _executions(client, model)
    events = await _collect(TritonBackend(), lease, _batch([8]))
    ns = _increase_ns(before, await _recorded(client, model, before, 1))
    (answer,) = _finals(events, 1)
    assert answer.placement.gpu_us == answer.placement.batch_gpu_us > 0
    assert abs(answer.placement.gpu_us - ns / 1000) < 1


@pytest.mark.asyncio
async def test_concurrent_batches_add_up_to_the_execution_time_triton_reports(
    pool: NodePool,
) -> None:
    """Many batches of both kinds of model in flight at once on one node (Triton queues
    them): each batch's rows add up to it exactly, and all of them to Triton's own total."""
    backend = TritonBackend()
    sizes = [1, 3, 5, 2, 8, 1, 4, 6, 3, 7, 2, 5] * 2
    models = [PLAIN, STREAM]
    clients = {model: _lease(pool, model).node.client for model in models}
    before = {model: await _executions(clients[model], model) for model in models}
    gate = asyncio.Semaphore(4)

    async def one(index: int, size: int) -> list[common_pb2.Completion]:
        model = models[index % 2]
        async with gate:
            limits = [4 + (index + row) % 9 for row in range(size)]
            return _finals(await _collect(backend, _lease(pool, model), _batch(limits)), size)

    batches = await asyncio.gather(*(one(index, size) for index, size in enumerate(sizes)))
    triton_ns = 0
    for model in models:
        after = await _recorded(clients[model], model, before[model], len(sizes) // 2)
        triton_ns += _increase_ns(before[model], after)
    for answers in batches:
        placements = [answer.placement for answer in answers]
        assert len({p.batch_id for p in placements}) == 1
        assert sum(p.gpu_us for p in placements) == placements[0].batch_gpu_us
    attributed = sum(p.placement.gpu_us for answers in batches for p in answers)
    print(f"attributed {attributed} us, Triton reports {triton_ns / 1000:.0f} us")
    assert abs(attributed - triton_ns / 1000) <= 0.01 * triton_ns / 1000
