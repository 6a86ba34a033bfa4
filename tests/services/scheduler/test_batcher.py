"""The per-model batcher: Triton's batch-size rules, the max-delay timer, order, and shutdown.

`FakeRunner` stands in for the dispatcher. It is the batcher's input (capacity, granted or
held back by the test, and what to do with a formed batch), so recording the batches it
receives is how a test watches the batcher's output. Its `run` answers every request the way a
backend would, so a request's future shows what its caller would see.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import pytest
from opentelemetry.trace import INVALID_SPAN_CONTEXT
from shepherd.common.v1 import common_pb2

from libs.catalog import Batching, Deployment, Model, Price, QueuePolicy
from libs.errors import ShepherdError
from services.scheduler.batcher import Batcher, WaiterKey
from services.scheduler.queue import ModelQueue, PendingRequest
from services.scheduler.stats import MAX_TENANTS, ModelStats

HIGH = common_pb2.PRIORITY_HIGH
NORMAL = common_pb2.PRIORITY_NORMAL
LOW = common_pb2.PRIORITY_LOW

# Waits for something the batcher does at once; generous, only hit when a test fails.
PATIENCE_S = 2.0


def model(
    max_batch_size: int = 8,
    max_queue_delay_ms: float = 50,
    preferred: Sequence[int] = (),
    *,
    aging_s: float = 60.0,
    priority: int = 5,
) -> Model:
    return Model(
        name="shepherd-tiny",
        aliases=(),
        family="shepherd-tiny",
        priority=priority,
        price=Price(input_nano_per_million=1, output_nano_per_million=1),
        default_max_tokens=16,
        max_output_tokens=64,
        batching=Batching(
            max_batch_size=max_batch_size,
            max_queue_delay_ms=max_queue_delay_ms,
            preferred_batch_sizes=tuple(preferred),
        ),
        queue=QueuePolicy(max_size=1_000, aging_s=aging_s),
        cache_ttl_s=60,
        deployments=(
            Deployment(name="p/tiny_lm", kind="triton", backend_model="tiny_lm", pool="p"),
        ),
    )


def pending(
    request_id: str,
    priority: int = NORMAL,
    *,
    timeout_s: float = 30.0,
    waited_s: float = 0.0,
    tenant: str = "acme",
) -> PendingRequest:
    now = time.monotonic()
    return PendingRequest(
        request_id=request_id,
        tenant=tenant,
        messages=(("user", f"hello from {request_id}"),),
        params=common_pb2.GenerationParams(max_tokens=4),
        deadline=now + timeout_s,
        span_context=INVALID_SPAN_CONTEXT,
        priority=priority,
        enqueued_at=now - waited_s,
    )


class FakeSlot:
    def __init__(self, runner: FakeRunner) -> None:
        self._runner = runner
        self.released = 0

    def release(self, *, latency_s: float | None = None, failure: str = "") -> None:
        self.released += 1
        if self.released == 1:
            self._runner.capacity.release()


@dataclass
class FakeRunner:
    """Grants `slots` batch slots at once (more via `grant`), runs batches, records them.

    With `finish` set, each batch holds its slot until the test sets the event. A batch that
    holds one of the request ids in `busy` runs until `busy_done` is set: the way a test keeps
    a batch running, so the batcher waits for company instead of sending at once.
    """

    slots: int = 1_000
    finish: asyncio.Event | None = None
    busy: set[str] = field(default_factory=set)
    busy_done: asyncio.Event = field(default_factory=asyncio.Event)
    refuse: ShepherdError | None = None
    explode: int = 0  # how many of the next runs raise instead of answering
    lanes: int = 1
    batches: list[list[str]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    errors: list[ShepherdError | None] = field(default_factory=list)
    given: list[FakeSlot] = field(default_factory=list)
    waiting: int = 0

    def __post_init__(self) -> None:
        self.capacity = asyncio.Semaphore(self.slots)

    def grant(self, count: int = 1) -> None:
        for _ in range(count):
            self.capacity.release()

    async def acquire(self, model: Model, key: Callable[[], WaiterKey]) -> FakeSlot:
        self.waiting += 1
        try:
            await self.capacity.acquire()
        finally:
            self.waiting -= 1
        if self.refuse is not None:
            self.capacity.release()
            raise self.refuse
        slot = FakeSlot(self)
        self.given.append(slot)
        return slot

    async def run(
        self,
        model: Model,
        slot: FakeSlot | None,
        batch: list[PendingRequest],
        error: ShepherdError | None = None,
    ) -> None:
        self.batches.append([item.request_id for item in batch])
        self.times.append(time.monotonic())
        self.errors.append(error)
        if self.explode:
            self.explode -= 1
            raise RuntimeError("backend bug: secret stack detail")
        if self.finish is not None:
            await self.finish.wait()
        if any(item.request_id in self.busy for item in batch):
            await self.busy_done.wait()
        for item in batch:
            item.settle(
                common_pb2.Completion(
                    text=f"answer to {item.request_id}",
                    placement=common_pb2.Placement(batch_size=len(batch)),
                )
            )
        if slot is not None:
            slot.release(latency_s=0.001)

    def parallelism(self, model: Model) -> int:
        return self.lanes


async def until(condition: Callable[[], bool]) -> None:
    """Let the batcher run until `condition` holds (it should, almost at once)."""
    give_up = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < give_up, "the batcher never got there"
        await asyncio.sleep(0.001)


async def answers(items: Sequence[PendingRequest]) -> list[common_pb2.Completion]:
    return await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), PATIENCE_S)


def error_of(item: PendingRequest) -> ShepherdError:
    assert item.future.done() and not item.future.cancelled(), item.request_id
    error = item.future.exception()
    assert isinstance(error, ShepherdError), error
    return error


MakeBatcher = Callable[..., Batcher]


@pytest.fixture
async def make_batcher() -> AsyncIterator[MakeBatcher]:
    started: list[tuple[Batcher, FakeRunner]] = []

    def make(runner: FakeRunner, served: Model, *, start: bool = True) -> Batcher:
        batcher = Batcher(
            served, ModelQueue(served.name, served.queue), runner, ModelStats(served.name)
        )
        if start:
            batcher.start()
            started.append((batcher, runner))
        return batcher

    yield make
    for batcher, runner in started:
        if runner.finish is not None:
            runner.finish.set()  # let held batches end so close() can wait for them
        await asyncio.wait_for(batcher.close(), PATIENCE_S)


def submit_all(batcher: Batcher, items: Sequence[PendingRequest]) -> None:
    for item in items:
        batcher.submit(item, retry_after_s=1.0)


async def keep_busy(batcher: Batcher, runner: FakeRunner) -> PendingRequest:
    """Start a batch that runs until `runner.busy_done` is set (see FakeRunner)."""
    busy = pending("busy")
    runner.busy.add(busy.request_id)
    batcher.submit(busy, retry_after_s=1.0)
    await until(lambda: batcher.inflight_batches == 1)
    return busy


# -- batch sizes ------------------------------------------------------------------------------


async def test_backlog_behind_a_busy_slot_leaves_as_a_max_size_batch(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner(slots=0)
    batcher = make_batcher(runner, model(8, 50, preferred=(4, 8)))
    items = [pending(f"r{index}") for index in range(10)]

    submit_all(batcher, items)
    await until(lambda: runner.waiting == 1)  # due (>= 4 queued), waiting for capacity
    assert runner.batches == []
    runner.grant()
    results = await answers(items)

    assert runner.batches == [[f"r{index}" for index in range(8)], ["r8", "r9"]]
    assert [result.placement.batch_size for result in results] == [8] * 8 + [2] * 2
    assert batcher.stats.batch_sizes == {8: 1, 2: 1}
    assert len(batcher.stats.queue_wait_ms) == 10
    assert batcher.queue.depth == 0


async def test_fewer_than_any_preferred_size_waits_the_max_delay_then_goes(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner()
    batcher = make_batcher(runner, model(8, 150, preferred=(4, 8)))
    await keep_busy(batcher, runner)
    before = time.monotonic()
    items = [pending(f"r{index}") for index in range(3)]

    submit_all(batcher, items)
    await answers(items)

    assert runner.batches == [["busy"], ["r0", "r1", "r2"]]
    assert runner.times[1] - before >= 0.15 - 1e-3
    runner.busy_done.set()


async def test_largest_preferred_size_leaves_at_once_and_the_rest_waits(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner()
    batcher = make_batcher(runner, model(8, 10_000, preferred=(4,)))
    await keep_busy(batcher, runner)
    items = [pending(f"r{index}") for index in range(5)]

    submit_all(batcher, items)
    await answers(items[:4])  # long before the 10 s max delay

    assert runner.batches == [["busy"], ["r0", "r1", "r2", "r3"]]
    await asyncio.sleep(0.02)
    assert runner.batches == [["busy"], ["r0", "r1", "r2", "r3"]]
    assert batcher.queue.depth == 1
    assert not items[4].future.done()
    runner.busy_done.set()  # the running batch ends: the one left goes without the timer
    await answers(items[4:])
    assert runner.batches[-1] == ["r4"]


async def test_largest_preferred_size_that_fits_is_chosen_at_grant_time(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner(slots=1)
    batcher = make_batcher(runner, model(16, 10_000, preferred=(2, 4, 8)))
    await keep_busy(batcher, runner)  # holds the only slot
    first = [pending(f"a{index}") for index in range(3)]
    submit_all(batcher, first)
    await until(lambda: runner.waiting == 1)  # due at 2, but the slot is busy
    later = [pending(f"b{index}") for index in range(4)]
    submit_all(batcher, later)  # 7 queued when the slot frees

    runner.grant()
    await until(lambda: len(runner.batches) == 3)
    await asyncio.sleep(0.02)

    assert [len(batch) for batch in runner.batches] == [1, 4, 2]
    assert batcher.queue.depth == 1  # the last one waits for more, or for the timer
    runner.busy_done.set()


async def test_full_batch_leaves_at_once_and_overflow_splits(make_batcher: MakeBatcher) -> None:
    runner = FakeRunner()
    batcher = make_batcher(runner, model(3, 30))
    items = [pending(f"r{index}") for index in range(7)]

    submit_all(batcher, items)
    await answers(items)

    assert runner.batches == [["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6"]]


async def test_lone_request_is_flushed_by_the_max_delay_timer(make_batcher: MakeBatcher) -> None:
    runner = FakeRunner()
    batcher = make_batcher(runner, model(8, 100, preferred=(4,)))
    await keep_busy(batcher, runner)
    lone = pending("lone")

    batcher.submit(lone, retry_after_s=1.0)
    [answer] = await answers([lone])

    assert answer.text == "answer to lone"
    assert answer.placement.batch_size == 1
    assert runner.batches == [["busy"], ["lone"]]
    assert runner.times[1] - lone.enqueued_at >= 0.1 - 1e-3
    runner.busy_done.set()


async def test_lone_request_on_an_idle_model_goes_at_once(make_batcher: MakeBatcher) -> None:
    runner = FakeRunner()
    batcher = make_batcher(runner, model(8, 10_000, preferred=(4,)))
    lone = pending("lone")

    batcher.submit(lone, retry_after_s=1.0)
    [answer] = await answers([lone])  # long before the 10 s max delay

    assert answer.placement.batch_size == 1
    assert runner.batches == [["lone"]]


async def test_what_queues_while_the_only_batch_runs_goes_together_when_it_ends(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner()
    batcher = make_batcher(runner, model(8, 10_000, preferred=(8,)))
    busy = await keep_busy(batcher, runner)
    items = [pending(f"r{index}") for index in range(5)]
    submit_all(batcher, items)
    await asyncio.sleep(0.02)
    assert runner.batches == [["busy"]]  # fewer than 8, delay 10 s: they wait while it runs

    runner.busy_done.set()
    results = await answers([busy, *items])

    assert runner.batches == [["busy"], [f"r{index}" for index in range(5)]]
    assert [result.placement.batch_size for result in results[1:]] == [5] * 5


async def test_a_hosted_model_never_waits_for_company(make_batcher: MakeBatcher) -> None:
    runner = FakeRunner()
    hosted = dataclasses.replace(
        model(8, 10_000, preferred=(4,)),
        deployments=(Deployment(name="api/m", kind="hosted", backend_model="m", provider="p"),),
    )
    batcher = make_batcher(runner, hosted)
    await keep_busy(batcher, runner)  # even with a batch running
    lone = pending("lone")

    batcher.submit(lone, retry_after_s=1.0)
    await answers([lone])  # long before the 10 s max delay

    assert runner.batches == [["busy"], ["lone"]]
    runner.busy_done.set()


async def test_timer_runs_from_the_oldest_request(make_batcher: MakeBatcher) -> None:
    runner = FakeRunner()
    batcher = make_batcher(runner, model(8, 5_000))
    overdue = pending("overdue", waited_s=6.0)  # has waited longer than the max delay
    fresh = pending("fresh")

    submit_all(batcher, [overdue, fresh])
    await answers([fresh, overdue])  # far sooner than the fresh one's 5 s

    assert runner.batches == [["overdue", "fresh"]]


# -- order ------------------------------------------------------------------------------------


async def test_priority_then_deadline_order_across_batches(make_batcher: MakeBatcher) -> None:
    runner = FakeRunner(slots=0)
    batcher = make_batcher(runner, model(1, 0))
    items = [
        pending("low-soonest", LOW, timeout_s=5),
        pending("normal-late", NORMAL, timeout_s=30),
        pending("high-late", HIGH, timeout_s=30),
        pending("normal-soon", NORMAL, timeout_s=10),
        pending("high-soon", HIGH, timeout_s=20),
    ]
    submit_all(batcher, items)
    await until(lambda: runner.waiting == 1)

    runner.grant()
    await answers(items)

    assert runner.batches == [
        ["high-soon"],
        ["high-late"],
        ["normal-soon"],
        ["normal-late"],
        ["low-soonest"],
    ]


async def test_late_high_priority_request_overtakes_earlier_arrivals(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner(slots=1, finish=asyncio.Event())
    batcher = make_batcher(runner, model(1, 0))
    running = pending("running")
    batcher.submit(running, retry_after_s=1.0)
    await until(lambda: runner.batches == [["running"]])  # holds the only slot

    waiting = [pending("low", LOW), pending("normal", NORMAL)]
    submit_all(batcher, waiting)
    await asyncio.sleep(0.01)
    urgent = pending("urgent", HIGH)
    batcher.submit(urgent, retry_after_s=1.0)
    assert runner.finish is not None
    runner.finish.set()
    await answers([running, *waiting, urgent])

    assert runner.batches == [["running"], ["urgent"], ["normal"], ["low"]]


async def test_low_request_that_waited_for_aging_goes_before_a_fresh_normal(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner(slots=0)
    batcher = make_batcher(runner, model(1, 0, aging_s=0.5))
    patient = pending("patient-low", LOW, waited_s=1.2)  # more than two aging periods
    fresh = pending("fresh-normal", NORMAL)
    submit_all(batcher, [fresh, patient])
    await until(lambda: runner.waiting == 1)

    runner.grant()
    await answers([fresh, patient])

    assert runner.batches == [["patient-low"], ["fresh-normal"]]


# -- requests that leave before their batch ----------------------------------------------------


async def test_cancelled_request_is_never_passed_to_the_runner(make_batcher: MakeBatcher) -> None:
    runner = FakeRunner()
    batcher = make_batcher(runner, model(3, 50))
    gone, kept = pending("gone"), pending("kept")

    submit_all(batcher, [gone, kept])
    gone.future.cancel()  # the caller hung up while queued
    [answer] = await answers([kept])

    assert answer.text == "answer to kept"
    assert runner.batches == [["kept"]]
    assert gone.future.cancelled()
    assert batcher.queue.counters.cancelled == 1


async def test_request_cancelled_while_the_slot_is_busy_is_skipped(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner(slots=0)
    batcher = make_batcher(runner, model(4, 0))
    items = [pending(f"r{index}") for index in range(3)]
    submit_all(batcher, items)
    await until(lambda: runner.waiting == 1)

    items[1].future.cancel()
    await asyncio.sleep(0)
    runner.grant()
    await answers([items[0], items[2]])

    assert runner.batches == [["r0", "r2"]]


async def test_request_cancelled_just_as_the_slot_frees_is_not_passed_to_the_runner(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner(slots=0)
    batcher = make_batcher(runner, model(4, 0))
    items = [pending(f"r{index}") for index in range(3)]
    submit_all(batcher, items)
    await until(lambda: runner.waiting == 1)

    runner.grant()
    items[1].future.cancel()  # same iteration: the grant's wakeup was scheduled first
    await answers([items[0], items[2]])

    assert runner.batches == [["r0", "r2"]]


async def test_expired_request_is_answered_deadline_exceeded_and_never_run(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner()
    batcher = make_batcher(runner, model(4, 20))
    late, fine = pending("late", timeout_s=-1.0), pending("fine")

    submit_all(batcher, [late, fine])
    [answer] = await answers([fine])

    error = error_of(late)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in error.message
    assert answer.text == "answer to fine"
    assert runner.batches == [["fine"]]


async def test_request_that_expires_waiting_for_a_slot_is_not_run_and_the_slot_returns(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner(slots=0)
    batcher = make_batcher(runner, model(4, 0))
    short = pending("short", timeout_s=0.05)
    batcher.submit(short, retry_after_s=1.0)
    await until(lambda: runner.waiting == 1)

    await asyncio.sleep(0.1)  # past its deadline, still queued
    runner.grant()
    await until(lambda: short.future.done())

    assert error_of(short).code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert batcher.queue.counters.expired == 1
    await until(lambda: runner.waiting == 0 and all(s.released for s in runner.given))
    assert runner.batches == []
    assert [slot.released for slot in runner.given] == [1]  # the unused slot went back


# -- failures and shutdown ------------------------------------------------------------------


async def test_refused_capacity_hands_the_batch_to_the_runner_with_the_error(
    make_batcher: MakeBatcher,
) -> None:
    refusal = ShepherdError(grpc.StatusCode.UNAVAILABLE, "no node of pool p is healthy")
    runner = FakeRunner(refuse=refusal)
    batcher = make_batcher(runner, model(8, 10_000, preferred=(2,)))
    items = [pending(f"r{index}") for index in range(5)]

    submit_all(batcher, items)
    await answers(items)

    # No capacity to wait for: everything queued (up to the max size) goes to the fallback.
    assert runner.batches == [[f"r{index}" for index in range(5)]]
    assert runner.errors == [refusal]


async def test_failing_batch_answers_internal_and_the_batcher_keeps_going(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner(slots=1, explode=1)
    batcher = make_batcher(runner, model(2, 10))
    items = [pending("a"), pending("b")]
    submit_all(batcher, items)
    await until(lambda: all(item.future.done() for item in items))

    for item in items:
        error = error_of(item)
        assert error.code == grpc.StatusCode.INTERNAL
        assert "secret" not in error.message
    assert [slot.released for slot in runner.given] == [1]

    again = pending("again")
    batcher.submit(again, retry_after_s=1.0)
    [answer] = await answers([again])
    assert answer.text == "answer to again"


async def test_close_answers_queued_requests_unavailable(make_batcher: MakeBatcher) -> None:
    runner = FakeRunner(slots=0)
    batcher = make_batcher(runner, model(8, 0))
    items = [pending(f"q{index}", (HIGH, NORMAL, LOW)[index]) for index in range(3)]
    submit_all(batcher, items)
    await until(lambda: runner.waiting == 1)

    await asyncio.wait_for(batcher.close(), PATIENCE_S)

    for item in items:
        error = error_of(item)
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in error.message
    assert runner.batches == []
    assert batcher.queue.depth == 0


async def test_close_lets_running_batches_finish(make_batcher: MakeBatcher) -> None:
    runner = FakeRunner(finish=asyncio.Event())
    batcher = make_batcher(runner, model(1, 0))
    running = pending("running")
    batcher.submit(running, retry_after_s=1.0)
    await until(lambda: runner.batches == [["running"]])

    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0.02)
    assert not closing.done()

    assert runner.finish is not None
    runner.finish.set()
    await asyncio.wait_for(closing, PATIENCE_S)
    assert running.future.result().text == "answer to running"


# -- per-tenant statistics ------------------------------------------------------------------


async def test_stats_count_admitted_completed_and_queue_wait_per_tenant(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner(slots=0, explode=1)
    batcher = make_batcher(runner, model(4, 10_000))
    failing = [pending("a0", tenant="a", waited_s=0.5), pending("b0", tenant="b")]
    failing += [pending("a1", tenant="a"), pending("a2", tenant="a")]
    submit_all(batcher, failing)
    assert {name: t.admitted for name, t in batcher.stats.tenants.items()} == {"a": 3, "b": 1}

    runner.grant()  # the first batch explodes: answered INTERNAL, so nothing is completed
    await until(lambda: all(item.future.done() for item in failing))
    served = [pending(f"b{index}", tenant="b") for index in range(1, 5)]
    submit_all(batcher, served)
    await answers(served)

    a, b = batcher.stats.tenants["a"], batcher.stats.tenants["b"]
    assert (a.admitted, a.completed, len(a.queue_wait_ms)) == (3, 0, 3)
    assert (b.admitted, b.completed, len(b.queue_wait_ms)) == (5, 4, 5)
    assert max(a.queue_wait_ms) >= 500  # a0 had waited half a second before it arrived


async def test_stats_track_a_bounded_number_of_tenants_forgetting_the_stalest() -> None:
    stats = ModelStats("shepherd-tiny")
    stats.tenant_admitted("first")
    for index in range(MAX_TENANTS - 1):
        stats.tenant_admitted(f"t{index}")
    stats.tenant_admitted("first")  # seen again: now the most recent
    stats.tenant_admitted("newcomer")

    assert len(stats.tenants) == MAX_TENANTS
    assert "t0" not in stats.tenants
    assert stats.tenants["first"].admitted == 2 and "newcomer" in stats.tenants


# -- what admission and capacity read --------------------------------------------------------


async def test_estimated_wait_grows_with_the_queue_ahead_and_is_zero_when_cold(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner(lanes=1)
    batcher = make_batcher(runner, model(4, 50), start=False)
    submit_all(batcher, [pending(f"n{index}") for index in range(7)])

    assert batcher.estimated_wait_s(1) == 0.0  # no batch timed yet: admit, do not guess

    batcher.stats.dispatched(0.2, "p/tiny_lm", primary=True)
    normal, high, low = (batcher.estimated_wait_s(rank) for rank in (1, 0, 2))
    assert 0 < high < normal <= low
    assert normal == pytest.approx(2 * 0.2)  # 8 requests: two batches of 4, one lane
    assert high == pytest.approx(0.2)  # alone in its batch, but nothing runs: no max delay

    runner.lanes = 2
    assert batcher.estimated_wait_s(1) == pytest.approx(normal / 2)
    batcher.queue.drain(ShepherdError(grpc.StatusCode.UNAVAILABLE, "done"))


async def test_estimated_wait_counts_the_max_delay_while_a_batch_runs(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner(lanes=1)
    batcher = make_batcher(runner, model(4, 50))
    batcher.stats.dispatched(0.2, "p/tiny_lm", primary=True)
    await keep_busy(batcher, runner)

    # One batch running (half done, on average), then the newcomer's own short batch, which
    # waits the max delay for company.
    assert batcher.estimated_wait_s(1) == pytest.approx(1.5 * 0.2 + 0.05)
    runner.busy_done.set()


async def test_key_puts_the_model_with_the_most_urgent_work_first(
    make_batcher: MakeBatcher,
) -> None:
    runner = FakeRunner()
    cheap = make_batcher(runner, model(8, 50, priority=1), start=False)
    urgent = make_batcher(runner, model(8, 50, priority=5), start=False)

    assert cheap.key() == (float("inf"), 1)  # nothing queued: last in line
    cheap.submit(pending("low", LOW), retry_after_s=1.0)
    urgent.submit(pending("high", HIGH), retry_after_s=1.0)

    # Request class decides before model priority; model priority breaks ties.
    assert urgent.key() < cheap.key()
    cheap.submit(pending("high-too", HIGH), retry_after_s=1.0)
    assert cheap.key() < urgent.key()
    for batcher in (cheap, urgent):
        batcher.queue.drain(ShepherdError(grpc.StatusCode.UNAVAILABLE, "done"))
