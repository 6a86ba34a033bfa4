"""Reading the Grafana dashboard (deploy/grafana/shepherd.json) and what Prometheus scrapes.

The dashboard tests need the metric names its PromQL queries name, and the sample names the
services really serve; both are worked out here, once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from libs.config import REPO_ROOT

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "shepherd.json"

# PromQL words that are not metric names.
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
     "unless", "offset", "inf", "nan"}
)  # fmt: skip
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLES = re.compile(r"\$\{?\w+\}?")
_IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: the panels' targets and the template variables' queries."""
    found = [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and isinstance(query, str):
            found.append(query)
    return found


def metric_names(expr: str) -> set[str]:
    """The metric (sample) names a PromQL expression selects."""
    label_values = re.match(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)", expr)
    if label_values:
        return {label_values.group(1)}
    stripped = _VARIABLES.sub(" ", expr)
    stripped = _STRINGS.sub('""', stripped)
    stripped = _MATCHERS.sub(" ", stripped)
    stripped = _RANGES.sub(" ", stripped)
    stripped = _GROUPINGS.sub(" ", stripped)
    names = set()
    for match in _IDENTIFIER.finditer(stripped):
        name, call = match.group(1), match.group(2)
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


# One sample line of Prometheus' text format: name, optional {labels}, value.
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_exposition(text: str) -> Samples:
    """Sample name -> (labels, value)s, the names exactly as served (Prometheus keeps them;
    prometheus_client's parser would rename a counter's samples to `_total`)."""
    samples: Samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue  # a comment (# HELP, # TYPE) or a blank line
        name, labels, value = match.groups()
        parsed = {
            key: raw.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
            for key, raw in _LABEL.findall(labels or "")
        }
        samples.setdefault(name, []).append((parsed, float(value)))
    return samples


def scrape(url: str) -> Samples:
    """One Prometheus scrape with a real HTTP client."""
    response = httpx.get(url, timeout=10.0)
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain")
    return parse_exposition(response.text)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        value
        for have, value in samples.get(name, [])
        if all(have.get(key) == wanted for key, wanted in labels.items())
    )
