"""Several scheduler processes in one scale-out cluster, and a router's view of them.

`SchedulerCluster` starts replicas of `python -m services.scheduler` sharing a catalog, a
Valkey and a cluster name (unique per test, so tests sharing a Valkey never see each other's
members), and stops them. `Routing` is the router's own scheduler directory
(services/router/schedulers.py) in the test's process: requests go to the owner of their
model exactly as the router sends them.

`overlap_model` writes a tiny_lm copy whose every execution records, in a file shared by all
its instances and all models that name the same file, how many executions run at once on the
node, and the most ever seen: what Triton really had in flight, measured inside Triton.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from shepherd.scheduler.v1 import scheduler_pb2

from libs.server import open_redis
from services.router.schedulers import SchedulerDirectory
from tests.support.scheduler import (
    TEST_CREDENTIALS,
    TINY_LM,
    SchedulerProcess,
    internal_channel,
    stub,
)

# Short enough that a killed replica's models move quickly in a test, long enough that a
# busy machine does not drop a live replica.
MEMBER_TTL_S = "2.0"


class SchedulerCluster:
    """`replicas` scheduler processes in one cluster; stopped on close."""

    def __init__(
        self,
        run_dir: Path,
        catalog_data: Mapping[str, Any],
        redis_url: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._run_dir = run_dir
        self._catalog = catalog_data
        self.redis_url = redis_url
        self.name = f"test-{uuid.uuid4().hex[:8]}"
        self._env = {
            "REDIS_URL": redis_url,
            "SHEPHERD_SCHEDULER_CLUSTER": self.name,
            "SHEPHERD_SCHEDULER_MEMBER_TTL_S": MEMBER_TTL_S,
            **(env or {}),
        }
        self.replicas: list[SchedulerProcess] = []

    def add(self, count: int = 1) -> list[SchedulerProcess]:
        """Start `count` more replicas, ids replica-<n> in order."""
        first = len(self.replicas)
        made = [
            SchedulerProcess(
                self._run_dir / f"scheduler-{n}",
                self._catalog,
                {**self._env, "SHEPHERD_SCHEDULER_REPLICA_ID": f"replica-{n}"},
            )
            for n in range(first, first + count)
        ]
        self.replicas.extend(made)  # stopped by stop() even if one fails to start
        # One after another, from this thread: a process is spawned to die with the thread
        # that spawned it (deploy/local/processes.py), so a worker thread must not start one.
        for process in made:
            process.start()
        return made

    def by_id(self, replica_id: str) -> SchedulerProcess:
        return self.replicas[int(replica_id.rsplit("-", 1)[1])]

    def stop(self) -> None:
        for process in self.replicas:
            process.stop()


async def assignments(address: str) -> scheduler_pb2.GetAssignmentsResponse:
    async with internal_channel(address) as channel:
        return await stub(channel).GetAssignments(scheduler_pb2.GetAssignmentsRequest(), timeout=5)


async def stats(address: str) -> scheduler_pb2.GetStatsResponse:
    async with internal_channel(address) as channel:
        return await stub(channel).GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)


async def wait_for_members(
    address: str, count: int, timeout_s: float = 30.0, leaders: Sequence[str] = ()
) -> scheduler_pb2.GetAssignmentsResponse:
    """Poll a replica until it sees `count` members (and a leader on each of `leaders`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        view = await assignments(address)
        led = {p.pool for p in view.pools if p.replica_id}
        if len(view.members) == count and set(leaders) <= led:
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"the cluster never reached {count} members: {view}")
        await asyncio.sleep(0.1)


class Routing:
    """The router's scheduler directory, in the test process, over the cluster's members."""

    def __init__(self, cluster: SchedulerCluster) -> None:
        self._client: redis.Redis = open_redis(cluster.redis_url, 2.0)
        self.directory = SchedulerDirectory(
            cluster.replicas[0].address, TEST_CREDENTIALS, self._client, cluster.name
        )

    async def __aenter__(self) -> SchedulerDirectory:
        await self.directory.start()
        return self.directory

    async def __aexit__(self, *exc: object) -> None:
        await self.directory.close()
        await self._client.aclose()


_OVERLAP_MODEL = '''"""tiny_lm, counting the executions that run at once (tests/support)."""

import fcntl
import importlib.util
import json
import os
import sys

_spec = importlib.util.spec_from_file_location("tiny_lm_base", {base!r})
_base = importlib.util.module_from_spec(_spec)
sys.modules["tiny_lm_base"] = _base  # its dataclasses look their module up
_spec.loader.exec_module(_base)


class TritonPythonModel(_base.TritonPythonModel):
    def initialize(self, args):
        super().initialize(args)
        parameters = json.loads(args["model_config"]).get("parameters", {{}})
        self._overlap_file = parameters["overlap_file"]["string_value"]

    def _bump(self, step):
        with open(self._overlap_file, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            now, most = (int(x) for x in (f.read().split() or ["0", "0"]))
            now += step
            most = max(most, now)
            f.seek(0)
            f.truncate()
            f.write(f"{{now}} {{most}}")
            f.flush()
            os.fsync(f.fileno())

    def execute(self, requests):
        self._bump(1)
        try:
            return super().execute(requests)
        finally:
            self._bump(-1)
'''


def overlap_model(root: Path, name: str, overlap_file: Path, step_delay_ms: int = 5) -> None:
    """A tiny_lm copy that records concurrent executions in `overlap_file` ("now most")."""
    config = (TINY_LM / "config.pbtxt").read_text().replace('name: "tiny_lm"', "")
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.py").write_text(
        _OVERLAP_MODEL.format(base=str((TINY_LM / "1" / "model.py").resolve()))
    )
    parameters = {
        "ignore_eos": "true",
        "step_delay_ms": str(step_delay_ms),
        "overlap_file": str(overlap_file),
    }
    extra = "".join(
        f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
        for key, value in parameters.items()
    )
    (root / name / "config.pbtxt").write_text(f'name: "{name}"\n{config}\n{extra}')


def most_overlap(overlap_file: Path) -> int:
    """The most executions that ever ran at once on the node, as the model recorded it."""
    if not overlap_file.exists():
        return 0
    parts = overlap_file.read_text().split()
    return int(parts[1]) if len(parts) == 2 else 0
