"""The Grafana dashboard (deploy/grafana/dynamo_lite.json) against the code's metric definitions: every
query of dynamo_lite's own metrics names a metric and labels the code declares, and each chart issue 15
asks for is there. Live processes are checked too: tests/e2e/test_worker_side_port.py (mocker, frontend,
router), tests/e2e/test_worker_side_port_vllm.py (vLLM's `vllm:` metrics) and
tests/integration/test_dashboard_admission.py (the queue and rejection panels)."""

from __future__ import annotations

import json

import pytest

from tests.dashboard import (
    DASHBOARD,
    SCRAPE_LABELS,
    dashboard_queries,
    declared_names,
    panels_charting,
    split_query,
)

# What the dashboard must chart (issue 15, point 6), each by the metric its panel's query names.
REQUIRED_CHARTS = {
    "TTFT": "dynamo_lite_frontend_time_to_first_token_seconds_bucket",
    "ITL": "dynamo_lite_frontend_inter_token_latency_seconds_bucket",
    "requests by status": "dynamo_lite_frontend_requests_total",
    "KV hit rate weighted by blocks (cached)": "dynamo_lite_worker_cached_blocks_total",
    "KV hit rate weighted by blocks (all)": "dynamo_lite_worker_prompt_blocks_total",
    "per-worker load (running)": "dynamo_lite_worker_running_requests",
    "per-worker load (waiting)": "dynamo_lite_worker_waiting_requests",
    "transfer throughput": "dynamo_lite_worker_kv_transfer_bytes_total",
    "queue length": "dynamo_lite_frontend_queued_requests",
    "queue wait": "dynamo_lite_frontend_queue_wait_seconds_bucket",
    "rejections": "dynamo_lite_frontend_rejected_requests_total",
}


def test_every_query_of_our_metrics_names_what_the_code_declares():
    declared, declared_labels = declared_names()
    checked = 0
    for expr in dashboard_queries():
        if "vllm:" in expr:  # vLLM's own names: only a real engine has them (the _vllm e2e test)
            continue
        metrics, labels = split_query(expr)
        assert metrics <= declared, f"{expr}: not declared by the code: {sorted(metrics - declared)}"
        unset = labels - declared_labels - SCRAPE_LABELS
        assert not unset, f"{expr}: labels nobody sets: {unset}"
        checked += 1
    assert checked >= len(REQUIRED_CHARTS)


@pytest.mark.parametrize("chart", list(REQUIRED_CHARTS))
def test_each_chart_the_issue_asks_for_has_a_panel(chart):
    metric = REQUIRED_CHARTS[chart]
    assert metric in declared_names()[0], f"{metric} is not a metric the code exports"
    assert panels_charting(metric), f"no panel charts {chart} ({metric})"


def test_rejections_are_split_by_reason_and_hit_rate_is_a_ratio_of_blocks():
    queries = dashboard_queries()
    [rejected] = [q for q in queries if "dynamo_lite_frontend_rejected_requests_total" in q]
    assert "reason" in split_query(rejected)[1]
    [hit_rate] = [q for q in queries if "dynamo_lite_worker_cached_blocks_total" in q]
    cached, total = hit_rate.split(" / ")
    assert "cached_blocks_total" in cached and "prompt_blocks_total" in total


def test_panels_have_unique_ids_and_do_not_overlap():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area


def test_the_query_splitter_catches_a_misspelt_metric_or_function():
    assert split_query('sum by (worker) (rate(dynamo_lite_worker_kv_events_total{model=~"$model"}[5m]))') == (
        {"dynamo_lite_worker_kv_events_total"}, {"worker", "model"})
    assert split_query("histogram_quantille(0.5, x_bucket)")[0] == {"histogram_quantille", "x_bucket"}
