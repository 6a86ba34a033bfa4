"""Memory-aware placement of models on Triton nodes running in explicit model-control mode.

Triton never loads or unloads a model on its own, and load -> infer -> unload from several
clients is a race. Shepherd is the only client that loads and unloads, so it can do it safely:

* A model with queued work that no node holds is loaded onto a node with room: the node's GPU
  memory (configured, or Triton's nv_gpu_memory_total_bytes) minus the declared footprints of
  the models it holds.
* When no node has room, the least recently used idle models on one node are unloaded to make
  room. A model with a batch in flight, or one being loaded, is never chosen; while it is being
  unloaded no new batch is sent to it.
* A hot model (every node holding it is at its in-flight cap while work waits) gets one more
  copy, up to the deployment's `max_nodes`, but only in free memory, so scaling out never
  evicts another model.
* Loads and unloads on one node run one at a time (a per-node lock), and requests for a model
  that is loading simply keep waiting in its queue.
* An ensemble (a deployment with `steps`) is loaded with its composing models: Triton loads
  them together, so room is made for the ensemble and the steps the node lacks. A batch of
  the ensemble counts as in flight on each step (nodes.py), so no step it uses is evicted; a
  step is evicted only after the ensembles on that node that use it (unloading a step would
  take its ensembles down with it), and an unloaded ensemble leaves its steps loaded, for
  other models to use or for LRU eviction later.
* A load that every node refuses (a step missing from the model repository, a broken config)
  fails the requests waiting for it at once, naming Triton's reason, instead of letting them
  wait for their deadline; the node is asked again after a back-off.

Every load, unload and failed load is kept as a PlacementEvent for GetStats and logged.

With scale-out on (services/scheduler/cluster.py) only the pool's placement leader loads and
unloads; a replica that is not the leader asks it (`EnsureLoaded`) and adds the nodes it
answers with. The leader marks each victim "unloading" in Redis before it unloads it, in the
same script that checks that no replica has a batch of it in flight there; when any does, the
load waits and is considered again at the next pump.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from tritonclient.utils import InferenceServerException

from libs.catalog import Deployment
from libs.errors import ShepherdError
from libs.tasks import spawn
from services.scheduler.cluster import Cluster, LeaderClient
from services.scheduler.nodes import ModelOnNode, ModelState, Node, NodePool
from services.scheduler.stats import placement_event

_log = logging.getLogger(__name__)

LOAD = "load"
UNLOAD = "unload"
LOAD_FAILED = "load_failed"


@dataclass(frozen=True)
class PlacementEvent:
    """One placement action, as GetStats reports it."""

    unix_ms: int
    node: str
    backend_model: str
    action: str
    reason: str
    duration_ms: float


@dataclass(frozen=True)
class PlacementConfig:
    """Timeouts and back-off of placement; read once at start-up."""

    load_timeout_s: float = 120.0
    unload_timeout_s: float = 30.0
    failed_load_backoff_s: float = 5.0
    max_events: int = 256


class Placer:
    """Loads and evicts models on the nodes of one pool."""

    def __init__(
        self,
        config: PlacementConfig,
        cluster: Cluster | None = None,
        leader: LeaderClient | None = None,
        settle: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self._config = config
        # Awaited before a model is unloaded from a node (address, model): the GPU meter's
        # last read of its counters (TritonBackend.settle), which go with the model.
        self._settle = settle
        self._cluster = cluster
        self._leader = leader
        # Scale-out, not leading: the models this replica is asking the leader for now, and
        # the leader's reason why a model cannot be loaded (until the back-off ends).
        self._asking: set[str] = set()
        self._leader_refusals: dict[str, tuple[str, float]] = {}
        self.events: deque[PlacementEvent] = deque(maxlen=config.max_events)
        self._backoff: dict[tuple[str, str], float] = {}
        # Why a node refused to load a model (it answered, and said no), until the back-off.
        self._refusals: dict[tuple[str, str], str] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def consider(self, pool: NodePool, deployment: Deployment, exclude: frozenset[str]) -> None:
        """Called when work for `deployment` found no free node; start a load if it helps."""
        name = deployment.backend_model
        if self._cluster is not None and not self._cluster.leads(pool.pool.name):
            self._ask_leader(pool, deployment)
            return
        nodes = [n for n in pool.nodes.values() if not n.gone]
        if any(n.models.get(name) and n.models[name].state is ModelState.LOADING for n in nodes):
            return  # a copy is on its way; the work waits for it
        now = time.monotonic()
        holders = [n for n in nodes if n.ready(name) and n.address not in exclude]
        usable_holders = [n for n in holders if n.usable(now)]
        if usable_holders and len(holders) >= deployment.max_nodes:
            return  # enough copies; the work waits for a slot
        candidates = [
            n
            for n in nodes
            if name not in n.models
            and n.address not in exclude
            and n.usable(now)
            and self._backoff.get((n.address, name), 0.0) <= now
            and n.memory_total_mb >= deployment.footprint_mb
            and not _steps_changing(n, deployment)
        ]
        if not candidates:
            return
        # Scaling out a model that already runs somewhere may only use free memory.
        may_evict = not usable_holders
        choice = self._choose(candidates, deployment, may_evict)
        if choice is None:
            return
        node, victims = choice
        for victim in victims:
            victim.state = ModelState.EVICTING
        steps = tuple(step.model for step in deployment.steps)
        node.models[name] = ModelOnNode(name, deployment.memory_mb, ModelState.LOADING, steps=steps)
        # The steps the node lacks load with the ensemble.
        arriving = [step for step in deployment.steps if step.model not in node.models]
        for step in arriving:
            node.models[step.model] = ModelOnNode(step.model, step.memory_mb, ModelState.LOADING)
        reason = "first use" if not holders else "hot: every copy is busy"
        spawn(
            self._tasks,
            self._load(pool, node, deployment, victims, reason, [s.model for s in arriving]),
            f"load:{name}@{node.address}",
        )

    def _ask_leader(self, pool: NodePool, deployment: Deployment) -> None:
        """Ask the pool's placement leader for the model, once at a time per model."""
        name = deployment.backend_model
        if name in self._asking or self._leader is None:
            return
        self._asking.add(name)
        spawn(self._tasks, self._asked(pool, name), f"ensure:{name}")

    async def _asked(self, pool: NodePool, name: str) -> None:
        assert self._leader is not None
        try:
            nodes = await self._leader.ensure_loaded(pool.pool.name, name)
        except ShepherdError as error:
            _log.info(
                "placement leader could not place the model now",
                extra={"model": name, "pool": pool.pool.name, "reason": error.message},
            )
            if error.code == grpc.StatusCode.UNAVAILABLE and " cannot load " in error.message:
                self._leader_refusals[name] = (
                    error.message,
                    time.monotonic() + self._config.failed_load_backoff_s,
                )
            await asyncio.sleep(0.1)  # the next pump asks again
            nodes = []
        finally:
            self._asking.discard(name)
        for address in nodes:
            node = pool.nodes.get(address)
            if node is not None and name not in node.models:
                node.models[name] = pool.loaded(name)
        pool.pump()

    async def ensure(self, pool: NodePool, deployment: Deployment, timeout_s: float) -> list[str]:
        """The leader's side of EnsureLoaded: load the model unless a node holds it, and answer
        with the nodes that hold it once one does (or UNAVAILABLE with why not)."""
        name = deployment.backend_model
        deadline = time.monotonic() + timeout_s
        while True:
            holders = [a for a, n in pool.nodes.items() if n.ready(name) and not n.gone]
            if holders:
                return holders
            refused = self.load_failure(pool, deployment)
            if refused:
                raise ShepherdError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"Triton pool {pool.pool.name!r} cannot load {name}: {refused}",
                )
            if self._cluster is not None and not self._cluster.leads(pool.pool.name):
                raise ShepherdError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"this replica does not lead placement on pool {pool.pool.name!r}",
                )
            if time.monotonic() >= deadline:
                raise ShepherdError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{name} is not loaded on pool {pool.pool.name!r} yet (no room: every "
                    "model that would make room is busy)",
                )
            self.consider(pool, deployment, frozenset())
            await asyncio.sleep(0.05)

    def load_failure(self, pool: NodePool, deployment: Deployment) -> str:
        """Why no node can load `deployment` now, when every node that could refused it.

        Only while no node holds or is loading the model, and each node that is not gone
        refused it within its back-off; the reasons are Triton's own, per node.
        """
        name = deployment.backend_model
        nodes = [n for n in pool.nodes.values() if not n.gone]
        if not nodes or any(name in n.models for n in nodes):
            return ""
        now = time.monotonic()
        if self._cluster is not None and not self._cluster.leads(pool.pool.name):
            reason, until = self._leader_refusals.get(name, ("", 0.0))
            return reason if until > now else ""
        reasons = []
        for node in nodes:
            refusal = self._refusals.get((node.address, name))
            if refusal is None or self._backoff.get((node.address, name), 0.0) <= now:
                return ""
            reasons.append(f"node {node.address}: {refusal}")
        return "; ".join(reasons)

    @staticmethod
    def _choose(
        candidates: list[Node], deployment: Deployment, may_evict: bool
    ) -> tuple[Node, list[ModelOnNode]] | None:
        fits = [n for n in candidates if _free_mb(n) >= _needed_mb(n, deployment)]
        if fits:
            return max(fits, key=_free_mb), []
        if not may_evict:
            return None
        best: tuple[float, Node, list[ModelOnNode]] | None = None
        for node in candidates:
            victims = _victims(node, deployment)
            if victims is None:
                continue  # even evicting every idle model would not make room here
            staleness = max(m.last_used for m in victims)
            if best is None or staleness < best[0]:
                best = (staleness, node, victims)
        return None if best is None else (best[1], best[2])

    async def _load(
        self,
        pool: NodePool,
        node: Node,
        deployment: Deployment,
        victims: list[ModelOnNode],
        reason: str,
        arriving: list[str] | None = None,
    ) -> None:
        """Load `deployment` (and, for an ensemble, the steps `arriving` with it)."""
        name = deployment.backend_model
        arriving = arriving or []
        try:
            async with node.load_lock:
                started = time.monotonic()
                if not await self._mark_victims(pool, node, victims):
                    # Another replica has a batch of a victim in flight: not now, but soon.
                    for model in (name, *arriving):
                        node.models.pop(model, None)
                    retry_s = 0.05
                    self._backoff[(node.address, name)] = time.monotonic() + retry_s
                    asyncio.get_running_loop().call_later(retry_s, pool.pump)
                    return
                for victim in victims:
                    if not await self._unload(node, victim, f"evicted (LRU, idle) to load {name}"):
                        for model in (name, *arriving):
                            node.models.pop(model, None)
                        self._record(
                            node, name, LOAD_FAILED, "no room: an eviction failed", started
                        )
                        return
                try:
                    await node.client.load_model(name, client_timeout=self._config.load_timeout_s)
                except InferenceServerException as error:
                    node.models.pop(name, None)
                    self._backoff[(node.address, name)] = (
                        time.monotonic() + self._config.failed_load_backoff_s
                    )
                    down = "StatusCode.UNAVAILABLE" == error.status()
                    if down:
                        node.failed(f"load {name}: {error.message()}", pool.health)
                    self._record(node, name, LOAD_FAILED, error.message(), started)
                    # Triton may have loaded some steps before the ensemble failed: keep
                    # those it reports ready (they take memory), forget the others. Before
                    # the refusal is known, since it fails the waiting requests: a caller
                    # told "no" then finds the node's books already true.
                    await self._settle_steps(node, name, arriving, started)
                    if not down:
                        self._refusals[(node.address, name)] = error.message()
                    return
                self._refusals.pop((node.address, name), None)
                if self._cluster is not None:
                    await self._cluster.loaded(pool.pool.name, node.address, [name, *arriving])
                now = time.monotonic()
                for model in (name, *arriving):
                    node.models[model].state = ModelState.READY
                    node.models[model].last_used = now
                self._record(node, name, LOAD, reason, started)
                for step in arriving:
                    self._record(node, step, LOAD, f"a step of ensemble {name}", started)
        finally:
            # A load that ended any other way (a client bug, cancellation at shutdown) must not
            # leave the model LOADING for ever, a state no request would ever be placed on.
            for model in (name, *arriving):
                entry = node.models.get(model)
                if entry is not None and entry.state is ModelState.LOADING:
                    node.models.pop(model, None)
                    self._backoff[(node.address, model)] = (
                        time.monotonic() + self._config.failed_load_backoff_s
                    )
            pool.pump()

    async def _mark_victims(self, pool: NodePool, node: Node, victims: list[ModelOnNode]) -> bool:
        """Scale-out: mark every victim "unloading" (atomically checked idle on every replica),
        or mark none and put them back."""
        if self._cluster is None or not victims:
            return True
        marked: list[str] = []
        try:
            for victim in victims:
                if not await self._cluster.mark_unloading(
                    pool.pool.name, node.address, victim.name
                ):
                    break
                marked.append(victim.name)
            else:
                return True
        except Exception:
            _log.exception("marking a model for unload failed", extra={"node": node.address})
        for victim in victims:
            victim.state = ModelState.READY
        with contextlib.suppress(Exception):
            await self._cluster.loaded(pool.pool.name, node.address, marked)
        return False

    async def _settle_steps(
        self, node: Node, ensemble: str, arriving: list[str], started: float
    ) -> None:
        """After a failed ensemble load: its steps Triton loaded stay, as models of their own."""
        for step in arriving:
            try:
                ready = await node.client.is_model_ready(
                    step, client_timeout=self._config.unload_timeout_s
                )
            except InferenceServerException:
                ready = False
            if ready:
                node.models[step].state = ModelState.READY
                node.models[step].last_used = time.monotonic()
                self._record(
                    node, step, LOAD, f"a step of ensemble {ensemble}, whose load failed", started
                )
            else:
                node.models.pop(step, None)

    async def _unload(self, node: Node, victim: ModelOnNode, reason: str) -> bool:
        started = time.monotonic()
        if self._settle is not None:
            await self._settle(node.address, victim.name)
        try:
            await node.client.unload_model(
                victim.name, client_timeout=self._config.unload_timeout_s
            )
        except InferenceServerException as error:
            victim.state = ModelState.READY  # still there; it may be chosen again later
            self._record(
                node, victim.name, LOAD_FAILED, f"unload failed: {error.message()}", started
            )
            return False
        node.models.pop(victim.name, None)
        self._record(node, victim.name, UNLOAD, reason, started)
        return True

    def _record(self, node: Node, model: str, action: str, reason: str, started: float) -> None:
        event = PlacementEvent(
            unix_ms=int(time.time() * 1000),
            node=node.address,
            backend_model=model,
            action=action,
            reason=reason,
            duration_ms=(time.monotonic() - started) * 1000,
        )
        self.events.append(event)
        placement_event(node.address, model, action)
        log = _log.warning if action == LOAD_FAILED else _log.info
        log(
            f"placement {action}",
            extra={
                "node": node.address,
                "model": model,
                "reason": reason,
                "duration_ms": round(event.duration_ms, 1),
            },
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _free_mb(node: Node) -> int:
    return node.memory_total_mb - node.memory_used_mb


def _needed_mb(node: Node, deployment: Deployment) -> int:
    """What loading `deployment` on `node` adds: the model, and the steps the node lacks."""
    return deployment.memory_mb + sum(
        step.memory_mb for step in deployment.steps if step.model not in node.models
    )


def _steps_changing(node: Node, deployment: Deployment) -> bool:
    """Whether a step the deployment needs is being loaded or evicted on the node: wait."""
    return any(
        node.models[step.model].state is not ModelState.READY
        for step in deployment.steps
        if step.model in node.models
    )


def _victims(node: Node, deployment: Deployment) -> list[ModelOnNode] | None:
    """The least recently used idle models to unload so that `deployment` fits; None if even
    every one of them would not make room.

    Never a model with a batch in flight (an ensemble's batch counts on its steps too), never
    a step the deployment itself needs, and never a step of an ensemble that stays loaded:
    an ensemble goes first, and its steps become candidates after it.
    """
    needed = _needed_mb(node, deployment)
    keep = {step.model for step in deployment.steps}
    free = _free_mb(node)
    chosen: list[ModelOnNode] = []
    while free < needed:
        gone = {m.name for m in chosen}
        pinned = {s for m in node.models.values() if m.name not in gone for s in m.steps}
        idle = [
            m
            for m in node.models.values()
            if m.state is ModelState.READY
            and m.inflight == 0
            and m.name not in keep
            and m.name not in pinned
            and m.name not in gone
        ]
        if not idle:
            return None
        victim = min(idle, key=lambda m: m.last_used)
        chosen.append(victim)
        free += victim.memory_mb
    return chosen
