"""JSON logs, one object per line, carrying the trace id and the tenant of the request being
served, so a log line leads to its trace (`python -m deploy.local.traces <trace_id>`, or
Jaeger) and to whom it concerns."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace

# The tenant of the request this task serves: each gRPC call runs in its own task, so setting
# it in a handler (libs/telemetry.set_tenant) names that call's tenant and no other's.
_tenant: ContextVar[str] = ContextVar("shepherd_tenant", default="")


def bind_tenant(tenant: str) -> None:
    """Every log line the current request writes from now on carries `tenant`."""
    _tenant.set(tenant)


_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON with the service name, the active trace id and any extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime a second, not one a line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = f"{span_context.trace_id:032x}"
        tenant = _tenant.get()
        if tenant:
            entry["tenant"] = tenant
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# HTTP client libraries log every request at INFO ("HTTP Request: POST ..."): one line per
# hosted call is noise at any volume and costs CPU on the request path. They log at WARNING
# and above; SHEPHERD_LOG_LEVEL=DEBUG still shows everything.
_CHATTY = ("httpx", "httpcore", "openai", "aiohttp.access", "aiohttp.client")


def setup_logging(service: str, level: str) -> None:
    """Send every logger's output to stderr as JSON lines."""
    # Nothing here prints the caller's file and line, thread or process, so logging is told not
    # to collect them: finding the caller walks the stack on every record (the switches the
    # logging HOWTO's "Optimization" section names; measured: a fifth of an access line's cost).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if root.level > logging.DEBUG:
        for name in _CHATTY:
            logging.getLogger(name).setLevel(max(root.level, logging.WARNING))
