"""A mesh of its own for the chaos suite (it kills things), with a second router replica."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.launcher import LocalMesh, MeshConfig, Replica
from tests.chaos.report import ChaosReport
from tests.support.catalog import write_test_catalog, write_test_repository


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    run_dir = tmp_path_factory.mktemp("chaos")
    config = MeshConfig.ephemeral(
        run_dir,
        model_repository=write_test_repository(tmp_path_factory.mktemp("models")),
        extra_env={
            "SHEPHERD_CATALOG": str(write_test_catalog(run_dir / "catalog.yaml")),
            # A killed peer is noticed by every request, not after a long health poll.
            "SHEPHERD_SHUTDOWN_GRACE_S": "2",
        },
    )
    with LocalMesh(config) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def second_router(mesh: LocalMesh) -> Replica:
    return mesh.add_router()


@pytest.fixture(scope="module")
def report() -> Iterator[ChaosReport]:
    """The fault table, printed and written to .build/chaos/ when the module is done."""
    table = ChaosReport()
    yield table
    table.write(Path(".build") / "chaos")
