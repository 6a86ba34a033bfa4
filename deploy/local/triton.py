"""Start and stop a real local Triton Inference Server node from the nvidia-pytriton wheel.

Why this module exists: Shepherd's tests and local runs need a real `tritonserver`, and the
binary shipped inside the nvidia-pytriton wheel does not run its Python backend out of the
box. The traps, all handled here in code rather than by hand:

* The Python backend stub links `libpython3.X.so`. Left alone, the dynamic loader may pick a
  system libpython that differs from the interpreter running us (this machine has one in
  /lib/x86_64-linux-gnu), so `sysconfig.get_config_var("LIBDIR")` goes first on
  LD_LIBRARY_PATH.
* The server and stub need the wheel's bundled libraries (`site-packages/nvidia_pytriton.libs`)
  on LD_LIBRARY_PATH too.
* The backend looks for `triton_python_backend_stub` next to `libtriton_python.so`, but the
  wheel keeps stubs per Python version elsewhere. We never modify site-packages; instead we
  build `<work_dir>/backends/python/` from symlinks and pass `--backend-directory`.
* The stub embeds the *base* interpreter in isolated mode (PyConfig_InitIsolatedConfig), so
  PYTHONPATH, PYTHONHOME and the venv are all ignored: it sees only the base interpreter's
  site-packages (verified: with PYTHONPATH set it still imported the base numpy 2.x instead of
  the venv's 1.26). The stub imports `triton_python_backend_utils` (which imports numpy)
  from the backend directory, so we write a small shim module of that name which puts this
  interpreter's site-packages first on sys.path and then runs the real file from the wheel.
  The stub loads model.py *before* that import, so a model must import
  `triton_python_backend_utils` before numpy (tiny_lm's model.py does).
* The Python backend names its shared-memory regions by a prefix (plus a UUID) and leaks
  them in /dev/shm when the server is stopped while a model is still loading or is killed.
  Each node uses the prefix `shepherd_<launcher pid>_<grpc port>_`, so stop() can delete its
  own regions and start() can sweep regions whose launcher process no longer exists.

The server runs in its own process group with PR_SET_PDEATHSIG=SIGKILL, so it dies when the
thread that started it dies, and `stop()` can reap the stub processes with the group.

Tracing: with `otlp_traces_url` set, the node runs Triton's OpenTelemetry tracer
(`--trace-config mode=opentelemetry`) and exports over OTLP/HTTP to that URL (Triton's tracer
speaks no OTLP/gRPC). `rate=0` traces exactly the requests that carry a W3C trace context
(Triton reads `traceparent` from the gRPC metadata), which is every call the scheduler makes
for a sampled request (libs/telemetry.sampled_trace_headers), so Triton's spans
(InferRequest, then the model's, then compute with its input/infer/output timestamps) join the
request's trace under the scheduler's call span, and a call without context costs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from deploy.local.ports import LOCALHOST, free_ports
from deploy.local.processes import tail, with_parent_death_signal
from libs.config import REPO_ROOT

DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
LOG_TAIL_LINES = 40
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "shepherd_"

ModelControlMode = Literal["none", "explicit"]


def trace_args(cfg: TritonNodeConfig) -> list[str]:
    """tritonserver's OpenTelemetry tracing flags (see the module docstring), or none."""
    if not cfg.otlp_traces_url:
        return []
    return [
        "--trace-config=mode=opentelemetry",
        f"--trace-config=opentelemetry,url={cfg.otlp_traces_url}",
        f"--trace-config=opentelemetry,resource=service.name={cfg.trace_service_name}",
        f"--trace-config=opentelemetry,resource=service.instance.id={cfg.grpc_url}",
        f"--trace-config=opentelemetry,bsp_schedule_delay={cfg.trace_export_delay_ms}",
        "--trace-config=rate=0",
        "--trace-config=count=-1",
        "--trace-config=level=TIMESTAMPS",
    ]


class TritonStartError(RuntimeError):
    """Raised when a node cannot be launched or does not become ready in time."""


@dataclass(frozen=True)
class TritonNodeConfig:
    """Everything needed to launch one node; frozen so a running node's settings cannot drift."""

    model_repository: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    work_dir: Path
    model_control_mode: ModelControlMode = "none"
    load_models: tuple[str, ...] = ()
    log_file: Path | None = None  # Defaults to <work_dir>/tritonserver.log.
    host: str = LOCALHOST
    exit_timeout_s: int = 5
    log_verbose: int = 0
    gpu: bool = False  # False adds flags that stop a CPU-only node from probing CUDA.
    extra_args: tuple[str, ...] = field(default=())
    # OTLP/HTTP traces endpoint (e.g. http://127.0.0.1:4318/v1/traces); empty: no tracing.
    otlp_traces_url: str = ""
    trace_service_name: str = "triton"
    trace_export_delay_ms: int = 1000  # how long Triton batches spans before exporting

    @classmethod
    def with_free_ports(
        cls,
        work_dir: Path,
        model_repository: Path = DEFAULT_MODEL_REPOSITORY,
        **kwargs: object,
    ) -> TritonNodeConfig:
        """Build a config on three distinct free ports, the usual choice for tests."""
        http_port, grpc_port, metrics_port = free_ports(3)
        return cls(
            model_repository=Path(model_repository),
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            work_dir=Path(work_dir),
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def grpc_url(self) -> str:
        """host:port form that tritonclient.grpc expects."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """host:port form that tritonclient.http expects."""
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus endpoint of the node."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def resolved_log_file(self) -> Path:
        """Where the server's stdout and stderr go."""
        return self.log_file if self.log_file is not None else self.work_dir / "tritonserver.log"

    def expected_models(self) -> tuple[str, ...]:
        """Models that must be ready before the node counts as ready.

        In explicit mode only the requested models load; in "none" mode Triton loads every
        model directory in the repository, so we expect all of them.
        """
        if self.load_models or self.model_control_mode == "explicit":
            return self.load_models
        if not self.model_repository.is_dir():
            return ()
        return tuple(
            sorted(
                entry.name
                for entry in self.model_repository.iterdir()
                if entry.is_dir() and (entry / "config.pbtxt").is_file()
            )
        )


@dataclass(frozen=True)
class TritonInstall:
    """Locations inside the nvidia-pytriton wheel that the launcher needs."""

    server_bin: Path
    backends_dir: Path
    caches_dir: Path
    bundled_libs: Path
    stub: Path

    @classmethod
    def discover(cls) -> TritonInstall:
        """Find the wheel without importing pytriton (its import pulls in much more)."""
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonStartError("nvidia-pytriton is not installed in this interpreter")
        package = Path(next(iter(spec.submodule_search_locations)))
        root = package / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        install = cls(
            server_bin=root / "bin" / "tritonserver",
            backends_dir=root / "backends",
            caches_dir=root / "caches",
            bundled_libs=package.parent / "nvidia_pytriton.libs",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        )
        for path in (install.server_bin, install.backends_dir / "python", install.stub):
            if not path.exists():
                raise TritonStartError(f"nvidia-pytriton install is incomplete: {path} missing")
        return install


def _prepend_path(new: list[str], existing: str | None) -> str:
    """Join search paths, new ones first, dropping duplicates and empties."""
    parts = [*new, *(existing.split(os.pathsep) if existing else [])]
    seen: set[str] = set()
    ordered = []
    for part in parts:
        if part and part not in seen:
            seen.add(part)
            ordered.append(part)
    return os.pathsep.join(ordered)


def site_dirs() -> list[str]:
    """This interpreter's site-packages (the venv's when run from one), in search order."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def _utils_shim(real_utils: Path) -> str:
    """Source of a triton_python_backend_utils module that fixes sys.path, then runs the real one.

    The stub imports this module before any model, with an isolated interpreter that cannot
    see the venv; prepending the venv's site-packages here makes numpy (and anything a model
    imports) resolve to the same packages as in the process that launched the node.
    """
    return (
        '"""Generated by deploy.local.triton: venv site-packages first, then the real utils."""\n'
        "import sys\n"
        f"for _path in reversed({site_dirs()!r}):\n"
        "    if _path in sys.path:\n"
        "        sys.path.remove(_path)\n"
        "    sys.path.insert(0, _path)\n"
        "if 'numpy' in sys.modules:\n"
        "    print('triton_python_backend_utils shim: numpy was imported before the venv was on'\n"
        "          ' sys.path; import triton_python_backend_utils first in model.py',\n"
        "          file=sys.stderr)\n"
        f"__file__ = {str(real_utils)!r}\n"
        "with open(__file__) as _source:\n"
        "    exec(compile(_source.read(), __file__, 'exec'), globals())\n"
    )


def _remove_shm(prefix: str) -> None:
    """Delete shared-memory regions whose names start with prefix; missing ones are fine."""
    if not SHM_DIR.is_dir():
        return
    for region in SHM_DIR.glob(f"{prefix}*"):
        try:
            region.unlink()
        except OSError:
            pass


def sweep_stale_shm() -> None:
    """Delete Shepherd regions left by launchers that have died.

    A dead launcher implies a dead server (PR_SET_PDEATHSIG), so nothing still maps them.
    """
    if not SHM_DIR.is_dir():
        return
    for region in SHM_DIR.glob(f"{SHM_PREFIX}*"):
        pid = region.name[len(SHM_PREFIX) :].split("_", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                region.unlink()


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in a process group, read from /proc.

    Used to prove that tritonserver and its triton_python_backend_stub children are gone.
    """
    members: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in {"Z", "X"}:
            members.append(int(entry.name))
    return members


class TritonNode:
    """One tritonserver subprocess plus the scaffolding it needs.

    Call start() from a long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that
    forked the server exits, not just the process.
    """

    def __init__(self, config: TritonNodeConfig) -> None:
        self.config = config
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._pgid: int | None = None
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}_{config.grpc_port}_"

    # -- launch ---------------------------------------------------------------------------

    def _prepare_backend_dir(self, install: TritonInstall) -> Path:
        """Assemble <work_dir>/backends/python with the stub next to libtriton_python.so."""
        backends = self.config.work_dir / "backends"
        python_dir = backends / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        sources = {
            "libtriton_python.so": install.backends_dir / "python" / "libtriton_python.so",
            "triton_python_backend_stub": install.stub,
        }
        for name, source in sources.items():
            link = python_dir / name
            if link.is_symlink() or link.exists():
                if link.is_symlink() and Path(os.readlink(link)) == source:
                    continue
                link.unlink()
            link.symlink_to(source)
        shim = python_dir / "triton_python_backend_utils.py"
        if shim.is_symlink():
            shim.unlink()
        shim.write_text(
            _utils_shim(install.backends_dir / "python" / "triton_python_backend_utils.py")
        )
        return backends

    def build_env(self, install: TritonInstall) -> dict[str, str]:
        """Environment for the server; the stub inherits it.

        LIBDIR first so the stub binds the same libpython as this interpreter, then the
        wheel's bundled libraries that tritonserver and the stub link against.
        """
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = _prepend_path(
            [libdir, str(install.bundled_libs)], env.get("LD_LIBRARY_PATH")
        )
        # The stub runs in isolated mode and ignores these; dropping them keeps the node's
        # environment honest about what the stub sees (the utils shim sets sys.path instead).
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
        # One model instance runs one batch at a time; threaded BLAS on 64-wide matrices only
        # fights Triton's own threads for the cores.
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
        return env

    def build_args(self, install: TritonInstall, backend_dir: Path) -> list[str]:
        """Command line for tritonserver (flags checked against `tritonserver --help`)."""
        cfg = self.config
        args = [
            str(install.server_bin),
            f"--model-repository={cfg.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--cache-directory={install.caches_dir}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--model-control-mode={cfg.model_control_mode}",
            "--allow-http=true",
            f"--http-address={cfg.host}",
            f"--http-port={cfg.http_port}",
            "--allow-grpc=true",
            f"--grpc-address={cfg.host}",
            f"--grpc-port={cfg.grpc_port}",
            "--allow-metrics=true",
            f"--metrics-address={cfg.host}",
            f"--metrics-port={cfg.metrics_port}",
            f"--exit-timeout-secs={cfg.exit_timeout_s}",
            f"--log-verbose={cfg.log_verbose}",
            "--strict-readiness=true",
        ]
        if not cfg.gpu:
            args += [
                "--allow-gpu-metrics=false",
                "--pinned-memory-pool-byte-size=0",
                "--cuda-memory-pool-byte-size=0:0",
            ]
        if cfg.model_control_mode == "explicit":
            args += [f"--load-model={name}" for name in cfg.load_models]
        args += trace_args(cfg)
        args += list(cfg.extra_args)
        return args

    def start(self) -> TritonNode:
        """Spawn tritonserver in its own process group; returns self for chaining."""
        if self._process is not None and self._process.poll() is None:
            raise TritonStartError("node already running")
        cfg = self.config
        install = TritonInstall.discover()
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
        sweep_stale_shm()
        backend_dir = self._prepare_backend_dir(install)
        log_path = cfg.resolved_log_file
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self._process = subprocess.Popen(
            with_parent_death_signal(self.build_args(install, backend_dir)),
            env=self.build_env(install),
            cwd=cfg.work_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._pgid = self._process.pid  # New session: pgid == pid.
        return self

    # -- readiness ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """pid of the tritonserver process, if started."""
        return self._process.pid if self._process is not None else None

    @property
    def pgid(self) -> int | None:
        """Process group holding tritonserver and its Python backend stubs."""
        return self._pgid

    def is_running(self) -> bool:
        """True while the tritonserver process has not exited."""
        return self._process is not None and self._process.poll() is None

    def _failure(self, reason: str, models_not_ready: tuple[str, ...] = ()) -> TritonStartError:
        """Build an error that says what happened, what to check, and shows the log tail."""
        cfg = self.config
        log_path = cfg.resolved_log_file
        exit_code = self._process.poll() if self._process is not None else None
        lines = [
            f"Triton node on grpc {cfg.grpc_url} {reason}.",
            f"  exit code: {exit_code}" if exit_code is not None else "  process: still running",
        ]
        if models_not_ready:
            lines.append(f"  models not ready: {', '.join(models_not_ready)}")
        lines += [
            "What to check:",
            f"  - the model repository exists and holds the models: {cfg.model_repository}",
            "  - ports are free (http/grpc/metrics: "
            f"{cfg.http_port}/{cfg.grpc_port}/{cfg.metrics_port})",
            "  - the Python backend stub loads: LD_LIBRARY_PATH must start with this "
            "interpreter's LIBDIR and include nvidia_pytriton.libs",
            "  - numpy imports in the stub (the generated backends/python/"
            "triton_python_backend_utils.py shim in the work dir puts the venv first on sys.path)",
            f"  - the full log: {log_path}",
            f"--- last {LOG_TAIL_LINES} lines of {log_path} ---",
            tail(log_path, LOG_TAIL_LINES),
        ]
        return TritonStartError("\n".join(lines))

    def _probe(self) -> tuple[bool, tuple[str, ...]]:
        """One readiness probe: (server ready, models not yet ready)."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        models = self.config.expected_models()
        try:
            client = grpcclient.InferenceServerClient(url=self.config.grpc_url)
        except InferenceServerException:
            return False, models
        try:
            if not client.is_server_ready(client_timeout=1.0):
                return False, models
            pending = tuple(m for m in models if not client.is_model_ready(m, client_timeout=1.0))
            return True, pending
        except InferenceServerException:
            return False, models
        finally:
            client.close()

    def wait_ready(self, timeout_s: float = 60.0, poll_s: float = 0.1) -> float:
        """Block until the server and every expected model are ready; return seconds waited.

        Fails fast with the log tail if the process exits (Triton exits when a model fails to
        load in "none" mode), and with a clear TritonStartError on timeout.
        """
        if self._process is None:
            raise TritonStartError("wait_ready() called before start()")
        began = time.monotonic()
        deadline = began + timeout_s
        pending = self.config.expected_models()
        while True:
            if self._process.poll() is not None:
                raise self._failure("exited before becoming ready", pending)
            server_ready, pending = self._probe()
            if server_ready and not pending:
                return time.monotonic() - began
            if time.monotonic() >= deadline:
                state = "server ready" if server_ready else "server not ready"
                raise self._failure(
                    f"did not become ready within {timeout_s:.1f}s ({state})", pending
                )
            time.sleep(poll_s)

    async def wait_ready_async(self, timeout_s: float = 60.0, poll_s: float = 0.1) -> float:
        """Async twin of wait_ready() for event-loop callers; probes run off the loop."""
        if self._process is None:
            raise TritonStartError("wait_ready_async() called before start()")
        began = time.monotonic()
        deadline = began + timeout_s
        pending = self.config.expected_models()
        while True:
            if self._process.poll() is not None:
                raise self._failure("exited before becoming ready", pending)
            server_ready, pending = await asyncio.to_thread(self._probe)
            if server_ready and not pending:
                return time.monotonic() - began
            if time.monotonic() >= deadline:
                state = "server ready" if server_ready else "server not ready"
                raise self._failure(
                    f"did not become ready within {timeout_s:.1f}s ({state})", pending
                )
            await asyncio.sleep(poll_s)

    # -- shutdown -------------------------------------------------------------------------

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Stop the node: SIGTERM, wait, then SIGKILL the whole group (stubs included).

        Returns tritonserver's exit code (None if it was never started). Safe to call twice.
        """
        process, pgid = self._process, self._pgid
        if process is None or pgid is None:
            return None
        grace = timeout_s if timeout_s is not None else self.config.exit_timeout_s + 5.0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._kill_group(pgid)
                process.wait(timeout=10)
        # Stubs normally exit with the server; anything left in the group is killed.
        deadline = time.monotonic() + 5.0
        while process_group_members(pgid):
            if time.monotonic() >= deadline:
                self._kill_group(pgid)
                deadline = time.monotonic() + 5.0
            time.sleep(0.05)
        _remove_shm(self.shm_prefix)
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode

    @staticmethod
    def _kill_group(pgid: int) -> None:
        """SIGKILL every process in the group; a vanished group is fine."""
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> TritonNode:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """Turn SIGTERM (and SIGINT, even if inherited as ignored) into Ctrl-C, one cleanup path."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run one node in the foreground until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(description="Run a local Triton node for Shepherd.")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    parser.add_argument("--grpc-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--http-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--metrics-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--model-control-mode", choices=("none", "explicit"), default="none")
    parser.add_argument("--load-model", action="append", default=[], dest="load_models")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--log-file", type=Path, default=None)
    parser.add_argument("--host", default=LOCALHOST)
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    spare = iter(free_ports(3))
    grpc_port = args.grpc_port or next(spare)
    http_port = args.http_port or next(spare)
    metrics_port = args.metrics_port or next(spare)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix=f"triton-{grpc_port}-"))
    config = TritonNodeConfig(
        model_repository=args.model_repository.resolve(),
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        work_dir=work_dir,
        model_control_mode=args.model_control_mode,
        load_models=tuple(args.load_models),
        log_file=args.log_file,
        host=args.host,
    )
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)  # Even if started with it ignored.
    with TritonNode(config) as node:
        try:
            waited = node.wait_ready(args.ready_timeout)
            print(
                f"triton ready in {waited:.1f}s: grpc {config.grpc_url} http {config.http_url} "
                f"metrics {config.metrics_url} models {', '.join(config.expected_models())}\n"
                f"log: {config.resolved_log_file}",
                flush=True,
            )
            while node.is_running():
                time.sleep(0.5)
            print(f"tritonserver exited; see {config.resolved_log_file}", file=sys.stderr)
            return 1
        except TritonStartError as exc:
            print(exc, file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stopping triton", file=sys.stderr)
            return 0


if __name__ == "__main__":
    sys.exit(main())
