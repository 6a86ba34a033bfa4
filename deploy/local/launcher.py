"""The local launcher: the whole mesh on one machine, for `make run` and for the tests.

It starts, in order: a Valkey server (unless REDIS_URL points at one), a Triton node serving
deploy/triton/model_repository on CPU, the hosted-API simulator (unless a real
SHEPHERD_HOSTED_API_KEY is configured), then billing, cache, scheduler and router, each as
its own `python -m services.<name>` process. The services authenticate each other with a
service token made fresh for each run, and operators use an admin key made the same way
(`SHEPHERD_INTERNAL_TOKEN` and `SHEPHERD_ADMIN_KEYS` from the environment win). It waits
until every service reports SERVING on the standard health service, issues a fresh dev API
key, and stops everything in reverse order on Ctrl-C or SIGTERM. The router also serves the
OpenAI-compatible HTTP API on its own port (8080 for `make run`, a free one in tests). Nothing
listens anywhere but 127.0.0.1.

Observability (README "Observability"): every service serves Prometheus' /metrics on its
metrics port (9461-9464 for `make run`, free ports in tests). Unless OTEL_EXPORTER_OTLP_ENDPOINT
points at a collector of the user's own (Jaeger's 4317), `make run` starts a local trace
collector (`python -m deploy.local.traces serve`) first: the services export their spans to it
over OTLP/gRPC, Triton over OTLP/HTTP, and it prints, for every request the router serves, the
command that shows its trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from deploy.local.ports import LOCALHOST, free_port, free_ports
from deploy.local.processes import spawn, stop, tail
from deploy.local.provider_sim import SimProcess
from deploy.local.triton import DEFAULT_MODEL_REPOSITORY, TritonNode, TritonNodeConfig
from deploy.local.valkey import ValkeyConfig, ValkeyServer
from libs.apikeys import issue_key_at
from libs.config import (
    DEFAULT_METRICS_PORTS,
    DEFAULT_PORTS,
    DEFAULT_ROUTER_HTTP_PORT,
    REPO_ROOT,
    env_int,
)
from libs.credentials import Credentials
from libs.peers import open_channel

SERVICES = ("billing", "cache", "scheduler", "router")
LOCAL_POOL = "local"
DEV_TENANT = "dev"
# The Triton models loaded when the node starts, so no first request waits for a load:
# shepherd-tiny's, shepherd-tiny-stream's, shepherd-echo's (the gateway benchmark's),
# shepherd-embed's and shepherd-rag's (the rag_tiny ensemble, which loads its steps with it).
PRELOADED_MODELS = ("tiny_lm", "tiny_lm_stream", "echo_lm", "embed_tiny", "rag_tiny")
# Requests per minute the launcher's provider simulator allows each key. The simulator's own
# default (600, `python -m deploy.local.provider_sim --rpm`) is a realistic provider quota for
# tests of 429 handling; a local mesh under a load test would trip it within a second, so the
# launcher's stands in for a generous paid tier instead.
LOCAL_SIM_RPM = 60_000


@dataclass(frozen=True)
class MeshConfig:
    """How to lay the mesh out on this machine."""

    run_dir: Path
    service_ports: Mapping[str, int]
    # The router's OpenAI-compatible HTTP port; 0 leaves the HTTP edge off.
    http_port: int = 0
    redis_url: str = ""  # empty: start a local Valkey server
    hosted_api_key: str = ""  # empty: start the provider simulator
    otlp_endpoint: str = ""
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # The shared secret the services authenticate each other with, and the operators' key.
    # The Triton model repository the local node serves (tests add models of their own).
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    internal_token: str = field(default_factory=lambda: secrets.token_hex(32))
    admin_key: str = field(default_factory=lambda: "sk-admin-" + secrets.token_urlsafe(32))
    # Prometheus /metrics port per service; a service not named serves none.
    metrics_ports: Mapping[str, int] = field(default_factory=dict)
    # Where Triton sends its spans (OTLP/HTTP base URL; it posts to <base>/v1/traces); empty:
    # Triton does not trace, unless the local collector runs.
    otlp_http_endpoint: str = ""
    # Start the local trace collector (deploy/local/traces.py) and send every span to it.
    collect_traces: bool = False
    # The collector prints a line per request with its trace command (on the launcher's stdout).
    announce_traces: bool = False

    @classmethod
    def from_env(cls, run_dir: Path) -> MeshConfig:
        """`make run`: the documented default ports, overridable per service."""
        otlp_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        return cls(
            run_dir=run_dir,
            service_ports={
                name: env_int(f"SHEPHERD_{name.upper()}_PORT", port, minimum=1, maximum=65535)
                for name, port in DEFAULT_PORTS.items()
            },
            metrics_ports={
                name: env_int(f"SHEPHERD_{name.upper()}_METRICS_PORT", port, minimum=0)
                for name, port in DEFAULT_METRICS_PORTS.items()
            },
            otlp_http_endpoint=os.environ.get(
                "SHEPHERD_TRITON_OTLP_ENDPOINT", _http_beside(otlp_endpoint)
            ),
            collect_traces=not otlp_endpoint,
            announce_traces=not otlp_endpoint,
            http_port=env_int(
                "SHEPHERD_ROUTER_HTTP_PORT", DEFAULT_ROUTER_HTTP_PORT, minimum=0, maximum=65535
            ),
            redis_url=os.environ.get("REDIS_URL", ""),
            hosted_api_key=os.environ.get("SHEPHERD_HOSTED_API_KEY", ""),
            otlp_endpoint=otlp_endpoint,
            internal_token=os.environ.get("SHEPHERD_INTERNAL_TOKEN") or secrets.token_hex(32),
            admin_key=(os.environ.get("SHEPHERD_ADMIN_KEYS") or "").split(",")[0].strip()
            or "sk-admin-" + secrets.token_urlsafe(32),
        )

    @classmethod
    def ephemeral(cls, run_dir: Path, **kwargs: object) -> MeshConfig:
        """Tests: every port picked free at start."""
        # Distinct ports: free_port() in a loop can hand out the same port twice.
        spare = iter(free_ports(2 * len(SERVICES) + 1))
        ports = {name: next(spare) for name in SERVICES}
        metrics = {name: next(spare) for name in SERVICES}
        return cls(
            run_dir=run_dir,
            service_ports=ports,
            http_port=next(spare),
            **{"metrics_ports": metrics, **kwargs},  # type: ignore[arg-type]
        )


def _http_beside(otlp_grpc_endpoint: str) -> str:
    """The OTLP/HTTP endpoint of the collector at an OTLP/gRPC endpoint, by the convention
    Jaeger and the OpenTelemetry Collector share (4317 gRPC, 4318 HTTP); "" if it is not."""
    if otlp_grpc_endpoint.rstrip("/").endswith(":4317"):
        return otlp_grpc_endpoint.rstrip("/")[: -len("4317")] + "4318"
    return ""


class MeshStartError(RuntimeError):
    """A component did not come up; the message includes the tail of its log."""


@dataclass(frozen=True)
class Replica:
    """An extra router replica sharing a mesh's scheduler, cache, billing and Redis."""

    address: str
    process: subprocess.Popen[bytes]
    log_path: Path
    http_address: str = ""  # its OpenAI-compatible HTTP edge, when the mesh has one


def wait_serving(
    name: str,
    proc: subprocess.Popen[bytes],
    address: str,
    log_path: Path,
    deadline: float,
    health_name: str = "",
) -> None:
    """Wait until the service at `address` reports SERVING (for `health_name`: "" is its
    readiness, `libs.health.LIVENESS` its being up); fail with its log if it cannot."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise MeshStartError(
                    f"the {name} service exited with status {proc.returncode}:\n" + tail(log_path)
                )
            try:
                response = stub.Check(
                    health_pb2.HealthCheckRequest(service=health_name), timeout=1.0
                )
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise MeshStartError(
                    f"the {name} service did not report SERVING on {address}:\n" + tail(log_path)
                )
            time.sleep(0.1)


class LocalMesh:
    """Owns every process of a local mesh."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.valkey: ValkeyServer | None = None
        self.triton: TritonNode | None = None
        self.sim: SimProcess | None = None
        self.services: dict[str, subprocess.Popen[bytes]] = {}
        self.replicas: list[Replica] = []
        # Extra scheduler replicas (scale-out: SHEPHERD_SCHEDULER_CLUSTER in extra_env).
        self.schedulers: list[Replica] = []
        self.redis_url = config.redis_url
        self.dev_api_key = ""
        self.log_dir = config.run_dir / "logs"
        self._lock: IO[str] | None = None
        self.collector: subprocess.Popen[bytes] | None = None
        self.otlp_endpoint = config.otlp_endpoint
        self.otlp_http_endpoint = config.otlp_http_endpoint
        self.traces_dir = config.run_dir / "traces"

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.config.service_ports[service]}"

    async def scheduler_assignments(self, address: str) -> scheduler_pb2.GetAssignmentsResponse:
        """What the scheduler replica at `address` says of the cluster: its members and who
        owns which model (SchedulerService/GetAssignments, with the mesh's service token)."""
        credentials = Credentials(internal_tokens=(self.config.internal_token,), admin_keys=())
        async with open_channel(address, credentials) as channel:
            return await scheduler_pb2_grpc.SchedulerServiceStub(channel).GetAssignments(
                scheduler_pb2.GetAssignmentsRequest(), timeout=5
            )

    @property
    def http_address(self) -> str:
        """The router's OpenAI-compatible HTTP edge, host:port ("" when it is off)."""
        return f"127.0.0.1:{self.config.http_port}" if self.config.http_port else ""

    @property
    def openai_base_url(self) -> str:
        """What an OpenAI client's `base_url` is set to for this mesh."""
        return f"http://{self.http_address}/v1" if self.http_address else ""

    def service_env(self) -> dict[str, str]:
        """The environment every service process gets."""
        assert self.triton is not None
        env = {
            **os.environ,
            **self.config.extra_env,
            "PYTHONUNBUFFERED": "1",
            "REDIS_URL": self.redis_url,
            "SHEPHERD_INTERNAL_TOKEN": self.config.internal_token,
            "SHEPHERD_ADMIN_KEYS": self.config.admin_key,
            f"SHEPHERD_POOL_{LOCAL_POOL.upper()}_NODES": self.triton.config.grpc_url,
        }
        for name in SERVICES:
            env[f"SHEPHERD_{name.upper()}_PORT"] = str(self.config.service_ports[name])
            env[f"SHEPHERD_{name.upper()}_ADDR"] = self.address(name)
        if self.sim is not None:
            env["SHEPHERD_HOSTED_API_KEY"] = self.sim.api_key
            env["SHEPHERD_PROVIDER_HOLYSHEEP_BASE_URL"] = self.sim.base_url
        if self.otlp_endpoint:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.otlp_endpoint
            if self.collector is not None and env.get("OTEL_EXPORTER_OTLP_PROTOCOL") == (
                "http/protobuf"
            ):
                env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.otlp_http_endpoint
        if self.collector is not None:
            # Spans reach the local collector within half a second, so a trace asked for just
            # after its answer is whole (OpenTelemetry's default is 5 s).
            env.setdefault("OTEL_BSP_SCHEDULE_DELAY", "500")
        for name in SERVICES:
            port = self.config.metrics_ports.get(name, 0)
            env[f"SHEPHERD_{name.upper()}_METRICS_PORT"] = str(port)
        # Always set: a router left to its default (8080) would collide with `make run`.
        env["SHEPHERD_ROUTER_HTTP_PORT"] = str(self.config.http_port)
        # Each router replica keeps usage that billing cannot take yet in its own spool.
        env["SHEPHERD_ROUTER_SPOOL_DIR"] = str(self.spool_dir(self.config.service_ports["router"]))
        return env

    def spool_dir(self, router_port: int) -> Path:
        """The usage spool of the router replica on `router_port` (kept across its restarts)."""
        return self.config.run_dir / "spool" / f"router-{router_port}"

    def start(self, timeout_s: float = 180.0) -> LocalMesh:
        """Start everything and wait until it is healthy; on failure stop what was started."""
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        self._claim_run_dir()
        self._check_ports_free()
        if self.config.collect_traces:
            self._start_collector(deadline)
        if not self.redis_url:
            self.valkey = ValkeyServer(
                ValkeyConfig(port=free_port(), data_dir=self.config.run_dir / "valkey")
            ).start()
            self.redis_url = self.valkey.config.url
        self.triton = TritonNode(
            TritonNodeConfig.with_free_ports(
                work_dir=self.config.run_dir / "triton",
                model_repository=self.config.model_repository,
                log_file=self.log_dir / "triton.log",
                # The scheduler owns placement (explicit mode); the models it serves by default
                # are loaded up front so the first request does not wait for a load.
                model_control_mode="explicit",
                load_models=PRELOADED_MODELS,
                otlp_traces_url=(
                    f"{self.otlp_http_endpoint}/v1/traces" if self.otlp_http_endpoint else ""
                ),
                trace_export_delay_ms=int(
                    self.config.extra_env.get("OTEL_BSP_SCHEDULE_DELAY", "500")
                ),
            )
        ).start()
        if not self.config.hosted_api_key:
            self.sim = SimProcess(
                api_key="sim-" + secrets.token_hex(8),
                rpm=LOCAL_SIM_RPM,
                log_path=self.log_dir / "provider_sim.log",
            ).start()
        self.triton.wait_ready(timeout_s=max(1.0, deadline - time.monotonic()))
        env = self.service_env()
        for name in SERVICES:
            self.services[name] = spawn(
                [sys.executable, "-m", f"services.{name}"],
                env=env,
                log_path=self.log_dir / f"{name}.log",
            )
        for name in SERVICES:
            self._wait_serving(name, deadline)
        self.dev_api_key = asyncio.run(issue_key_at(self.redis_url, DEV_TENANT))

    def _start_collector(self, deadline: float) -> None:
        """Start the local trace collector and point every exporter at it (see the module)."""
        grpc_port, http_port = free_ports(2)
        self.collector = spawn(
            [
                sys.executable,
                "-m",
                "deploy.local.traces",
                "serve",
                "--dir",
                str(self.traces_dir),
                "--grpc-port",
                str(grpc_port),
                "--http-port",
                str(http_port),
                *(["--announce"] if self.config.announce_traces else []),
            ],
            env=os.environ,
            log_path=self.log_dir / "traces.log",
            stdout=sys.stdout.fileno() if self.config.announce_traces else None,
        )
        self.otlp_endpoint = f"http://{LOCALHOST}:{grpc_port}"
        self.otlp_http_endpoint = f"http://{LOCALHOST}:{http_port}"
        for port in (grpc_port, http_port):
            while True:
                if self.collector.poll() is not None:
                    raise MeshStartError(
                        "the trace collector exited:\n" + tail(self.log_dir / "traces.log")
                    )
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    if probe.connect_ex((LOCALHOST, port)) == 0:
                        break
                if time.monotonic() > deadline:
                    raise MeshStartError("the trace collector did not start listening")
                time.sleep(0.05)

    def _claim_run_dir(self) -> None:
        """Hold the run directory for this mesh's life: two meshes must not share it.

        A second `make run` would otherwise start a second Valkey on the same append-only
        file and overwrite the first mesh's logs. The lock is the kernel's (flock), so it is
        released even when this process is killed.
        """
        lock = open(self.config.run_dir / ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise MeshStartError(
                f"another mesh is running from {self.config.run_dir} (a second `make run`?):"
                " stop it first, or run this one from another directory"
            ) from None
        self._lock = lock

    def _check_ports_free(self) -> None:
        """Refuse at once, before starting anything, when a service port is taken."""
        ports = [
            (name, f"SHEPHERD_{name.upper()}_PORT", port)
            for name, port in self.config.service_ports.items()
        ]
        if self.config.http_port:
            ports.append(("router HTTP", "SHEPHERD_ROUTER_HTTP_PORT", self.config.http_port))
        ports += [
            (f"{name} /metrics", f"SHEPHERD_{name.upper()}_METRICS_PORT", port)
            for name, port in self.config.metrics_ports.items()
            if port
        ]
        for name, variable, port in ports:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                # A port left in TIME_WAIT by a mesh just stopped is free; a listener is not.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    raise MeshStartError(
                        f"port {port} for the {name} service is in use: stop what holds it, or"
                        f" set {variable} to another port"
                    ) from None

    def _wait_serving(self, name: str, deadline: float) -> None:
        wait_serving(
            name,
            self.services[name],
            self.address(name),
            self.log_dir / f"{name}.log",
            deadline,
        )

    def add_router(self, extra_env: Mapping[str, str] | None = None) -> Replica:
        """Start one more router replica on a free port; it stops with the mesh.

        Every router replica is stateless: they share the scheduler, cache, billing and
        Redis, so budgets, limits and keys must hold across them (the tests check it).
        """
        port, http_port = free_ports(2)
        http_port = http_port if self.config.http_port else 0
        address = f"127.0.0.1:{port}"
        log_path = self.log_dir / f"router-{port}.log"
        env = {
            **self.service_env(),
            "SHEPHERD_ROUTER_SPOOL_DIR": str(self.spool_dir(port)),
            # The first router holds the router's metrics port; extra replicas serve none.
            "SHEPHERD_ROUTER_METRICS_PORT": "0",
            **(extra_env or {}),
            "SHEPHERD_ROUTER_PORT": str(port),
            "SHEPHERD_ROUTER_HTTP_PORT": str(http_port),
        }
        proc = spawn([sys.executable, "-m", "services.router"], env=env, log_path=log_path)
        replica = Replica(
            address=address,
            process=proc,
            log_path=log_path,
            http_address=f"127.0.0.1:{http_port}" if http_port else "",
        )
        self.replicas.append(replica)
        wait_serving("router replica", proc, address, log_path, time.monotonic() + 60.0)
        return replica

    def add_scheduler(self, extra_env: Mapping[str, str] | None = None) -> Replica:
        """Start one more scheduler replica on a free port; it stops with the mesh.

        It joins the mesh's scheduler cluster when the mesh names one
        (SHEPHERD_SCHEDULER_CLUSTER in its extra_env): the replicas then share the models'
        queues, the nodes' capacity and placement through Redis (services/scheduler/cluster.py).
        """
        port = free_port()
        address = f"127.0.0.1:{port}"
        log_path = self.log_dir / f"scheduler-{port}.log"
        env = self._scheduler_env(port, extra_env)
        proc = spawn([sys.executable, "-m", "services.scheduler"], env=env, log_path=log_path)
        replica = Replica(address=address, process=proc, log_path=log_path)
        self.schedulers.append(replica)
        wait_serving("scheduler replica", proc, address, log_path, time.monotonic() + 60.0)
        return replica

    def _scheduler_env(self, port: int, extra_env: Mapping[str, str] | None) -> dict[str, str]:
        return {
            **self.service_env(),
            # The first scheduler holds the scheduler's metrics port; extra replicas serve none.
            "SHEPHERD_SCHEDULER_METRICS_PORT": "0",
            **(extra_env or {}),
            "SHEPHERD_SCHEDULER_PORT": str(port),
        }

    # -- faults, for the chaos suite (tests/chaos) ----------------------------------------

    def kill(self, component: str) -> float:
        """SIGKILL one component, as a crash would; returns when it is gone (monotonic time).

        `component` is "valkey", "triton", a service name, or a replica's address.
        """
        if component == "valkey":
            assert self.valkey is not None and self.valkey.pid is not None
            _kill_group(self.valkey.pid)
        elif component == "triton":
            assert self.triton is not None and self.triton.pgid is not None
            _kill_group(self.triton.pgid)
        elif component in self.services:
            _kill_group(self.services[component].pid)
        else:
            _kill_group(self._replica(component).process.pid)
        return time.monotonic()

    def revive(self, component: str, timeout_s: float = 60.0) -> float:
        """Start a killed component again on its old port; returns once it serves (monotonic).

        Services come back with the same environment (a router with the same usage spool);
        Valkey with its append-only file; Triton with the models it preloads.
        """
        deadline = time.monotonic() + timeout_s
        if component == "valkey":
            assert self.valkey is not None
            self.valkey.start(timeout_s=timeout_s)
        elif component == "triton":
            assert self.triton is not None
            self.triton.start()
            self.triton.wait_ready(timeout_s=timeout_s)
        elif component in self.services:
            self.services[component] = spawn(
                [sys.executable, "-m", f"services.{component}"],
                env=self.service_env(),
                log_path=self.log_dir / f"{component}.log",
            )
            self._wait_serving(component, deadline)
        elif any(r.address == component for r in self.schedulers):
            old = self._replica(component)
            port = int(old.address.rsplit(":")[1])
            proc = spawn(
                [sys.executable, "-m", "services.scheduler"],
                env=self._scheduler_env(port, None),
                log_path=old.log_path,
            )
            self.schedulers[self.schedulers.index(old)] = Replica(old.address, proc, old.log_path)
            wait_serving("scheduler replica", proc, old.address, old.log_path, deadline)
        else:
            old = self._replica(component)
            env = {
                **self.service_env(),
                "SHEPHERD_ROUTER_SPOOL_DIR": str(self.spool_dir(int(old.address.rsplit(":")[1]))),
                "SHEPHERD_ROUTER_METRICS_PORT": "0",
                "SHEPHERD_ROUTER_PORT": old.address.rsplit(":")[1],
                "SHEPHERD_ROUTER_HTTP_PORT": old.http_address.rsplit(":")[1]
                if old.http_address
                else "0",
            }
            proc = spawn([sys.executable, "-m", "services.router"], env=env, log_path=old.log_path)
            self.replicas[self.replicas.index(old)] = Replica(
                old.address, proc, old.log_path, old.http_address
            )
            wait_serving("router replica", proc, old.address, old.log_path, deadline)
        return time.monotonic()

    def _replica(self, address: str) -> Replica:
        for replica in (*self.replicas, *self.schedulers):
            if replica.address == address:
                return replica
        raise KeyError(f"no component or router replica {address!r} in this mesh")

    def stop(self) -> None:
        """Stop everything, routers first, so no request is accepted that cannot finish."""
        while self.replicas:
            stop(self.replicas.pop().process)
        while self.schedulers:
            stop(self.schedulers.pop().process)
        for name in reversed(SERVICES):
            proc = self.services.pop(name, None)
            if proc is not None:
                stop(proc)
        if self.sim is not None:
            self.sim.stop()
            self.sim = None
        if self.triton is not None:
            self.triton.stop()
            self.triton = None
        if self.valkey is not None:
            self.valkey.stop()
            self.valkey = None
        if self.collector is not None:  # last: it takes the spans the others flush on exit
            stop(self.collector)
            self.collector = None
        if self._lock is not None:
            self._lock.close()  # releases the run directory
            self._lock = None

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_group(pgid: int) -> None:
    """SIGKILL a process group (every child runs in its own session) and reap its leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, 0)


def banner(mesh: LocalMesh) -> str:
    """What `make run` prints: endpoints, the dev key and a call to copy."""
    grpcurl = shutil.which("grpcurl") or str(REPO_ROOT / ".venv" / "bin" / "grpcurl")
    router = mesh.address("router")
    billing = mesh.address("billing")
    admin = f"-H 'authorization: Bearer {mesh.config.admin_key}'"
    stream_body = (
        '{"model": "tiny-stream", "messages": [{"role": "ROLE_USER", "content": "Hello"}]}'
    )
    body = '{"model": "tiny", "messages": [{"role": "ROLE_USER", "content": "Hello, Shepherd"}]}'
    hosted = (
        f"provider simulator at {mesh.sim.base_url} (set SHEPHERD_HOSTED_API_KEY for the real API)"
        if mesh.sim is not None
        else "the real hosted API (SHEPHERD_HOSTED_API_KEY is set)"
    )
    assert mesh.triton is not None
    http = (
        [f"  {'http':<10} {mesh.openai_base_url} (the router's OpenAI-compatible API)"]
        if mesh.http_address
        else []
    )
    lines = [
        "",
        "Shepherd is up.",
        "",
        *(f"  {name:<10} {mesh.address(name)}" for name in reversed(SERVICES)),
        *http,
        f"  {'triton':<10} {mesh.triton.config.grpc_url} (gRPC, explicit model control, "
        "tiny_lm, echo_lm, embed_tiny and rag_tiny on CPU)",
        f"  {'hosted':<10} {hosted}",
        f"  {'redis':<10} {mesh.redis_url}",
        f"  {'logs':<10} {mesh.log_dir}",
        "",
        f'Dev API key for tenant "{DEV_TENANT}" (new each run, shown only here):',
        f"  {mesh.dev_api_key}",
        "",
        'Chat with the self-hosted model (try "gpt4" for the hosted one):',
        f"  {grpcurl} -plaintext -H 'authorization: Bearer {mesh.dev_api_key}' \\",
        f"    -d '{body}' \\",
        f"    {router} shepherd.router.v1.RouterService/Chat",
        "",
        "The same, streamed token by token from the decoupled Triton model:",
        f"  {grpcurl} -plaintext -H 'authorization: Bearer {mesh.dev_api_key}' \\",
        f"    -d '{stream_body}' \\",
        f"    {router} shepherd.router.v1.RouterService/ChatStream",
        "",
        *openai_examples(mesh),
        "Your usage by day and model, with your own key:",
        f"  {grpcurl} -plaintext -H 'authorization: Bearer {mesh.dev_api_key}' -d '{{}}' \\",
        f"    {router} shepherd.router.v1.RouterService/GetUsage",
        "",
        "Admin key (new each run; AdminService on the billing port, and GetStats):",
        f"  {mesh.config.admin_key}",
        "",
        f'Give tenant "{DEV_TENANT}" a daily budget of $1 and 60 requests per minute:',
        f"  {grpcurl} -plaintext {admin} \\",
        f'    -d \'{{"tenant": "{DEV_TENANT}", "limits": {{"overall": {{"daily_budget":'
        ' {"nano_usd": "1000000000"}, "requests_per_minute": "60"}}}\' \\',
        f"    {billing} shepherd.billing.v1.AdminService/SetTenantLimits",
        "",
        "Issue a key for another tenant, and list keys (never their secrets):",
        f'  {grpcurl} -plaintext {admin} -d \'{{"tenant": "acme"}}\' \\',
        f"    {billing} shepherd.billing.v1.AdminService/IssueKey",
        f"  {grpcurl} -plaintext {admin} -d '{{}}' \\",
        f"    {billing} shepherd.billing.v1.AdminService/ListKeys",
        "",
        "The scheduler's queues, batches, Triton nodes and model placement:",
        f"  {grpcurl} -plaintext {admin} -d '{{}}' \\",
        f"    {mesh.address('scheduler')} shepherd.scheduler.v1.SchedulerService/GetStats",
        "",
        *observability_lines(mesh),
        "",
        "Press Ctrl-C to stop everything.",
    ]
    return "\n".join(lines)


def observability_lines(mesh: LocalMesh) -> list[str]:
    """The banner's part on metrics and traces: where to scrape, and how to see a trace."""
    ports = mesh.config.metrics_ports
    lines = ["Metrics (Prometheus text format, one endpoint per service):"]
    lines += [
        f"  {name:<10} http://{LOCALHOST}:{ports[name]}/metrics"
        for name in reversed(SERVICES)
        if ports.get(name)
    ]
    if mesh.triton is not None:
        lines.append(f"  {'triton':<10} {mesh.triton.config.metrics_url}")
    traces = f"{REPO_ROOT / '.venv' / 'bin' / 'python'} -m deploy.local.traces"
    if mesh.collector is not None:
        lines += [
            "",
            "Traces: every answer carries its traceId. See that request's whole trace (router,",
            "cache, scheduler, batch, Triton's own spans, billing) as a tree with timings:",
            f"  {traces} <traceId>",
            f"  {traces} --last      (the latest request; --list for the recent ones)",
            "Each request the router serves is announced below with that command.",
        ]
    elif mesh.otlp_endpoint:
        triton = mesh.otlp_http_endpoint or "nowhere (set SHEPHERD_TRITON_OTLP_ENDPOINT)"
        lines += [
            "",
            f"Traces go to {mesh.otlp_endpoint} (OTLP/gRPC; Triton's to {triton}, OTLP/HTTP):",
            "look each answer's traceId up there (in Jaeger's UI: /trace/<traceId>).",
        ]
    return lines


def openai_examples(mesh: LocalMesh) -> list[str]:
    """The banner's HTTP lines: curl (a JSON answer, then a stream) and the openai SDK."""
    if not mesh.http_address:
        return []
    url, key = mesh.openai_base_url, mesh.dev_api_key
    body = '{"model": "tiny", "messages": [{"role": "user", "content": "Hello, Shepherd"}]}'
    stream_body = (
        '{"model": "tiny-stream", "stream": true,'
        ' "messages": [{"role": "user", "content": "Hello, Shepherd"}]}'
    )
    sdk = (
        f'import openai; client = openai.OpenAI(base_url="{url}", api_key="{key}");'
        ' print(client.chat.completions.create(model="tiny",'
        ' messages=[{"role": "user", "content": "Hello, Shepherd"}]).choices[0].message.content)'
    )
    return [
        "The OpenAI-compatible HTTP API on the same mesh, with curl (add -i for the cost,",
        "placement and trace id headers), streamed, and with the openai SDK:",
        f"  curl -sS {url}/chat/completions -H 'authorization: Bearer {key}' \\",
        f"    -H 'content-type: application/json' -d '{body}'",
        f"  curl -sSN {url}/chat/completions -H 'authorization: Bearer {key}' \\",
        f"    -H 'content-type: application/json' -d '{stream_body}'",
        f"  {sys.executable} -c '{sdk}'",
        "",
    ]


def main() -> int:
    mesh = LocalMesh(MeshConfig.from_env(REPO_ROOT / ".run"))
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    print("Starting Valkey, Triton, the provider simulator and the four services...", flush=True)
    try:
        mesh.start()
        print(banner(mesh), flush=True)
        while not stopping:
            for name, proc in mesh.services.items():
                if proc.poll() is not None:
                    print(f"\nthe {name} service exited; see {mesh.log_dir / name}.log")
                    stopping = True
            time.sleep(0.5)
    except Exception as error:
        print(f"\nstart-up failed: {error}", file=sys.stderr)
        return 1
    finally:
        print("\nStopping...", flush=True)
        mesh.stop()
        print("Stopped.", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
