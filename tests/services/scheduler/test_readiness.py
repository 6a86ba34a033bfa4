"""The scheduler's health: per model, and for the whole scheduler, against a real Triton node
that is stopped and started again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.local.triton import TritonNode
from libs.health import LIVENESS
from services.scheduler.readiness import SERVICE, model_health_name
from tests.support.health import NOT_SERVING, SERVING, status, wait_for
from tests.support.scheduler import SchedulerProcess, catalog, model_repository, start_node


@pytest.fixture
def node(tmp_path: Path) -> Iterator[TritonNode]:
    repository = model_repository(tmp_path / "repo", ["tiny_a"])
    started = start_node(tmp_path / "node", repository, load=["tiny_a"])
    yield started
    started.stop()


@pytest.fixture
def schedulers(tmp_path: Path) -> Iterator[list[SchedulerProcess]]:
    started: list[SchedulerProcess] = []
    yield started
    for process in started:
        process.stop()


def with_hosted_model(data: dict[str, Any]) -> dict[str, Any]:
    """`data` plus a hosted-only model `cloud`. A hosted provider is usable while it has an API
    key and its circuit breaker is closed; nothing calls it here."""
    data["models"]["cloud"] = {
        "price": {"input_usd_per_million": "1", "output_usd_per_million": "1"},
        "deployments": [{"kind": "hosted", "provider": "sim", "model": "gpt-4.1"}],
    }
    return data


async def test_a_model_is_ready_while_it_has_a_backend_and_the_scheduler_while_any_model_is(
    tmp_path: Path, node: TritonNode, schedulers: list[SchedulerProcess]
) -> None:
    env = {"SHEPHERD_SCHEDULER_HEALTH_INTERVAL_S": "0.2"}
    # `mixed` serves a Triton model and a hosted one; `triton_only` only the Triton model.
    mixed = SchedulerProcess(
        tmp_path / "mixed",
        with_hosted_model(catalog([node.config.grpc_url], {"chat": {"model": "tiny_a"}})),
        {**env, "SHEPHERD_HOSTED_API_KEY": "a-key-for-the-readiness-test"},
    )
    triton_only = SchedulerProcess(
        tmp_path / "triton_only",
        catalog([node.config.grpc_url], {"chat": {"model": "tiny_a"}}),
        env,
    )
    for process in (mixed, triton_only):
        schedulers.append(process)
        process.start()
    chat, cloud = model_health_name("chat"), model_health_name("cloud")

    for process in (mixed, triton_only):
        for name in ("", SERVICE, chat):
            await wait_for(process.address, name, SERVING)
    await wait_for(mixed.address, cloud, SERVING)

    node.stop()
    await wait_for(mixed.address, chat, NOT_SERVING)
    await wait_for(triton_only.address, chat, NOT_SERVING)
    # One model down is not the scheduler down: the hosted model is still served.
    assert await status(mixed.address, cloud) == SERVING
    assert await status(mixed.address, "") == SERVING
    # With no usable model at all, the scheduler is not ready; it is still alive.
    for name in ("", SERVICE):
        await wait_for(triton_only.address, name, NOT_SERVING)
    assert await status(triton_only.address, LIVENESS) == SERVING

    restarted = TritonNode(node.config).start()  # the same ports and repository
    try:
        restarted.wait_ready(timeout_s=60)
        for process in (mixed, triton_only):
            for name in ("", SERVICE, chat):
                await wait_for(process.address, name, SERVING)
    finally:
        restarted.stop()
