"""A mesh of its own for the chaos suite (it kills things), with a second router replica."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.launcher import LocalMesh, Replica
from tests.chaos.report import ChaosReport
from tests.support.mesh import running_mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """The integration suite's mesh (tests/support/mesh.py), scoped to this module."""
    with running_mesh(tmp_path_factory, extra_env={"SHEPHERD_SHUTDOWN_GRACE_S": "2"}) as mesh:
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
