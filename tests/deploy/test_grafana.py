"""The Grafana dashboard (deploy/grafana/shepherd.json) as Grafana loads it.

Whether every query names a metric the services really serve is checked against a running
mesh (tests/integration/test_observability.py); here, that it is a dashboard at all and covers
what the operators' view promises.
"""

from __future__ import annotations

from tests.support.dashboard import load_dashboard, metric_names, panels, queries

# What an operator must see, and a metric each panel family is built on.
COVERS = {
    "requests": "rpc_server_duration_milliseconds_count",
    "latency": "gen_ai_client_operation_duration_seconds_bucket",
    "time to first token": "gen_ai_server_time_to_first_token_seconds_bucket",
    "queue depth": "shepherd_scheduler_queue_depth",
    "batch fill": "shepherd_scheduler_batch_fill_sum",
    "cache hit ratio": "shepherd_cache_events_total",
    "spend per tenant": "shepherd_billing_cost_usd_total",
}


def test_the_dashboard_parses_and_every_panel_has_a_query_on_the_chosen_prometheus() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] == "Shepherd"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["description"], panel["id"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and metric_names(target["expr"]), panel["title"]


def test_the_dashboard_covers_the_operators_view() -> None:
    named = {name for expr in queries(load_dashboard()) for name in metric_names(expr)}
    missing = {topic: metric for topic, metric in COVERS.items() if metric not in named}
    assert not missing


def test_metric_names_are_read_from_promql_as_prometheus_reads_them() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(a_b_bucket{x=~"y|z", q!="by"}'
        "[$__rate_interval]))) / ignoring(model) group_left sum(increase(c:d_total[5m]))"
        " * 3600 and on() vector(1) > bool 0"
    )
    assert metric_names(expr) == {"a_b_bucket", "c:d_total"}
    assert metric_names("label_values(shepherd_billing_requests_total, tenant)") == {
        "shepherd_billing_requests_total"
    }
