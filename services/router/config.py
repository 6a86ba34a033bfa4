"""The router's configuration, read once at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from libs.config import (
    ServerConfig,
    TelemetryConfig,
    catalog_path,
    env_float,
    peer_address,
    redis_url,
)


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router needs to start."""

    server: ServerConfig
    telemetry: TelemetryConfig
    catalog: Path
    redis_url: str
    scheduler_addr: str
    cache_addr: str
    billing_addr: str
    cache_timeout_s: float
    billing_timeout_s: float
    default_timeout_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RouterConfig:
        return cls(
            server=ServerConfig.from_env("router", env),
            telemetry=TelemetryConfig.from_env("router", env),
            catalog=catalog_path(env),
            redis_url=redis_url(env),
            scheduler_addr=peer_address("scheduler", env),
            cache_addr=peer_address("cache", env),
            billing_addr=peer_address("billing", env),
            cache_timeout_s=env_float(
                "SHEPHERD_ROUTER_CACHE_TIMEOUT_S", 0.5, minimum=0.01, env=env
            ),
            billing_timeout_s=env_float(
                "SHEPHERD_ROUTER_BILLING_TIMEOUT_S", 5.0, minimum=0.01, env=env
            ),
            # Applies when the caller set no gRPC deadline, so nothing waits forever.
            default_timeout_s=env_float(
                "SHEPHERD_ROUTER_DEFAULT_TIMEOUT_S", 120.0, minimum=0.01, env=env
            ),
        )
