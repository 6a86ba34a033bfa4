"""Background tasks that cannot die silently.

Why: an asyncio task that raises just stops. Nothing awaits a long-lived loop (a Triton health
poll, a model's batcher), so its exception surfaces, at best, as "Task exception was never
retrieved" when the task is garbage-collected, and the service keeps answering health checks
while the loop that made it useful is gone. Every long-lived loop therefore runs under
`supervise`: a crash is logged with its traceback and the loop is started again after a
backoff (doubling from `min_backoff_s` to `max_backoff_s`, reset once the loop has run a
while), or, for a loop the service cannot work without (`fatal=True`), the service is stopped
with one clear log line so that its supervisor (Kubernetes, the launcher) restarts it.

Short-lived per-call tasks are not restarted, but their exceptions must not vanish either:
`log_failure` is the done-callback that logs one when nobody else retrieves it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

_log = logging.getLogger(__name__)

FatalHandler = Callable[[str], None]

_fatal_handler: FatalHandler | None = None


def set_fatal_handler(handler: FatalHandler | None) -> None:
    """Say what stops the service when a fatal task crashes (libs/server.py sets it).

    Without one (a library used outside a service), a fatal crash is only logged.
    """
    global _fatal_handler
    _fatal_handler = handler


def supervise(
    name: str,
    factory: Callable[[], Awaitable[None]],
    *,
    fatal: bool = False,
    min_backoff_s: float = 0.1,
    max_backoff_s: float = 5.0,
) -> asyncio.Task[None]:
    """Run `factory()` as a long-lived task named `name`, restarting it when it crashes.

    Cancelling the returned task stops the loop (that is how owners close it). A loop that
    returns normally is done and is not restarted. A backoff that doubles keeps a loop that
    crashes at once from spinning; it starts again from `min_backoff_s` once a run has
    lasted longer than `max_backoff_s`.
    """
    return asyncio.get_running_loop().create_task(
        _supervised(name, factory, fatal, min_backoff_s, max_backoff_s), name=name
    )


async def _supervised(
    name: str,
    factory: Callable[[], Awaitable[None]],
    fatal: bool,
    min_backoff_s: float,
    max_backoff_s: float,
) -> None:
    backoff_s = min_backoff_s
    while True:
        started = time.monotonic()
        try:
            await factory()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            if fatal:
                _log.critical(
                    "background task crashed; stopping the service, which cannot work without it",
                    exc_info=True,
                    extra={"task": name},
                )
                if _fatal_handler is not None:
                    _fatal_handler(f"background task {name} crashed")
                return
            if time.monotonic() - started > max_backoff_s:
                backoff_s = min_backoff_s  # it ran well for a while: this is a fresh failure
            _log.error(
                "background task crashed; restarting it",
                exc_info=True,
                extra={"task": name, "restart_in_s": backoff_s},
            )
        await asyncio.sleep(backoff_s)
        backoff_s = min(max_backoff_s, backoff_s * 2)


def spawn(
    tasks: set[asyncio.Task[Any]], work: Coroutine[Any, Any, Any], name: str
) -> asyncio.Task[Any]:
    """Run `work` as a short-lived task kept in `tasks` until it ends, its failure logged.

    Why the set: the event loop holds only a weak reference to a task, so one nobody keeps
    may be collected mid-run; the owner keeps them, and can cancel what is left when it stops.
    """
    task = asyncio.get_running_loop().create_task(work, name=name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    task.add_done_callback(log_failure)
    return task


def log_failure(task: asyncio.Task[object]) -> None:
    """Done-callback for a short-lived task: log its exception, which nobody else reads."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        _log.error(
            "background task failed",
            exc_info=(type(error), error, error.__traceback__),
            extra={"task": task.get_name()},
        )
