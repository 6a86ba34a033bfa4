"""The real mesh, started once per test run: Valkey, Triton, the provider simulator, the four
services as processes on free loopback ports, and an OTLP receiver they export traces to."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc
from shepherd.router.v1 import router_pb2_grpc

from deploy.local.launcher import LocalMesh
from libs.apikeys import issue_key_at
from tests.support.mesh import running_mesh
from tests.support.otlp_receiver import OtlpReceiver

Metadata = tuple[tuple[str, str], ...]


def tenant_totals(
    billing: billing_pb2_grpc.BillingServiceStub, admin_md: Metadata, tenant: str
) -> billing_pb2.GetTenantUsageResponse:
    """A tenant's running totals, read as an operator would (admin key)."""
    return billing.GetTenantUsage(
        billing_pb2.GetTenantUsageRequest(tenant=tenant), metadata=admin_md, timeout=5
    )


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver) -> Iterator[LocalMesh]:
    with running_mesh(
        tmp_path_factory,
        otlp_endpoint=otlp.endpoint,
        otlp_http_endpoint=otlp.http_endpoint,
        extra_env={"OTEL_BSP_SCHEDULE_DELAY": "100"},
    ) as mesh:
        yield mesh


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
