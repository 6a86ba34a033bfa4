"""Health that tells the truth: liveness of the process, readiness of the service.

Every service serves the standard grpc.health.v1 service with these names:

* `liveness`: SERVING while the process runs its event loop (the health service answers from
  that loop, so a wedged loop fails the probe by timing out). It never follows dependencies:
  restarting a process because Redis is down would not bring Redis back. Kubernetes'
  livenessProbe and startupProbe ask this name.
* `""` and each served service's full name (`shepherd.cache.v1.CacheService`, ...): readiness,
  SERVING only while the service's hard dependencies answer (Redis for the router, cache and
  billing; a usable backend for the scheduler, see services/scheduler/readiness.py), and
  NOT_SERVING from the moment the service starts shutting down. Kubernetes' readinessProbe
  and the local launcher ask `""`.
* names a probe adds (the scheduler's `shepherd.scheduler.v1.SchedulerService/<model>`):
  readiness of one part, for operators and dashboards.

Readiness is checked once before the server accepts calls and then about once a second
(`interval_s`), so a dependency that comes back shows as SERVING within about a second. A
probe that raises or does not answer within the interval counts as not ready. Changes are
logged once, with the reason, not on every check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as redis
from grpc_health.v1 import health, health_pb2

from libs.tasks import supervise

_log = logging.getLogger(__name__)

LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Verdict:
    """One probe's answer: ready or not (and why), plus any health names of its own."""

    ready: bool
    reason: str = ""
    names: Mapping[str, bool] = field(default_factory=dict)


class Probe(Protocol):
    """A hard dependency of a service, checked about once a second."""

    name: str

    async def check(self) -> Verdict: ...

    async def close(self) -> None: ...


class RedisProbe:
    """PING on a connection of its own, with a short timeout.

    Its own connection, not the service's pool: a pool busy with a burst of requests is not
    Redis being down, and must not take the replica out of rotation.
    """

    name = "redis"

    def __init__(self, client: redis.Redis) -> None:
        self._client = client  # libs/server.py redis_probe(): one connection, short timeouts

    async def check(self) -> Verdict:
        try:
            await self._client.ping()
        except (redis.RedisError, OSError) as error:
            return Verdict(False, f"redis: {type(error).__name__}: {error}")
        return Verdict(True)

    async def close(self) -> None:
        await self._client.aclose()


class Health:
    """The health service of one server, and the loop that keeps its readiness current."""

    def __init__(
        self,
        readiness_names: Sequence[str],
        probes: Sequence[Probe] = (),
        interval_s: float = READINESS_INTERVAL_S,
    ) -> None:
        self.servicer = health.aio.HealthServicer()
        self._names = ["", *readiness_names]
        self._probes = list(probes)
        self._interval_s = interval_s
        self._status: dict[str, bool] = {}
        self._task: asyncio.Task[None] | None = None
        self._shutting_down = False

    async def start(self) -> None:
        """Check readiness once (before the server takes calls), then keep checking."""
        await self.servicer.set(LIVENESS, SERVING)
        await self.refresh()
        self._task = supervise("health", self._loop)

    async def refresh(self) -> bool:
        """Run every probe now and publish the result; returns the service's readiness."""
        verdicts = await asyncio.gather(*(self._check(probe) for probe in self._probes))
        ready = all(v.ready for v in verdicts)
        statuses = {name: ready for name in self._names}
        for verdict in verdicts:
            statuses.update(verdict.names)
        if self._shutting_down:
            return False  # shutting_down() has already published NOT_SERVING everywhere
        if ready != self._status.get(""):
            if ready:
                _log.info("ready")
            else:
                reasons = [v.reason for v in verdicts if not v.ready]
                _log.warning("not ready", extra={"reasons": reasons})
        for name, serving in statuses.items():
            if self._status.get(name) != serving:
                if name not in self._names:
                    _log.info("readiness changed", extra={"health_name": name, "serving": serving})
                self._status[name] = serving
                await self.servicer.set(name, SERVING if serving else NOT_SERVING)
        return ready

    async def shutting_down(self) -> None:
        """Readiness is NOT_SERVING for good (traffic goes elsewhere); liveness stays SERVING."""
        self._shutting_down = True
        await self._stop_loop()
        for name in self._status:
            await self.servicer.set(name, NOT_SERVING)

    async def close(self) -> None:
        await self._stop_loop()
        for probe in self._probes:
            try:
                await probe.close()
            except Exception:
                _log.exception("closing a readiness probe failed", extra={"probe": probe.name})

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.refresh()

    async def _stop_loop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _check(self, probe: Probe) -> Verdict:
        try:
            return await asyncio.wait_for(probe.check(), self._interval_s)
        except TimeoutError:
            return Verdict(False, f"{probe.name}: no answer within {self._interval_s:g}s")
        except Exception as error:
            _log.exception("readiness probe failed", extra={"probe": probe.name})
            return Verdict(False, f"{probe.name}: {type(error).__name__}: {error}")
