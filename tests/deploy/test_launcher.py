"""The local launcher refuses, before starting anything, what would break a mesh already up."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from deploy.local.launcher import LocalMesh, MeshConfig, MeshStartError


def test_a_second_mesh_on_the_same_run_directory_is_refused(tmp_path: Path) -> None:
    first = LocalMesh(MeshConfig.ephemeral(tmp_path))
    first._claim_run_dir()  # what start() does first; nothing else is started here
    try:
        second = LocalMesh(MeshConfig.ephemeral(tmp_path))
        with pytest.raises(MeshStartError, match="another mesh is running from"):
            second.start(timeout_s=5)
        assert second.valkey is None and second.triton is None and not second.services
    finally:
        first.stop()
    # Released on stop: the directory can be used again.
    again = LocalMesh(MeshConfig.ephemeral(tmp_path))
    again._claim_run_dir()
    again.stop()


def test_a_service_port_in_use_is_named_before_anything_starts(tmp_path: Path) -> None:
    config = MeshConfig.ephemeral(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", config.service_ports["scheduler"]))
        holder.listen()
        mesh = LocalMesh(config)
        with pytest.raises(MeshStartError) as refused:
            mesh.start(timeout_s=5)
    port = config.service_ports["scheduler"]
    assert f"port {port} for the scheduler service is in use" in str(refused.value)
    assert "SHEPHERD_SCHEDULER_PORT" in str(refused.value)
    assert mesh.valkey is None and mesh.triton is None and not mesh.services


def test_the_router_http_port_in_use_is_named_before_anything_starts(tmp_path: Path) -> None:
    config = MeshConfig.ephemeral(tmp_path)
    assert config.http_port, "test meshes serve the OpenAI-compatible HTTP edge too"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", config.http_port))
        holder.listen()
        mesh = LocalMesh(config)
        with pytest.raises(MeshStartError) as refused:
            mesh.start(timeout_s=5)
    assert f"port {config.http_port} for the router HTTP service is in use" in str(refused.value)
    assert "SHEPHERD_ROUTER_HTTP_PORT" in str(refused.value)
    assert mesh.valkey is None and mesh.triton is None and not mesh.services
