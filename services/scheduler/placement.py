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

Every load, unload and failed load is kept as a PlacementEvent for GetStats and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from tritonclient.utils import InferenceServerException

from libs.catalog import Deployment
from libs.tasks import log_failure
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

    def __init__(self, config: PlacementConfig) -> None:
        self._config = config
        self.events: deque[PlacementEvent] = deque(maxlen=config.max_events)
        self._backoff: dict[tuple[str, str], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def consider(self, pool: NodePool, deployment: Deployment, exclude: frozenset[str]) -> None:
        """Called when work for `deployment` found no free node; start a load if it helps."""
        name = deployment.backend_model
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
            and n.memory_total_mb >= deployment.memory_mb
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
        node.models[name] = ModelOnNode(name, deployment.memory_mb, ModelState.LOADING)
        reason = "first use" if not holders else "hot: every copy is busy"
        task = asyncio.get_running_loop().create_task(
            self._load(pool, node, deployment, victims, reason), name=f"load:{name}@{node.address}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(log_failure)

    @staticmethod
    def _choose(
        candidates: list[Node], deployment: Deployment, may_evict: bool
    ) -> tuple[Node, list[ModelOnNode]] | None:
        fits = [
            n for n in candidates if n.memory_total_mb - n.memory_used_mb >= deployment.memory_mb
        ]
        if fits:
            return max(fits, key=lambda n: n.memory_total_mb - n.memory_used_mb), []
        if not may_evict:
            return None
        best: tuple[float, Node, list[ModelOnNode]] | None = None
        for node in candidates:
            idle = sorted(
                (
                    m
                    for m in node.models.values()
                    if m.state is ModelState.READY and m.inflight == 0
                ),
                key=lambda m: m.last_used,
            )
            free = node.memory_total_mb - node.memory_used_mb
            victims: list[ModelOnNode] = []
            for model in idle:
                if free >= deployment.memory_mb:
                    break
                victims.append(model)
                free += model.memory_mb
            if free < deployment.memory_mb:
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
    ) -> None:
        name = deployment.backend_model
        try:
            async with node.load_lock:
                started = time.monotonic()
                for victim in victims:
                    if not await self._unload(node, victim, f"evicted (LRU, idle) to load {name}"):
                        node.models.pop(name, None)
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
                    self._record(node, name, LOAD_FAILED, error.message(), started)
                    if "StatusCode.UNAVAILABLE" == error.status():
                        node.failed(f"load {name}: {error.message()}", pool.health)
                    return
                node.models[name].state = ModelState.READY
                node.models[name].last_used = time.monotonic()
                self._record(node, name, LOAD, reason, started)
        finally:
            # A load that ended any other way (a client bug, cancellation at shutdown) must not
            # leave the model LOADING for ever, a state no request would ever be placed on.
            entry = node.models.get(name)
            if entry is not None and entry.state is ModelState.LOADING:
                node.models.pop(name, None)
                self._backoff[(node.address, name)] = (
                    time.monotonic() + self._config.failed_load_backoff_s
                )
            pool.pump()

    async def _unload(self, node: Node, victim: ModelOnNode, reason: str) -> bool:
        started = time.monotonic()
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
