"""The catalog the integration tests run with: the shipped one plus a model that cannot run."""

from __future__ import annotations

from pathlib import Path

import yaml

from deploy.local.ports import free_port
from libs.config import DEFAULT_CATALOG

OFFLINE_MODEL = "offline-tiny"


def write_test_catalog(path: Path) -> Path:
    """Write the shipped catalog plus a model whose only Triton node is down (nothing listens)."""
    data = yaml.safe_load(DEFAULT_CATALOG.read_text())
    data["pools"]["offline"] = {"nodes": [f"127.0.0.1:{free_port()}"]}
    data["models"][OFFLINE_MODEL] = {
        **data["models"]["shepherd-tiny"],
        "aliases": [],
        "deployments": [{"kind": "triton", "pool": "offline", "model": "tiny_lm"}],
    }
    path.write_text(yaml.safe_dump(data))
    return path
