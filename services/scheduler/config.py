"""The scheduler's configuration, read once at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from libs.config import ServerConfig, TelemetryConfig, catalog_path, env_float, env_int


@dataclass(frozen=True)
class SchedulerConfig:
    """Everything the scheduler needs to start."""

    server: ServerConfig
    telemetry: TelemetryConfig
    catalog: Path
    triton_timeout_s: float
    hosted_timeout_s: float
    hosted_max_retries: int
    default_timeout_s: float
    max_inflight_batches: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SchedulerConfig:
        return cls(
            server=ServerConfig.from_env("scheduler", env),
            telemetry=TelemetryConfig.from_env("scheduler", env),
            catalog=catalog_path(env),
            triton_timeout_s=env_float("SHEPHERD_TRITON_TIMEOUT_S", 30.0, minimum=0.01, env=env),
            hosted_timeout_s=env_float("SHEPHERD_HOSTED_TIMEOUT_S", 60.0, minimum=0.01, env=env),
            hosted_max_retries=env_int("SHEPHERD_HOSTED_MAX_RETRIES", 3, minimum=0, env=env),
            # Applies when the caller set no gRPC deadline, so nothing waits forever.
            default_timeout_s=env_float(
                "SHEPHERD_SCHEDULER_DEFAULT_TIMEOUT_S", 120.0, minimum=0.01, env=env
            ),
            max_inflight_batches=env_int(
                "SHEPHERD_SCHEDULER_MAX_INFLIGHT_BATCHES", 4, minimum=1, env=env
            ),
        )
