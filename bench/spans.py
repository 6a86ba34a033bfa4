"""What one span costs: OpenTelemetry's SDK against Shepherd's lean spans, and the two encoders.

Why this exists: the telemetry benchmark (bench/telemetry.py) finds spans the largest part of
what the operators' view costs per request, but a whole mesh moves by several points between
rounds, too much to price one change to how a span is made. This prices the two halves of a
span in one process, with nothing else running:

- recording, in the thread that serves requests: a server span (the RPC attributes the
  service gate sets) with a GenAI chat span inside it (the router's attributes and an event),
  started and ended through `start_as_current_span`, as the services do. Once back to back
  (warm caches) and once after an idle pause (`--pause-ms`, default 5): at concurrency 1 every
  hop of the mesh runs after such a pause, and code then runs several times slower on this
  machine (see "The floor under every hop" in docs/BENCHMARKS.md);
- encoding, in the exporter's thread: a batch of those spans to OTLP's protobuf bytes, with
  opentelemetry-exporter-otlp's `encode_spans` (serialised) and with libs/otlp_spans.py's.

CPU is the measuring thread's own (`time.thread_time_ns`), so the batch processor's thread is
not counted in "recording"; processors drop what they are handed, so no export runs. `make
bench-spans` runs it (about 20 s); a measurement, no target. Writes .build/bench/spans.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as library_encode
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.trace import SpanKind, Tracer

from libs.config import REPO_ROOT
from libs.otlp_spans import encode_spans as shepherd_encode
from libs.spans import LeanTracerProvider

DEFAULT_OUTPUT = REPO_ROOT / ".build" / "bench" / "spans.json"
RPC = {
    "rpc.system": "grpc",
    "rpc.service": "shepherd.router.v1.RouterService",
    "rpc.method": "Chat",
}


class _Keep(SpanProcessor):
    """Keeps the last finished spans for the encoding half, and nothing else."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        if len(self.spans) < 1000:
            self.spans.append(span)


def _request(tracer: Tracer, i: int) -> None:
    """The two spans the router records for one Chat."""
    with tracer.start_as_current_span(
        "/shepherd.router.v1.RouterService/Chat", kind=SpanKind.SERVER, attributes=RPC
    ) as server:
        server.set_attribute("shepherd.tenant", "acme")
        with tracer.start_as_current_span("chat shepherd-echo") as chat:
            chat.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": "triton",
                    "gen_ai.request.model": "shepherd-echo",
                    "gen_ai.response.model": "echo_lm",
                    "gen_ai.usage.input_tokens": 12 + i % 7,
                    "gen_ai.usage.output_tokens": 16,
                    "gen_ai.response.finish_reasons": ("stop",),
                    "shepherd.cost_usd": 0.00012,
                }
            )
            chat.add_event("first_token", {"shepherd.ttft_ms": 3.5})
        server.set_attribute("rpc.grpc.status_code", 0)


def _recording_us(tracer: Tracer, requests: int, pause_s: float) -> float:
    """Thread CPU microseconds per request (two spans), the mean over `requests`."""
    for i in range(200):
        _request(tracer, i)
    spent = 0
    for i in range(requests):
        if pause_s:
            time.sleep(pause_s)
        start = time.thread_time_ns()
        _request(tracer, i)
        spent += time.thread_time_ns() - start
    return spent / requests / 1e3


def _encoding_us(
    encode: Callable[[Sequence[ReadableSpan]], Any], spans: list[ReadableSpan]
) -> float:
    """Thread CPU microseconds per span to encode `spans` as one export's bytes."""
    encode(spans)
    rounds = 20
    start = time.thread_time_ns()
    for _ in range(rounds):
        encode(spans)
    return (time.thread_time_ns() - start) / rounds / len(spans) / 1e3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spans", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="back to back, per tracer")
    parser.add_argument("--paused-requests", type=int, default=600, help="after a pause each")
    parser.add_argument("--pause-ms", type=float, default=5.0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    resource = Resource.create({"service.name": "router"})
    results: dict[str, dict[str, float]] = {}
    kept: dict[str, list[ReadableSpan]] = {}
    for name, provider in (
        ("opentelemetry-sdk", TracerProvider(resource=resource, shutdown_on_exit=False)),
        ("shepherd lean", LeanTracerProvider(resource=resource, shutdown_on_exit=False)),
    ):
        keep = _Keep()
        provider.add_span_processor(keep)
        tracer = provider.get_tracer("shepherd.router")
        results[name] = {
            "warm_us_per_request": _recording_us(tracer, args.requests, 0.0),
            "paused_us_per_request": _recording_us(
                tracer, args.paused_requests, args.pause_ms / 1e3
            ),
        }
        kept[name] = keep.spans
    spans = kept["opentelemetry-sdk"]
    library = _encoding_us(lambda batch: library_encode(batch).SerializeToString(), spans)
    ours = _encoding_us(shepherd_encode, spans)
    same = library_encode(spans).SerializeToString() == shepherd_encode(spans)

    print(
        f"recording a server span and a chat span (thread CPU, us per request; "
        f"pause {args.pause_ms:g} ms):"
    )
    print(f"  {'tracer':<20} {'back to back':>13} {'after a pause':>14}")
    for name, row in results.items():
        print(
            f"  {name:<20} {row['warm_us_per_request']:>13.1f} "
            f"{row['paused_us_per_request']:>14.1f}"
        )
    print(
        f"encoding {len(spans)} spans to OTLP bytes (us per span): "
        f"opentelemetry-exporter-otlp {library:.1f}, libs/otlp_spans.py {ours:.1f}; "
        f"byte-identical: {same}"
    )
    report = {
        "recording": results,
        "encoding_us_per_span": {"opentelemetry-exporter-otlp": library, "shepherd": ours},
        "byte_identical": same,
        "pause_ms": args.pause_ms,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
