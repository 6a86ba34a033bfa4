"""Trace context from callers: what is used, and what is ignored quietly."""

from __future__ import annotations

import logging

import pytest

from libs.telemetry import child_span, server_span

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_valid_traceparent_parents_the_span() -> None:
    with child_span("billing.record", VALID) as span:
        assert format(span.get_span_context().trace_id, "032x") == VALID.split("-")[1]


def test_an_oversized_trace_header_is_ignored_without_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by the fuzz: OpenTelemetry logs a warning for each trace header over 512
    characters, so one caller could flood the logs by sending them on every call."""
    huge = VALID + "-" + "f" * 600
    with caplog.at_level(logging.WARNING):
        with child_span("billing.record", huge) as span:
            assert format(span.get_span_context().trace_id, "032x") != VALID.split("-")[1]
        with server_span("/shepherd.router.v1.RouterService/Chat", [("traceparent", huge)]):
            pass
    assert caplog.records == []
