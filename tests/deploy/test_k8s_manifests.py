"""The Kubernetes manifests stay in step with the code they deploy."""

from __future__ import annotations

from pathlib import Path

import yaml

from libs.catalog import load_catalog
from libs.config import DEFAULT_CATALOG, REPO_ROOT

K8S = REPO_ROOT / "deploy" / "k8s"


def test_cluster_catalog_is_the_shipped_catalog() -> None:
    # Kustomize cannot read files outside deploy/k8s, so the cluster has a copy; it must not drift.
    assert load_catalog(K8S / "catalog.yaml", env={}) == load_catalog(DEFAULT_CATALOG, env={})


def test_every_manifest_is_valid_yaml_with_kinds() -> None:
    files = sorted(K8S.glob("*.yaml"))
    assert files
    for path in files:
        documents = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        assert documents, path
        if path.name not in {"catalog.yaml", "kustomization.yaml"}:
            assert all("kind" in d and "metadata" in d for d in documents), path
