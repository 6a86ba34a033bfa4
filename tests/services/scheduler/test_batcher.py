"""The per-model batcher: flush by size or by timer, skip the abandoned, fail on close.

`run_batch` here is a recording coroutine: it is the batcher's input (what to do with a
formed batch), so recording what it receives is how a test watches the batcher's output.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from opentelemetry.trace import INVALID_SPAN_CONTEXT
from shepherd.common.v1 import common_pb2

from libs.catalog import Batching, Deployment, Model, Price
from libs.errors import ShepherdError
from services.scheduler.batcher import Batcher, PendingRequest, RunBatch

TOLERANCE_S = 0.01


def model(max_batch_size: int, max_queue_delay_ms: float) -> Model:
    return Model(
        name="shepherd-tiny",
        aliases=(),
        family="shepherd-tiny",
        priority=5,
        price=Price(input_nano_per_million=1, output_nano_per_million=1),
        default_max_tokens=16,
        max_output_tokens=64,
        batching=Batching(
            max_batch_size=max_batch_size,
            max_queue_delay_ms=max_queue_delay_ms,
            preferred_batch_sizes=(),
        ),
        cache_ttl_s=60,
        deployments=(
            Deployment(name="local/tiny_lm", kind="triton", backend_model="tiny_lm", pool="p"),
        ),
    )


def pending(request_id: str, timeout_s: float = 30.0) -> PendingRequest:
    return PendingRequest(
        request_id=request_id,
        tenant="acme",
        messages=(("user", f"hello from {request_id}"),),
        params=common_pb2.GenerationParams(max_tokens=4),
        deadline=time.monotonic() + timeout_s,
        future=asyncio.get_running_loop().create_future(),
        span_context=INVALID_SPAN_CONTEXT,
    )


@dataclass
class Recorder:
    """A run_batch that answers every request and remembers each batch and when it came."""

    batches: list[list[str]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    release: asyncio.Event | None = None
    dispatched: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, model: Model, batch: list[PendingRequest]) -> None:
        self.batches.append([item.request_id for item in batch])
        self.times.append(time.monotonic())
        self.dispatched.set()
        if self.release is not None:
            await self.release.wait()
        for item in batch:
            item.settle(
                common_pb2.Completion(
                    text=f"answer to {item.request_id}",
                    placement=common_pb2.Placement(batch_size=len(batch)),
                )
            )


@pytest.fixture
async def make_batcher() -> AsyncIterator[Callable[..., Batcher]]:
    started: list[Batcher] = []

    def make(
        run_batch: RunBatch, *, size: int = 4, delay_ms: float = 50, inflight: int = 4
    ) -> Batcher:
        batcher = Batcher(model(size, delay_ms), run_batch, max_inflight_batches=inflight)
        batcher.start()
        started.append(batcher)
        return batcher

    yield make
    for batcher in started:
        await batcher.close()


async def test_full_batch_flushes_immediately(make_batcher: Callable[..., Batcher]) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder, size=4, delay_ms=5_000)
    items = [pending(f"r{i}") for i in range(4)]

    started = time.monotonic()
    for item in items:
        batcher.submit(item)
    answers = await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 1.0)

    assert time.monotonic() - started < 1.0  # far less than the 5 s queue delay
    assert recorder.batches == [["r0", "r1", "r2", "r3"]]
    assert [a.text for a in answers] == [f"answer to r{i}" for i in range(4)]
    assert all(a.placement.batch_size == 4 for a in answers)
    assert batcher.depth == 0


async def test_overflow_splits_into_batches_of_max_size(
    make_batcher: Callable[..., Batcher],
) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder, size=3, delay_ms=30)
    items = [pending(f"r{i}") for i in range(7)]

    for item in items:
        batcher.submit(item)
    await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), 1.0)

    assert recorder.batches == [["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6"]]


async def test_lone_request_flushes_on_the_timer(make_batcher: Callable[..., Batcher]) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder, size=8, delay_ms=100)
    item = pending("lone")

    submitted = time.monotonic()
    batcher.submit(item)
    answer = await asyncio.wait_for(item.future, 1.0)

    assert answer.text == "answer to lone"
    assert recorder.batches == [["lone"]]
    waited = recorder.times[0] - submitted
    assert 0.1 - TOLERANCE_S <= waited < 1.0


async def test_timer_runs_from_the_oldest_request(make_batcher: Callable[..., Batcher]) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder, size=8, delay_ms=150)
    first, second = pending("first"), pending("second")

    submitted = time.monotonic()
    batcher.submit(first)
    await asyncio.sleep(0.05)
    batcher.submit(second)
    await asyncio.wait_for(asyncio.gather(first.future, second.future), 1.0)

    assert recorder.batches == [["first", "second"]]
    assert 0.15 - TOLERANCE_S <= recorder.times[0] - submitted < 1.0


async def test_cancelled_request_is_never_dispatched(make_batcher: Callable[..., Batcher]) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder, size=3, delay_ms=50)
    gone, kept = pending("gone"), pending("kept")

    batcher.submit(gone)
    batcher.submit(kept)
    gone.future.cancel()  # the caller hung up while queued
    answer = await asyncio.wait_for(kept.future, 1.0)

    assert answer.text == "answer to kept"
    assert recorder.batches == [["kept"]]
    assert gone.future.cancelled()


async def test_cancelled_request_frees_its_slot_in_a_full_batch(
    make_batcher: Callable[..., Batcher],
) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder, size=2, delay_ms=50)
    items = [pending(f"r{i}") for i in range(3)]
    items[0].future.cancel()

    for item in items:
        batcher.submit(item)
    await asyncio.wait_for(asyncio.gather(items[1].future, items[2].future), 1.0)

    assert recorder.batches == [["r1", "r2"]]


async def test_expired_request_gets_deadline_exceeded_and_is_not_run(
    make_batcher: Callable[..., Batcher],
) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder, size=4, delay_ms=20)
    late, fine = pending("late", timeout_s=-1.0), pending("fine")

    batcher.submit(late)
    batcher.submit(fine)

    with pytest.raises(ShepherdError) as caught:
        await asyncio.wait_for(late.future, 1.0)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in caught.value.message
    assert (await asyncio.wait_for(fine.future, 1.0)).text == "answer to fine"
    assert recorder.batches == [["fine"]]


async def test_request_that_expires_while_queued_is_not_run(
    make_batcher: Callable[..., Batcher],
) -> None:
    recorder = Recorder()
    batcher = make_batcher(recorder, size=4, delay_ms=100)
    item = pending("short", timeout_s=0.03)

    batcher.submit(item)
    with pytest.raises(ShepherdError) as caught:
        await asyncio.wait_for(item.future, 1.0)

    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert recorder.batches == []


async def test_failing_run_batch_answers_internal(make_batcher: Callable[..., Batcher]) -> None:
    recorder = Recorder()
    calls = 0

    async def explode_once(model: Model, batch: list[PendingRequest]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("backend bug")
        await recorder(model, batch)

    batcher = make_batcher(explode_once, size=2, delay_ms=10)
    items = [pending("a"), pending("b")]
    for item in items:
        batcher.submit(item)

    for item in items:
        with pytest.raises(ShepherdError) as caught:
            await asyncio.wait_for(item.future, 1.0)
        assert caught.value.code == grpc.StatusCode.INTERNAL
        assert "backend bug" not in caught.value.message

    # The batcher keeps working after a failed batch.
    again = pending("again")
    batcher.submit(again)
    assert (await asyncio.wait_for(again.future, 1.0)).text == "answer to again"
    assert recorder.batches == [["again"]]


async def test_inflight_limit_holds_back_the_next_batch(
    make_batcher: Callable[..., Batcher],
) -> None:
    recorder = Recorder(release=asyncio.Event())
    batcher = make_batcher(recorder, size=1, delay_ms=0, inflight=1)
    first, second = pending("first"), pending("second")

    batcher.submit(first)
    batcher.submit(second)
    await asyncio.wait_for(recorder.dispatched.wait(), 1.0)
    await asyncio.sleep(0.05)
    assert recorder.batches == [["first"]]  # the second waits for a free slot

    recorder.release.set()
    await asyncio.wait_for(asyncio.gather(first.future, second.future), 1.0)
    assert recorder.batches == [["first"], ["second"]]


async def test_close_fails_queued_requests_with_unavailable() -> None:
    recorder = Recorder()
    batcher = Batcher(model(8, 10_000), recorder, max_inflight_batches=2)
    batcher.start()
    items = [pending(f"q{i}") for i in range(3)]
    for item in items:
        batcher.submit(item)
    await asyncio.sleep(0.02)

    await asyncio.wait_for(batcher.close(), 1.0)

    for item in items:
        assert item.future.done()
        with pytest.raises(ShepherdError) as caught:
            item.future.result()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in caught.value.message
    assert recorder.batches == []
    assert batcher.depth == 0


async def test_close_waits_for_batches_in_flight() -> None:
    recorder = Recorder(release=asyncio.Event())
    batcher = Batcher(model(1, 0), recorder, max_inflight_batches=2)
    batcher.start()
    running = pending("running")
    batcher.submit(running)
    await asyncio.wait_for(recorder.dispatched.wait(), 1.0)

    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # it drains the batch that is running

    recorder.release.set()
    await asyncio.wait_for(closing, 1.0)
    assert running.future.result().text == "answer to running"
