"""A pool of Triton nodes: discovery, health, circuit breaking and fair hand-out of capacity.

Why the scheduler owns this instead of trusting Triton: Triton answers a full queue with a
bare error and knows nothing of other nodes. Here every node has a cap on batches in flight,
and a batch only leaves its model's queue once a node slot is granted to it, so backlog waits
in Shepherd's priority queues (where it can be ordered, shed or spilled) rather than in
Triton's FIFO.

Capacity is handed out by priority. Every model's batcher that has a batch ready waits here
with a key (its queue's best aged request class, then the model's catalog priority); when a
slot frees, the waiting batcher with the smallest key that some free node can serve gets it.
Among the free nodes that hold the model, two are sampled and the one with less work (in-flight
batches times its EMA batch latency) wins: the power of two choices.

Health comes from two sides. A poller asks every node ServerReady, and ModelReady for each
model it should hold. Failed calls feed a circuit breaker (breaker.py, shared with the hosted
providers): after `failure_threshold` consecutive failures a node is OPEN and gets nothing for
a cool-down that doubles on every failed probe; then it is HALF_OPEN and exactly one probe (a
poll or a batch) decides. When every node of a pool is OPEN, a request fails at once with
UNAVAILABLE instead of waiting.

Nodes come from the catalog's static list or from DNS (a Kubernetes headless service), which
is re-resolved periodically; a node that disappears from DNS gets no new work and is dropped
when its batches finish.

With scale-out on (services/scheduler/cluster.py) the cap is shared by every replica: a slot
chosen here is confirmed by one Redis script per batch before the batch gets it, and given
back in Redis when the batch ends; and under explicit model control every replica reads each
node's repository index on its polls, so it sees what the pool's placement leader loaded or
unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import grpc
import httpx
import tritonclient.grpc.aio as triton
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions
from tritonclient.utils import InferenceServerException

from libs.catalog import Deployment, Pool
from libs.errors import ShepherdError
from libs.peers import RECONNECT_OPTIONS
from libs.tasks import spawn, supervise
from services.scheduler.breaker import BreakerConfig, BreakerState, CircuitBreaker
from services.scheduler.cluster import Cluster

_log = logging.getLogger(__name__)

WaiterKey = tuple[float, int]


# The circuit breaker's view of a node (the name servicer.py and GetStats know it by).
NodeState = BreakerState


class ModelState(Enum):
    """Where a model stands on one node."""

    LOADING = "loading"
    READY = "ready"
    EVICTING = "evicting"


@dataclass
class ModelOnNode:
    """One model's copy on one node: its footprint, batches in flight and last use.

    An ensemble names its `steps`: a batch of the ensemble counts as in flight on each of
    them too (and uses them), so none is evicted while the ensemble runs.
    """

    name: str
    memory_mb: int
    state: ModelState
    inflight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    steps: tuple[str, ...] = ()


@dataclass(frozen=True)
class HealthConfig:
    """How nodes are watched; read once at start-up."""

    poll_interval_s: float = 0.5
    probe_timeout_s: float = 1.0
    failure_threshold: int = 2
    open_cooldown_s: float = 1.0
    max_cooldown_s: float = 30.0
    dns_interval_s: float = 5.0
    ema_alpha: float = 0.2

    def breaker(self) -> BreakerConfig:
        """The settings of each node's circuit breaker."""
        return BreakerConfig(self.failure_threshold, self.open_cooldown_s, self.max_cooldown_s)


class Node:
    """One Triton server, its client and everything Shepherd tracks about it."""

    def __init__(
        self,
        pool: Pool,
        address: str,
        client: triton.InferenceServerClient,
        health: HealthConfig | None = None,
    ) -> None:
        self.pool = pool
        self.address = address
        self.client = client
        self.cap = pool.max_inflight_batches
        self.memory_total_mb = pool.gpu_memory_mb
        self.breaker = CircuitBreaker((health or HealthConfig()).breaker())
        self.inflight = 0
        self.ema_s = 0.0
        self.models: dict[str, ModelOnNode] = {}
        self.load_lock = asyncio.Lock()  # loads and unloads on one node run one at a time
        self.gone = False  # removed from DNS: drain, then drop
        self.memory_probed = False
        # Scale-out: slots given back locally whose release Redis has not confirmed yet, and
        # until when other replicas were found to fill the node.
        self.releasing = 0
        self.shared_full_until = 0.0

    @property
    def memory_used_mb(self) -> int:
        return sum(m.memory_mb for m in self.models.values())

    @property
    def state(self) -> NodeState:
        return self.breaker.state

    @property
    def failures(self) -> int:
        """Consecutive failures since the last success."""
        return self.breaker.failures

    @property
    def retry_at(self) -> float:
        """When an OPEN node turns HALF_OPEN and may be probed."""
        return self.breaker.retry_at

    def usable(self, now: float) -> bool:
        """Whether the breaker lets a new batch or probe through now.

        HALF_OPEN admits one probe: a batch only while none is in flight (and has_slot caps
        it at one), or the health poll.
        """
        if self.gone:
            return False
        state = self.breaker.current(now)
        if state is NodeState.HALF_OPEN:
            return self.inflight == 0
        return state is not NodeState.OPEN

    def answering(self) -> bool:
        """Whether the node answers its health checks: its breaker is closed, or nothing has
        failed yet. For readiness, which must not count a node that is down or on probation
        (HALF_OPEN) as capacity."""
        if self.gone:
            return False
        state = self.breaker.state
        return state is NodeState.HEALTHY or (state is NodeState.UNKNOWN and not self.failures)

    def blocked_until(self, now: float) -> float | None:
        """When an OPEN node may be probed again; None when it is not blocked."""
        if self.gone:
            return None
        return self.breaker.blocked_until(now)

    def has_slot(self) -> bool:
        cap = 1 if self.state is NodeState.HALF_OPEN else self.cap
        return self.inflight + self.releasing < cap

    def ready(self, model: str) -> bool:
        copy = self.models.get(model)
        return copy is not None and copy.state is ModelState.READY

    def score(self) -> float:
        """Expected time until a new batch would finish here: the P2C comparison."""
        return (self.inflight + 1) * (self.ema_s or 0.001)

    def succeeded(self, latency_s: float | None, alpha: float) -> None:
        if latency_s is not None:
            self.ema_s = (
                latency_s if self.ema_s == 0 else alpha * latency_s + (1 - alpha) * self.ema_s
            )
        if self.breaker.succeeded():
            _log.info("triton node healthy", extra={"node": self.address})

    def failed(self, reason: str, config: HealthConfig | None = None) -> None:
        """A poll, load or batch failed: feed the breaker, and log when it opens.

        The thresholds are the breaker's, built from the pool's HealthConfig when the node was
        added; `config` is still accepted so existing callers need not change.
        """
        if self.breaker.failed():
            _log.warning(
                "triton node circuit open",
                extra={
                    "node": self.address,
                    "reason": reason,
                    "cooldown_s": self.breaker.cooldown_s,
                },
            )


class Lease:
    """A granted slot on one node for one batch; release it exactly once."""

    def __init__(
        self,
        pool: NodePool,
        node: Node,
        deployment: Deployment,
        used: tuple[ModelOnNode, ...] = (),
    ) -> None:
        self._pool = pool
        self.node = node
        self.deployment = deployment
        # The copies the batch counts as in flight on: the model's, and an ensemble's steps.
        self.used = used
        self._released = False
        # Its holder entry in the node's shared semaphore (scale-out); "" when not shared.
        self.holder = ""
        # The batch's time on the node, once released with one: the backend gives the slot
        # back as soon as the node is done, before the answers go out.
        self.latency_s: float | None = None

    @property
    def address(self) -> str:
        return self.node.address

    def release(self, *, latency_s: float | None = None, failure: str = "") -> None:
        """Give the slot back; `latency_s` feeds the EMA, `failure` the circuit breaker."""
        if self._released:
            return
        self._released = True
        self.latency_s = latency_s
        self._pool.released(self, latency_s, failure)


@dataclass(eq=False)
class _Waiter:
    deployment: Deployment
    key: Callable[[], WaiterKey]
    exclude: frozenset[str]
    future: asyncio.Future[Lease]


class PlacementPolicy(Protocol):
    """Decides where to load a model that no free node holds (see placement.py)."""

    def consider(self, pool: NodePool, deployment: Deployment, exclude: frozenset[str]) -> None: ...

    def load_failure(self, pool: NodePool, deployment: Deployment) -> str:
        """Why no node of `pool` can load `deployment` now, when each refused it; else ""."""
        ...


ClientFactory = Callable[[str], triton.InferenceServerClient]


def default_client(address: str) -> triton.InferenceServerClient:
    """A Triton client whose channel reconnects within about a second of a node's restart.

    tritonclient replaces all its channel options when given any, so its own defaults
    (unlimited message sizes, keepalive) are repeated here.
    """
    keepalive = KeepAliveOptions()
    return triton.InferenceServerClient(
        url=address,
        channel_args=[
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            *RECONNECT_OPTIONS,
        ],
    )


class NodePool:
    """The nodes of one catalog pool and the waiters for their capacity."""

    def __init__(
        self,
        pool: Pool,
        deployments: Iterable[Deployment],
        health: HealthConfig,
        placement: PlacementPolicy | None,
        client_factory: ClientFactory = default_client,
        cluster: Cluster | None = None,
    ) -> None:
        self.pool = pool
        self.cluster = cluster
        self.health = health
        self.placement = placement
        self._deployments = {d.backend_model: d for d in deployments}
        # What each Triton model takes and, for an ensemble, its steps: for models found
        # loaded (adopted, or loaded with an ensemble) that no deployment of their own names.
        self._memory: dict[str, int] = {}
        self._steps: dict[str, tuple[str, ...]] = {}
        for deployment in self._deployments.values():
            for step in deployment.steps:
                self._memory.setdefault(step.model, step.memory_mb)
            self._steps[deployment.backend_model] = tuple(s.model for s in deployment.steps)
        for deployment in self._deployments.values():
            self._memory[deployment.backend_model] = deployment.memory_mb
        self._client_factory = client_factory
        self.nodes: dict[str, Node] = {}
        self._waiters: list[_Waiter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._http = httpx.AsyncClient(timeout=health.probe_timeout_s, trust_env=False)
        for address in pool.nodes:
            self._add(address)

    # -- life cycle -------------------------------------------------------------------------

    def _add(self, address: str) -> Node:
        node = Node(self.pool, address, self._client_factory(address), self.health)
        self.nodes[address] = node
        return node

    async def start(self) -> None:
        """Learn what each node already serves, then keep polling (and resolving DNS)."""
        if self.pool.dns:
            await self._resolve_dns()
        await asyncio.gather(*(self._adopt(node) for node in list(self.nodes.values())))
        self._tasks.add(supervise(f"poll:{self.pool.name}", self._poll_loop))
        if self.pool.dns:
            self._tasks.add(supervise(f"dns:{self.pool.name}", self._dns_loop))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # each logs its own failure
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_exception(
                    ShepherdError(grpc.StatusCode.UNAVAILABLE, "the scheduler is shutting down")
                )
        for node in self.nodes.values():
            await node.client.close()
        await self._http.aclose()

    # -- capacity ---------------------------------------------------------------------------

    async def acquire(
        self,
        deployment: Deployment,
        key: Callable[[], WaiterKey],
        exclude: frozenset[str] = frozenset(),
    ) -> Lease:
        """Wait for a slot on a node that serves `deployment`; UNAVAILABLE if none can."""
        waiter = _Waiter(deployment, key, exclude, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            self.pump()
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()  # granted just before the cancel: give it back
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def pump(self) -> None:
        """Grant free slots to waiters in priority order; start placements where needed."""
        if not self._waiters:
            return
        now = time.monotonic()
        for waiter in sorted(self._waiters, key=lambda w: w.key()):
            if waiter.future.done():
                self._waiters.remove(waiter)
                continue
            candidates = [
                node
                for node in self.nodes.values()
                if node.address not in waiter.exclude
                and node.usable(now)
                and node.has_slot()
                and node.shared_full_until <= now
                and node.ready(waiter.deployment.backend_model)
            ]
            if candidates:
                node = self._choose(candidates)
                self._grant(waiter, node, now)
                continue
            possible = [
                n for n in self.nodes.values() if n.address not in waiter.exclude and not n.gone
            ]
            if not possible or all(n.blocked_until(now) is not None for n in possible):
                self._waiters.remove(waiter)
                waiter.future.set_exception(self._unavailable(waiter, possible, now))
                continue
            if self.placement is not None:
                self.placement.consider(self, waiter.deployment, waiter.exclude)
                refused = self.placement.load_failure(self, waiter.deployment)
                if refused:
                    # Every node refused to load it (a step missing from the repository, a
                    # broken config): waiting would only run into the deadline.
                    self._waiters.remove(waiter)
                    waiter.future.set_exception(
                        ShepherdError(
                            grpc.StatusCode.UNAVAILABLE,
                            f"Triton pool {self.pool.name!r} cannot load "
                            f"{waiter.deployment.backend_model}: {refused}",
                        )
                    )
            elif all(n.state is NodeState.HEALTHY for n in possible) and not any(
                waiter.deployment.backend_model in n.models for n in possible
            ):
                # Nobody may load it (model_control: none) and every node has been polled.
                self._waiters.remove(waiter)
                waiter.future.set_exception(
                    ShepherdError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"no node of Triton pool {self.pool.name!r} has "
                        f"{waiter.deployment.backend_model} loaded, and the pool's "
                        "model_control is 'none', so Shepherd may not load it",
                    )
                )

    def _unavailable(self, waiter: _Waiter, possible: list[Node], now: float) -> ShepherdError:
        if not possible:
            detail = "no other node is configured" if waiter.exclude else "it has no nodes"
        else:
            next_probe = min(n.retry_at for n in possible) - now
            detail = (
                f"all {len(possible)} node(s) are failing health checks "
                f"(next probe in {next_probe:.1f}s)"
            )
        return ShepherdError(
            grpc.StatusCode.UNAVAILABLE,
            f"Triton pool {self.pool.name!r} cannot serve {waiter.deployment.backend_model}: "
            f"{detail}",
        )

    @staticmethod
    def _choose(candidates: list[Node]) -> Node:
        if len(candidates) == 1:
            return candidates[0]
        first, second = random.sample(candidates, 2)
        return first if first.score() <= second.score() else second

    def deployment(self, backend_model: str) -> Deployment | None:
        """The pool's deployment of a Triton model, if it has one."""
        return self._deployments.get(backend_model)

    def loaded(self, name: str) -> ModelOnNode:
        """A READY entry for a model found loaded on a node, with its footprint and steps."""
        return ModelOnNode(
            name, self._memory.get(name, 0), ModelState.READY, steps=self._steps.get(name, ())
        )

    def _grant(self, waiter: _Waiter, node: Node, now: float) -> None:
        self._waiters.remove(waiter)
        node.inflight += 1
        copy = node.models[waiter.deployment.backend_model]
        used = (copy, *(node.models[s] for s in copy.steps if s in node.models))
        for entry in used:
            entry.inflight += 1
            entry.last_used = now
        lease = Lease(self, node, waiter.deployment, used)
        if self.cluster is None:
            waiter.future.set_result(lease)
            return
        # Reserved here (so this pump does not hand the slot out twice); the batch gets it
        # once the node's shared semaphore agrees.
        spawn(self._tasks, self._confirm(waiter, lease), f"slot:{node.address}")

    async def _confirm(self, waiter: _Waiter, lease: Lease) -> None:
        """Take the slot in Redis; on a refusal give it back here and put the waiter back."""
        assert self.cluster is not None
        node = lease.node
        holder = self.cluster.holder_id()
        models = [entry.name for entry in lease.used]
        retry_s = self.cluster.config.full_retry_s
        try:
            verdict, model = await self.cluster.acquire_slot(
                self.pool.name, node.address, node.cap, holder, models
            )
        except Exception as error:  # Redis down or slow: the batch waits and asks again
            _log.warning(
                "shared node slot unavailable", extra={"node": node.address, "error": str(error)}
            )
            verdict, model, retry_s = 0, "", 0.25
        if verdict == 1:
            lease.holder = holder
            if waiter.future.done():
                lease.release()  # its batcher went away meanwhile
            else:
                waiter.future.set_result(lease)
            return
        now = time.monotonic()
        self._unreserve(lease, now)
        if verdict < 0:
            # The placement leader is unloading (or has unloaded) it there: forget the copy
            # until a poll or the leader says it is back.
            copy = node.models.get(model)
            if copy is not None and copy.state is ModelState.READY and copy.inflight == 0:
                del node.models[model]
        else:
            node.shared_full_until = now + retry_s
            asyncio.get_running_loop().call_later(retry_s, self.pump)
        if not waiter.future.done():
            self._waiters.append(waiter)
        self.pump()

    def _unreserve(self, lease: Lease, now: float) -> None:
        node = lease.node
        node.inflight -= 1
        for entry in lease.used:
            entry.inflight -= 1
            entry.last_used = now

    def released(self, lease: Lease, latency_s: float | None, failure: str) -> None:
        node = lease.node
        self._unreserve(lease, time.monotonic())
        if self.cluster is not None and lease.holder:
            node.releasing += 1

            def done() -> None:
                node.releasing -= 1
                self.pump()

            self.cluster.release_slot(self.pool.name, node.address, lease.holder, done)
        if failure:
            node.failed(failure, self.health)
        elif latency_s is not None:
            node.succeeded(latency_s, self.health.ema_alpha)
        if node.gone and node.inflight == 0:
            self._drop(node)
        self.pump()

    def capacity(self, deployment: Deployment) -> int:
        """Batch slots of usable nodes that hold the model now (for wait estimates)."""
        now = time.monotonic()
        return sum(
            node.cap
            for node in self.nodes.values()
            if node.ready(deployment.backend_model) and node.usable(now)
        )

    def serves(self, deployment: Deployment) -> bool:
        """Whether a batch of `deployment` could run in this pool now: some answering node
        holds the model, or (explicit model control) has the memory to load it."""
        name = deployment.backend_model
        return any(
            node.ready(name)
            or (self.placement is not None and node.memory_total_mb >= deployment.footprint_mb)
            for node in self.nodes.values()
            if node.answering()
        )

    def ema_s(self, deployment: Deployment) -> float:
        """The mean EMA batch latency of the nodes holding the model, 0 when unknown."""
        emas = [
            n.ema_s for n in self.nodes.values() if n.ready(deployment.backend_model) and n.ema_s
        ]
        return sum(emas) / len(emas) if emas else 0.0

    # -- health -----------------------------------------------------------------------------

    async def _adopt(self, node: Node) -> None:
        """Take over the models a node already has loaded (after a scheduler restart)."""
        try:
            index = await node.client.get_model_repository_index(
                as_json=True, client_timeout=self.health.probe_timeout_s
            )
        except InferenceServerException as error:
            node.failed(f"repository index: {error.message()}", self.health)
            return
        for entry in index.get("models", []):
            name = entry.get("name", "")
            if entry.get("state") == "READY" and name and name not in node.models:
                node.models[name] = self.loaded(name)
        node.succeeded(None, self.health.ema_alpha)
        await self._probe_memory(node)

    async def _probe_memory(self, node: Node) -> None:
        """On GPU nodes, Triton's nv_gpu_memory_total_bytes replaces the configured memory."""
        if node.memory_probed or not self.pool.metrics_port:
            return
        host = node.address.rpartition(":")[0]
        try:
            response = await self._http.get(f"http://{host}:{self.pool.metrics_port}/metrics")
        except httpx.HTTPError:
            return
        node.memory_probed = True
        total = 0.0
        for line in response.text.splitlines():
            if line.startswith("nv_gpu_memory_total_bytes"):
                with contextlib.suppress(ValueError, IndexError):
                    total += float(line.rsplit(" ", 1)[1])
        if total > 0:
            node.memory_total_mb = int(total // (1024 * 1024))

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health.poll_interval_s)
            await asyncio.gather(*(self.poll(node) for node in list(self.nodes.values())))
            self.pump()

    async def poll(self, node: Node) -> None:
        """ServerReady, then ModelReady for every model the node should hold."""
        now = time.monotonic()
        if node.gone:
            return
        timeout = self.health.probe_timeout_s
        if node.blocked_until(now) is not None:
            # Cooling down. A node that answers ready again (a restarted Triton) is probed
            # now, not after a cool-down that doubles up to max_cooldown_s while it was down.
            try:
                back = await node.client.is_server_ready(client_timeout=timeout)
            except InferenceServerException:
                return
            if not back:
                return
            node.breaker.end_cooldown(now)
        if node.state is NodeState.OPEN:
            node.usable(now)  # cool-down over: HALF_OPEN, this poll is the probe
        try:
            if not await node.client.is_server_ready(client_timeout=timeout):
                # With --strict-readiness a node is "not ready" while any model loads or
                # unloads; a live node in that state is busy, not broken, and ModelReady
                # below still tells which models it can serve.
                if not await node.client.is_server_live(client_timeout=timeout):
                    node.failed("ServerLive and ServerReady answered false", self.health)
                    return
            if self.cluster is not None and self.placement is not None:
                await self._reconcile(node)
                node.succeeded(None, self.health.ema_alpha)
                return
            expected = set(node.models)
            if self.pool.model_control == "none":
                expected |= set(self._deployments)
            for name in expected:
                copy = node.models.get(name)
                if copy is not None and copy.state is not ModelState.READY:
                    continue  # a load or unload is in progress; placement owns it
                ready = await node.client.is_model_ready(name, client_timeout=timeout)
                if ready and copy is None:
                    node.models[name] = self.loaded(name)
                elif not ready and copy is not None and copy.inflight == 0:
                    _log.warning(
                        "model no longer ready", extra={"node": node.address, "model": name}
                    )
                    del node.models[name]
        except InferenceServerException as error:
            node.failed(f"health poll: {error.message()}", self.health)
            return
        if node.state is not NodeState.HEALTHY:
            await self._probe_memory(node)
        node.succeeded(None, self.health.ema_alpha)

    async def _reconcile(self, node: Node) -> None:
        """Scale-out, explicit model control: the node's repository index is the truth, since
        the placement leader may be another replica. A settled copy Triton no longer reports
        ready is forgotten unless a batch of ours still runs on it; one it reports is adopted.
        Copies this replica is loading or evicting are the placer's to settle."""
        index = await node.client.get_model_repository_index(
            as_json=True, client_timeout=self.health.probe_timeout_s
        )
        ready = {
            entry.get("name", "")
            for entry in index.get("models", [])
            if entry.get("state") == "READY" and entry.get("name")
        }
        for name in ready - set(node.models):
            node.models[name] = self.loaded(name)
        for name, copy in list(node.models.items()):
            if name not in ready and copy.state is ModelState.READY and copy.inflight == 0:
                del node.models[name]
        if node.state is not NodeState.HEALTHY:
            await self._probe_memory(node)

    async def adopt_for_leadership(self) -> None:
        """This replica just became the pool's placement leader: take over what the nodes have
        loaded, unloading nothing, and lift the marks of models that are loaded (a previous
        leader that died between its mark and its unload leaves the model loaded)."""
        assert self.cluster is not None
        for node in list(self.nodes.values()):
            try:
                await self._reconcile(node)
            except InferenceServerException as error:
                node.failed(f"repository index: {error.message()}", self.health)
                continue
            ready = [n for n, m in node.models.items() if m.state is ModelState.READY]
            await self.cluster.loaded(self.pool.name, node.address, ready)
        self.pump()

    # -- DNS --------------------------------------------------------------------------------

    async def _dns_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health.dns_interval_s)
            await self._resolve_dns()

    async def _resolve_dns(self) -> None:
        host, _, port = self.pool.dns.rpartition(":")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, int(port), type=socket.SOCK_STREAM
            )
        except OSError as error:
            _log.warning("DNS lookup failed", extra={"pool": self.pool.name, "error": str(error)})
            return
        found = set()
        for family, _, _, _, sockaddr in infos:
            ip = sockaddr[0]
            found.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
        for address in found - set(self.nodes):
            _log.info("triton node discovered", extra={"pool": self.pool.name, "node": address})
            await self._adopt(self._add(address))
        for address in set(self.nodes) - found:
            node = self.nodes[address]
            node.gone = True
            if node.inflight == 0:
                self._drop(node)
        self.pump()

    def _drop(self, node: Node) -> None:
        if self.nodes.get(node.address) is node:
            del self.nodes[node.address]
            spawn(self._tasks, node.client.close(), f"close:{node.address}")


def pools_for(
    pools: Mapping[str, Pool],
    deployments: Iterable[Deployment],
    health: HealthConfig,
    placement_factory: Callable[[Pool], PlacementPolicy | None],
    cluster: Cluster | None = None,
) -> dict[str, NodePool]:
    """One NodePool per catalog pool, knowing the deployments that run on it."""
    by_pool: dict[str, list[Deployment]] = {name: [] for name in pools}
    for deployment in deployments:
        if deployment.kind == "triton":
            by_pool[deployment.pool].append(deployment)
    return {
        name: NodePool(pool, by_pool[name], health, placement_factory(pool), cluster=cluster)
        for name, pool in pools.items()
    }
