"""The scheduler against real Triton nodes: priorities, deadlines, cancellation, admission,
spill-over with data sovereignty, node failure, statistics and metrics.

Each test starts its own scheduler process with a catalog written for it; the Triton nodes
(tiny_lm copies that decode exactly max_tokens, so a request's cost is known) are shared by
the module, except where a test kills one. Contention is made with a "blocker": a long request
occupying the only batch slot while the requests under test queue behind it.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as triton_sync
from google.rpc import error_details_pb2, status_pb2
from shepherd.common.v1 import common_pb2
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from deploy.local.provider_sim import SimProcess
from deploy.local.triton import TritonNode
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.scheduler import (
    SchedulerProcess,
    catalog,
    infer_request,
    internal_channel,
    model_repository,
    start_node,
)

HIGH, NORMAL, LOW = common_pb2.PRIORITY_HIGH, common_pb2.PRIORITY_NORMAL, common_pb2.PRIORITY_LOW
BLOCKER_TOKENS = 256  # the most tiny_lm decodes: ~20x a 4-token request
HURRY_S = 0.6  # a deadline far shorter than a long queue, long enough for a hosted call


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_repository(tmp_path_factory.mktemp("repo"), ["tiny_a", "tiny_b"])


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, repository: Path) -> Iterator[TritonNode]:
    started = start_node(tmp_path_factory.mktemp("node"), repository, load=["tiny_a", "tiny_b"])
    yield started
    started.stop()


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    process = SimProcess(
        api_key="sim-test-key", log_path=tmp_path_factory.mktemp("sim") / "sim.log"
    ).start()
    yield process
    process.stop()


Launch = Callable[..., SchedulerProcess]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start schedulers for one test; every one is stopped when the test ends."""
    started: list[SchedulerProcess] = []

    def start(catalog_data: dict[str, Any], env: dict[str, str] | None = None) -> SchedulerProcess:
        process = SchedulerProcess(tmp_path / f"scheduler{len(started)}", catalog_data, env)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


@pytest.fixture
async def channel_to() -> AsyncIterator[Callable[[SchedulerProcess], Any]]:
    channels: list[grpc.aio.Channel] = []

    def open_stub(process: SchedulerProcess) -> scheduler_pb2_grpc.SchedulerServiceStub:
        channel = internal_channel(process.address)
        channels.append(channel)
        return scheduler_pb2_grpc.SchedulerServiceStub(channel)

    yield open_stub
    for channel in channels:
        await channel.close()


def retry_delay_s(error: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay the server attached to an error (fails if there is none)."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    raise AssertionError(f"no RetryInfo on {error.code()}: {error.details()}")


def successes(node: TritonNode, model: str) -> int:
    """How many inferences Triton itself counts for a model: what really ran."""
    client = triton_sync.InferenceServerClient(node.config.grpc_url)
    try:
        if not client.is_model_ready(model):
            return 0  # unloaded: a load starts counting afresh
        stats = client.get_inference_statistics(model_name=model, as_json=True)
    finally:
        client.close()
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


def unload(node: TritonNode, model: str) -> None:
    """Make `model` absent from the node, so the next scheduler must load it on first use.

    A load takes over a second here, so requests that arrive meanwhile all queue: a long,
    dependable window in which to observe ordering, deadlines and cancellation.
    """
    client = triton_sync.InferenceServerClient(node.config.grpc_url)
    try:
        client.unload_model(model)
        deadline = time.monotonic() + 30
        while client.is_model_ready(model):
            assert time.monotonic() < deadline, f"{model} never unloaded"
            time.sleep(0.05)
    finally:
        client.close()


async def stats_of(stub: Any, model: str) -> scheduler_pb2.ModelStats:
    response = await stub.GetStats(scheduler_pb2.GetStatsRequest(model=model), timeout=5)
    return response.models[0]


async def until(predicate: Callable[[], Any], timeout_s: float = 10.0) -> None:
    """Poll an async predicate until it holds (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def start_blocker(stub: Any, model: str) -> asyncio.Future[Any]:
    """A long request that holds the only batch slot; returns once it is running."""
    batches_before = (await stats_of(stub, model)).batches
    task = asyncio.ensure_future(
        stub.Infer(
            infer_request(model, request_id="blocker", max_tokens=BLOCKER_TOKENS), timeout=30
        )
    )

    async def running() -> bool:
        stats = await stats_of(stub, model)
        return stats.batches > batches_before and stats.queue_depth == 0

    await until(running)
    return task


def one_node_catalog(node: TritonNode, **models: dict[str, Any]) -> dict[str, Any]:
    return catalog([node.config.grpc_url], models)


async def test_higher_priority_requests_run_first(
    node: TritonNode, launch: Launch, channel_to: Callable[..., Any]
) -> None:
    unload(node, "tiny_a")
    scheduler = launch(one_node_catalog(node, chat={"model": "tiny_a"}))
    stub = channel_to(scheduler)
    finished: list[str] = []

    async def call(name: str, priority: int, timeout_s: float) -> None:
        await stub.Infer(
            infer_request("chat", request_id=name, max_tokens=4, priority=priority),
            timeout=timeout_s,
        )
        finished.append(name)

    calls = []
    for index, (name, priority) in enumerate(
        (
            ("low-1", LOW),
            ("low-2", LOW),
            ("normal-1", NORMAL),
            ("normal-2", NORMAL),
            ("high-1", HIGH),
            ("high-2", HIGH),
        )
    ):
        # Within a class the earliest deadline goes first: each later request gets a later
        # one by a full second, so a busy machine's jitter in sending cannot reorder them.
        calls.append(asyncio.create_task(call(name, priority, 30.0 + index)))
        await asyncio.sleep(0.005)
    # All six wait while the model loads on first use; then one runs at a time.
    await until(lambda: _depth_is(stub, "chat", 6))
    assert finished == []
    await asyncio.gather(*calls)
    assert finished == ["high-1", "high-2", "normal-1", "normal-2", "low-1", "low-2"]
    events = (await stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)).placement_events
    assert [(e.backend_model, e.action) for e in events] == [
        ("tiny_a", scheduler_pb2.PLACEMENT_ACTION_LOAD)
    ]


async def _depth_is(stub: Any, model: str, depth: int) -> bool:
    return (await stats_of(stub, model)).queue_depth == depth


async def _depth_at_least(stub: Any, model: str, depth: int) -> bool:
    return (await stats_of(stub, model)).queue_depth >= depth


async def test_the_catalog_priority_ranks_models_competing_for_a_node(
    node: TritonNode, launch: Launch, channel_to: Callable[..., Any]
) -> None:
    scheduler = launch(
        one_node_catalog(
            node,
            premium={"model": "tiny_a", "priority": 1},
            bulk={"model": "tiny_b", "priority": 9},
        )
    )
    stub = channel_to(scheduler)
    blocker = await start_blocker(stub, "bulk")
    finished: list[str] = []

    async def call(model: str, name: str) -> None:
        await stub.Infer(infer_request(model, request_id=name, max_tokens=4), timeout=30)
        finished.append(name)

    calls = [asyncio.create_task(call("bulk", f"bulk-{i}")) for i in range(2)]
    calls += [asyncio.create_task(call("premium", f"premium-{i}")) for i in range(2)]
    await until(lambda: _depth_is(stub, "premium", 2))
    assert not blocker.done(), "all four must queue behind the blocker"
    await asyncio.gather(blocker, *calls)
    assert sorted(finished[:2]) == ["premium-0", "premium-1"], finished


async def test_a_request_whose_deadline_passes_in_the_queue_never_reaches_triton(
    node: TritonNode, launch: Launch, channel_to: Callable[..., Any]
) -> None:
    unload(node, "tiny_a")
    scheduler = launch(one_node_catalog(node, chat={"model": "tiny_a"}))
    stub = channel_to(scheduler)
    before = successes(node, "tiny_a")
    short = [
        stub.Infer(infer_request("chat", request_id=f"short-{i}", max_tokens=4), timeout=0.2)
        for i in range(3)
    ]
    outcomes = await asyncio.gather(*short, return_exceptions=True)
    assert [o.code() for o in outcomes] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
    # Once the model is loaded, a request with time to spare runs; the expired ones never do.
    reply = await stub.Infer(infer_request("chat", request_id="later", max_tokens=4), timeout=30)
    assert reply.completion.text
    await asyncio.sleep(0.3)  # long enough for a wrongly dispatched request to be counted
    assert successes(node, "tiny_a") - before == 1, "only the request with time left may run"
    stats = await stats_of(stub, "chat")
    assert stats.expired == 3 and stats.completed == 1


async def test_a_cancelled_request_leaves_the_queue_and_its_place_is_reused(
    node: TritonNode, launch: Launch, channel_to: Callable[..., Any]
) -> None:
    unload(node, "tiny_a")
    scheduler = launch(one_node_catalog(node, chat={"model": "tiny_a", "queue": {"max_size": 2}}))
    stub = channel_to(scheduler)
    before = successes(node, "tiny_a")
    doomed = [
        stub.Infer(infer_request("chat", request_id=f"doomed-{i}", max_tokens=4), timeout=30)
        for i in range(2)
    ]
    await until(lambda: _depth_is(stub, "chat", 2))
    for call in doomed:
        call.cancel()
    await until(lambda: _depth_is(stub, "chat", 0))
    # The queue holds two; after the cancellations two newcomers fit and both run.
    replies = await asyncio.gather(
        *(
            stub.Infer(infer_request("chat", request_id=f"next-{i}", max_tokens=4), timeout=30)
            for i in range(2)
        )
    )
    assert all(reply.completion.text for reply in replies)
    assert successes(node, "tiny_a") - before == 2, "the cancelled requests must never run"
    assert (await stats_of(stub, "chat")).cancelled == 2


async def test_a_full_queue_refuses_at_once_with_retry_info_and_sheds_lower_priority_first(
    node: TritonNode, launch: Launch, channel_to: Callable[..., Any]
) -> None:
    unload(node, "tiny_a")
    scheduler = launch(one_node_catalog(node, chat={"model": "tiny_a", "queue": {"max_size": 2}}))
    stub = channel_to(scheduler)
    low = []
    for i in range(2):  # one after the other, so low-1 is the newest
        low.append(
            asyncio.ensure_future(
                stub.Infer(
                    infer_request("chat", request_id=f"low-{i}", max_tokens=4, priority=LOW),
                    timeout=30,
                )
            )
        )
        await until(lambda i=i: _depth_is(stub, "chat", i + 1))

    # Another LOW request finds nothing lower to shed: refused while the blocker still runs.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Infer(
            infer_request("chat", request_id="low-extra", max_tokens=4, priority=LOW), timeout=30
        )
    assert not any(call.done() for call in low), "the refusal must not wait for capacity"
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue of model chat is full" in refused.value.details()
    assert retry_delay_s(refused.value) > 0

    # A HIGH request displaces the newest LOW one, which is told so with a retry delay.
    high = asyncio.ensure_future(
        stub.Infer(
            infer_request("chat", request_id="high", max_tokens=4, priority=HIGH), timeout=30
        )
    )
    outcomes = await asyncio.gather(high, *low, return_exceptions=True)
    assert isinstance(outcomes[0], scheduler_pb2.InferResponse)
    assert isinstance(outcomes[1], scheduler_pb2.InferResponse), "the oldest LOW one stays"
    shed = outcomes[2]
    assert isinstance(shed, grpc.aio.AioRpcError)
    assert shed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "shed" in shed.details() and retry_delay_s(shed) > 0
    stats = await stats_of(stub, "chat")
    assert (stats.rejected, stats.shed) == (1, 1)


async def test_spill_over_to_the_hosted_api_unless_data_must_stay_self_hosted(
    node: TritonNode, sim: SimProcess, launch: Launch, channel_to: Callable[..., Any]
) -> None:
    scheduler = launch(
        catalog(
            [node.config.grpc_url],
            {"chat": {"model": "tiny_a", "hosted": "deepseek-v3.2"}},
            provider_url=sim.base_url,
            tenants={"clinic": {"self_hosted_only": True}},
        ),
        env={"SHEPHERD_HOSTED_API_KEY": sim.api_key},
    )
    stub = channel_to(scheduler)
    # One timed batch teaches the scheduler how long a long request takes on the GPU.
    warm = await stub.Infer(
        infer_request("chat", request_id="warm", max_tokens=BLOCKER_TOKENS), timeout=30
    )
    assert warm.completion.placement.kind == common_pb2.BACKEND_KIND_TRITON
    blocker = await start_blocker(stub, "chat")
    # A long queue: one 256-token batch runs in only ~30 ms on an idle machine, so the queue
    # must hold far more than the deadline below, whenever the blocker happens to end (on a
    # busy machine the client may still be sending when it does). The deadline itself must
    # leave the hosted call time to answer on a busy machine: 0.6 s against ~1.4 s of queue
    # (more on a busy machine, where every batch takes longer too).
    queued = [
        asyncio.ensure_future(
            stub.Infer(
                infer_request("chat", request_id=f"queued-{i}", max_tokens=BLOCKER_TOKENS),
                timeout=30,
            )
        )
        for i in range(48)
    ]
    await until(lambda: _depth_at_least(stub, "chat", 30))

    # The GPU queue needs far longer than this request's 0.6 s: it runs on the hosted API.
    spilled = await stub.Infer(infer_request("chat", request_id="hurry"), timeout=HURRY_S)
    placement = spilled.completion.placement
    assert placement.kind == common_pb2.BACKEND_KIND_HOSTED
    assert placement.spilled_over and placement.backend_model == "deepseek-v3.2"

    # The same request may not leave self-hosted nodes: refused, not spilled.
    for request in (
        infer_request("chat", request_id="private", self_hosted_only=True),
        infer_request("chat", request_id="clinic", tenant="clinic"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Infer(request, timeout=HURRY_S)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "exceeds" in refused.value.details()
        assert retry_delay_s(refused.value) > 0

    # With a deadline the GPU can meet, the request waits for the GPU.
    patient = await stub.Infer(infer_request("chat", request_id="patient"), timeout=30)
    assert patient.completion.placement.kind == common_pb2.BACKEND_KIND_TRITON
    assert not patient.completion.placement.spilled_over
    await asyncio.gather(blocker, *queued)
    stats = await stats_of(stub, "chat")
    assert stats.spilled_over == 1 and stats.rejected == 2


async def test_a_self_hosted_only_request_for_a_hosted_only_model_is_refused(
    node: TritonNode, sim: SimProcess, launch: Launch, channel_to: Callable[..., Any]
) -> None:
    data = one_node_catalog(node, chat={"model": "tiny_a"})
    data["models"]["cloud"] = {
        "price": {"input_usd_per_million": "1", "output_usd_per_million": "1"},
        "deployments": [{"kind": "hosted", "provider": "sim", "model": "gpt-4.1"}],
    }
    stub = channel_to(launch(data))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Infer(
            infer_request("cloud", request_id="private", self_hosted_only=True), timeout=5
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "chat" in refused.value.details(), "the message names a self-hosted model to use"


async def test_a_node_killed_under_load_loses_no_request(
    tmp_path: Path, repository: Path, launch: Launch, channel_to: Callable[..., Any]
) -> None:
    doomed = start_node(tmp_path / "doomed", repository, load=["tiny_a"])
    survivor = start_node(tmp_path / "survivor", repository, load=["tiny_a"])
    try:
        scheduler = launch(
            catalog(
                [doomed.config.grpc_url, survivor.config.grpc_url],
                {
                    "chat": {
                        "model": "tiny_a",
                        "max_nodes": 2,
                        "batching": {"max_batch_size": 4, "max_queue_delay_ms": 2},
                    }
                },
            )
        )
        stub = channel_to(scheduler)
        total, concurrency = 80, 12
        outcomes: dict[str, Any] = {}
        answered = 0
        killed = asyncio.Event()

        async def worker(ids: list[str]) -> None:
            nonlocal answered
            for request_id in ids:
                try:
                    outcomes[request_id] = await stub.Infer(
                        infer_request("chat", request_id=request_id, max_tokens=24), timeout=30
                    )
                except grpc.aio.AioRpcError as error:
                    outcomes[request_id] = error
                answered += 1
                if answered == total // 4 and not killed.is_set():
                    os.kill(doomed.pid or 0, signal.SIGKILL)
                    killed.set()

        ids = [f"r{i}" for i in range(total)]
        await asyncio.gather(*(worker(ids[i::concurrency]) for i in range(concurrency)))
        assert killed.is_set()
        assert sorted(outcomes) == sorted(ids), "every request gets exactly one answer"
        errors = {k: v for k, v in outcomes.items() if isinstance(v, grpc.aio.AioRpcError)}
        assert errors == {}, {k: (v.code(), v.details()) for k, v in errors.items()}
        nodes = {o.completion.placement.node for o in outcomes.values()}
        assert survivor.config.grpc_url in nodes
        response = await stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
        states = {n.address: n.state for n in response.nodes}
        assert states[doomed.config.grpc_url] in (
            scheduler_pb2.NODE_STATE_OPEN,
            scheduler_pb2.NODE_STATE_HALF_OPEN,
        )
        assert states[survivor.config.grpc_url] == scheduler_pb2.NODE_STATE_HEALTHY
        assert response.models[0].completed == total
    finally:
        doomed.stop()
        survivor.stop()


async def test_stats_and_metrics_show_batches_queue_and_nodes(
    node: TritonNode, launch: Launch, channel_to: Callable[..., Any]
) -> None:
    otlp = OtlpReceiver().start()
    scheduler: SchedulerProcess | None = None
    try:
        scheduler = launch(
            one_node_catalog(
                node,
                chat={
                    "model": "tiny_a",
                    "batching": {
                        "max_batch_size": 8,
                        "max_queue_delay_ms": 20,
                        "preferred_batch_sizes": [4, 8],
                    },
                },
            ),
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
                "OTEL_METRIC_EXPORT_INTERVAL": "200",
            },
        )
        stub = channel_to(scheduler)
        replies = await asyncio.gather(
            *(
                stub.Infer(infer_request("chat", request_id=f"s{i}", max_tokens=4), timeout=30)
                for i in range(8)
            )
        )
        sizes = [r.completion.placement.batch_size for r in replies]
        assert sum(sizes) >= 8 and max(sizes) > 1, "concurrent requests share batches"
        response = await stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
        [model] = response.models
        assert model.model == "chat" and model.completed == 8 and model.queue_depth == 0
        assert sum(b.size * b.count for b in model.batch_sizes) == 8
        assert model.queue_wait_p99_ms > 0 and model.dispatch_latency_p50_ms > 0
        [gpu] = response.nodes
        assert gpu.address == node.config.grpc_url and "tiny_a" in gpu.loaded_models
        assert gpu.state == scheduler_pb2.NODE_STATE_HEALTHY and gpu.ema_latency_ms > 0
        metrics = otlp.wait_for_metrics(
            "shepherd-scheduler",
            {
                "shepherd.scheduler.batch.size",
                "shepherd.scheduler.queue.wait",
                "shepherd.scheduler.dispatch.latency",
                "shepherd.scheduler.requests",
                "shepherd.scheduler.queue.depth",
            },
        )
        outcomes = {
            p.get("outcome") for m in metrics["shepherd.scheduler.requests"] for p in m.points
        }
        assert "completed" in outcomes and "admitted" in outcomes
    finally:
        # The scheduler first: stopped after the receiver, its last export retries against a
        # closed port for seconds before it gives up.
        if scheduler is not None:
            scheduler.stop()
        otlp.stop()


async def test_without_model_control_only_models_the_nodes_report_ready_are_served(
    node: TritonNode, launch: Launch, channel_to: Callable[..., Any]
) -> None:
    data = catalog(
        [node.config.grpc_url],
        {"loaded": {"model": "tiny_b"}, "absent": {"model": "tiny_z"}},
        pool={"model_control": "none"},
    )
    stub = channel_to(launch(data))
    reply = await stub.Infer(infer_request("loaded", request_id="ok"), timeout=30)
    assert reply.completion.placement.backend_model == "tiny_b"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Infer(infer_request("absent", request_id="nope"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "tiny_z" in refused.value.details() and "model_control" in refused.value.details()
    response = await stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
    assert response.placement_events == []


async def test_infer_validates_its_own_input_even_from_the_router(
    node: TritonNode, launch: Launch, channel_to: Callable[..., Any]
) -> None:
    stub = channel_to(launch(one_node_catalog(node, chat={"model": "tiny_a"})))
    request = infer_request("chat", request_id="no-tenant", tenant="")
    del request.messages[:]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Infer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant: is required" in caught.value.details()
    assert "messages: at least one message is required" in caught.value.details()


async def test_a_bad_row_is_refused_before_batching_and_never_fails_its_batch_mates(
    node: TritonNode, launch: Launch, channel_to: Callable[..., Any]
) -> None:
    # The router validates too, but a scheduler trusts no caller: a non-finite temperature
    # sent straight to it once joined a batch and failed its batch-mates with INTERNAL.
    stub = channel_to(launch(one_node_catalog(node, chat={"model": "tiny_a"})))
    bad = infer_request("chat", request_id="nan")
    bad.params.temperature = math.nan
    bad.priority = 99  # type: ignore[assignment]
    good = [infer_request("chat", request_id=f"good-{n}") for n in range(6)]

    outcomes = await asyncio.gather(
        stub.Infer(bad, timeout=30),
        *(stub.Infer(request, timeout=30) for request in good),
        return_exceptions=True,
    )

    refused = outcomes[0]
    assert isinstance(refused, grpc.aio.AioRpcError)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params.temperature: must be between 0 and 2" in (refused.details() or "")
    assert "priority: must be" in (refused.details() or "")
    answers = outcomes[1:]
    assert all(isinstance(a, scheduler_pb2.InferResponse) and a.completion.text for a in answers)


async def test_a_restarted_node_is_probed_as_soon_as_it_answers_ready(
    tmp_path: Path, repository: Path, launch: Launch, channel_to: Callable[..., Any]
) -> None:
    # The breaker's cool-down is 30 s here, so waiting it out cannot pass this test: the
    # health poll must see the restarted node ready and probe it at once (half-open).
    node = start_node(tmp_path / "node", repository, load=["tiny_a"])
    restarted: TritonNode | None = None
    try:
        scheduler = launch(
            catalog([node.config.grpc_url], {"chat": {"model": "tiny_a"}}),
            {
                "SHEPHERD_SCHEDULER_BREAKER_COOLDOWN_S": "30",
                "SHEPHERD_SCHEDULER_BREAKER_FAILURES": "1",
                "SHEPHERD_SCHEDULER_HEALTH_INTERVAL_S": "0.2",
            },
        )
        stub = channel_to(scheduler)
        await stub.Infer(infer_request("chat", request_id="before"), timeout=30)

        async def state() -> int:
            response = await stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
            return next(n.state for n in response.nodes if n.address == node.config.grpc_url)

        node.stop()
        give_up = time.monotonic() + 20
        while await state() != scheduler_pb2.NODE_STATE_OPEN:
            assert time.monotonic() < give_up, "the dead node never opened its breaker"
            await asyncio.sleep(0.1)

        restarted = TritonNode(node.config).start()
        restarted.wait_ready(timeout_s=60)
        back_at = time.monotonic()
        while await state() != scheduler_pb2.NODE_STATE_HEALTHY:
            assert time.monotonic() - back_at < 10, "still waiting out the 30 s cool-down"
            await asyncio.sleep(0.1)
        answer = await stub.Infer(infer_request("chat", request_id="after"), timeout=30)
        assert answer.completion.placement.node == node.config.grpc_url
    finally:
        node.stop()
        if restarted is not None:
            restarted.stop()
