"""The shared server bootstrap, seen from outside a real service process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from shepherd.cache.v1 import cache_pb2, cache_pb2_grpc
from shepherd.common.v1 import common_pb2
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from deploy.local.ports import free_port
from deploy.local.provider_sim import SimProcess
from libs.config import REPO_ROOT
from libs.credentials import INTERNAL_TOKEN_HEADER
from libs.health import LIVENESS
from tests.support.health import NOT_SERVING, SERVING, status, wait_for
from tests.support.scheduler import SchedulerProcess, infer_request, internal_channel

TOKEN = "token-for-the-bootstrap-test-0123"


def test_bad_configuration_fails_fast_with_one_clear_line() -> None:
    env = {**os.environ, "SHEPHERD_ROUTER_PORT": "not-a-port"}
    result = subprocess.run(
        [sys.executable, "-m", "services.router"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "configuration error: SHEPHERD_ROUTER_PORT='not-a-port' is not an integer"
    )


@pytest.mark.parametrize("service", ["router", "scheduler", "cache", "billing"])
def test_a_service_without_the_internal_token_refuses_to_start(service: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHEPHERD_")}
    result = subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        cwd=REPO_ROOT,
        env={**env, f"SHEPHERD_{service.upper()}_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("configuration error: SHEPHERD_INTERNAL_TOKEN is not set")
    assert "openssl rand -hex 32" in result.stderr


def test_service_serves_health_reflection_and_stops_gracefully_on_sigterm() -> None:
    port = free_port()
    env = {
        **os.environ,
        "SHEPHERD_CACHE_PORT": str(port),
        "SHEPHERD_INTERNAL_TOKEN": TOKEN,
        # Never contacted: the cache connects lazily, and no request is made here.
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cache"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 20
            while True:
                try:
                    alive = health.Check(
                        health_pb2.HealthCheckRequest(service=LIVENESS), timeout=1
                    ).status
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "the cache service never came up"
                    time.sleep(0.1)
            assert alive == health_pb2.HealthCheckResponse.SERVING
            # Its Redis is down: the process is alive, but the service is not ready.
            for name in ["", "shepherd.cache.v1.CacheService"]:
                ready = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert ready.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert_only_the_service_token_opens_the_cache(channel)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert proc.stderr is not None
        messages = [json.loads(line)["msg"] for line in proc.stderr.read().splitlines()]
        assert "serving" in messages
        assert messages[-3:] == ["shutting down", "drained", "stopped"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_service_on_a_port_in_use_refuses_to_start_with_one_clear_line() -> None:
    port = free_port()
    env = {
        **os.environ,
        "SHEPHERD_CACHE_PORT": str(port),
        "SHEPHERD_INTERNAL_TOKEN": TOKEN,
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # never contacted
    }
    first = subprocess.Popen(
        [sys.executable, "-m", "services.cache"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
        second = subprocess.run(
            [sys.executable, "-m", "services.cache"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert first.poll() is None, "the first service must keep its port"
    finally:
        first.terminate()
        first.wait(timeout=20)
    assert second.returncode == 2
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cannot start: cache could not listen on 127.0.0.1:{port}")
    assert "is the port in use?" in last and "SHEPHERD_CACHE_PORT" in last


def test_a_router_whose_http_port_is_taken_refuses_to_start_with_one_clear_line(
    tmp_path: Path,
) -> None:
    http_port = free_port()
    env = {
        **os.environ,
        "SHEPHERD_ROUTER_PORT": str(free_port()),
        "SHEPHERD_ROUTER_HTTP_PORT": str(http_port),
        "SHEPHERD_ROUTER_SPOOL_DIR": str(tmp_path / "spool"),
        "SHEPHERD_INTERNAL_TOKEN": TOKEN,
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # never answers: not needed here
    }
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", http_port))
        holder.listen()
        router = subprocess.run(
            [sys.executable, "-m", "services.router"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert router.returncode == 2
    last = router.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"cannot start: the router's HTTP edge could not listen on 127.0.0.1:{http_port}"
    )
    assert "is the port in use?" in last and "SHEPHERD_ROUTER_HTTP_PORT" in last


def assert_only_the_service_token_opens_the_cache(channel: grpc.Channel) -> None:
    """Health and reflection are open; a cache call needs the service token."""
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    listing = next(
        reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
    )
    assert "shepherd.cache.v1.CacheService" in {
        s.name for s in listing.list_services_response.service
    }
    cache = cache_pb2_grpc.CacheServiceStub(channel)
    lookup = cache_pb2.LookupRequest(
        model_family="shepherd-tiny",
        tenant="acme",
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")],
    )
    for metadata in [(), ((INTERNAL_TOKEN_HEADER, "a-wrong-token-0123456789"),)]:
        with pytest.raises(grpc.RpcError) as caught:
            cache.Lookup(lookup, metadata=metadata, timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert INTERNAL_TOKEN_HEADER in caught.value.details()
    # With the token the call reaches the servicer (Redis is down, so the cache fails open).
    answer = cache.Lookup(lookup, metadata=((INTERNAL_TOKEN_HEADER, TOKEN),), timeout=5)
    assert answer.cacheable and not answer.hit


async def test_sigterm_serves_every_accepted_call_and_refuses_new_ones(tmp_path: Path) -> None:
    # A real scheduler whose only model is a hosted API that takes seconds to answer, so the
    # calls are still running when SIGTERM arrives.
    sim = SimProcess(api_key="sim-drain-key", latency_ms=3_000, log_path=tmp_path / "sim.log")
    sim.start()
    scheduler = SchedulerProcess(
        tmp_path / "scheduler",
        {
            "providers": {"sim": {"base_url": sim.base_url, "api_key_env": "SIM_KEY"}},
            "models": {
                "slow": {
                    "price": {"input_usd_per_million": "1", "output_usd_per_million": "1"},
                    "deployments": [{"kind": "hosted", "provider": "sim", "model": "gpt-4.1"}],
                }
            },
        },
        {"SIM_KEY": sim.api_key, "SHEPHERD_SHUTDOWN_GRACE_S": "30"},
    )
    channel = internal_channel(scheduler.address)
    try:
        scheduler.start()
        process = scheduler.process
        assert process is not None
        await wait_for(scheduler.address, "", SERVING)
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

        async def call(request_id: str) -> list[scheduler_pb2.InferStreamResponse]:
            request = scheduler_pb2.InferStreamRequest(
                **_fields(infer_request("slow", request_id=request_id, max_tokens=8))
            )
            return [chunk async for chunk in stub.InferStream(request, timeout=60)]

        accepted = [asyncio.ensure_future(call(f"accepted-{i}")) for i in range(CALLS)]
        deadline = time.monotonic() + 30
        while (await asyncio.to_thread(_sim_stats, sim))["requests_received"] < CALLS:
            assert time.monotonic() < deadline, "the calls never reached the hosted API"
            await asyncio.sleep(0.05)

        process.send_signal(signal.SIGTERM)
        await wait_for(scheduler.address, "", NOT_SERVING)
        assert await status(scheduler.address, LIVENESS) == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call("after-sigterm")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down: retry on another replica" in (refused.value.details() or "")

        for chunks in await asyncio.gather(*accepted):
            final = chunks[-1]
            assert final.HasField("final")
            assert final.final.usage.completion_tokens > 0
        assert await asyncio.to_thread(process.wait, 40) == 0
    finally:
        await channel.close()
        scheduler.stop()
        sim.stop()
    entries = [json.loads(line) for line in scheduler.log_path.read_text().splitlines()]
    messages = [entry["msg"] for entry in entries]
    shutting_down = entries[messages.index("shutting down")]
    assert shutting_down["calls_in_flight"] == CALLS
    assert messages.index("drained") > messages.index("shutting down")
    assert messages[-1] == "stopped"


CALLS = 5


def _fields(request: scheduler_pb2.InferRequest) -> dict[str, Any]:
    return {field.name: value for field, value in request.ListFields()}


def _sim_stats(sim: SimProcess) -> dict[str, Any]:
    return dict(httpx.get(f"{sim.root_url}/_sim/stats", timeout=5).json())


def test_a_metrics_port_in_use_stops_the_service_with_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "services.cache"],
            cwd=REPO_ROOT,
            env={
                **os.environ,
                "SHEPHERD_CACHE_PORT": str(free_port()),
                "SHEPHERD_CACHE_METRICS_PORT": str(port),
                "SHEPHERD_INTERNAL_TOKEN": TOKEN,
                "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # never contacted
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cannot start: cannot serve /metrics on 127.0.0.1:{port}")
    assert "SHEPHERD_CACHE_METRICS_PORT" in last
