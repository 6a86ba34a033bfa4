"""Billing's configuration, read once at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from libs.config import ServerConfig, TelemetryConfig, catalog_path, env_float, env_int, redis_url
from libs.credentials import Credentials


@dataclass(frozen=True)
class BillingConfig:
    """Everything the billing service needs to start."""

    server: ServerConfig
    telemetry: TelemetryConfig
    credentials: Credentials
    redis_url: str
    redis_timeout_s: float
    catalog: Path
    # How long each request's ledger entry (and so its idempotency) is kept; the daily
    # aggregates that reports read are kept for good.
    retention_s: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BillingConfig:
        return cls(
            server=ServerConfig.from_env("billing", env),
            telemetry=TelemetryConfig.from_env("billing", env),
            credentials=Credentials.from_env(env),
            redis_url=redis_url(env),
            redis_timeout_s=env_float("SHEPHERD_REDIS_TIMEOUT_S", 2.0, minimum=0.01, env=env),
            catalog=catalog_path(env),
            retention_s=86_400
            * env_int("SHEPHERD_LEDGER_RETENTION_DAYS", 35, minimum=1, maximum=3650, env=env),
        )
