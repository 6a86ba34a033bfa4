"""One model's queue: class order, earliest deadline first, aging, the bound and its answers.

The queue runs on a fake clock, so waiting (aging, deadlines) is a number set by the test, not
a sleep. A request's future is what its RPC handler awaits: its result or exception is what
the caller sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.trace import INVALID_SPAN_CONTEXT
from shepherd.common.v1 import common_pb2

from libs.catalog import QueuePolicy
from libs.errors import STATUS_DETAILS_KEY, ShepherdError
from services.scheduler.queue import ModelQueue, PendingRequest

HIGH = common_pb2.PRIORITY_HIGH
NORMAL = common_pb2.PRIORITY_NORMAL
LOW = common_pb2.PRIORITY_LOW


@dataclass
class FakeClock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_queue(clock: FakeClock) -> Callable[..., ModelQueue]:
    def make(max_size: int = 100, aging_s: float = 10.0, **kwargs: object) -> ModelQueue:
        return ModelQueue(
            "tiny", QueuePolicy(max_size=max_size, aging_s=aging_s), clock=clock, **kwargs
        )

    return make


def request(
    clock: FakeClock,
    request_id: str,
    priority: int = NORMAL,
    *,
    timeout_s: float = 60.0,
    waited_s: float = 0.0,
) -> PendingRequest:
    """A request that arrived `waited_s` ago and must be answered `timeout_s` after arrival."""
    return PendingRequest(
        request_id=request_id,
        tenant="acme",
        messages=(("user", f"hello from {request_id}"),),
        params=common_pb2.GenerationParams(max_tokens=4),
        deadline=clock.now - waited_s + timeout_s,
        future=asyncio.get_running_loop().create_future(),
        span_context=INVALID_SPAN_CONTEXT,
        priority=priority,
        enqueued_at=clock.now - waited_s,
    )


def ids(batch: list[PendingRequest]) -> list[str]:
    return [item.request_id for item in batch]


def error_of(item: PendingRequest) -> ShepherdError:
    assert item.future.done() and not item.future.cancelled(), item.request_id
    error = item.future.exception()
    assert isinstance(error, ShepherdError), error
    return error


def retry_delay_s(error: ShepherdError) -> float:
    """The google.rpc.RetryInfo delay a gRPC client would decode from the error's trailers."""
    trailers = dict(error.trailing_metadata())
    status = status_pb2.Status.FromString(trailers[STATUS_DETAILS_KEY])
    assert status.code == error.code.value[0]
    delays = []
    for packed in status.details:
        if packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            packed.Unpack(info)
            delays.append(info.retry_delay.ToNanoseconds() / 1e9)
    assert len(delays) == 1, status
    return delays[0]


# -- order --------------------------------------------------------------------------------


async def test_higher_class_leaves_first_and_earliest_deadline_first_within_a_class(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue()
    arrivals = [
        request(clock, "low", LOW, timeout_s=1),
        request(clock, "normal-late", NORMAL, timeout_s=50),
        request(clock, "normal-soon", NORMAL, timeout_s=5),
        request(clock, "high-late", HIGH, timeout_s=40),
        request(clock, "unspecified-mid", common_pb2.PRIORITY_UNSPECIFIED, timeout_s=20),
        request(clock, "high-soon", HIGH, timeout_s=30),
    ]
    for item in arrivals:
        queue.admit(item, retry_after_s=1.0)

    assert queue.depth == 6
    assert [queue.depth_of(rank) for rank in (0, 1, 2)] == [2, 3, 1]
    assert ids(queue.take(10)) == [
        "high-soon",
        "high-late",
        "normal-soon",
        "unspecified-mid",
        "normal-late",
        "low",
    ]
    assert queue.depth == 0
    assert queue.counters.admitted == 6


async def test_take_returns_at_most_n_and_keeps_the_rest_in_order(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue()
    for index in range(5):
        queue.admit(request(clock, f"r{index}", timeout_s=10 + index), 1.0)

    assert ids(queue.take(2)) == ["r0", "r1"]
    assert queue.depth == 3
    queue.admit(request(clock, "urgent", HIGH), 1.0)
    assert ids(queue.take(2)) == ["urgent", "r2"]
    assert ids(queue.take(5)) == ["r3", "r4"]
    assert queue.take(5) == []
    assert queue.effective_rank() is None
    assert queue.oldest_enqueued_at() is None


async def test_unknown_priority_value_is_served_as_normal(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue()
    queue.admit(request(clock, "low", LOW, timeout_s=1), 1.0)
    queue.admit(request(clock, "odd", 99, timeout_s=9), 1.0)
    queue.admit(request(clock, "high", HIGH, timeout_s=9), 1.0)

    assert queue.depth_of(1) == 1
    assert ids(queue.take(3)) == ["high", "odd", "low"]


# -- aging --------------------------------------------------------------------------------


async def test_low_request_that_waited_two_aging_periods_goes_before_a_fresh_normal(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    # Aging moves whole classes: two periods lift LOW above NORMAL; between steps the
    # request's own class (and, across models, the catalog priority) still decides.
    queue = make_queue(aging_s=2.0)
    queue.admit(request(clock, "patient-low", LOW, waited_s=4.5), 1.0)
    queue.admit(request(clock, "fresh-normal", NORMAL), 1.0)

    assert ids(queue.take(2)) == ["patient-low", "fresh-normal"]


async def test_low_request_that_waited_less_than_aging_stays_behind_normal(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue(aging_s=2.0)
    queue.admit(request(clock, "low", LOW, waited_s=1.5), 1.0)
    queue.admit(request(clock, "normal", NORMAL), 1.0)

    assert ids(queue.take(2)) == ["normal", "low"]


async def test_aging_is_measured_when_the_batch_is_taken(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue(aging_s=2.0)
    queue.admit(request(clock, "low", LOW, timeout_s=600), 1.0)
    queue.admit(request(clock, "normal", NORMAL, timeout_s=600), 1.0)
    queue.admit(request(clock, "high", HIGH, timeout_s=600), 1.0)

    clock.now += 6.5  # three aging periods and a bit, for all three
    queue.admit(request(clock, "fresh-high", HIGH, timeout_s=600), 1.0)

    # Equal waits keep the original class order; 6.5 s of waiting beats a fresh HIGH.
    assert ids(queue.take(4)) == ["high", "normal", "low", "fresh-high"]


async def test_effective_rank_is_the_best_aged_class_waiting(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue(aging_s=2.0)
    assert queue.effective_rank() is None
    queue.admit(request(clock, "low", LOW), 1.0)
    assert queue.effective_rank() == 2

    clock.now += 4.0  # two aging periods
    assert queue.effective_rank() == 0
    queue.admit(request(clock, "normal", NORMAL), 1.0)
    assert queue.effective_rank() == 0

    assert ids(queue.take(1)) == ["low"]
    assert queue.effective_rank() == 1


async def test_each_aging_period_lifts_one_class_so_low_never_starves(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue(aging_s=1.0)
    queue.admit(request(clock, "low", LOW, timeout_s=600), 1.0)
    served = []
    # A steady stream of fresh HIGH work, one taken per second.
    for second in range(5):
        queue.admit(request(clock, f"high{second}", HIGH, timeout_s=600), 1.0)
        served += ids(queue.take(1))
        clock.now += 1.0

    # After 2 s LOW ties a fresh HIGH (HIGH wins ties); after 3 s it goes first.
    assert served == ["high0", "high1", "high2", "low", "high3"]


async def test_long_waiting_low_is_aged_even_behind_a_fresher_low_with_an_earlier_deadline(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue(aging_s=1.0)
    queue.admit(request(clock, "old-low", LOW, timeout_s=100), 1.0)
    clock.now += 3.0  # old-low has waited three aging periods
    queue.admit(request(clock, "fresh-low", LOW, timeout_s=10), 1.0)
    queue.admit(request(clock, "fresh-normal", NORMAL, timeout_s=50), 1.0)

    # The LOW class stays promoted until its longest-waiting request is served (EDF within
    # the class), so neither LOW request is starved by the fresh NORMAL one.
    assert ids(queue.take(3)) == ["fresh-low", "old-low", "fresh-normal"]


# -- the bound: shedding and refusing -------------------------------------------------------


async def test_full_queue_sheds_the_newest_request_of_the_lowest_class(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue(max_size=4)
    older_low = request(clock, "older-low", LOW, waited_s=3)
    newer_low = request(clock, "newer-low", LOW, waited_s=1)
    normal = request(clock, "normal", NORMAL, waited_s=0)
    high = request(clock, "high", HIGH, waited_s=2)
    for item in (older_low, newer_low, normal, high):
        queue.admit(item, 1.0)
    assert queue.would_refuse(0) is False

    newcomer = request(clock, "newcomer", HIGH)
    queue.admit(newcomer, retry_after_s=0.75)

    shed = error_of(newer_low)
    assert shed.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "shed" in shed.message and "tiny" in shed.message
    assert retry_delay_s(shed) == pytest.approx(0.75)
    assert not older_low.future.done() and not normal.future.done()
    assert queue.depth == 4
    assert queue.counters.shed == 1
    assert ids(queue.take(10)) == ["high", "newcomer", "normal", "older-low"]


async def test_shedding_prefers_the_lowest_class_even_when_a_middle_class_is_newer(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue(max_size=2)
    low = request(clock, "low", LOW, waited_s=5)
    normal = request(clock, "normal", NORMAL, waited_s=0)
    queue.admit(low, 1.0)
    queue.admit(normal, 1.0)

    queue.admit(request(clock, "high", HIGH), 1.0)

    assert error_of(low).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not normal.future.done()
    assert ids(queue.take(2)) == ["high", "normal"]


async def test_normal_newcomer_sheds_low_but_never_an_equal_class(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue(max_size=2)
    low, normal = request(clock, "low", LOW), request(clock, "normal", NORMAL)
    queue.admit(low, 1.0)
    queue.admit(normal, 1.0)

    queue.admit(request(clock, "second-normal", NORMAL), 1.0)
    assert error_of(low).code == grpc.StatusCode.RESOURCE_EXHAUSTED

    assert queue.would_refuse(1) is True
    refused = request(clock, "third-normal", NORMAL)
    with pytest.raises(ShepherdError) as caught:
        queue.admit(refused, retry_after_s=2.5)

    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "full" in caught.value.message and "tiny" in caught.value.message
    assert retry_delay_s(caught.value) == pytest.approx(2.5)
    assert not refused.future.done()  # refused to the caller directly, never queued
    assert not normal.future.done()
    assert queue.depth == 2
    assert ids(queue.take(3)) == ["normal", "second-normal"]


async def test_full_queue_refuses_low_newcomer_and_keeps_everyone_queued(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue(max_size=2)
    waiting = [request(clock, "normal", NORMAL), request(clock, "high", HIGH)]
    for item in waiting:
        queue.admit(item, 1.0)

    assert queue.would_refuse(2) is True
    assert queue.would_refuse(1) is True
    assert queue.would_refuse(0) is False  # HIGH could shed the NORMAL one
    with pytest.raises(ShepherdError) as caught:
        queue.admit(request(clock, "low", LOW), retry_after_s=0.2)

    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay_s(caught.value) > 0
    assert not any(item.future.done() for item in waiting)
    assert queue.counters.rejected == 1
    assert queue.counters.admitted == 2
    assert ids(queue.take(3)) == ["high", "normal"]


async def test_outcomes_are_counted_and_reported(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    seen: list[str] = []
    queue = make_queue(max_size=1, on_outcome=seen.append)
    queue.admit(request(clock, "low", LOW), 1.0)
    queue.admit(request(clock, "high", HIGH), 1.0)
    with pytest.raises(ShepherdError):
        queue.admit(request(clock, "high2", HIGH), 1.0)

    assert seen == ["admitted", "shed", "admitted", "rejected"]
    assert (queue.counters.admitted, queue.counters.shed, queue.counters.rejected) == (2, 1, 1)


# -- requests that leave: cancelled and expired --------------------------------------------


async def test_cancelled_request_leaves_the_count_and_its_place_is_reused(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue(max_size=2)
    gone, kept = request(clock, "gone", NORMAL), request(clock, "kept", LOW)
    queue.admit(gone, 1.0)
    queue.admit(kept, 1.0)

    gone.future.cancel()  # the caller hung up
    await asyncio.sleep(0)  # the done-callback runs on the next loop iteration

    assert queue.depth == 1
    assert queue.counters.cancelled == 1
    assert queue.counters.expired == 0
    assert queue.would_refuse(2) is False
    newcomer = request(clock, "newcomer", LOW)
    queue.admit(newcomer, 1.0)  # the freed place is reused: nobody is shed
    assert not kept.future.done()
    assert queue.counters.shed == 0
    assert ids(queue.take(5)) == ["kept", "newcomer"]


async def test_request_cancelled_at_its_deadline_counts_as_expired(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue()
    item = request(clock, "timed-out", timeout_s=1.0)
    queue.admit(item, 1.0)

    clock.now += 1.0  # the RPC handler's wait_for gives up and cancels the future
    item.future.cancel()
    await asyncio.sleep(0)

    assert queue.depth == 0
    assert (queue.counters.expired, queue.counters.cancelled) == (1, 0)
    assert queue.take(1) == []


async def test_expired_request_is_answered_deadline_exceeded_and_not_returned(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue()
    late = request(clock, "late", HIGH, timeout_s=1.0)
    fine = request(clock, "fine", LOW, timeout_s=60.0)
    queue.admit(late, 1.0)
    queue.admit(fine, 1.0)

    clock.now += 1.0
    assert ids(queue.take(1)) == ["fine"]  # the expired one does not use up the batch

    error = error_of(late)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in error.message and "not run" in error.message
    assert queue.counters.expired == 1
    assert queue.depth == 0


async def test_oldest_enqueued_skips_requests_that_left(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue()
    first = request(clock, "first", HIGH, waited_s=3)
    second = request(clock, "second", LOW, waited_s=2)
    third = request(clock, "third", NORMAL, waited_s=1)
    for item in (first, second, third):
        queue.admit(item, 1.0)
    assert queue.oldest_enqueued_at() == first.enqueued_at

    assert ids(queue.take(1)) == ["first"]
    assert queue.oldest_enqueued_at() == second.enqueued_at

    second.future.cancel()
    await asyncio.sleep(0)
    assert queue.oldest_enqueued_at() == third.enqueued_at


async def test_many_cancellations_keep_depth_and_order_right(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue(max_size=1_000)
    items = [
        request(clock, f"r{index:03}", (HIGH, NORMAL, LOW)[index % 3], timeout_s=500 - index)
        for index in range(300)
    ]
    for item in items:
        queue.admit(item, 1.0)
    for item in items[::2]:
        item.future.cancel()
    await asyncio.sleep(0)

    kept = items[1::2]
    assert queue.depth == len(kept)
    assert queue.counters.cancelled == 150
    expected = sorted(kept, key=lambda item: (item.rank, item.deadline))
    assert ids(queue.take(1_000)) == ids(expected)


async def test_drain_answers_every_queued_request(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue()
    items = [request(clock, f"r{index}", (HIGH, NORMAL, LOW)[index % 3]) for index in range(5)]
    for item in items:
        queue.admit(item, 1.0)
    taken = queue.take(1)

    queue.drain(ShepherdError(grpc.StatusCode.UNAVAILABLE, "shutting down"))

    assert queue.depth == 0
    assert not taken[0].future.done()  # already on its way to a backend: not the queue's
    for item in items:
        if item is not taken[0]:
            assert error_of(item).code == grpc.StatusCode.UNAVAILABLE
