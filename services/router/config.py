"""The router's configuration, read once at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from libs.config import (
    DEFAULT_ROUTER_HTTP_PORT,
    REPO_ROOT,
    ConfigError,
    ServerConfig,
    TelemetryConfig,
    catalog_path,
    env_bool,
    env_float,
    env_int,
    env_str,
    peer_address,
    redis_url,
)
from libs.credentials import Credentials
from services.router.auth import MAX_CACHE_TTL_S


@dataclass(frozen=True)
class QuotaConfig:
    """How the router reserves budgets and applies rate limits (services/router/quota.py)."""

    # When the accounts store cannot be reached: refuse (False, the default) or let the
    # request through unreserved and unlimited (True), logging each time.
    fail_open: bool
    # A reservation outlives its request's deadline by this much before it is released
    # automatically, so a router that dies never leaves money reserved for ever.
    lease_grace_s: float
    # How long a request waits for other requests' reservations to settle when only they
    # stand between it and the budget, before it is refused.
    budget_wait_s: float


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router needs to start."""

    server: ServerConfig
    telemetry: TelemetryConfig
    credentials: Credentials
    catalog: Path
    redis_url: str
    scheduler_addr: str
    cache_addr: str
    billing_addr: str
    cache_timeout_s: float
    billing_timeout_s: float
    default_timeout_s: float
    key_cache_s: float
    quota: QuotaConfig
    # Where usage that billing cannot take yet waits (services/router/spool.py): one directory
    # per replica, kept across restarts; and how many records it may hold.
    spool_dir: Path
    spool_max_records: int
    # How long a spooled request's reservation is kept while its usage waits for billing.
    spool_hold_s: float
    # The OpenAI-compatible HTTP edge (services/router/http_edge.py) listens on this port, on
    # the same host as gRPC; 0 turns it off.
    http_port: int = DEFAULT_ROUTER_HTTP_PORT
    # The scheduler cluster (SHEPHERD_SCHEDULER_CLUSTER) whose members, in Redis, own the
    # models' queues; empty: every request goes to scheduler_addr.
    scheduler_cluster: str = ""
    # Unary chats go to the scheduler as calls on one open InferMany stream per replica
    # (services/router/multiplex.py); False: one InferStream call each, as streams go.
    multiplex: bool = True

    @property
    def http_address(self) -> str:
        return f"{self.server.host}:{self.http_port}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RouterConfig:
        key_cache_s = env_float("SHEPHERD_ROUTER_KEY_CACHE_S", 2.0, minimum=0.0, env=env)
        if key_cache_s > MAX_CACHE_TTL_S:
            raise ConfigError(
                f"SHEPHERD_ROUTER_KEY_CACHE_S={key_cache_s} must be at most {MAX_CACHE_TTL_S}:"
                " a revoked key must stop working within 5 seconds"
            )
        server = ServerConfig.from_env("router", env)
        spool_dir = env_str(
            "SHEPHERD_ROUTER_SPOOL_DIR",
            str(REPO_ROOT / ".run" / "spool" / f"router-{server.port}"),
            env,
        )
        http_port = env_int(
            "SHEPHERD_ROUTER_HTTP_PORT", DEFAULT_ROUTER_HTTP_PORT, minimum=0, maximum=65535, env=env
        )
        if http_port == server.port:
            raise ConfigError(
                f"SHEPHERD_ROUTER_HTTP_PORT={http_port} is the router's gRPC port too: give the"
                " HTTP edge a port of its own (or 0 to turn it off)"
            )
        return cls(
            server=server,
            telemetry=TelemetryConfig.from_env("router", env),
            credentials=Credentials.from_env(env),
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
            key_cache_s=key_cache_s,
            quota=QuotaConfig(
                fail_open=env_bool("SHEPHERD_QUOTA_FAIL_OPEN", False, env),
                lease_grace_s=env_float(
                    "SHEPHERD_ROUTER_LEASE_GRACE_S", 30.0, minimum=0.1, env=env
                ),
                budget_wait_s=env_float(
                    "SHEPHERD_ROUTER_BUDGET_WAIT_S", 10.0, minimum=0.0, env=env
                ),
            ),
            spool_dir=Path(spool_dir),
            spool_max_records=env_int(
                "SHEPHERD_ROUTER_SPOOL_MAX_RECORDS", 100_000, minimum=1, env=env
            ),
            spool_hold_s=env_float("SHEPHERD_ROUTER_SPOOL_HOLD_S", 3600.0, minimum=1.0, env=env),
            http_port=http_port,
            scheduler_cluster=env_str("SHEPHERD_SCHEDULER_CLUSTER", "", env),
            multiplex=env_bool("SHEPHERD_ROUTER_MULTIPLEX", True, env),
        )
