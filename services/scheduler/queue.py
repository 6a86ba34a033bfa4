"""One model's bounded queue: priority classes, weighted fair share between tenants, aging and
shedding.

Why not a FIFO: the seed's promise is that expensive, urgent work runs first. A request's
class is its request priority (HIGH, NORMAL, LOW). A class that has waited `aging_s` is ranked
one class higher for every `aging_s` it waited, so LOW work is delayed under load but never
starved.

Why fair share within a class: earliest deadline first across all requests serves whoever
sends the most. One tenant flooding a model fills the queue with requests whose deadlines come
before a quiet tenant's next one, and the quiet tenant waits behind the whole flood. So within
a class, tenants are served by weighted fair share with a Virtual Token Counter (VTC, from
"Fairness in Serving Large Language Models", Sheng et al., OSDI 2024). Each tenant has a
counter of the tokens it has been served, divided by its catalog weight. Each place in a batch
goes to the tenant in the class with the lowest counter, and that tenant's earliest-deadline
request fills it. The real token count is known only after the batch runs, so the counter is
charged the request's estimate (prompt estimate + max_tokens) when it is taken, and the charge
is corrected to the real usage when its completion arrives (`settle_usage`). A tenant of weight
2 is therefore served twice the tokens of a tenant of weight 1 while both have work queued. A
tenant with one request waiting is served within about one batch, however much others send.

An idle tenant must not bank credit: a tenant away for an hour would otherwise come back with
a counter far below everyone else's and monopolise the model until it caught up. So when a
tenant with nothing queued sends again, its counter is lifted to at least the lowest counter
among tenants with queued work (or, when none has any, to where the last one left off). A
tenant keeps its own higher counter, so going briefly idle does not erase its debt either.
Counters of idle tenants are kept for the most recently idle `MAX_IDLE_TENANTS`; a forgotten
one simply starts again at the lowest counter. Choosing a tenant scans the tenants queued in
the class, so taking a request costs O(active tenants).

Why bounded: a queue that accepts everything turns overload into minutes of latency and then
timeouts. When a model's queue is full, a newcomer displaces the newest request of a lower
class (that one is answered RESOURCE_EXHAUSTED at once, with RetryInfo); when there is no
lower class to shed, the newcomer itself is refused at once.

Requests whose caller cancelled, or whose deadline passed, leave the count immediately (a
callback on their future) and are skipped when a batch is taken, so their place is reused.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from opentelemetry.trace import SpanContext
from shepherd.common.v1 import common_pb2

from libs.catalog import QueuePolicy
from libs.errors import ShepherdError, resource_exhausted
from services.scheduler.events import EventChannel, Final

# Rank 0 is served first. UNSPECIFIED is NORMAL, as the proto documents.
RANKS = {
    common_pb2.PRIORITY_HIGH: 0,
    common_pb2.PRIORITY_NORMAL: 1,
    common_pb2.PRIORITY_UNSPECIFIED: 1,
    common_pb2.PRIORITY_LOW: 2,
}
CLASSES = (common_pb2.PRIORITY_HIGH, common_pb2.PRIORITY_NORMAL, common_pb2.PRIORITY_LOW)

# Idle tenants whose fair-share counter is remembered; older ones start again at the lowest.
MAX_IDLE_TENANTS = 1024
# A prompt's size before a backend has tokenised it: about four characters per token, the
# usual rule of thumb for BPE vocabularies. The charge is corrected once the real count is
# known, so the estimate only has to be right on average.
CHARS_PER_TOKEN = 4


def rank_of(priority: int) -> int:
    """The class rank of a request priority; unknown values count as NORMAL."""
    return RANKS.get(priority, 1)


def expired() -> ShepherdError:
    """The answer to a request whose deadline passed before it ran: it never reached a backend."""
    return ShepherdError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "the request's deadline passed before it could be dispatched; it was not run",
    )


def estimated_prompt_tokens(messages: Sequence[tuple[str, str]]) -> int:
    """A tokenizer-free guess of a prompt's tokens, for charging before the backend counts."""
    chars = sum(len(role) + len(content) for role, content in messages)
    return max(1, math.ceil(chars / CHARS_PER_TOKEN))


@dataclass(eq=False)
class PendingRequest:
    """One admitted request and the event channel its RPC handler reads."""

    request_id: str
    tenant: str
    messages: tuple[tuple[str, str], ...]
    params: common_pb2.GenerationParams
    deadline: float
    span_context: SpanContext
    priority: int = common_pb2.PRIORITY_NORMAL
    # True when the prompt must stay on self-hosted nodes (request or tenant policy).
    self_hosted_only: bool = False
    # False when the caller reads only the final answer: backends need not stream to it.
    deltas: bool = True
    enqueued_at: float = field(default_factory=time.monotonic)
    queued: bool = False
    # The tenant's fair-share weight from the catalog (1 for tenants it does not name).
    weight: float = 1.0
    # The tokens the tenant's counter was charged for this request; 0 until it is taken.
    charged_tokens: int = 0
    # Deltas, then the terminal outcome (services/scheduler/events.py).
    events: EventChannel = field(default_factory=EventChannel)
    # Scheduler replicas the router could not reach before it sent this request here (a
    # retry after its owner died): their claims on it are void (services/scheduler/cluster.py).
    unreachable: frozenset[str] = frozenset()

    @property
    def future(self) -> asyncio.Future[common_pb2.Completion]:
        """The request's outcome: done when it ends, cancelled when its caller went away."""
        return self.events.outcome

    @property
    def rank(self) -> int:
        return rank_of(self.priority)

    @property
    def estimated_tokens(self) -> int:
        """What this request will cost before it has run: its prompt guess plus max_tokens."""
        return estimated_prompt_tokens(self.messages) + max(0, self.params.max_tokens)

    def settle(self, result: common_pb2.Completion | ShepherdError) -> None:
        """End the request once; later answers (e.g. after a retry) are ignored."""
        if isinstance(result, ShepherdError):
            self.events.fail(result)
        else:
            self.events.finish(Final(result))


@dataclass
class QueueCounters:
    """What happened to requests in this queue since start-up."""

    admitted: int = 0
    rejected: int = 0
    shed: int = 0
    expired: int = 0
    cancelled: int = 0


Entry = tuple[float, int, PendingRequest]  # (deadline, arrival sequence, request)


@dataclass(eq=False)
class _Tenant:
    """A tenant with queued requests: its virtual token counter and an EDF heap per class."""

    name: str
    counter: float
    heaps: list[list[Entry]] = field(default_factory=lambda: [[] for _ in CLASSES])
    live: list[int] = field(default_factory=lambda: [0 for _ in CLASSES])

    @property
    def depth(self) -> int:
        return sum(self.live)


@dataclass
class ModelQueue:
    """Per-tenant, per-class EDF heaps with lazy removal of settled requests."""

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
        self._live = [0 for _ in CLASSES]
        self._active: dict[str, _Tenant] = {}  # tenants with queued requests
        self._by_class: list[dict[str, _Tenant]] = [{} for _ in CLASSES]  # ... of that class
        self._idle: OrderedDict[str, float] = OrderedDict()  # counters, longest idle first
        self._floor = 0.0  # where the last tenant to leave an emptied queue left off
        self._entries = 0  # heap entries, live or not, to decide when to compact
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

    def tenant_depths(self) -> dict[str, int]:
        """Requests waiting now, per tenant that has any."""
        return {name: tenant.depth for name, tenant in self._active.items()}

    def virtual_counter(self, tenant: str) -> float | None:
        """A tenant's fair-share counter (weighted tokens served); None if not remembered."""
        active = self._active.get(tenant)
        return active.counter if active is not None else self._idle.get(tenant)

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
        tenant = self._activate(item.tenant)
        heapq.heappush(tenant.heaps[rank], (item.deadline, next(self._seq), item))
        self._entries += 1
        if not tenant.live[rank]:
            self._by_class[rank][tenant.name] = tenant
        tenant.live[rank] += 1
        self._arrivals.append(item)
        self._class_arrivals[rank].append(item)
        self._live[rank] += 1
        self.count("admitted")
        item.future.add_done_callback(functools.partial(self._on_done, item))

    def _activate(self, name: str) -> _Tenant:
        """The queued state of a tenant; one returning from idle is lifted to the lowest counter.

        The lift is what keeps an idle tenant from banking credit (see the module docstring).
        """
        tenant = self._active.get(name)
        if tenant is None:
            lowest = min((t.counter for t in self._active.values()), default=self._floor)
            counter = max(self._idle.pop(name, lowest), lowest)
            tenant = self._active[name] = _Tenant(name, counter)
        return tenant

    def _deactivate(self, tenant: _Tenant) -> None:
        """A tenant's last queued request left: remember its counter among the idle ones."""
        del self._active[tenant.name]
        if not self._active:
            self._floor = tenant.counter
        self._idle[tenant.name] = tenant.counter
        while len(self._idle) > MAX_IDLE_TENANTS:
            self._idle.popitem(last=False)

    def _left(self, item: PendingRequest) -> None:
        """A queued request was taken, answered, cancelled or timed out: it no longer counts."""
        if not item.queued:
            return
        item.queued = False
        rank = item.rank
        self._live[rank] -= 1
        tenant = self._active[item.tenant]
        tenant.live[rank] -= 1
        if not tenant.live[rank]:
            # Whatever is left in the class heap is a tombstone.
            del self._by_class[rank][tenant.name]
            self._entries -= len(tenant.heaps[rank])
            tenant.heaps[rank].clear()
            if not tenant.depth:
                self._deactivate(tenant)
        future = item.future
        if future.cancelled():
            if self.clock() >= item.deadline - 0.001:
                self.count("expired")
            else:
                self.count("cancelled")
        if self._tombstones() > 64 + self.depth:
            self._compact()

    def _on_done(self, item: PendingRequest, _future: object) -> None:
        self._answered(item)

    def _answered(self, item: PendingRequest) -> None:
        """The request's future is done: it leaves the count; a completion corrects its charge."""
        self._left(item)
        future = item.future
        if item.charged_tokens and not future.cancelled() and future.exception() is None:
            self.settle_usage(item, future.result())

    def settle_usage(self, item: PendingRequest, completion: common_pb2.Completion) -> None:
        """Correct the tenant's counter from the estimate charged at take to the real usage.

        Called for every taken request whose answer is a completion (from the future's
        done-callback, so every dispatch path is covered). Idempotent. An answer without
        usage keeps the estimate, so a backend that omits usage cannot make work free; so do
        errors and cancellations after take, since the backend may have done the work anyway.
        """
        real = completion.usage.prompt_tokens + completion.usage.completion_tokens
        if not item.charged_tokens or real <= 0:
            return
        delta = (real - item.charged_tokens) / item.weight
        item.charged_tokens = real
        tenant = self._active.get(item.tenant)
        if tenant is not None:
            tenant.counter += delta
        elif item.tenant in self._idle:
            self._idle[item.tenant] += delta

    def _tombstones(self) -> int:
        """Entries still held for requests that left: in the heaps, and in the arrival
        deques. The deques are trimmed from the front only when the batcher asks for the
        oldest arrival, and a batcher that never waits for company (a hosted model, an idle
        backend) never asks: counted here, they are compacted like the heaps, else every
        answered request would stay in memory for good."""
        arrivals = max(len(self._arrivals), sum(len(a) for a in self._class_arrivals))
        return max(self._entries, arrivals) - self.depth

    def _compact(self) -> None:
        for tenant in self._active.values():
            for heap in tenant.heaps:
                # In place: a caller may be walking this very heap.
                heap[:] = [entry for entry in heap if entry[2].queued]
                heapq.heapify(heap)
        self._entries = sum(len(h) for t in self._active.values() for h in t.heaps)
        self._arrivals = deque(item for item in self._arrivals if item.queued)
        self._class_arrivals = [
            deque(item for item in arrivals if item.queued) for arrivals in self._class_arrivals
        ]

    def _newest_of_lowest_class_below(self, rank: int) -> PendingRequest | None:
        for victim_rank in range(len(CLASSES) - 1, rank, -1):
            if self._live[victim_rank]:
                arrivals = list(self._class_arrivals[victim_rank])
                live = [item for item in arrivals if self._waiting(item)]
                if live:
                    return max(live, key=lambda item: item.enqueued_at)
        return None

    # -- ordering ---------------------------------------------------------------------------

    def _waiting(self, item: PendingRequest) -> bool:
        """Still queued, counting a cancel whose done-callback has not run yet as gone."""
        if item.queued and item.future.done():
            self._left(item)
        return item.queued

    def _tenant_head(self, tenant: _Tenant, rank: int) -> Entry | None:
        """The tenant's earliest-deadline live request of the class, dropping tombstones."""
        heap = tenant.heaps[rank]
        while heap:
            entry = heap[0]
            if entry[2].queued and not entry[2].future.done():
                return entry
            heapq.heappop(heap)
            self._entries -= 1
            self._left(entry[2])  # may empty (clear) this heap
        return None

    def _oldest(self, arrivals: deque[PendingRequest]) -> PendingRequest | None:
        while arrivals and not self._waiting(arrivals[0]):
            arrivals.popleft()
        return arrivals[0] if arrivals else None

    def _aged(self, rank: int, now: float) -> int | None:
        """A class is promoted by how long its longest-waiting request has waited.

        The longest-waiting one, not the earliest deadline, so an old request is not starved
        behind fresher ones of its class with shorter deadlines: its class stays promoted
        until it is served. Whole classes only: between steps, the model's catalog priority
        still decides. None when the class has nothing waiting.
        """
        oldest = self._oldest(self._class_arrivals[rank])
        if oldest is None:
            return None
        return rank - math.floor((now - oldest.enqueued_at) / self.policy.aging_s)

    def _best_class(self, now: float) -> tuple[int, int] | None:
        """The class to serve next and its aged rank (ties go to the better class)."""
        best: tuple[int, int] | None = None
        for rank in range(len(CLASSES)):
            aged = self._aged(rank, now)
            if aged is not None and (best is None or aged < best[1]):
                best = (rank, aged)
        return best

    def effective_rank(self, now: float | None = None) -> float | None:
        """The rank of the request that would leave next, after aging; None when empty."""
        best = self._best_class(self.clock() if now is None else now)
        return None if best is None else best[1]

    def oldest_enqueued_at(self) -> float | None:
        """When the longest-waiting live request arrived, for the max-delay timer."""
        oldest = self._oldest(self._arrivals)
        return None if oldest is None else oldest.enqueued_at

    def _fair_pick(self, rank: int) -> tuple[_Tenant, PendingRequest] | None:
        """The lowest-counter tenant of the class and its earliest-deadline request.

        Ties (a tenant just lifted to the lowest counter) go to the earlier deadline, then to
        the earlier arrival.
        """
        best: tuple[float, float, int] | None = None
        chosen: _Tenant | None = None
        for tenant in list(self._by_class[rank].values()):
            head = self._tenant_head(tenant, rank)
            if head is None:
                continue
            key = (tenant.counter, head[0], head[1])
            if best is None or key < best:
                best, chosen = key, tenant
        if chosen is None:
            return None
        _, _, item = heapq.heappop(chosen.heaps[rank])
        self._entries -= 1
        return chosen, item

    def take(self, count: int) -> list[PendingRequest]:
        """Remove up to `count` live requests in service order; expired ones are answered.

        Each place goes to the best aged class, and within it to the tenant with the lowest
        virtual counter, which is charged the request's estimated tokens over its weight. A
        request whose deadline has passed is never returned (so it never reaches a backend)
        and costs its tenant nothing.
        """
        now = self.clock()
        batch: list[PendingRequest] = []
        while len(batch) < count:
            best = self._best_class(now)
            if best is None:
                break
            picked = self._fair_pick(best[0])
            if picked is None:  # cannot happen: the class has a live request
                break
            tenant, item = picked
            if item.deadline <= now:
                self._left(item)
                self.count("expired")
                item.settle(expired())
                continue
            tokens = item.estimated_tokens
            tenant.counter += tokens / item.weight
            item.charged_tokens = tokens
            self._left(item)  # after the charge: an emptied tenant goes idle with it
            batch.append(item)
        return batch

    def drain(self, error: ShepherdError) -> None:
        """Answer every queued request with `error` (at shutdown)."""
        items = [e[2] for t in self._active.values() for heap in t.heaps for e in heap]
        for item in items:
            if item.queued:
                self._left(item)
                item.settle(error)
