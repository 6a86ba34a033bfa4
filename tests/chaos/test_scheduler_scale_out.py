"""Chaos, scale-out: the scheduler replica that owns a model is SIGKILLed under load.

A mesh whose schedulers form one cluster (three replicas, services/scheduler/cluster.py),
two router replicas, and the chaos suite's careful callers (tests/chaos/load.py). The owner
of the Triton model the callers use is killed; its membership expires, the model's queue
moves to the next owner by rendezvous hashing, and the routers send the model's requests
there, retrying a request the dead replica held once on the new owner. Then:

- answered, failed and answered-twice counts (0 answered twice), against the ledger
  (0 billed twice, nothing billed that was not delivered);
- the time from the kill until a request for the model, sent after the kill, is answered
  again: at most 5 s (the routers move a model off a replica they cannot reach at once; the
  membership expiry, 2 s here, bounds it otherwise);
- the killed replica, restarted, rejoins the cluster with nothing else restarted, and the
  model it owns again is served by it.

Bounded: about twelve seconds of load and one restart.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from shepherd.scheduler.v1 import scheduler_pb2

from deploy.local.launcher import LocalMesh
from libs.apikeys import issue_key_at
from tests.chaos.load import Load
from tests.chaos.report import ChaosReport, FaultRow
from tests.chaos.test_faults import billed_ids, ledger_of, settled
from tests.support.mesh import running_mesh

MODEL = "shepherd-tiny"
BEFORE_KILL_S = 2.0
AFTER_KILL_S = 6.0


@pytest.fixture(scope="module")
def cluster_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    env = {
        "SHEPHERD_SHUTDOWN_GRACE_S": "2",
        "SHEPHERD_SCHEDULER_CLUSTER": "chaos",
        "SHEPHERD_SCHEDULER_MEMBER_TTL_S": "2",
    }
    with running_mesh(tmp_path_factory, extra_env=env) as mesh:
        mesh.add_scheduler()
        mesh.add_scheduler()
        yield mesh


async def members(
    mesh: LocalMesh, address: str, count: int
) -> scheduler_pb2.GetAssignmentsResponse:
    deadline = time.monotonic() + 60
    while True:
        try:
            view = await mesh.scheduler_assignments(address)
            if len(view.members) == count:
                return view
        except grpc.aio.AioRpcError:
            pass
        assert time.monotonic() < deadline, f"the cluster never had {count} members"
        await asyncio.sleep(0.1)


@pytest.mark.timeout(180)
async def test_killing_a_models_owner_moves_it_within_5s_and_runs_nothing_twice(
    cluster_mesh: LocalMesh,
) -> None:
    mesh = cluster_mesh
    second = mesh.add_router()
    view = await members(mesh, mesh.address("scheduler"), 3)
    owner = next(a.replica_id for a in view.models if a.model == MODEL)
    owner_address = next(m.address for m in view.members if m.replica_id == owner)
    component = "scheduler" if owner_address == mesh.address("scheduler") else owner_address
    survivor = next(m.address for m in view.members if m.replica_id != owner)

    tenant = f"scale-{uuid.uuid4().hex[:6]}"
    key = await issue_key_at(mesh.redis_url, tenant)
    load = Load([mesh.address("router"), second.address], key, tag=tenant).start()
    await asyncio.sleep(BEFORE_KILL_S)
    killed = mesh.kill(component)
    await asyncio.sleep(AFTER_KILL_S)
    outcomes = await load.stop()

    local = [o for o in outcomes if o.model == "tiny"]
    served_after = [
        a.ended - killed
        for o in local
        for a in o.attempts
        if a.started >= killed and a.code == grpc.StatusCode.OK
    ]
    answered = [o for o in outcomes if o.ok]
    await settled(mesh, tenant, answered)
    usage = await ledger_of(mesh, tenant)
    ids = await billed_ids(mesh, tenant)
    row = FaultRow.of(
        "scheduler owner (scale-out)",
        outcomes,
        usage,
        ids,
        down_s=0.0,
        recovery_s=min(served_after) if served_after else None,
        last_failure_after_return_s=None,
    )
    report = ChaosReport()
    report.add(row)
    report.write(Path(".build") / "chaos-scale-out")

    assert row.answered_twice == 0
    assert row.billed_twice == 0
    assert row.lost_answers == 0
    assert row.ledger_nano == row.answered_nano
    assert served_after, f"{MODEL} was never served after its owner was killed"
    assert min(served_after) <= 5.0, f"{MODEL} was served again {min(served_after):.1f}s later"
    unanswered = [(o.request_id, o.final_code.name) for o in outcomes if not o.ok]
    assert unanswered == [], f"requests that failed for good: {unanswered[:10]}"

    # The model moved: a survivor owns it now.
    after = await members(mesh, survivor, 2)
    assert next(a.replica_id for a in after.models if a.model == MODEL) != owner

    # The killed replica restarts on its port and rejoins; nothing else was restarted.
    await asyncio.to_thread(mesh.revive, component)
    await members(mesh, survivor, 3)
