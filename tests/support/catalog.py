"""The catalog the integration tests run with: the shipped one plus models and tenants that
exercise what the shipped one does not.

- `offline-tiny`: a model whose only Triton node is down (nothing listens).
- `shared-tiny`: tiny_lm with `cache_scope: shared`, so every tenant shares its answers.
- `sovereign-hosted` and `sovereign-local`: one model family, answered by the hosted API and
  by the local Triton node, so a cached hosted answer is visible to the self-hosted model.
- tenants `grp-a` and `grp-b` in cache group `corp`, and the self-hosted-only `sovereign`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from deploy.local.ports import free_port
from libs.config import DEFAULT_CATALOG

OFFLINE_MODEL = "offline-tiny"
SHARED_MODEL = "shared-tiny"
SOVEREIGN_HOSTED = "sovereign-hosted"
SOVEREIGN_LOCAL = "sovereign-local"
GROUP_TENANTS = ("grp-a", "grp-b")
SOVEREIGN_TENANT = "sovereign"


def write_test_catalog(path: Path) -> Path:
    """Write the shipped catalog plus the test models and tenants."""
    data = yaml.safe_load(DEFAULT_CATALOG.read_text())
    tiny = data["models"]["shepherd-tiny"]
    data["pools"]["offline"] = {"nodes": [f"127.0.0.1:{free_port()}"]}
    data["models"][OFFLINE_MODEL] = {
        **tiny,
        "aliases": [],
        "deployments": [{"kind": "triton", "pool": "offline", "model": "tiny_lm"}],
    }
    data["models"][SHARED_MODEL] = {
        **tiny,
        "aliases": [],
        "family": SHARED_MODEL,
        "cache_scope": "shared",
        "deployments": [
            {"name": "local/shared", "kind": "triton", "pool": "local", "model": "tiny_lm"}
        ],
    }
    data["models"][SOVEREIGN_HOSTED] = {
        **tiny,
        "aliases": [],
        "family": "sovereign",
        "deployments": [{"kind": "hosted", "provider": "holysheep", "model": "deepseek-v3.2"}],
    }
    data["models"][SOVEREIGN_LOCAL] = {
        **tiny,
        "aliases": [],
        "family": "sovereign",
        "deployments": [
            {"name": "local/sovereign", "kind": "triton", "pool": "local", "model": "tiny_lm"}
        ],
    }
    data["tenants"] = {
        **data.get("tenants", {}),
        **{name: {"cache_group": "corp"} for name in GROUP_TENANTS},
        SOVEREIGN_TENANT: {"self_hosted_only": True},
    }
    path.write_text(yaml.safe_dump(data))
    return path
