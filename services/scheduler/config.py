"""The scheduler's configuration, read once at start-up."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from libs.config import (
    ServerConfig,
    TelemetryConfig,
    catalog_path,
    env_address,
    env_float,
    env_int,
    env_str,
    redis_url,
)
from libs.credentials import Credentials
from libs.retry import RetryPolicy
from services.scheduler.breaker import BreakerConfig
from services.scheduler.cluster import ClusterConfig, default_replica_id
from services.scheduler.nodes import HealthConfig
from services.scheduler.placement import PlacementConfig


@dataclass(frozen=True)
class SchedulerConfig:
    """Everything the scheduler needs to start."""

    server: ServerConfig
    telemetry: TelemetryConfig
    credentials: Credentials
    catalog: Path
    # How hosted calls retry (libs/retry.py) and when a provider's circuit opens (breaker.py).
    hosted_retry: RetryPolicy
    hosted_breaker: BreakerConfig
    default_timeout_s: float
    hosted_inflight_batches: int
    health: HealthConfig
    placement: PlacementConfig
    # Where pool usage goes (services/scheduler/poolusage.py): billing's address, given
    # explicitly (SHEPHERD_BILLING_ADDR); empty: the pools' hourly figures are not kept.
    billing_addr: str = ""
    pool_usage_interval_s: float = 1.0
    # A stream's deltas go at most this often (events.py EventChannel.deltas); 0: each as soon
    # as it is ready.
    stream_interval_s: float = 0.02
    # Scale-out across replicas (services/scheduler/cluster.py); off unless a cluster is named.
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SchedulerConfig:
        server = ServerConfig.from_env("scheduler", env)
        return cls(
            server=server,
            telemetry=TelemetryConfig.from_env("scheduler", env),
            credentials=Credentials.from_env(env),
            catalog=catalog_path(env),
            # SHEPHERD_HOSTED_TIMEOUT_S: how long one attempt may wait for its first byte
            # before it is abandoned and retried (a whole call is bounded by the request's
            # deadline); SHEPHERD_HOSTED_MAX_RETRIES: retries after the first attempt.
            hosted_retry=RetryPolicy(
                attempts=env_int("SHEPHERD_HOSTED_MAX_RETRIES", 3, minimum=0, env=env) + 1,
                base_s=0.25,
                max_s=8.0,
                jitter=0.5,
                attempt_timeout_s=env_float(
                    "SHEPHERD_HOSTED_TIMEOUT_S", 60.0, minimum=0.01, env=env
                ),
            ),
            # Consecutive failed calls that open a provider's circuit, and its first cool-down
            # (doubling on every failed probe up to 30 s).
            hosted_breaker=BreakerConfig(
                failure_threshold=env_int(
                    "SHEPHERD_HOSTED_BREAKER_FAILURES", 5, minimum=1, env=env
                ),
                open_cooldown_s=env_float(
                    "SHEPHERD_HOSTED_BREAKER_COOLDOWN_S", 1.0, minimum=0.01, env=env
                ),
                max_cooldown_s=30.0,
            ),
            # Applies when the caller set no gRPC deadline, so nothing waits forever.
            default_timeout_s=env_float(
                "SHEPHERD_SCHEDULER_DEFAULT_TIMEOUT_S", 120.0, minimum=0.01, env=env
            ),
            # Concurrent batches per hosted-only model (Triton capacity is per node, in the
            # catalog's pools).
            hosted_inflight_batches=env_int(
                "SHEPHERD_SCHEDULER_HOSTED_INFLIGHT_BATCHES", 8, minimum=1, env=env
            ),
            health=HealthConfig(
                poll_interval_s=env_float(
                    "SHEPHERD_SCHEDULER_HEALTH_INTERVAL_S", 0.5, minimum=0.01, env=env
                ),
                failure_threshold=env_int(
                    "SHEPHERD_SCHEDULER_BREAKER_FAILURES", 2, minimum=1, env=env
                ),
                open_cooldown_s=env_float(
                    "SHEPHERD_SCHEDULER_BREAKER_COOLDOWN_S", 1.0, minimum=0.01, env=env
                ),
            ),
            placement=PlacementConfig(
                load_timeout_s=env_float(
                    "SHEPHERD_SCHEDULER_LOAD_TIMEOUT_S", 120.0, minimum=0.1, env=env
                ),
            ),
            billing_addr=(
                env_address("SHEPHERD_BILLING_ADDR", "", env)
                if env_str("SHEPHERD_BILLING_ADDR", "", env)
                else ""
            ),
            pool_usage_interval_s=env_float(
                "SHEPHERD_SCHEDULER_POOL_USAGE_INTERVAL_S", 1.0, minimum=0.01, env=env
            ),
            stream_interval_s=env_float("SHEPHERD_STREAM_INTERVAL_MS", 20.0, minimum=0.0, env=env)
            / 1000,
            cluster=cluster_config(server, env),
        )


def cluster_config(server: ServerConfig, env: Mapping[str, str] | None = None) -> ClusterConfig:
    """Scale-out settings. SHEPHERD_SCHEDULER_CLUSTER names the cluster (and turns it on);
    the replica registers SHEPHERD_SCHEDULER_ADVERTISE (default: its listen address, the host
    name for a wildcard host) for routers and other replicas to dial."""
    name = env_str("SHEPHERD_SCHEDULER_CLUSTER", "", env)
    if not name:
        return ClusterConfig()
    host = server.host if server.host not in ("0.0.0.0", "::", "") else socket.gethostname()
    member_ttl_s = env_float("SHEPHERD_SCHEDULER_MEMBER_TTL_S", 2.5, minimum=0.2, env=env)
    return ClusterConfig(
        name=name,
        redis_url=redis_url(env),
        replica_id=env_str("SHEPHERD_SCHEDULER_REPLICA_ID", "", env) or default_replica_id(),
        advertise=env_address("SHEPHERD_SCHEDULER_ADVERTISE", f"{host}:{server.port}", env),
        # A quarter of the expiry: three heartbeats can be lost before a live replica is
        # taken for dead.
        heartbeat_s=env_float(
            "SHEPHERD_SCHEDULER_HEARTBEAT_S", member_ttl_s / 4, minimum=0.05, env=env
        ),
        member_ttl_s=member_ttl_s,
        leader_ttl_s=env_float(
            "SHEPHERD_SCHEDULER_LEADER_TTL_S", member_ttl_s, minimum=0.2, env=env
        ),
    )
