"""One model's bounded queue: priority classes, earliest deadline first, aging and shedding.

Why not a FIFO: the seed's promise is that expensive, urgent work runs first. A request's
class is its request priority (HIGH, NORMAL, LOW); within a class the request whose deadline
comes first leaves first, so a short deadline is not served after a long one. A class that has
waited `aging_s` is ranked one class higher for every `aging_s` it waited, so LOW work is
delayed under load but never starved.

Why bounded: a queue that accepts everything turns overload into minutes of latency and then
timeouts. When a model's queue is full, a newcomer displaces the newest request of a lower
class (that one is answered RESOURCE_EXHAUSTED at once, with RetryInfo); when there is no
lower class to shed, the newcomer itself is refused at once.

Requests whose caller cancelled, or whose deadline passed, leave the count immediately (a
callback on their future) and are skipped when a batch is taken, so their place is reused.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from opentelemetry.trace import SpanContext
from shepherd.common.v1 import common_pb2

from libs.catalog import QueuePolicy
from libs.errors import ShepherdError, resource_exhausted

# Rank 0 is served first. UNSPECIFIED is NORMAL, as the proto documents.
RANKS = {
    common_pb2.PRIORITY_HIGH: 0,
    common_pb2.PRIORITY_NORMAL: 1,
    common_pb2.PRIORITY_UNSPECIFIED: 1,
    common_pb2.PRIORITY_LOW: 2,
}
CLASSES = (common_pb2.PRIORITY_HIGH, common_pb2.PRIORITY_NORMAL, common_pb2.PRIORITY_LOW)


def rank_of(priority: int) -> int:
    """The class rank of a request priority; unknown values count as NORMAL."""
    return RANKS.get(priority, 1)


def expired() -> ShepherdError:
    """The answer to a request whose deadline passed before it ran: it never reached a backend."""
    return ShepherdError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "the request's deadline passed before it could be dispatched; it was not run",
    )


@dataclass(eq=False)
class PendingRequest:
    """One admitted request and the future its RPC handler awaits."""

    request_id: str
    tenant: str
    messages: tuple[tuple[str, str], ...]
    params: common_pb2.GenerationParams
    deadline: float
    future: asyncio.Future[common_pb2.Completion]
    span_context: SpanContext
    priority: int = common_pb2.PRIORITY_NORMAL
    # True when the prompt must stay on self-hosted nodes (request or tenant policy).
    self_hosted_only: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)
    queued: bool = False

    @property
    def rank(self) -> int:
        return rank_of(self.priority)

    def settle(self, result: common_pb2.Completion | ShepherdError) -> None:
        """Answer the waiting RPC once; later answers (e.g. after a retry) are ignored."""
        if self.future.done():
            return
        if isinstance(result, ShepherdError):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)


@dataclass
class QueueCounters:
    """What happened to requests in this queue since start-up."""

    admitted: int = 0
    rejected: int = 0
    shed: int = 0
    expired: int = 0
    cancelled: int = 0


@dataclass
class ModelQueue:
    """Per-class EDF heaps with lazy removal of settled requests."""

    model: str
    policy: QueuePolicy
    clock: Callable[[], float] = time.monotonic
    counters: QueueCounters = field(default_factory=QueueCounters)
    # Told every outcome counted here (the scheduler exports them as metrics).
    on_outcome: Callable[[str], None] = lambda _outcome: None

    def count(self, outcome: str) -> None:
        """Count one admitted, rejected, shed, expired or cancelled request."""
        setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)
        self.on_outcome(outcome)

    def __post_init__(self) -> None:
        self._heaps: list[list[tuple[float, int, PendingRequest]]] = [[] for _ in CLASSES]
        self._live = [0 for _ in CLASSES]
        self._arrivals: deque[PendingRequest] = deque()  # FIFO, for the max-delay timer
        self._class_arrivals: list[deque[PendingRequest]] = [deque() for _ in CLASSES]  # aging
        self._seq = itertools.count()

    # -- size -------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests waiting now (cancelled and expired ones are not counted)."""
        return sum(self._live)

    def depth_of(self, rank: int) -> int:
        return self._live[rank]

    def ahead_of(self, rank: int) -> int:
        """Requests that a newcomer of `rank` would wait behind, ignoring aging."""
        return sum(self._live[: rank + 1])

    # -- admission --------------------------------------------------------------------------

    def would_refuse(self, rank: int) -> bool:
        """Whether a newcomer of class `rank` would be refused: full, nothing lower to shed."""
        return self.depth >= self.policy.max_size and not any(self._live[rank + 1 :])

    def admit(self, item: PendingRequest, retry_after_s: float) -> None:
        """Queue a request, shedding a lower class or refusing it when the queue is full."""
        rank = item.rank
        if self.depth >= self.policy.max_size:
            victim = self._newest_of_lowest_class_below(rank)
            if victim is None:
                self.count("rejected")
                raise resource_exhausted(
                    f"the queue of model {self.model} is full ({self.policy.max_size} requests "
                    "waiting); retry later or raise the request's priority",
                    retry_after_s,
                )
            self.count("shed")
            self._left(victim)
            victim.settle(
                resource_exhausted(
                    f"model {self.model} is overloaded and this request was shed to make room "
                    "for higher-priority work; retry later",
                    retry_after_s,
                )
            )
        item.queued = True
        heapq.heappush(self._heaps[rank], (item.deadline, next(self._seq), item))
        self._arrivals.append(item)
        self._class_arrivals[rank].append(item)
        self._live[rank] += 1
        self.count("admitted")
        item.future.add_done_callback(lambda _f, item=item: self._left(item))

    def _left(self, item: PendingRequest) -> None:
        """A queued request was answered, cancelled or timed out: it no longer counts."""
        if not item.queued:
            return
        item.queued = False
        self._live[item.rank] -= 1
        future = item.future
        if future.cancelled():
            if self.clock() >= item.deadline - 0.001:
                self.count("expired")
            else:
                self.count("cancelled")
        if self._tombstones() > 64 + self.depth:
            self._compact()

    def _tombstones(self) -> int:
        return sum(len(h) for h in self._heaps) - self.depth

    def _compact(self) -> None:
        for index, heap in enumerate(self._heaps):
            self._heaps[index] = [entry for entry in heap if entry[2].queued]
            heapq.heapify(self._heaps[index])
        self._arrivals = deque(item for item in self._arrivals if item.queued)
        self._class_arrivals = [
            deque(item for item in arrivals if item.queued) for arrivals in self._class_arrivals
        ]

    def _newest_of_lowest_class_below(self, rank: int) -> PendingRequest | None:
        for victim_rank in range(len(CLASSES) - 1, rank, -1):
            if self._live[victim_rank]:
                live = [entry[2] for entry in self._heaps[victim_rank] if self._waiting(entry[2])]
                if live:
                    return max(live, key=lambda item: item.enqueued_at)
        return None

    # -- ordering ---------------------------------------------------------------------------

    def _waiting(self, item: PendingRequest) -> bool:
        """Still queued, counting a cancel whose done-callback has not run yet as gone."""
        if item.queued and item.future.done():
            self._left(item)
        return item.queued

    def _head(self, rank: int) -> PendingRequest | None:
        """The class's earliest-deadline live request."""
        heap = self._heaps[rank]
        while heap and not self._waiting(heap[0][2]):
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def _oldest(self, arrivals: deque[PendingRequest]) -> PendingRequest | None:
        while arrivals and not self._waiting(arrivals[0]):
            arrivals.popleft()
        return arrivals[0] if arrivals else None

    def _aged(self, rank: int, now: float) -> int:
        """A class is promoted by how long its longest-waiting request has waited.

        The longest-waiting one, not the earliest deadline, so an old request is not starved
        behind fresher ones of its class with shorter deadlines: its class stays promoted
        until it is served. Whole classes only: between steps, the model's catalog priority
        still decides.
        """
        oldest = self._oldest(self._class_arrivals[rank])
        waited = 0.0 if oldest is None else now - oldest.enqueued_at
        return rank - math.floor(waited / self.policy.aging_s)

    def effective_rank(self, now: float | None = None) -> float | None:
        """The rank of the request that would leave next, after aging; None when empty."""
        now = self.clock() if now is None else now
        best: float | None = None
        for rank in range(len(CLASSES)):
            head = self._head(rank)
            if head is None:
                continue
            aged = self._aged(rank, now)
            if best is None or aged < best:
                best = aged
        return best

    def oldest_enqueued_at(self) -> float | None:
        """When the longest-waiting live request arrived, for the max-delay timer."""
        oldest = self._oldest(self._arrivals)
        return None if oldest is None else oldest.enqueued_at

    def take(self, count: int) -> list[PendingRequest]:
        """Remove up to `count` live requests in service order; expired ones are answered.

        A request whose deadline has passed is never returned, so it never reaches a backend.
        """
        now = self.clock()
        batch: list[PendingRequest] = []
        while len(batch) < count:
            best_rank, best_key = -1, math.inf
            for rank in range(len(CLASSES)):
                head = self._head(rank)
                if head is None:
                    continue
                aged = self._aged(rank, now)
                if aged < best_key:
                    best_rank, best_key = rank, aged
            if best_rank < 0:
                break
            _, _, item = heapq.heappop(self._heaps[best_rank])
            self._left(item)
            if item.deadline <= now:
                self.count("expired")
                item.settle(expired())
                continue
            batch.append(item)
        return batch

    def drain(self, error: ShepherdError) -> None:
        """Answer every queued request with `error` (at shutdown)."""
        for heap in self._heaps:
            for _, _, item in heap:
                if item.queued:
                    self._left(item)
                    item.settle(error)
