"""Free TCP port helpers for local nodes and tests.

Why: every local service (Triton, routers, caches) is started on ports chosen at run time so
parallel test runs and developer sessions never collide on hard-coded numbers.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack

LOCALHOST = "127.0.0.1"


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port that was free on host a moment ago.

    The kernel picks the port (bind to port 0), which is the only race-free way to find one;
    the caller should bind it soon, since another process could take it after we close it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = LOCALHOST) -> list[int]:
    """Return count distinct free ports.

    All sockets stay bound until every port is chosen, so the kernel cannot hand out the same
    port twice (calling free_port() in a loop can).
    """
    with ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports
