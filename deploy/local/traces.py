"""See a request's trace on this machine, without Jaeger: a local collector and a viewer.

Why: operators read traces in Jaeger, but Jaeger is not installable from the registries this
project's machines reach (not on PyPI, npm or Debian; `deploy/compose/` runs it for people with
Docker). The one maintained OTLP trace viewer on PyPI, Arize Phoenix, is an LLM-evaluation
platform that would pull a few hundred megabytes of dependencies into the virtual environment.
So `make run` starts this small collector, and a request's trace is printed with

    .venv/bin/python -m deploy.local.traces <trace_id>     # the trace_id every answer carries
    .venv/bin/python -m deploy.local.traces --last         # the latest request's trace
    .venv/bin/python -m deploy.local.traces --list         # the latest requests, one a line

as a tree with each span's start, duration, service and the attributes that matter (GenAI
usage, tenant, status, batch size, Triton's model): router -> chat -> cache -> scheduler ->
batch -> Triton's own spans (InferRequest -> model -> compute) -> billing.

`serve` (what the launcher runs) receives OTLP over gRPC from the services and over HTTP from
Triton (deploy/local/otlp.py) and appends every span, one JSON line each, to
`<dir>/spans.jsonl` (default `.run/traces/`). The store is bounded: past `--max-mb` the file
becomes `spans.1.jsonl` (replacing the one before), so the latest spans are always kept.
With `--announce` it prints one line per request the router served, with its trace command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from deploy.local.otlp import OtlpReceiver, Span
from libs.config import REPO_ROOT

DEFAULT_DIR = REPO_ROOT / ".run" / "traces"
STORE = "spans.jsonl"
ROTATED = "spans.1.jsonl"
DEFAULT_MAX_MB = 64
ROUTER = "shepherd-router"
# Attributes worth a glance in a tree line, in this order (others: --all).
SHOWN = (
    "shepherd.tenant",
    "gen_ai.provider.name",
    "gen_ai.response.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.response.finish_reasons",
    "shepherd.cost.nano_usd",
    "shepherd.cache_hit",
    "shepherd.batch.size",
    "shepherd.triton.node",
    "triton.model_name",
    "rpc.grpc.status_code",
    "error.type",
)


class SpanStore:
    """Spans as JSON lines in a directory, rotated at `max_bytes` (see the module)."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_MB << 20) -> None:
        self.directory = directory
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._file: IO[str] | None = None

    def add(self, spans: Sequence[Span]) -> None:
        if not spans:
            return
        lines = "".join(span.to_json() + "\n" for span in spans)
        with self._lock:
            if self._file is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._file = (self.directory / STORE).open("a", encoding="utf-8")
            self._file.write(lines)
            self._file.flush()
            if self._file.tell() > self._max_bytes:
                self._file.close()
                os.replace(self.directory / STORE, self.directory / ROTATED)
                self._file = (self.directory / STORE).open("a", encoding="utf-8")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _lines(directory: Path) -> Iterator[str]:
    """Every stored line, oldest first."""
    for name in (ROTATED, STORE):
        with (
            contextlib.suppress(FileNotFoundError),
            (directory / name).open(encoding="utf-8", errors="replace") as file,
        ):
            yield from file


def read_trace(directory: Path, trace_id: str) -> tuple[list[Span], list[Span]]:
    """The spans of `trace_id`, and the spans of other traces that link to it (a batch that
    served this request along with others lives in the oldest request's trace)."""
    own: list[Span] = []
    linking: list[Span] = []
    for line in _lines(directory):
        if trace_id not in line:  # cheap: most lines are other traces'
            continue
        try:
            span = Span.from_json(line)
        except (ValueError, TypeError):
            continue  # a line cut short by a crash
        if span.trace_id == trace_id:
            own.append(span)
        elif any(link[0] == trace_id for link in span.links):
            linking.append(span)
    return own, linking


def recent_requests(directory: Path, count: int) -> list[Span]:
    """The router's root spans (one per request it served), newest last."""
    roots: list[Span] = []
    for line in _lines(directory):
        if ROUTER not in line or '"parent_span_id":""' not in line:
            continue
        with contextlib.suppress(ValueError, TypeError):
            roots.append(Span.from_json(line))
            roots = roots[-count:]
    return roots


def _value(value: object) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _details(span: Span, everything: bool) -> str:
    keys = sorted(span.attributes) if everything else [k for k in SHOWN if k in span.attributes]
    parts = []
    for key in keys:
        value = span.attributes[key]
        if key == "rpc.grpc.status_code" and value == 0 and not everything:
            continue
        parts.append(f"{key}={_value(value)}")
    if span.status == "error":
        parts.append(f"ERROR {span.status_message}".rstrip())
    return "  " + " ".join(parts) if parts else ""


def render(
    trace_id: str, spans: Sequence[Span], linking: Sequence[Span], everything: bool = False
) -> str:
    """The trace as a tree: start offset and duration (ms), service, name, key attributes."""
    if not spans:
        return f"trace {trace_id}: no spans received (yet)"
    start = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[Span]] = {}
    roots: list[Span] = []
    for span in spans:
        if span.parent_span_id and span.parent_span_id in by_id:
            children.setdefault(span.parent_span_id, []).append(span)
        else:
            roots.append(span)
    services = {s.service for s in spans}
    lines = [
        f"trace {trace_id}: {len(spans)} spans from {len(services)} services"
        f" ({', '.join(sorted(services))}), {(end - start) / 1e6:.2f} ms",
        f"{'start ms':>9} {'took ms':>9}  {'service':<20} span",
    ]

    def walk(span: Span, prefix: str, last: bool, depth: int) -> None:
        branch = "" if depth == 0 else ("└─ " if last else "├─ ")
        orphan = " (parent not received)" if depth == 0 and span.parent_span_id else ""
        lines.append(
            f"{(span.start_ns - start) / 1e6:>9.2f} {span.duration_ms:>9.2f}  "
            f"{span.service[:20]:<20} {prefix}{branch}{span.name}{orphan}"
            f"{_details(span, everything)}"
        )
        kids = sorted(children.get(span.span_id, []), key=lambda s: s.start_ns)
        extension = "" if depth == 0 else ("   " if last else "│  ")
        for i, kid in enumerate(kids):
            walk(kid, prefix + extension, i == len(kids) - 1, depth + 1)

    for root in sorted(roots, key=lambda s: s.start_ns):
        walk(root, "", True, 0)
    for span in linking:
        lines.append(
            f"linked: {span.service} {span.name} ({span.duration_ms:.2f} ms) in trace"
            f" {span.trace_id} served this request too{_details(span, everything)}"
        )
    return "\n".join(lines)


def _request_name(span: Span) -> str:
    """`Chat` for a gRPC method's span, `POST /v1/chat/completions` for the HTTP edge's."""
    return span.name.rsplit("/", 1)[-1] if span.name.startswith("/") else span.name


def _status(span: Span) -> str:
    """OK, or the gRPC status code, or the HTTP status of an HTTP request's span."""
    http = span.attributes.get("http.response.status_code")
    if http is not None:
        return f"HTTP {http}"
    code = span.attributes.get("rpc.grpc.status_code", 0)
    return "OK" if code == 0 else f"status {code}"


def _announce(spans: Sequence[Span]) -> None:
    """One line per request the router served: what it was, and how to see its trace."""
    for span in spans:
        if span.service != ROUTER or span.parent_span_id or span.kind != "server":
            continue
        print(
            f"[trace] {_request_name(span)} {_status(span)} {span.duration_ms:.1f} ms:"
            f" python -m deploy.local.traces {span.trace_id}",
            flush=True,
        )


def serve(args: argparse.Namespace) -> int:
    """Receive OTLP until SIGTERM or Ctrl-C, storing spans (the launcher runs this)."""
    store = SpanStore(args.dir, args.max_mb << 20)

    def keep(spans: list[Span]) -> None:
        store.add(spans)
        if args.announce:
            _announce(spans)

    receiver = OtlpReceiver(
        keep, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    receiver.start()
    print(
        f"receiving OTLP: gRPC {receiver.grpc_endpoint}, HTTP {receiver.http_endpoint};"
        f" spans in {args.dir}",
        flush=True,
    )
    stop.wait()
    receiver.stop()
    store.close()
    return 0


def show(args: argparse.Namespace) -> int:
    """Print one trace, waiting up to --wait seconds for its spans to arrive."""
    trace_id = args.trace_id
    if args.last:
        latest = recent_requests(args.dir, 1)
        if not latest:
            print(f"no request has been traced in {args.dir} yet", file=sys.stderr)
            return 1
        trace_id = latest[-1].trace_id
    trace_id = trace_id.strip().lower()
    if len(trace_id) != 32 or any(c not in "0123456789abcdef" for c in trace_id):
        print(f"{trace_id!r} is not a trace id (32 hex digits)", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.wait
    spans, linking = read_trace(args.dir, trace_id)
    # Services export every few hundred milliseconds: a trace asked for at once may be partial.
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again, linking = read_trace(args.dir, trace_id)
        if spans and len(again) == len(spans):
            break
        spans = again
    print(render(trace_id, spans, linking, args.all))
    return 0 if spans else 1


def list_requests(args: argparse.Namespace) -> int:
    roots = recent_requests(args.dir, args.list)
    if not roots:
        print(f"no request has been traced in {args.dir} yet", file=sys.stderr)
        return 1
    for span in roots:
        when = time.strftime("%H:%M:%S", time.localtime(span.start_ns / 1e9))
        print(
            f"{when} {span.trace_id} {_request_name(span):<26} {_status(span):<9}"
            f" {span.duration_ms:>8.1f} ms"
        )
    return 0


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.traces serve",
        description="Receive OTLP (gRPC and HTTP) and store spans; the launcher runs this.",
    )
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the span store")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--http-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--max-mb", type=int, default=DEFAULT_MAX_MB, help="rotate past this")
    parser.add_argument("--announce", action="store_true", help="a line per request served")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return serve(_serve_parser().parse_args(argv[1:]))
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.traces",
        description="Print a request's trace from the local collector `make run` starts"
        " (`serve` runs the collector).",
    )
    parser.add_argument("trace_id", nargs="?", default="", help="32 hex digits (traceId)")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the span store")
    parser.add_argument("--last", action="store_true", help="the latest request's trace")
    parser.add_argument("--list", type=int, nargs="?", const=20, default=0, metavar="N",
                        help="the latest N requests (20)")  # fmt: skip
    parser.add_argument("--all", action="store_true", help="every attribute of every span")
    parser.add_argument("--wait", type=float, default=3.0, help="seconds to wait for spans")
    args = parser.parse_args(argv)
    if args.list:
        return list_requests(args)
    if not args.trace_id and not args.last:
        parser.error("give a trace id, --last or --list")
    return show(args)


if __name__ == "__main__":
    raise SystemExit(main())
