"""Configuration read from the environment once, at start-up.

Every service builds one frozen dataclass from these helpers before it opens a socket, so a
typo in a variable fails the process immediately with a message naming the variable, instead
of surfacing later as a confusing runtime error.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CATALOG = REPO_ROOT / "deploy" / "catalog.yaml"

DEFAULT_PORTS: Mapping[str, int] = {
    "router": 50051,
    "scheduler": 50052,
    "cache": 50053,
    "billing": 50054,
}
# The router's OpenAI-compatible HTTP edge (services/router/http_edge.py), beside its gRPC port;
# SHEPHERD_ROUTER_HTTP_PORT=0 turns it off.
DEFAULT_ROUTER_HTTP_PORT = 8080

# Where each service serves Prometheus' /metrics (libs/metrics.py): next to 9464, the port
# OpenTelemetry's Prometheus exporter uses by default. 0 turns a service's endpoint off.
DEFAULT_METRICS_PORTS: Mapping[str, int] = {
    "router": 9461,
    "scheduler": 9462,
    "cache": 9463,
    "billing": 9464,
}


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message says which and how to fix it."""


def env_str(name: str, default: str, env: Mapping[str, str] | None = None) -> str:
    """Return a string variable, or the default when it is unset or empty."""
    value = (env if env is not None else os.environ).get(name, "")
    return value if value != "" else default


def env_int(
    name: str,
    default: int,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Return an integer variable within bounds, failing fast with the variable's name."""
    raw = env_str(name, "", env)
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={value} must be at most {maximum}")
    return value


def env_float(
    name: str,
    default: float,
    *,
    minimum: float | None = None,
    env: Mapping[str, str] | None = None,
) -> float:
    """Return a float variable (used only for durations, never for money)."""
    raw = env_str(name, "", env)
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} must be a finite number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def env_bool(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    """Return a true/false variable; anything but the usual spellings fails at start-up."""
    raw = env_str(name, "", env).strip().lower()
    if raw == "":
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r} must be true or false")


def env_address(name: str, default: str, env: Mapping[str, str] | None = None) -> str:
    """Return a `host:port` variable, checking its shape so a bad peer address fails at start."""
    value = env_str(name, default, env)
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={value!r} must look like host:port, e.g. 127.0.0.1:50052")
    return value


@dataclass(frozen=True)
class ServerConfig:
    """Where a service listens and how long it drains on shutdown."""

    service: str
    host: str
    port: int
    grace_s: float

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str] | None = None) -> ServerConfig:
        prefix = f"SHEPHERD_{service.upper()}"
        return cls(
            service=service,
            host=env_str("SHEPHERD_HOST", "127.0.0.1", env),
            port=env_int(
                f"{prefix}_PORT", DEFAULT_PORTS[service], minimum=1, maximum=65535, env=env
            ),
            grace_s=env_float("SHEPHERD_SHUTDOWN_GRACE_S", 5.0, minimum=0.0, env=env),
        )


@dataclass(frozen=True)
class TelemetryConfig:
    """Where traces and metrics go, and how verbose logs are.

    `enabled` is false with OTEL_SDK_DISABLED=true (OpenTelemetry's own switch): no spans, no
    metrics, no /metrics endpoint, only logs. `metrics_port` 0 leaves /metrics off.
    """

    service_name: str
    otlp_endpoint: str
    log_level: str
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    enabled: bool = True
    # OTEL_EXPORTER_OTLP_PROTOCOL: "grpc" (Jaeger's and the Collector's 4317) or
    # "http/protobuf" (their 4318; the endpoint is then the base URL, /v1/traces is added).
    otlp_protocol: str = "grpc"
    # Where metrics go (OTEL_METRICS_EXPORTER: otlp, prometheus, none, comma-separated). Unset:
    # Prometheus' /metrics when the service has a metrics port, else OTLP to the endpoint (Jaeger,
    # the usual OTLP endpoint, takes no metrics).
    metrics_exporters: frozenset[str] = frozenset({"prometheus"})

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str] | None = None) -> TelemetryConfig:
        level = env_str("SHEPHERD_LOG_LEVEL", "INFO", env).upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(f"SHEPHERD_LOG_LEVEL={level!r} must be DEBUG, INFO, WARNING or ERROR")
        metrics_port = env_int(
            f"SHEPHERD_{service.upper()}_METRICS_PORT",
            DEFAULT_METRICS_PORTS.get(service, 0),
            minimum=0,
            maximum=65535,
            env=env,
        )
        return cls(
            service_name=f"shepherd-{service}",
            otlp_endpoint=env_str("OTEL_EXPORTER_OTLP_ENDPOINT", "", env),
            log_level=level,
            metrics_host=env_str("SHEPHERD_HOST", "127.0.0.1", env),
            metrics_port=metrics_port,
            enabled=not env_bool("OTEL_SDK_DISABLED", False, env),
            otlp_protocol=_otlp_protocol(env),
            metrics_exporters=_metrics_exporters(env, metrics_port),
        )


def _metrics_exporters(env: Mapping[str, str] | None, metrics_port: int) -> frozenset[str]:
    raw = env_str("OTEL_METRICS_EXPORTER", "", env)
    if not raw:
        return frozenset({"prometheus" if metrics_port else "otlp"})
    chosen = frozenset(part.strip().lower() for part in raw.split(",") if part.strip())
    if not chosen <= {"otlp", "prometheus", "none"}:
        raise ConfigError(
            f"OTEL_METRICS_EXPORTER={raw!r} must name otlp, prometheus or none (comma-separated)"
        )
    return chosen - {"none"}


def _otlp_protocol(env: Mapping[str, str] | None) -> str:
    value = env_str("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", env).strip().lower()
    if value not in {"grpc", "http/protobuf"}:
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={value!r} must be grpc or http/protobuf"
            " (http/json is not supported)"
        )
    return value


def peer_address(service: str, env: Mapping[str, str] | None = None) -> str:
    """Return the address other services dial to reach `service` (`SHEPHERD_<SERVICE>_ADDR`)."""
    return env_address(
        f"SHEPHERD_{service.upper()}_ADDR", f"127.0.0.1:{DEFAULT_PORTS[service]}", env
    )


def redis_url(env: Mapping[str, str] | None = None) -> str:
    """Return the Redis/Valkey URL shared by the router, cache and billing."""
    value = env_str("REDIS_URL", "redis://127.0.0.1:6379/0", env)
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"REDIS_URL={value!r} must start with redis://, rediss:// or unix://")
    return value


def catalog_path(env: Mapping[str, str] | None = None) -> Path:
    """Return the model catalog file, failing fast when it does not exist."""
    path = Path(env_str("SHEPHERD_CATALOG", str(DEFAULT_CATALOG), env))
    if not path.is_file():
        raise ConfigError(f"SHEPHERD_CATALOG={str(path)!r} is not a file")
    return path
