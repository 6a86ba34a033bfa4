"""The real mesh, started once per test run: Valkey, Triton, the provider simulator, the four
services as processes on free loopback ports, and an OTLP receiver they export traces to."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc
from shepherd.router.v1 import router_pb2_grpc

from deploy.local.launcher import LocalMesh, MeshConfig
from libs.apikeys import issue_key_at
from tests.support.catalog import write_test_catalog, write_test_repository
from tests.support.otlp_receiver import OtlpReceiver

Metadata = tuple[tuple[str, str], ...]


def tenant_totals(
    billing: billing_pb2_grpc.BillingServiceStub, admin_md: Metadata, tenant: str
) -> billing_pb2.GetTenantUsageResponse:
    """A tenant's running totals, read as an operator would (admin key)."""
    return billing.GetTenantUsage(
        billing_pb2.GetTenantUsageRequest(tenant=tenant), metadata=admin_md, timeout=5
    )


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in {"Z", "X"}:
            alive.append(pid)
    return alive


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver) -> Iterator[LocalMesh]:
    run_dir = tmp_path_factory.mktemp("mesh")
    config = MeshConfig.ephemeral(
        run_dir,
        otlp_endpoint=otlp.endpoint,
        model_repository=write_test_repository(tmp_path_factory.mktemp("models")),
        extra_env={
            "SHEPHERD_CATALOG": str(write_test_catalog(run_dir / "catalog.yaml")),
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    mesh = LocalMesh(config).start()
    pids = [proc.pid for proc in mesh.services.values()]
    assert mesh.triton is not None and mesh.triton.pid is not None
    pids.append(mesh.triton.pid)
    yield mesh
    mesh.stop()
    assert _pids_alive(pids) == [], "the mesh left processes running after stop()"


@pytest.fixture(scope="session")
def router_channel(mesh: LocalMesh) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(mesh.address("router")) as channel:
        yield channel


@pytest.fixture(scope="session")
def router(router_channel: grpc.Channel) -> router_pb2_grpc.RouterServiceStub:
    return router_pb2_grpc.RouterServiceStub(router_channel)


@pytest.fixture(scope="session")
def billing(mesh: LocalMesh) -> Iterator[billing_pb2_grpc.BillingServiceStub]:
    with grpc.insecure_channel(mesh.address("billing")) as channel:
        yield billing_pb2_grpc.BillingServiceStub(channel)


@pytest.fixture(scope="session")
def admin_md(mesh: LocalMesh) -> Metadata:
    """The metadata of an operator's call: the mesh's admin key."""
    return (("authorization", f"Bearer {mesh.config.admin_key}"),)


@pytest.fixture
def tenant(request: pytest.FixtureRequest, mesh: LocalMesh) -> tuple[str, str]:
    """A fresh tenant for one test and its API key, so billing totals start at zero."""
    name = "t-" + request.node.name.replace("[", "-").replace("]", "")[:40].replace(".", "-")
    name = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)
    key = asyncio.run(issue_key_at(mesh.redis_url, name))
    return name, key
