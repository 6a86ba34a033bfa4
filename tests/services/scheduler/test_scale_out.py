"""Scale-out: two or three scheduler replicas, one view of queues, node capacity and placement.

Real Triton nodes, a real Valkey (tests/conftest.py), real scheduler processes in one cluster
(tests/support/scale_out.py), and requests sent as the router sends them: to the owner of
their model, read from the members in Redis (services/router/schedulers.py). What is
checked is what a user or an operator would see: every answer, Triton's own repository index,
Triton's own count of executions running at once, GetStats and GetAssignments.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from shepherd.scheduler.v1 import scheduler_pb2

from deploy.local.triton import TritonNode
from deploy.local.valkey import ValkeyServer
from libs.config import ServerConfig
from services.router.schedulers import SchedulerDirectory
from services.scheduler.cluster import ClusterConfig
from services.scheduler.config import cluster_config
from tests.support.scale_out import (
    Routing,
    SchedulerCluster,
    most_overlap,
    overlap_model,
    stats,
    wait_for_members,
)
from tests.support.scheduler import (
    TINY_LM,
    catalog,
    copy_model,
    infer_request,
    loaded_on,
    model_repository,
    start_node,
)

LOAD = scheduler_pb2.PLACEMENT_ACTION_LOAD
UNLOAD = scheduler_pb2.PLACEMENT_ACTION_UNLOAD


async def infer(
    directory: SchedulerDirectory, model: str, request_id: str, max_tokens: int = 4
) -> scheduler_pb2.InferResponse:
    """One request to its model's owner, retried once as the router does."""
    for attempt in range(2):
        replica, scheduler, metadata = directory.route(model)
        try:
            return await scheduler.Infer(
                infer_request(model, request_id=request_id, max_tokens=max_tokens),
                timeout=60,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as error:
            if attempt or not directory.retryable(replica, error):
                raise
            await directory.refresh()
    raise AssertionError("unreachable")


@pytest.fixture
def cluster(tmp_path: Path, valkey: ValkeyServer) -> Iterator[list[SchedulerCluster]]:
    """Clusters a test starts; every replica is stopped afterwards."""
    made: list[SchedulerCluster] = []
    yield made
    for each in made:
        each.stop()


@pytest.fixture
def swap_node(tmp_path: Path) -> Iterator[TritonNode]:
    """One node with room for one of two 600 MB models (it declares 1000 MB)."""
    repository = model_repository(tmp_path / "repo", ["tiny_a", "tiny_b"])
    started = start_node(tmp_path / "node", repository)  # nothing loaded
    yield started
    started.stop()


def swap_catalog(node: TritonNode) -> dict[str, object]:
    return catalog(
        [node.config.grpc_url],
        {
            "alpha": {"model": "tiny_a", "memory_mb": 600},
            "beta": {"model": "tiny_b", "memory_mb": 600},
        },
        pool={"gpu_memory_mb": 1000, "max_inflight_batches": 2},
    )


@pytest.mark.timeout(180)
async def test_two_replicas_swap_two_models_on_one_node_and_no_batch_loses_its_model(
    tmp_path: Path,
    valkey: ValkeyServer,
    swap_node: TritonNode,
    cluster: list[SchedulerCluster],
) -> None:
    """Sustained load on two models that do not both fit, through two replicas.

    Twelve seconds is enough: every swap (an unload and a load of a Python-backend model) takes
    about a second here, and each caller alternates the models, so the node swaps several times
    while batches of the other model are in flight on the other replica; a model unloaded
    under a batch fails that batch at once, and any such failure fails the test.
    """
    scale = SchedulerCluster(tmp_path, swap_catalog(swap_node), valkey.config.url)
    cluster.append(scale)
    scale.add(2)
    view = await wait_for_members(scale.replicas[0].address, 2, leaders=["gpu"])
    leader = next(p.replica_id for p in view.pools if p.pool == "gpu")
    owners = {a.model: a.replica_id for a in view.models}
    assert owners["alpha"] != owners["beta"], "each replica owns one model's queue"

    answered: list[str] = []
    failures: list[str] = []
    stop_at = time.monotonic() + 12.0

    async def caller(n: int, directory: SchedulerDirectory) -> None:
        i = 0
        while time.monotonic() < stop_at:
            model = ("alpha", "beta")[(n + i) % 2]
            i += 1
            try:
                reply = await infer(directory, model, f"c{n}-{i}")
                answered.append(reply.completion.placement.backend_model)
            except grpc.aio.AioRpcError as error:
                failures.append(f"{model}: {error.code().name} {error.details()}")

    async with Routing(scale) as directory:
        await asyncio.gather(*(caller(n, directory) for n in range(4)))

    assert failures == [], f"{len(failures)} requests failed: {failures[:5]}"
    assert {"tiny_a", "tiny_b"} <= set(answered)
    per_replica = {}
    for replica in scale.replicas:
        snapshot = await stats(replica.address)
        per_replica[snapshot.replica_id] = [
            (e.backend_model, e.action) for e in snapshot.placement_events
        ]
    placed = {replica: events for replica, events in per_replica.items() if events}
    assert list(placed) == [leader], f"placement events came from {sorted(placed)}, not one leader"
    loads = [e for e in placed[leader] if e[1] == LOAD]
    assert len(loads) >= 3, f"the models should have swapped several times: {placed[leader]}"


@pytest.mark.timeout(180)
async def test_a_killed_placement_leader_is_replaced_and_its_models_are_adopted(
    tmp_path: Path,
    valkey: ValkeyServer,
    swap_node: TritonNode,
    cluster: list[SchedulerCluster],
) -> None:
    scale = SchedulerCluster(tmp_path, swap_catalog(swap_node), valkey.config.url)
    cluster.append(scale)
    scale.add(2)
    view = await wait_for_members(scale.replicas[0].address, 2, leaders=["gpu"])
    leader = next(p.replica_id for p in view.pools if p.pool == "gpu")
    async with Routing(scale) as directory:
        await infer(directory, "alpha", "first")
        assert loaded_on(swap_node) == {"tiny_a"}

        process = scale.by_id(leader).process
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        survivor = next(r for r in scale.replicas if r is not scale.by_id(leader))
        deadline = time.monotonic() + 20
        while True:
            view = await wait_for_members(survivor.address, 1)
            if [p.replica_id for p in view.pools] == [view.replica_id]:
                break
            assert time.monotonic() < deadline, f"no replica took the lease over: {view}"
            await asyncio.sleep(0.1)

        # The new leader adopted tiny_a: served again with no load, nothing unloaded.
        await directory.refresh()
        reply = await infer(directory, "alpha", "after")
        assert reply.completion.placement.backend_model == "tiny_a"
        assert loaded_on(swap_node) == {"tiny_a"}
        events = (await stats(survivor.address)).placement_events
        assert [(e.backend_model, e.action) for e in events] == []

        # And it now places: beta takes alpha's room.
        reply = await infer(directory, "beta", "beta")
        assert reply.completion.placement.backend_model == "tiny_b"
        assert loaded_on(swap_node) == {"tiny_b"}
        events = (await stats(survivor.address)).placement_events
        assert [(e.backend_model, e.action) for e in events] == [
            ("tiny_a", UNLOAD),
            ("tiny_b", LOAD),
        ]


@pytest.mark.timeout(180)
async def test_a_node_cap_holds_across_three_replicas_and_batches_are_as_large_as_with_one(
    tmp_path: Path, valkey: ValkeyServer, cluster: list[SchedulerCluster]
) -> None:
    """Cap 2 on one node, three replicas each owning some of six models, callers on all six:
    Triton (the models themselves) never runs more than 2 executions at once. Then the
    same offered load on one model, with three replicas and with one: the mean batch size is
    within 10 %, because the model's queue is on its owner either way."""
    overlap_file = tmp_path / "overlap"
    names = [f"m{i}" for i in range(6)]
    repository = tmp_path / "repo"
    repository.mkdir()
    for name in names:
        overlap_model(repository, name, overlap_file)
    copy_model(repository, "batchy", TINY_LM, {"ignore_eos": "true", "step_delay_ms": "2"})
    node = start_node(tmp_path / "node", repository, load=[*names, "batchy"])
    try:
        batching = {"max_batch_size": 8, "max_queue_delay_ms": 20}
        data = catalog(
            [node.config.grpc_url],
            {
                **{name: {"model": name, "batching": batching} for name in names},
                "batchy": {"model": "batchy", "batching": batching},
            },
            pool={"gpu_memory_mb": 8192, "max_inflight_batches": 2},
        )
        scale = SchedulerCluster(tmp_path, data, valkey.config.url)
        cluster.append(scale)
        scale.add(3)
        view = await wait_for_members(scale.replicas[0].address, 3)
        assert len({a.replica_id for a in view.models if a.model in names}) >= 2, view

        async with Routing(scale) as directory:
            await closed_loop(directory, names, 4, "cap")
            assert most_overlap(overlap_file) >= 2, "the load never filled the node"
            assert most_overlap(overlap_file) <= 2, (
                f"Triton ran {most_overlap(overlap_file)} executions at once; the cap is 2"
            )
            three = await batch_mean(scale, directory, "three")

        # One replica: the other two leave; the same load again.
        for replica in scale.replicas[1:]:
            replica.stop()
        await wait_for_members(scale.replicas[0].address, 1)
        async with Routing(scale) as directory:
            one = await batch_mean(scale, directory, "one")
        assert abs(three - one) <= 0.1 * one, f"mean batch size {three:.2f} (3) vs {one:.2f} (1)"
    finally:
        node.stop()


async def closed_loop(
    directory: SchedulerDirectory,
    models: list[str],
    per_caller: int,
    tag: str,
    callers: int = 24,
) -> None:
    """`callers` callers, each sending `per_caller` requests one after another, over `models`."""

    async def caller(n: int) -> None:
        for i in range(per_caller):
            await infer(directory, models[(n + i) % len(models)], f"{tag}-{n}-{i}", 8)

    await asyncio.gather(*(caller(n) for n in range(callers)))


async def batch_mean(scale: SchedulerCluster, directory: SchedulerDirectory, tag: str) -> float:
    """Mean batch size of `batchy` under 48 closed-loop callers (6 requests each), from the
    replicas' GetStats. With a max batch size of 8 and 2 batches in flight, 48 callers keep
    at least 32 requests waiting, so every batch but the first (a lone request meets an idle
    model) and the last few is full however slow this machine is: the mean measures where the
    model's queue is (one owner, or split), not the machine's speed. (24 callers left the queue
    short of 8 now and then, by timing alone, and the means of two runs 10 % apart.)"""

    async def counts() -> tuple[int, int]:
        rows = batches = 0
        for replica in scale.replicas:
            if replica.process is None:
                continue
            for model in (await stats(replica.address)).models:
                if model.model == "batchy":
                    rows += sum(b.size * b.count for b in model.batch_sizes)
                    batches += model.batches
        return rows, batches

    rows0, batches0 = await counts()
    await closed_loop(directory, ["batchy"], 6, tag, callers=48)
    rows1, batches1 = await counts()
    return (rows1 - rows0) / max(1, batches1 - batches0)


def test_scale_out_is_off_unless_a_cluster_is_named_and_advertises_a_dialable_address() -> None:
    """`make run` and every single-replica test: no cluster, so no Redis in the scheduler."""

    def cluster(env: dict[str, str]) -> ClusterConfig:
        return cluster_config(ServerConfig.from_env("scheduler", env), env)

    assert not cluster({}).enabled
    on = cluster({"SHEPHERD_SCHEDULER_CLUSTER": "prod", "SHEPHERD_SCHEDULER_PORT": "50999"})
    assert on.enabled and on.name == "prod"
    assert on.advertise == "127.0.0.1:50999"
    assert on.heartbeat_s < on.member_ttl_s / 3, "a live replica survives lost heartbeats"
    wildcard = cluster({"SHEPHERD_SCHEDULER_CLUSTER": "prod", "SHEPHERD_HOST": "0.0.0.0"})
    assert not wildcard.advertise.startswith("0.0.0.0"), "peers cannot dial a wildcard"
    ids = {cluster({"SHEPHERD_SCHEDULER_CLUSTER": "prod"}).replica_id for _ in range(2)}
    assert len(ids) == 2, "a restarted process is a new member"
