"""A whole real mesh for the suites that test it from outside: integration and fuzz.

Both start the same thing, so it is laid out once here: the local launcher
(deploy/local/launcher.py) on free loopback ports, with the test catalog and model repository
(tests/support/catalog.py), and a check on the way out that stopping it left no process
behind. Each suite owns its mesh's lifetime through its own fixture.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

from deploy.local.launcher import LocalMesh, MeshConfig
from tests.support.catalog import write_test_catalog, write_test_repository


def pids_alive(pids: list[int]) -> list[int]:
    """The processes among `pids` still running (a zombie or a dead one is not)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in {"Z", "X"}:
            alive.append(pid)
    return alive


def mesh_pids(mesh: LocalMesh) -> list[int]:
    """The pids of the four services and the Triton node: what a test must not kill."""
    pids = [proc.pid for proc in mesh.services.values()]
    assert mesh.triton is not None and mesh.triton.pid is not None
    pids.append(mesh.triton.pid)
    return pids


@contextmanager
def running_mesh(
    tmp_path_factory: pytest.TempPathFactory,
    *,
    otlp_endpoint: str = "",
    otlp_http_endpoint: str = "",
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[LocalMesh]:
    """A started mesh on the test catalog; stopped on exit, with nothing left running."""
    run_dir = tmp_path_factory.mktemp("mesh")
    config = MeshConfig.ephemeral(
        run_dir,
        otlp_endpoint=otlp_endpoint,
        otlp_http_endpoint=otlp_http_endpoint,
        model_repository=write_test_repository(tmp_path_factory.mktemp("models")),
        extra_env={
            "SHEPHERD_CATALOG": str(write_test_catalog(run_dir / "catalog.yaml")),
            **(extra_env or {}),
        },
    )
    mesh = LocalMesh(config).start()
    pids = mesh_pids(mesh)
    try:
        yield mesh
    finally:
        mesh.stop()
    assert pids_alive(pids) == [], "the mesh left processes running after stop()"
