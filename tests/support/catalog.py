"""The catalog the integration tests run with: the shipped one plus models and tenants that
exercise what the shipped one does not.

- `offline-tiny`: a model whose only Triton node is down (nothing listens).
- `shared-tiny`: tiny_lm with `cache_scope: shared`, so every tenant shares its answers.
- `sovereign-hosted` and `sovereign-local`: one model family, answered by the hosted API and
  by the local Triton node, so a cached hosted answer is visible to the self-hosted model,
  and the cost reports compare sovereign-local's tokens with sovereign-hosted's price.
- tenants `grp-a` and `grp-b` in cache group `corp`, and the self-hosted-only `sovereign`.
- `tiny-slow`: the streaming model decoding exactly max_tokens, 50 ms a step, so a test can
  cancel it mid-stream or let its deadline pass; and `tiny-engine`, the streaming model as an
  engine-batched deployment (one request per sequence). Both are copies in a test model
  repository (`write_test_repository`), so their Triton statistics are their own.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from deploy.local.ports import free_port
from deploy.local.triton import DEFAULT_MODEL_REPOSITORY
from libs.config import DEFAULT_CATALOG
from tests.support.scheduler import copy_model, link_shipped_models

OFFLINE_MODEL = "offline-tiny"
SHARED_MODEL = "shared-tiny"
SOVEREIGN_HOSTED = "sovereign-hosted"
SOVEREIGN_LOCAL = "sovereign-local"
SLOW_MODEL, SLOW_TRITON_MODEL = "tiny-slow", "tiny_lm_slow"
ENGINE_MODEL, ENGINE_TRITON_MODEL = "tiny-engine", "tiny_lm_engine"
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
    # The sovereign family is compared with its own hosted model, not shepherd-tiny's.
    sovereign = {key: value for key, value in tiny.items() if key != "hosted_equivalent"}
    data["models"][SOVEREIGN_HOSTED] = {
        **sovereign,
        "aliases": [],
        "family": "sovereign",
        "deployments": [{"kind": "hosted", "provider": "holysheep", "model": "deepseek-v3.2"}],
    }
    data["models"][SOVEREIGN_LOCAL] = {
        **sovereign,
        "aliases": [],
        "family": "sovereign",
        "deployments": [
            {"name": "local/sovereign", "kind": "triton", "pool": "local", "model": "tiny_lm"}
        ],
    }
    stream = data["models"]["shepherd-tiny-stream"]
    data["models"][SLOW_MODEL] = {
        **stream,
        "aliases": [],
        "family": SLOW_MODEL,
        "deployments": [
            {"kind": "triton", "pool": "local", "model": SLOW_TRITON_MODEL, "memory_mb": 256}
        ],
    }
    data["models"][ENGINE_MODEL] = {
        **stream,
        "aliases": [],
        "family": ENGINE_MODEL,
        "deployments": [
            {
                "kind": "triton",
                "pool": "local",
                "model": ENGINE_TRITON_MODEL,
                "memory_mb": 256,
                "batching": "engine",
            }
        ],
    }
    data["tenants"] = {
        **data.get("tenants", {}),
        **{name: {"cache_group": "corp"} for name in GROUP_TENANTS},
        SOVEREIGN_TENANT: {"self_hosted_only": True},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def write_test_repository(root: Path) -> Path:
    """The shipped model repository plus the test copies of the streaming model."""
    link_shipped_models(root)
    stream = DEFAULT_MODEL_REPOSITORY / "tiny_lm_stream"
    copy_model(root, SLOW_TRITON_MODEL, stream, {"ignore_eos": "true", "step_delay_ms": "50"})
    copy_model(root, ENGINE_TRITON_MODEL, stream)
    return root
