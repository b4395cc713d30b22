"""The Grafana dashboard's PromQL, split into the metric and label names it uses, and the names a live
process exports: tests check the first against the second, so no panel charts a metric nobody sends."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dynamo_lite.json"

# PromQL functions, aggregations and keywords the dashboard may use, and Grafana's label_values().
PROMQL_WORDS = {
    "sum", "avg", "max", "min", "count", "topk", "bottomk", "rate", "irate", "increase", "delta",
    "histogram_quantile", "clamp_min", "clamp_max", "by", "without", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "offset", "bool", "label_values",
}
# Labels Prometheus adds to every scraped sample (the target's), and the histogram bucket label.
SCRAPE_LABELS = {"instance", "job", "le"}
# The admission-control metrics (frontend/admission.py): labelled samples appear only once admission control
# is on and has queued or refused a request, so their labels are checked where that happens
# (tests/integration/test_dashboard_admission.py).
ADMISSION_METRICS = {"dynamo_lite_frontend_queued_requests", "dynamo_lite_frontend_rejected_requests_total",
                     "dynamo_lite_frontend_queue_wait_seconds_bucket"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_RANGE = re.compile(r"\[[^\]]*\]")
_NUMBER = re.compile(r"(?<![A-Za-z_:])\d+(\.\d+)?")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def dashboard_queries(path: Path = DASHBOARD) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and templating queries."""
    dashboard = json.loads(path.read_text())
    queries = []

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        queries += [target["expr"] for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def split_query(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) one PromQL expression uses. Whatever is neither a PromQL word nor
    a label is taken for a metric name, so a misspelt function shows up as an unknown metric."""
    text = _RANGE.sub(" ", _STRING.sub('""', expr))
    labels = set(_MATCHER_LABEL.findall(text))
    for group in _GROUPING.findall(text):
        labels |= {name.strip() for name in group.split(",") if name.strip()}
    text = _GROUPING.sub(" ", _MATCHER_LABEL.sub(" ", text))
    # label_values(metric, label): its second argument is a label.
    for metric, label in re.findall(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*(\w+)\s*\)", text):
        labels.add(label)
        text = text.replace(f", {label})", ")").replace(f",{label})", ")")
    text = _NUMBER.sub(" ", text)
    metrics = {word for word in _IDENT.findall(text) if word not in PROMQL_WORDS}
    return metrics, labels


def dashboard_names(path: Path = DASHBOARD) -> tuple[set[str], set[str]]:
    metrics: set[str] = set()
    labels: set[str] = set()
    for expr in dashboard_queries(path):
        m, lab = split_query(expr)
        metrics |= m
        labels |= lab
    return metrics, labels


_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}


def exported_names(*texts: str) -> tuple[set[str], set[str]]:
    """(sample names, label names) in Prometheus exposition texts. A family listed without samples yet
    (a labelled metric nobody has set) still counts, with the sample names its type gives it."""
    names: set[str] = set()
    labels: set[str] = set()
    for text in texts:
        for family in text_string_to_metric_families(text):
            names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
            for sample in family.samples:
                names.add(sample.name)
                labels |= set(sample.labels)
    return names, labels


def declared_names() -> tuple[set[str], set[str]]:
    """(sample names, label names) the code's own metric definitions give: the frontend's, the KV router's
    (both on the frontend's registry) and the worker side port's collector. No process is needed, so a
    renamed metric or label fails a unit test. The label names come from prometheus_client's
    `_labelnames`: a labelled family lists none until a child exists, and the public API has no other way
    to read them without setting a value."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from dynamo_lite.engine.worker_metrics import WorkerMetricsCollector
    from dynamo_lite.frontend.metrics import FrontendMetrics
    from dynamo_lite.router.metrics import KvRouterMetrics

    names: set[str] = set()
    labels: set[str] = set()
    registry = CollectorRegistry()
    for owner in (FrontendMetrics(registry), KvRouterMetrics(registry)):
        for metric in vars(owner).values():
            if isinstance(metric, MetricWrapperBase):
                names |= {metric._name + suffix for suffix in _SUFFIXES[metric._type]}
                labels |= set(metric._labelnames)
    for family in WorkerMetricsCollector._families().values():
        names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
        labels |= set(family._labelnames)
    return names, labels


def panels_charting(metric: str, path: Path = DASHBOARD) -> list[str]:
    """Titles of the dashboard's panels with a query naming `metric`."""
    titles = []
    for panel in json.loads(path.read_text())["panels"]:
        if any(metric in split_query(target["expr"])[0] for target in panel.get("targets", [])):
            titles.append(panel["title"])
    return titles
