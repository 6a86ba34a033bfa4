"""Starting and stopping the local processes so none outlives its launcher.

Each child runs in its own session (so a Ctrl-C in the terminal reaches only the launcher,
which then stops children in order) and has the kernel SIGKILL it if the launcher dies
(PR_SET_PDEATHSIG), so even a crashed test run leaves no server holding ports behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from libs.config import REPO_ROOT


def with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    """Prefix a command so the kernel SIGKILLs it when the thread that started it exits.

    util-linux's `setpriv --pdeathsig` sets PR_SET_PDEATHSIG and execs the command. Doing it
    in the exec'd helper rather than in a `preexec_fn` matters: a `preexec_fn` forces a real
    fork(), whose gRPC fork handlers restart gRPC's poller in the child, and that poller
    aborts the child (epoll_wait: Bad file descriptor) once close_fds closes its epoll fd.
    Without a `preexec_fn`, CPython uses vfork(), which runs no fork handlers.
    """
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv]


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path | None,
    cwd: Path = REPO_ROOT,
    stdout: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start a child in its own session with output appended to `log_path` (None: discarded).

    `stdout=subprocess.PIPE` keeps standard output for the caller, e.g. to read a ready line.
    """
    with contextlib.ExitStack() as stack:
        log: IO[bytes] | int = subprocess.DEVNULL
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = stack.enter_context(log_path.open("ab"))
        return subprocess.Popen(
            with_parent_death_signal(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int:
    """SIGTERM the child's whole process group, wait, then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # Grandchildren (e.g. Triton's backend stubs) share the group and are reaped here too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=timeout_s)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages that say what went wrong."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
