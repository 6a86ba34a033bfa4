"""Start-up configuration: every bad variable fails fast with a message naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.config import (
    DEFAULT_CATALOG,
    ConfigError,
    ServerConfig,
    TelemetryConfig,
    catalog_path,
    env_address,
    env_float,
    env_int,
    peer_address,
    redis_url,
)


def test_server_config_defaults() -> None:
    config = ServerConfig.from_env("scheduler", env={})

    assert config.service == "scheduler"
    assert config.host == "127.0.0.1"
    assert config.port == 50052
    assert config.grace_s == 5.0
    assert config.address == "127.0.0.1:50052"


def test_server_config_reads_its_own_service_port() -> None:
    env = {
        "SHEPHERD_HOST": "0.0.0.0",
        "SHEPHERD_ROUTER_PORT": "6000",
        "SHEPHERD_CACHE_PORT": "7000",
        "SHEPHERD_SHUTDOWN_GRACE_S": "0.5",
    }

    router = ServerConfig.from_env("router", env=env)
    cache = ServerConfig.from_env("cache", env=env)

    assert router.address == "0.0.0.0:6000"
    assert cache.address == "0.0.0.0:7000"
    assert router.grace_s == 0.5


def test_empty_variable_means_default() -> None:
    config = ServerConfig.from_env("billing", env={"SHEPHERD_BILLING_PORT": ""})
    assert config.port == 50054


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [("0", "at least 1"), ("65536", "at most 65535"), ("http", "not an integer"), ("1.5", "")],
)
def test_server_config_rejects_bad_ports_naming_the_variable(raw: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ServerConfig.from_env("router", env={"SHEPHERD_ROUTER_PORT": raw})

    assert "SHEPHERD_ROUTER_PORT" in str(caught.value)
    assert fragment in str(caught.value)


def test_server_config_rejects_negative_grace() -> None:
    with pytest.raises(ConfigError, match="SHEPHERD_SHUTDOWN_GRACE_S"):
        ServerConfig.from_env("router", env={"SHEPHERD_SHUTDOWN_GRACE_S": "-1"})
    with pytest.raises(ConfigError, match=r"SHEPHERD_SHUTDOWN_GRACE_S.*not a number"):
        ServerConfig.from_env("router", env={"SHEPHERD_SHUTDOWN_GRACE_S": "soon"})


def test_env_int_bounds_are_inclusive() -> None:
    env = {"N": "10"}
    assert env_int("N", 3, minimum=10, maximum=10, env=env) == 10
    assert env_int("MISSING", 3, minimum=10, env=env) == 3  # the default is not re-checked
    assert env_int("N", 3, env={"N": "-7"}) == -7

    with pytest.raises(ConfigError, match=r"^N=10 must be at least 11$"):
        env_int("N", 3, minimum=11, env=env)
    with pytest.raises(ConfigError, match=r"^N=10 must be at most 9$"):
        env_int("N", 3, maximum=9, env=env)
    with pytest.raises(ConfigError, match=r"^N='ten' is not an integer$"):
        env_int("N", 3, env={"N": "ten"})


def test_env_float_minimum() -> None:
    assert env_float("F", 1.0, minimum=0.01, env={"F": "0.01"}) == 0.01
    with pytest.raises(ConfigError, match=r"^F=0\.001 must be at least 0\.01$"):
        env_float("F", 1.0, minimum=0.01, env={"F": "0.001"})


@pytest.mark.parametrize(
    "value",
    ["127.0.0.1:50052", "scheduler.internal:1", "[::1]:65535", "localhost:8001"],
)
def test_env_address_accepts_host_port(value: str) -> None:
    assert env_address("SHEPHERD_SCHEDULER_ADDR", "x", env={"SHEPHERD_SCHEDULER_ADDR": value}) == (
        value
    )


@pytest.mark.parametrize(
    "value",
    ["localhost", ":50052", "host:", "host:port", "host:0", "host:65536", "host:-1", "host: 80"],
)
def test_env_address_rejects_bad_shapes_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        env_address(
            "SHEPHERD_SCHEDULER_ADDR", "127.0.0.1:1", env={"SHEPHERD_SCHEDULER_ADDR": value}
        )

    message = str(caught.value)
    assert message.startswith(f"SHEPHERD_SCHEDULER_ADDR={value!r}")
    assert "host:port" in message


def test_peer_address_defaults_and_checks() -> None:
    assert peer_address("billing", env={}) == "127.0.0.1:50054"
    assert peer_address("cache", env={"SHEPHERD_CACHE_ADDR": "cache:9"}) == "cache:9"
    with pytest.raises(ConfigError, match="SHEPHERD_CACHE_ADDR"):
        peer_address("cache", env={"SHEPHERD_CACHE_ADDR": "cache"})


@pytest.mark.parametrize(
    "value", ["redis://10.0.0.1:6379/0", "rediss://user:pw@redis:6380/2", "unix:///tmp/r.sock"]
)
def test_redis_url_accepts_redis_schemes(value: str) -> None:
    assert redis_url(env={"REDIS_URL": value}) == value


def test_redis_url_default() -> None:
    assert redis_url(env={}) == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("value", ["http://redis:6379", "127.0.0.1:6379", "valkey://x:1"])
def test_redis_url_rejects_other_schemes(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        redis_url(env={"REDIS_URL": value})

    assert str(caught.value).startswith(f"REDIS_URL={value!r}")
    assert "redis://" in str(caught.value)


def test_telemetry_log_level() -> None:
    assert TelemetryConfig.from_env("cache", env={"SHEPHERD_LOG_LEVEL": "debug"}).log_level == (
        "DEBUG"
    )
    assert TelemetryConfig.from_env("cache", env={}).service_name == "shepherd-cache"
    with pytest.raises(ConfigError, match="SHEPHERD_LOG_LEVEL"):
        TelemetryConfig.from_env("cache", env={"SHEPHERD_LOG_LEVEL": "LOUD"})


def test_catalog_path(tmp_path: Path) -> None:
    assert catalog_path(env={}) == DEFAULT_CATALOG
    with pytest.raises(ConfigError, match="SHEPHERD_CATALOG") as caught:
        catalog_path(env={"SHEPHERD_CATALOG": str(tmp_path / "missing.yaml")})
    assert "missing.yaml" in str(caught.value)
    with pytest.raises(ConfigError, match="SHEPHERD_CATALOG"):
        catalog_path(env={"SHEPHERD_CATALOG": str(tmp_path)})  # a directory is not a file


def test_telemetry_config_reads_the_metrics_port_and_opentelemetrys_own_switches() -> None:
    config = TelemetryConfig.from_env("cache", env={})
    assert (config.metrics_port, config.enabled, config.otlp_protocol) == (9463, True, "grpc")
    # With a /metrics port, metrics go there only; without one, over OTLP as before.
    assert config.metrics_exporters == {"prometheus"}
    off = TelemetryConfig.from_env(
        "cache", env={"SHEPHERD_CACHE_METRICS_PORT": "0", "OTEL_SDK_DISABLED": "true"}
    )
    assert (off.metrics_port, off.enabled, off.metrics_exporters) == (0, False, {"otlp"})
    both = TelemetryConfig.from_env(
        "router",
        env={
            "OTEL_METRICS_EXPORTER": "otlp,prometheus",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        },
    )
    assert both.metrics_exporters == {"otlp", "prometheus"}
    assert both.otlp_protocol == "http/protobuf"
    assert (
        TelemetryConfig.from_env("router", env={"OTEL_METRICS_EXPORTER": "none"}).metrics_exporters
        == set()
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SHEPHERD_ROUTER_METRICS_PORT", "70000"),
        ("OTEL_METRICS_EXPORTER", "statsd"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_SDK_DISABLED", "maybe"),
    ],
)
def test_bad_telemetry_settings_fail_fast_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TelemetryConfig.from_env("router", env={name: value})
    assert name in str(caught.value)
