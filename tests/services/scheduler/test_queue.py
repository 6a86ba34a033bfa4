"""One model's queue: class order, earliest deadline first, aging, the bound and its answers,
and weighted fair share between tenants within a class.

The queue runs on a fake clock, so waiting (aging, deadlines) is a number set by the test, not
a sleep. A request's future is what its RPC handler awaits: its result or exception is what
the caller sees.
"""

from __future__ import annotations

import asyncio
import gc
import random
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.trace import INVALID_SPAN_CONTEXT
from shepherd.common.v1 import common_pb2

from libs.catalog import QueuePolicy
from libs.errors import STATUS_DETAILS_KEY, ShepherdError
from services.scheduler.queue import MAX_IDLE_TENANTS, ModelQueue, PendingRequest

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
    tenant: str = "acme",
    weight: float = 1.0,
    max_tokens: int = 4,
) -> PendingRequest:
    """A request that arrived `waited_s` ago and must be answered `timeout_s` after arrival."""
    return PendingRequest(
        request_id=request_id,
        tenant=tenant,
        weight=weight,
        messages=(("user", f"hello from {request_id}"),),
        params=common_pb2.GenerationParams(max_tokens=max_tokens),
        deadline=clock.now - waited_s + timeout_s,
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


# -- fair share between tenants -----------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> common_pb2.Completion:
    """A backend's answer that used this many tokens."""
    return common_pb2.Completion(
        text="ok",
        usage=common_pb2.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


def tenants_of(batch: list[PendingRequest]) -> list[str]:
    return [item.tenant for item in batch]


async def test_a_quiet_tenant_is_served_among_the_first_despite_a_flood_ahead_of_it(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    # The flood arrived first and has the earlier deadlines: by EDF alone, b would wait
    # behind all 40 of a's requests.
    queue = make_queue()
    for index in range(40):
        queue.admit(request(clock, f"a-{index:02}", tenant="a", timeout_s=10 + index), 1.0)
    for index in range(4):
        queue.admit(request(clock, f"b-{index:02}", tenant="b", timeout_s=60), 1.0)
    assert queue.tenant_depths() == {"a": 40, "b": 4}

    first, second = queue.take(4), queue.take(4)

    # Equal counters tie; the tie goes to the earlier deadline, then the tenants alternate.
    assert tenants_of(first) == ["a", "b", "a", "b"]
    assert tenants_of(second) == ["a", "b", "a", "b"]
    assert ids(first + second)[::2] == ["a-00", "a-01", "a-02", "a-03"], "EDF within a tenant"
    assert queue.tenant_depths() == {"a": 36}
    assert tenants_of(queue.take(100)) == ["a"] * 36


async def test_weights_two_to_one_share_tokens_two_to_one_over_a_long_run(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    # Both tenants always have work queued; sizes vary and real usage differs from the
    # estimate charged at take, and is corrected when each answer arrives.
    rng = random.Random(7)
    queue = make_queue(max_size=1_000)
    weights = {"heavy": 2.0, "light": 1.0}
    served: Counter[str] = Counter()
    queued: Counter[str] = Counter()
    serial = 0
    for _ in range(600):
        for tenant, weight in weights.items():
            while queued[tenant] < 8:
                serial += 1
                queue.admit(
                    request(
                        clock,
                        f"{tenant}-{serial}",
                        tenant=tenant,
                        weight=weight,
                        max_tokens=rng.randint(1, 64),
                        timeout_s=600,
                    ),
                    1.0,
                )
                queued[tenant] += 1
        for item in queue.take(4):
            queued[item.tenant] -= 1
            real = usage(rng.randint(3, 12), rng.randint(1, item.params.max_tokens))
            served[item.tenant] += real.usage.total_tokens
            item.settle(real)
        await asyncio.sleep(0)  # the futures' done-callbacks correct the charges

    assert served["heavy"] / served["light"] == pytest.approx(2.0, rel=0.05)
    # Each counter is the tenant's real tokens over its weight; they stay level.
    heavy, light = queue.virtual_counter("heavy"), queue.virtual_counter("light")
    assert heavy is not None and light is not None
    assert abs(heavy - light) < 100


async def test_an_idle_tenant_does_not_bank_credit(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue(max_size=1_000)
    queue.admit(request(clock, "b-early", tenant="b"), 1.0)
    assert tenants_of(queue.take(1)) == ["b"]
    # While b is away, a alone is served a lot.
    for index in range(50):
        queue.admit(request(clock, f"a-{index:02}", tenant="a"), 1.0)
    assert len(queue.take(30)) == 30
    a_counter = queue.virtual_counter("a")
    assert a_counter is not None and a_counter > 20 * (queue.virtual_counter("b") or 0)

    # b comes back: it is lifted to a's counter instead of owning the model until it catches
    # up, so the two now alternate.
    for index in range(20):
        queue.admit(request(clock, f"b-{index:02}", tenant="b"), 1.0)
    assert queue.virtual_counter("b") == pytest.approx(a_counter)
    assert Counter(tenants_of(queue.take(10))) == {"a": 5, "b": 5}


async def test_a_new_tenant_starts_at_the_lowest_counter_even_after_the_queue_emptied(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue()
    for index in range(10):
        queue.admit(request(clock, f"a-{index}", tenant="a"), 1.0)
    assert len(queue.take(10)) == 10
    assert queue.depth == 0 and queue.tenant_depths() == {}

    queue.admit(request(clock, "c-0", tenant="c"), 1.0)
    assert queue.virtual_counter("c") == queue.virtual_counter("a")


async def test_a_tenant_keeps_its_debt_across_a_short_idle_spell(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    # The lift only ever raises a counter: a tenant that was just served a big request and
    # whose queue ran dry does not come back level with the others.
    queue = make_queue(max_size=1_000)
    queue.admit(request(clock, "a-big", tenant="a", max_tokens=1_000, timeout_s=30), 1.0)
    queue.admit(request(clock, "b-00", tenant="b", max_tokens=10, timeout_s=60), 1.0)
    assert ids(queue.take(1)) == ["a-big"]  # tie at zero, earlier deadline
    for index in range(1, 31):
        queue.admit(request(clock, f"b-{index:02}", tenant="b", max_tokens=10), 1.0)
    for index in range(10):
        queue.admit(request(clock, f"a-{index:02}", tenant="a", max_tokens=10), 1.0)

    assert tenants_of(queue.take(20)) == ["b"] * 20


async def test_the_charge_is_corrected_to_real_usage_when_the_answer_arrives(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue()
    cheap = request(clock, "cheap", tenant="a", weight=2.0, max_tokens=300)
    failed = request(clock, "failed", tenant="b", max_tokens=100)
    silent = request(clock, "silent", tenant="c", max_tokens=100)
    for item in (cheap, failed, silent):
        queue.admit(item, 1.0)
    # Each tenant has more work queued, so it stays active and keeps its counter.
    for tenant in ("c", "b", "a"):
        queue.admit(request(clock, f"{tenant}-next", tenant=tenant), 1.0)
    assert ids(queue.take(3)) == ["cheap", "failed", "silent"]
    estimate = cheap.estimated_tokens
    assert estimate > 300
    assert queue.virtual_counter("a") == pytest.approx(estimate / 2)  # over its weight
    assert queue.virtual_counter("a") > (queue.virtual_counter("b") or 0)

    cheap.settle(usage(6, 4))  # stopped early: 10 tokens, not the estimate
    failed.settle(ShepherdError(grpc.StatusCode.INTERNAL, "boom"))  # keeps the estimate
    silent.settle(usage(0, 0))  # a backend that reports no usage cannot make work free
    await asyncio.sleep(0)

    assert queue.virtual_counter("a") == pytest.approx(10 / 2)
    assert queue.virtual_counter("b") == pytest.approx(failed.estimated_tokens)
    assert queue.virtual_counter("c") == pytest.approx(silent.estimated_tokens)
    queue.settle_usage(cheap, usage(6, 4))  # idempotent
    assert queue.virtual_counter("a") == pytest.approx(10 / 2)

    # Corrected, a is behind the others, so its next request leaves first.
    assert ids(queue.take(3)) == ["a-next", "c-next", "b-next"]


async def test_an_expired_request_costs_its_tenant_nothing_and_the_place_goes_on(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue()
    late = request(clock, "b-late", tenant="b", timeout_s=1.0)
    queue.admit(request(clock, "a-0", tenant="a", timeout_s=60), 1.0)
    queue.admit(request(clock, "a-1", tenant="a", timeout_s=60), 1.0)
    fine = request(clock, "b-fine", tenant="b", timeout_s=60)
    queue.admit(late, 1.0)
    queue.admit(fine, 1.0)

    clock.now += 1.0
    # b's expired head is chosen first (tie at zero, earliest deadline) but is not run nor
    # charged, so b is still level with a, and the batch is still filled.
    assert ids(queue.take(3)) == ["a-0", "b-fine", "a-1"]

    assert error_of(late).code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert queue.counters.expired == 1
    assert queue.virtual_counter("b") == fine.estimated_tokens  # only the request that ran


async def test_cancelled_requests_leave_their_tenants_count_and_the_rest_share_fairly(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue()
    a_items = [request(clock, f"a-{index}", tenant="a") for index in range(6)]
    b_items = [request(clock, f"b-{index}", tenant="b") for index in range(3)]
    for item in a_items + b_items:
        queue.admit(item, 1.0)
    for item in b_items[:2] + a_items[:3]:
        item.future.cancel()
    await asyncio.sleep(0)

    assert queue.tenant_depths() == {"a": 3, "b": 1}
    assert queue.counters.cancelled == 5
    assert ids(queue.take(10)) == ["a-3", "b-2", "a-4", "a-5"]
    assert queue.tenant_depths() == {}


async def test_a_cancel_not_yet_seen_by_its_callback_is_skipped_when_its_tenant_is_chosen(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue()
    gone = request(clock, "b-gone", tenant="b", timeout_s=10)
    for item in (request(clock, "a-0", tenant="a", timeout_s=5), gone):
        queue.admit(item, 1.0)
    queue.admit(request(clock, "b-kept", tenant="b", timeout_s=20), 1.0)
    assert ids(queue.take(1)) == ["a-0"]  # b now has the lower counter

    gone.future.cancel()  # no sleep: the queue has not been told yet
    assert ids(queue.take(5)) == ["b-kept"]
    await asyncio.sleep(0)
    assert queue.counters.cancelled == 1 and queue.depth == 0


async def test_shedding_takes_the_newest_lower_class_request_whatever_its_tenant(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue(max_size=4)
    older_low = request(clock, "a-low", LOW, tenant="a", waited_s=3)
    newer_low = request(clock, "b-low", LOW, tenant="b", waited_s=1)
    for item in (
        older_low,
        newer_low,
        request(clock, "a-normal", NORMAL, tenant="a"),
        request(clock, "b-normal", NORMAL, tenant="b"),
    ):
        queue.admit(item, 1.0)

    queue.admit(request(clock, "c-high", HIGH, tenant="c"), retry_after_s=0.5)

    assert error_of(newer_low).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not older_low.future.done()
    assert queue.tenant_depths() == {"a": 2, "b": 1, "c": 1}
    assert queue.counters.shed == 1
    assert ids(queue.take(10)) == ["c-high", "a-normal", "b-normal", "a-low"]


async def test_drain_answers_every_tenants_requests(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue()
    items = [request(clock, f"r{index}", tenant=f"t{index % 3}") for index in range(7)]
    for item in items:
        queue.admit(item, 1.0)

    queue.drain(ShepherdError(grpc.StatusCode.UNAVAILABLE, "shutting down"))

    assert queue.depth == 0 and queue.tenant_depths() == {}
    assert all(error_of(item).code == grpc.StatusCode.UNAVAILABLE for item in items)


async def test_idle_tenants_remembered_are_bounded(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    queue = make_queue()
    tenants = [f"t{index}" for index in range(MAX_IDLE_TENANTS + 10)]
    for tenant in tenants:
        queue.admit(request(clock, tenant, tenant=tenant), 1.0)
        assert len(queue.take(1)) == 1

    assert queue.virtual_counter(tenants[0]) is None  # forgotten, longest idle
    assert queue.virtual_counter(tenants[-1]) is not None
    remembered = sum(queue.virtual_counter(tenant) is not None for tenant in tenants)
    assert remembered == MAX_IDLE_TENANTS


async def test_answered_requests_are_not_kept_when_every_batch_leaves_at_once(
    clock: FakeClock, make_queue: Callable[..., ModelQueue]
) -> None:
    # A hosted model's batcher takes each request as it arrives and never asks for the oldest
    # arrival (nothing waits for company). The soak (bench/soak.py) found every such request
    # kept for good, with its answer: the scheduler grew by 1.7 MiB per 1,000 requests.
    queue = make_queue()
    alive: list[weakref.ref[PendingRequest]] = []
    for index in range(1_000):
        item = request(clock, f"r{index}")
        queue.admit(item, 1.0)
        (taken,) = queue.take(1)
        taken.settle(common_pb2.Completion(text="done"))
        alive.append(weakref.ref(taken))
        del item, taken
        await asyncio.sleep(0)  # the done-callbacks run
    gc.collect()

    kept = sum(1 for ref in alive if ref() is not None)
    assert kept <= 100, f"{kept} of 1000 answered requests are still held"
    assert queue.depth == 0
