"""GPU time per request and the pool's utilisation, end to end: a real scheduler process
batching for a real Triton node, reporting its pool to a real billing process over Valkey.

What a user sees: each answer's Placement says what GPU time the request used and what its
batch used; those add up, batch by batch, to exactly the batch's time, and over a period to
what Triton itself reports as its execution time; a lone request gets its whole execution; a
hosted answer used no GPU time. The pool report's utilisation over a window is Triton's own
compute time over the wall time, and its batch fill is the rows per execution the answers
show. Sums are compared, never speeds, so a loaded machine changes nothing but the duration.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import tritonclient.grpc.aio as triton
import yaml
from shepherd.billing.v1 import admin_pb2, admin_pb2_grpc
from shepherd.common.v1 import common_pb2
from shepherd.scheduler.v1 import scheduler_pb2_grpc

from deploy.local.provider_sim import SimProcess
from deploy.local.triton import TritonNode
from deploy.local.valkey import ValkeyServer
from tests.support.billing import BillingProcess
from tests.support.scheduler import (
    TINY_LM,
    TINY_LM_STREAM,
    SchedulerProcess,
    catalog,
    copy_model,
    infer_request,
    internal_channel,
    start_node,
)

TINY, STREAM, HOSTED = "cost-tiny", "cost-stream", "cost-hosted"
TINY_COPY, STREAM_COPY = "cost_lm", "cost_lm_stream"
TRITON_MODELS = (TINY_COPY, STREAM_COPY)
MAX_BATCH = 8
LOAD_S = 6.0  # the load's length: long enough that a few ms of polling are noise
WORKERS = 24
REPORT_INTERVAL_S = 0.25


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonNode]:
    """One node serving copies of both kinds of model, each generating exactly max_tokens
    (rows of a batch do different amounts of work), with Triton statistics of their own."""
    root = tmp_path_factory.mktemp("gpu-time")
    repository = root / "repository"
    repository.mkdir()
    copy_model(repository, TINY_COPY, TINY_LM, {"ignore_eos": "true"})
    copy_model(repository, STREAM_COPY, TINY_LM_STREAM, {"ignore_eos": "true"})
    started = start_node(root / "work", repository, load=TRITON_MODELS)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    process = SimProcess(
        api_key="sim-test-key", log_path=tmp_path_factory.mktemp("sim") / "sim.log"
    ).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def services(
    tmp_path_factory: pytest.TempPathFactory,
    node: TritonNode,
    sim: SimProcess,
    valkey: ValkeyServer,
) -> Iterator[tuple[SchedulerProcess, BillingProcess]]:
    batching = {"max_batch_size": MAX_BATCH, "max_queue_delay_ms": 5, "preferred_batch_sizes": [4]}
    data = catalog(
        [node.config.grpc_url],
        {
            TINY: {"model": TINY_COPY, "batching": batching},
            STREAM: {"model": STREAM_COPY, "batching": batching},
        },
        pool={"max_inflight_batches": 2, "gpu_hour_usd": "4.00", "gpus_per_node": 1},
        provider_url=sim.base_url,
    )
    data["models"][HOSTED] = {
        "price": {"input_usd_per_million": "0.28", "output_usd_per_million": "0.42"},
        "deployments": [{"kind": "hosted", "provider": "sim", "model": "deepseek-v3.2"}],
    }
    run = tmp_path_factory.mktemp("services")
    (run / "catalog.yaml").write_text(yaml.safe_dump(data))
    billing = BillingProcess(run / "billing", run / "catalog.yaml", valkey.config.url).start()
    try:
        scheduler = SchedulerProcess(
            run / "scheduler",
            data,
            env={
                "SHEPHERD_HOSTED_API_KEY": sim.api_key,
                "SHEPHERD_BILLING_ADDR": billing.address,
                "SHEPHERD_SCHEDULER_POOL_USAGE_INTERVAL_S": str(REPORT_INTERVAL_S),
            },
        ).start()
        try:
            yield scheduler, billing
        finally:
            scheduler.stop()
    finally:
        billing.stop()


@pytest.fixture
async def scheduler(
    services: tuple[SchedulerProcess, BillingProcess],
) -> AsyncIterator[scheduler_pb2_grpc.SchedulerServiceStub]:
    channel = internal_channel(services[0].address)
    yield scheduler_pb2_grpc.SchedulerServiceStub(channel)
    await channel.close()


@pytest.fixture
async def admin(
    services: tuple[SchedulerProcess, BillingProcess],
) -> AsyncIterator[Any]:
    billing = services[1]
    async with grpc.aio.insecure_channel(billing.address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)

        async def report() -> admin_pb2.PoolUsage:
            today = dt.datetime.now(dt.UTC).date()
            response = await stub.GetPoolReport(
                admin_pb2.GetPoolReportRequest(
                    pool="gpu",
                    start_day=(today - dt.timedelta(days=1)).isoformat(),
                    end_day=today.isoformat(),
                ),
                metadata=billing.admin_metadata(),
                timeout=5,
            )
            return response.pools[0]

        yield report


@pytest.fixture
async def node_client(node: TritonNode) -> AsyncIterator[triton.InferenceServerClient]:
    async with triton.InferenceServerClient(node.config.grpc_url) as client:
        yield client


async def triton_compute(client: triton.InferenceServerClient) -> tuple[int, int]:
    """(executions, ns) of both models as Triton reports them: per execution, by batch size,
    the time to take the inputs, execute and give the outputs (compute input, infer, output)."""
    executions = ns = 0
    for model in TRITON_MODELS:
        for stats in (await client.get_inference_statistics(model)).model_stats:
            for size in stats.batch_stats:
                executions += size.compute_infer.count
                ns += size.compute_input.ns + size.compute_infer.ns + size.compute_output.ns
    return executions, ns


async def recorded(
    client: triton.InferenceServerClient, before: tuple[int, int], executions: int
) -> tuple[int, int]:
    """Triton's figures once `executions` more have been recorded (30 s at most)."""
    deadline = time.monotonic() + 30
    while (now := await triton_compute(client))[0] - before[0] < executions:
        assert time.monotonic() < deadline, "Triton never recorded every execution"
        await asyncio.sleep(0.02)
    assert now[0] - before[0] == executions
    return now


async def test_a_hosted_answer_used_no_gpu_time(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
) -> None:
    answer = await scheduler.Infer(infer_request(HOSTED, request_id="hosted"), timeout=30)
    placement = answer.completion.placement
    assert placement.kind == common_pb2.BACKEND_KIND_HOSTED
    assert (placement.gpu_us, placement.batch_gpu_us, placement.batch_id) == (0, 0, "")


async def test_a_lone_request_is_a_batch_of_one_and_gets_its_whole_execution(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub, node_client: triton.InferenceServerClient
) -> None:
    for model in (TINY, STREAM):
        before = await triton_compute(node_client)
        answer = await scheduler.Infer(
            infer_request(model, request_id=f"lone-{model}", max_tokens=12), timeout=30
        )
        after = await recorded(node_client, before, 1)
        placement = answer.completion.placement
        assert placement.batch_size == 1 and placement.batch_id
        assert placement.gpu_us == placement.batch_gpu_us > 0
        assert abs(placement.gpu_us - (after[1] - before[1]) / 1000) < 1


async def after_next_report(report: Any) -> tuple[float, admin_pb2.PoolUsage]:
    """The moment a scheduler report lands in billing, and the pool's figures then."""
    first = await report()
    deadline = time.monotonic() + 30
    while (now := await report()).wall_us == first.wall_us:
        assert time.monotonic() < deadline, "the scheduler stopped reporting its pool"
        await asyncio.sleep(0.01)
    return time.monotonic(), now


async def test_under_load_gpu_time_adds_up_to_triton_and_utilisation_is_compute_over_wall(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
    node_client: triton.InferenceServerClient,
    admin: Any,
) -> None:
    started, report_before = await after_next_report(admin)
    triton_before = await triton_compute(node_client)
    answers: list[common_pb2.Completion] = []
    stop_at = time.monotonic() + LOAD_S

    async def worker(index: int) -> None:
        model = (TINY, STREAM)[index % 2]
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            request = infer_request(
                model, request_id=f"load-{index}-{n}", max_tokens=4 + (index * 7 + n) % 21
            )
            answers.append((await scheduler.Infer(request, timeout=60)).completion)

    await asyncio.gather(*(worker(index) for index in range(WORKERS)))
    batches: dict[str, list[common_pb2.Placement]] = {}
    for answer in answers:
        batches.setdefault(answer.placement.batch_id, []).append(answer.placement)
    triton_after = await recorded(node_client, triton_before, len(batches))

    # Each batch: every row answered, and their shares add up to the batch's time exactly.
    for batch_id, rows in batches.items():
        assert batch_id and len(rows) == rows[0].batch_size
        assert sum(row.gpu_us for row in rows) == rows[0].batch_gpu_us > 0
        if len(rows) == 1:
            assert rows[0].gpu_us == rows[0].batch_gpu_us
    assert max(len(rows) for rows in batches.values()) > 1, "the load formed batches"
    # All of them: what Triton reports it executed, within 1 %.
    attributed = sum(answer.placement.gpu_us for answer in answers)
    executed_us = (triton_after[1] - triton_before[1]) / 1000
    assert abs(attributed - executed_us) <= 0.01 * executed_us, (attributed, executed_us)

    # The pool report, once every execution is in it: its busy time is the batches' GPU time
    # and its utilisation Triton's compute time over the wall time of the window (1 GPU).
    batch_us = sum(rows[0].batch_gpu_us for rows in batches.values())

    async def reported() -> tuple[float, admin_pb2.PoolUsage]:
        deadline = time.monotonic() + 30
        while True:
            at, figures = await after_next_report(admin)
            if figures.busy_gpu_us - report_before.busy_gpu_us >= batch_us:
                return at, figures
            assert time.monotonic() < deadline, "the pool's busy time never caught up"

    ended, report_after = await reported()
    triton_end = await triton_compute(node_client)
    assert triton_end[0] == triton_after[0], "nothing ran after the load"
    busy = report_after.busy_gpu_us - report_before.busy_gpu_us
    capacity = report_after.capacity_gpu_us - report_before.capacity_gpu_us
    wall_s = ended - started
    assert busy == batch_us
    assert abs(capacity / 1e6 - wall_s) <= 0.05 * wall_s, (capacity, wall_s)
    expected = executed_us / (wall_s * 1e6)
    utilisation = busy / capacity
    print(
        f"{len(answers)} answers in {len(batches)} batches over {wall_s:.2f} s:"
        f" attributed {attributed} us, Triton {executed_us:.0f} us;"
        f" utilisation {utilisation:.1%}, Triton compute / wall {expected:.1%}"
    )
    assert abs(utilisation - expected) <= 0.05 * expected
    # Batch fill: rows per execution over the max batch size, as the answers show it.
    rows = report_after.rows - report_before.rows
    executions = report_after.executions - report_before.executions
    assert (executions, rows) == (len(batches), len(answers))
    assert report_after.batch_fill == pytest.approx(
        report_after.rows / (report_after.executions * MAX_BATCH)
    )
