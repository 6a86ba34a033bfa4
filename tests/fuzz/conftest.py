"""A real mesh of its own for the fuzz module, and the credentials a caller of each port holds.

The mesh is the integration suite's (tests/support/mesh.py) but scoped to the module, so it
is stopped before the next suite starts its own: fuzzing must not share a mesh whose state
(cache entries, ledgers, queues) other tests assert on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc

from deploy.local.launcher import LocalMesh
from libs.apikeys import issue_key_at
from libs.credentials import INTERNAL_TOKEN_HEADER
from tests.support.mesh import mesh_pids, pids_alive, running_mesh

Metadata = tuple[tuple[str, str], ...]
# The tenant the fuzz's API key belongs to.
FUZZ_TENANT = "fuzz"


@dataclass(frozen=True)
class FuzzMesh:
    """A running mesh, the processes it started with, and each kind of caller's metadata."""

    mesh: LocalMesh
    pids: tuple[int, ...]
    api_key: Metadata  # a tenant's: RouterService
    internal: Metadata  # the service token: scheduler, cache, billing
    admin: Metadata  # an operator's: AdminService and operators' reads

    def address(self, service: str) -> str:
        return self.mesh.address(service)

    def assert_unharmed(self) -> None:
        """No process died or was replaced, and the mesh still answers an ordinary chat."""
        exited = {
            name: proc.returncode
            for name, proc in self.mesh.services.items()
            if proc.poll() is not None
        }
        assert not exited, (
            f"services exited during the fuzz: {exited} (logs in {self.mesh.log_dir})"
        )
        assert pids_alive(list(self.pids)) == list(self.pids), (
            f"a process of the mesh died or was replaced (logs in {self.mesh.log_dir})"
        )
        with grpc.insecure_channel(self.address("router")) as channel:
            answer = router_pb2_grpc.RouterServiceStub(channel).Chat(
                router_pb2.ChatRequest(
                    model="tiny",
                    messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Hello")],
                    params=common_pb2.GenerationParams(max_tokens=4),
                ),
                metadata=self.api_key,
                timeout=30,
            )
        assert answer.usage.completion_tokens > 0 and answer.finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def fuzz_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzMesh]:
    # Fuzzed lookups take single-flight leases they never settle: short leases keep fuzzed
    # followers of them from waiting long.
    with running_mesh(tmp_path_factory, extra_env={"SHEPHERD_CACHE_LEASE_MS": "300"}) as mesh:
        key = asyncio.run(issue_key_at(mesh.redis_url, FUZZ_TENANT))
        yield FuzzMesh(
            mesh=mesh,
            pids=tuple(mesh_pids(mesh)),
            api_key=(("authorization", f"Bearer {key}"),),
            internal=((INTERNAL_TOKEN_HEADER, mesh.config.internal_token),),
            admin=(("authorization", f"Bearer {mesh.config.admin_key}"),),
        )
