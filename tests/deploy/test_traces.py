"""Seeing traces without Jaeger: the OTLP receiver (gRPC and HTTP) and the local trace viewer.

The receiver is fed the way Jaeger would be: spans from OpenTelemetry's own OTLP/gRPC exporter,
and OTLP/HTTP bodies in both encodings (Triton's exporter sends JSON with hex ids). The viewer
is run as a person runs it, `python -m deploy.local.traces`, against a collector process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from deploy.local.otlp import OtlpReceiver, Span
from deploy.local.ports import free_ports
from deploy.local.traces import ROTATED, STORE, SpanStore, read_trace, render
from libs.config import REPO_ROOT

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


def triton_json(base_ns: int = 1795314419600000000) -> dict[str, object]:
    """What Triton's OpenTelemetry exporter posts (taken from a real node, shortened), its
    times starting at `base_ns`."""

    def at(offset_ns: int) -> str:
        return str(base_ns + offset_ns)

    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "triton"}}]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "triton-server"},
                        "spans": [
                            {
                                "traceId": TRACE,
                                "spanId": "f5eff1deff497f19",
                                "parentSpanId": PARENT,
                                "name": "InferRequest",
                                "kind": 2,
                                "startTimeUnixNano": at(32062111),
                                "endTimeUnixNano": at(62984305),
                                "events": [{"name": "GRPC_SEND_END", "timeUnixNano": at(62868222)}],
                            },
                            {
                                "traceId": TRACE,
                                "spanId": "26e90678d5597ead",
                                "parentSpanId": "f5eff1deff497f19",
                                "name": "tiny_lm",
                                "kind": 2,
                                "startTimeUnixNano": at(32153017),
                                "endTimeUnixNano": at(62891812),
                                "attributes": [
                                    {
                                        "key": "triton.model_name",
                                        "value": {"stringValue": "tiny_lm"},
                                    },
                                    {"key": "triton.model_version", "value": {"intValue": "1"}},
                                ],
                            },
                        ],
                    }
                ],
            }
        ]
    }


class Collected:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def add(self, spans: list[Span]) -> None:
        with self._lock:
            self.spans.extend(spans)


@pytest.fixture
def receiver() -> Iterator[tuple[OtlpReceiver, Collected]]:
    collected = Collected()
    running = OtlpReceiver(collected.add).start()
    try:
        yield running, collected
    finally:
        running.stop()


def sdk_provider(endpoint: str, service: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint, insecure=True)))
    return provider


def test_the_receiver_takes_opentelemetrys_grpc_exporter(
    receiver: tuple[OtlpReceiver, Collected],
) -> None:
    running, collected = receiver
    provider = sdk_provider(running.grpc_endpoint, "shepherd-router")
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("chat tiny", kind=SpanKind.CLIENT) as span:
        span.set_attribute("gen_ai.usage.input_tokens", 12)
        span.set_attribute("gen_ai.response.finish_reasons", ["stop"])
    provider.shutdown()
    (got,) = collected.spans
    assert got.service == "shepherd-router" and got.name == "chat tiny"
    assert got.kind == "client"
    assert got.attributes == {
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.response.finish_reasons": ["stop"],
    }
    assert got.trace_id == format(span.get_span_context().trace_id, "032x")
    assert got.end_ns > got.start_ns


def test_the_receiver_takes_otlp_http_in_json_as_triton_sends_it_and_in_protobuf(
    receiver: tuple[OtlpReceiver, Collected],
) -> None:
    running, collected = receiver
    url = f"{running.http_endpoint}/v1/traces"
    answer = httpx.post(url, json=triton_json(), timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    request, model = collected.spans
    assert (request.trace_id, request.span_id, request.parent_span_id) == (
        TRACE,
        "f5eff1deff497f19",
        PARENT,
    )
    assert request.service == "triton" and request.kind == "server"
    assert request.events == (("GRPC_SEND_END", 1795314419662868222),)
    assert model.parent_span_id == request.span_id
    assert model.attributes == {"triton.model_name": "tiny_lm", "triton.model_version": 1}

    # The same export as protobuf, the encoding OpenTelemetry's HTTP exporters use.
    message = trace_service_pb2.ExportTraceServiceRequest()
    message.resource_spans.add().scope_spans.add().spans.add(
        trace_id=bytes.fromhex(TRACE), span_id=bytes.fromhex(PARENT), name="scheduler.batch"
    )
    answer = httpx.post(
        url,
        content=message.SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"},
        timeout=10,
    )
    assert answer.status_code == 200
    assert collected.spans[-1].name == "scheduler.batch"
    assert collected.spans[-1].span_id == PARENT

    bad = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400
    assert httpx.post(f"{running.http_endpoint}/v1/logs", content=b"").status_code == 404


# Where the tree starts in a line of the viewer: after start, duration and service columns.
TREE_COLUMN = 9 + 1 + 9 + 2 + 20 + 1


def span(
    name: str, span_id: str, parent: str, start_ms: float, took_ms: float, **kw: object
) -> Span:
    base = 1_800_000_000_000_000_000
    return Span(
        service=str(kw.pop("service", "shepherd-router")),
        name=name,
        trace_id=str(kw.pop("trace_id", TRACE)),
        span_id=span_id,
        parent_span_id=parent,
        start_ns=base + int(start_ms * 1e6),
        end_ns=base + int((start_ms + took_ms) * 1e6),
        **kw,  # type: ignore[arg-type]
    )


def test_the_tree_shows_every_hop_under_its_parent_with_timings(tmp_path: Path) -> None:
    store = SpanStore(tmp_path)
    other = "1" * 32
    store.add(
        [
            span("compute", "05", "04", 4.0, 2.0, service="triton"),
            span("/shepherd.router.v1.RouterService/Chat", "01", "", 0.0, 10.0, kind="server"),
            span(
                "chat tiny",
                "02",
                "01",
                0.5,
                9.0,
                attributes={"gen_ai.provider.name": "triton", "shepherd.tenant": "acme"},
            ),
            span("scheduler.batch", "03", "02", 2.0, 6.0, service="shepherd-scheduler"),
            span("InferRequest", "04", "03", 3.0, 4.0, service="triton"),
            span("unrelated", "09", "", 0.0, 1.0, trace_id=other),
            span("scheduler.batch", "0a", "", 0.0, 1.0, trace_id=other, links=((TRACE, "02"),)),
        ]
    )
    store.close()
    spans, linking = read_trace(tmp_path, TRACE)
    assert len(spans) == 5 and [s.name for s in linking] == ["scheduler.batch"]
    text = render(TRACE, spans, linking)
    lines = text.splitlines()
    assert lines[0].startswith(f"trace {TRACE}: 5 spans from 3 services")
    assert lines[0].endswith("10.00 ms")
    tree = [line[TREE_COLUMN:] for line in lines[2:7]]
    assert tree == [
        "/shepherd.router.v1.RouterService/Chat",
        "└─ chat tiny  shepherd.tenant=acme gen_ai.provider.name=triton",
        "   └─ scheduler.batch",
        "      └─ InferRequest",
        "         └─ compute",
    ]
    assert lines[4].split()[:2] == ["2.00", "6.00"]  # start and duration of the batch
    linked = f"linked: shepherd-router scheduler.batch (1.00 ms) in trace {other}"
    assert lines[7].startswith(linked)


def test_the_store_is_bounded_and_keeps_the_latest_spans(tmp_path: Path) -> None:
    store = SpanStore(tmp_path, max_bytes=2_000)
    for n in range(60):
        store.add([span("s", f"{n:016x}", "", float(n), 1.0)])
    store.close()
    assert (tmp_path / ROTATED).exists()
    assert (tmp_path / STORE).stat().st_size <= 2_000 + 1_000
    spans, _ = read_trace(tmp_path, TRACE)
    assert f"{59:016x}" in {s.span_id for s in spans}
    assert len(spans) < 60  # the oldest were let go


def traces(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.local.traces", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_collector_process_and_the_viewer_as_a_person_runs_them(tmp_path: Path) -> None:
    grpc_port, http_port = free_ports(2)
    collector = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deploy.local.traces",
            "serve",
            "--dir",
            str(tmp_path),
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--announce",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert collector.stdout is not None
        assert collector.stdout.readline().startswith("receiving OTLP")
        provider = sdk_provider(f"http://127.0.0.1:{grpc_port}", "shepherd-router")
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span(
            "/shepherd.router.v1.RouterService/Chat", kind=SpanKind.SERVER
        ) as root:
            root.set_attribute("rpc.grpc.status_code", 0)
            with tracer.start_as_current_span("chat tiny", kind=SpanKind.CLIENT):
                time.sleep(0.01)
        provider.shutdown()
        trace_id = format(root.get_span_context().trace_id, "032x")
        # Triton's spans of the same trace arrive over HTTP, as JSON.
        body = triton_json(time.time_ns() - 40_000_000)
        chat_id = None
        for _ in range(50):
            spans, _ = read_trace(tmp_path, trace_id)
            chat_id = next((s.span_id for s in spans if s.name == "chat tiny"), None)
            if chat_id and len(spans) == 2:
                break
            time.sleep(0.1)
        assert chat_id is not None
        text = json.dumps(body).replace(TRACE, trace_id).replace(PARENT, chat_id)
        posted = httpx.post(
            f"http://127.0.0.1:{http_port}/v1/traces",
            content=text,
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert posted.status_code == 200
        announced = collector.stdout.readline()
        assert announced.startswith("[trace] Chat OK")
        assert announced.rstrip().endswith(f"python -m deploy.local.traces {trace_id}")

        shown = traces(trace_id, "--dir", str(tmp_path), "--wait", "1")
        assert shown.returncode == 0, shown.stderr
        names = [line[TREE_COLUMN:] for line in shown.stdout.splitlines()[2:]]
        assert names == [
            "/shepherd.router.v1.RouterService/Chat",
            "└─ chat tiny",
            "   └─ InferRequest",
            "      └─ tiny_lm  triton.model_name=tiny_lm",
        ]
        last = traces("--last", "--dir", str(tmp_path), "--wait", "0")
        assert last.stdout == shown.stdout
        listed = traces("--list", "--dir", str(tmp_path))
        assert trace_id in listed.stdout and "Chat" in listed.stdout
        assert traces("not-a-trace", "--dir", str(tmp_path)).returncode == 2
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(timeout=20)
    assert collector.returncode == 0
