"""The cache service's configuration, read once at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from libs.config import (
    ServerConfig,
    TelemetryConfig,
    catalog_path,
    env_bool,
    env_float,
    env_int,
    redis_url,
)
from libs.credentials import Credentials


@dataclass(frozen=True)
class CacheConfig:
    """Everything the cache service needs to start."""

    server: ServerConfig
    telemetry: TelemetryConfig
    credentials: Credentials
    catalog: Path
    redis_url: str
    redis_timeout_s: float
    default_ttl_s: int
    # How long a leader's lease lasts unless renewed: how long followers of a leader that
    # died wait before one of them takes over (services/cache/flights.py).
    lease_ms: int
    # Whether identical requests in flight are coalesced at all (on by default).
    single_flight: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CacheConfig:
        return cls(
            server=ServerConfig.from_env("cache", env),
            telemetry=TelemetryConfig.from_env("cache", env),
            credentials=Credentials.from_env(env),
            catalog=catalog_path(env),
            redis_url=redis_url(env),
            # Short: a slow cache must not cost more than the work it saves.
            redis_timeout_s=env_float(
                "SHEPHERD_CACHE_REDIS_TIMEOUT_S", 0.25, minimum=0.01, env=env
            ),
            default_ttl_s=env_int("SHEPHERD_CACHE_TTL_S", 3600, minimum=1, env=env),
            lease_ms=env_int("SHEPHERD_CACHE_LEASE_MS", 5_000, minimum=100, env=env),
            single_flight=env_bool("SHEPHERD_CACHE_SINGLE_FLIGHT", True, env),
        )
