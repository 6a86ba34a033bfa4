"""The shared server bootstrap, seen from outside a real service process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from shepherd.cache.v1 import cache_pb2, cache_pb2_grpc
from shepherd.common.v1 import common_pb2

from deploy.local.ports import free_port
from libs.config import REPO_ROOT
from libs.credentials import INTERNAL_TOKEN_HEADER

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
                    status = health.Check(
                        health_pb2.HealthCheckRequest(service="shepherd.cache.v1.CacheService"),
                        timeout=1,
                    ).status
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "the cache service never became healthy"
                    time.sleep(0.1)
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert_only_the_service_token_opens_the_cache(channel)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert proc.stderr is not None
        messages = [json.loads(line)["msg"] for line in proc.stderr.read().splitlines()]
        assert "serving" in messages
        assert messages[-2:] == ["shutting down", "stopped"]
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
