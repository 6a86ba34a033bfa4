"""deploy/compose/: the mesh with Jaeger, Prometheus and Grafana, read as Docker Compose reads it.

No Docker daemon runs where these tests run, so the file is checked for what would make it
start and wire up wrongly: every service present, each service told its peers, its metrics
port and Jaeger; Triton tracing into Jaeger's OTLP/HTTP port; Prometheus scraping every
metrics port; Grafana provisioned with the dashboard the dashboard tests check.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import yaml

from libs.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, REPO_ROOT

COMPOSE = REPO_ROOT / "deploy" / "compose"
SERVICES = ("router", "scheduler", "cache", "billing")


def _compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text())


def test_the_mesh_and_the_operators_tools_are_all_there() -> None:
    services = _compose()["services"]
    assert set(services) == {*SERVICES, "valkey", "triton", "jaeger", "prometheus", "grafana"}
    assert "16686:16686" in services["jaeger"]["ports"]


def test_each_service_knows_its_peers_metrics_port_and_jaeger() -> None:
    services = _compose()["services"]
    for name in SERVICES:
        env = services[name]["environment"]
        assert services[name]["command"] == [f"services.{name}"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        assert env["REDIS_URL"] == "redis://valkey:6379/0"
        for peer, port in DEFAULT_PORTS.items():
            assert env[f"SHEPHERD_{peer.upper()}_ADDR"] == f"{peer}:{port}"
        assert env[f"SHEPHERD_{name.upper()}_METRICS_PORT"] == str(DEFAULT_METRICS_PORTS[name])
        assert env["SHEPHERD_POOL_LOCAL_NODES"] == "triton:8001"


def test_triton_traces_into_jaegers_otlp_http_port() -> None:
    command = _compose()["services"]["triton"]["command"]
    assert "--trace-config=mode=opentelemetry" in command
    (url,) = [c.split("url=", 1)[1] for c in command if "opentelemetry,url=" in c]
    assert urlsplit(url)[1:3] == ("jaeger:4318", "/v1/traces")
    loaded = {c.split("=", 1)[1] for c in command if c.startswith("--load-model=")}
    assert all((REPO_ROOT / "deploy" / "triton" / "model_repository" / m).is_dir() for m in loaded)


def test_prometheus_scrapes_every_metrics_port_and_grafana_gets_the_dashboard() -> None:
    scrape = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = {
        target
        for job in scrape["scrape_configs"]
        for config in job["static_configs"]
        for target in config["targets"]
    }
    assert targets == {f"{n}:{p}" for n, p in DEFAULT_METRICS_PORTS.items()} | {"triton:8002"}
    volumes = _compose()["services"]["grafana"]["volumes"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in volumes}
    assert (COMPOSE / "../grafana").resolve() == REPO_ROOT / "deploy" / "grafana"
    provider = yaml.safe_load((COMPOSE / "grafana" / "dashboards.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == mounted["../grafana"]
    assert (REPO_ROOT / "deploy" / "grafana" / "shepherd.json").is_file()
