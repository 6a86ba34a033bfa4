"""The shared server bootstrap, seen from outside a real service process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local.ports import free_port
from libs.config import REPO_ROOT


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


def test_service_serves_health_reflection_and_stops_gracefully_on_sigterm() -> None:
    port = free_port()
    env = {
        **os.environ,
        "SHEPHERD_CACHE_PORT": str(port),
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
