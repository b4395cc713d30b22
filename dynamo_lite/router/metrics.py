"""Prometheus metrics of the KV router, registered on a CollectorRegistry passed in (the frontend's).

Worker ids are labelled in hex, as in the logs and etcd keys; a data-parallel rank above 0 as
"{id}-dp{rank}" (router/dp_ranks.py).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dynamo_lite.protocol.messages import LoadReport
from dynamo_lite.router import dp_ranks

PREFIX = "dynamo_lite_router"
OVERLAP_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def worker_label(worker_id: int) -> str:
    return dp_ranks.label(worker_id)


class KvRouterMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.decisions = Counter(f"{PREFIX}_decisions", "Requests routed, by model and chosen worker",
                                 ["model", "worker"], registry=registry)
        self.overlap_blocks = Histogram(f"{PREFIX}_predicted_overlap_blocks",
                                        "Prompt blocks the router predicted cached on the chosen worker",
                                        ["model"], buckets=OVERLAP_BUCKETS, registry=registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of routed requests that "
                                     "finished, as reported by the engines", ["model"], registry=registry)
        self.cached_tokens = Counter(f"{PREFIX}_engine_cached_tokens", "Prompt tokens the engines served "
                                     "from their prefix cache", ["model"], registry=registry)
        self.cache_hit_rate = Gauge(f"{PREFIX}_engine_cache_hit_rate", "Engine-reported cached prompt "
                                    "tokens / prompt tokens since start", ["model"], registry=registry)
        self.event_lag = Histogram(f"{PREFIX}_kv_event_lag_seconds", "Time from a KV event batch leaving "
                                   "the worker to the router applying it", ["model"], buckets=LAG_BUCKETS,
                                   registry=registry)
        self.resyncs = Counter(f"{PREFIX}_kv_resyncs", "Block-set resyncs requested from workers, by result "
                               "(ok, timeout, error)", ["model", "result"], registry=registry)
        self.events = Counter(f"{PREFIX}_kv_events", "KV events received, by outcome (applied, dropped)",
                              ["model", "outcome"], registry=registry)
        self.worker_active_blocks = Gauge(f"{PREFIX}_worker_active_blocks", "KV blocks in use, as last "
                                          "reported by the worker", ["model", "worker"], registry=registry)
        self.worker_total_blocks = Gauge(f"{PREFIX}_worker_total_blocks", "KV blocks of the worker's cache",
                                         ["model", "worker"], registry=registry)
        self.worker_requests = Gauge(f"{PREFIX}_worker_requests", "Requests on the worker by state "
                                     "(running, waiting), as last reported", ["model", "worker", "state"],
                                     registry=registry)
        self.indexed_blocks = Gauge(f"{PREFIX}_indexed_blocks", "Blocks the router's index holds per worker",
                                    ["model", "worker"], registry=registry)
        self._totals: dict[str, list[int]] = {}  # model -> [prompt tokens, cached tokens]

    def record_usage(self, model: str, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.cached_tokens.labels(model).inc(cached_tokens)
        totals = self._totals.setdefault(model, [0, 0])
        totals[0] += prompt_tokens
        totals[1] += cached_tokens
        if totals[0]:
            self.cache_hit_rate.labels(model).set(totals[1] / totals[0])

    def record_load(self, model: str, report: LoadReport) -> None:
        worker = worker_label(report.worker_id)
        self.worker_active_blocks.labels(model, worker).set(report.active_blocks)
        self.worker_total_blocks.labels(model, worker).set(report.total_blocks)
        self.worker_requests.labels(model, worker, "running").set(report.running_requests)
        self.worker_requests.labels(model, worker, "waiting").set(report.waiting_requests)

    def forget_worker(self, model: str, worker_id: int) -> None:
        """Drop the per-worker gauges of a worker that is gone (counters stay: they are history)."""
        worker = worker_label(worker_id)
        for gauge in (self.worker_active_blocks, self.worker_total_blocks, self.indexed_blocks):
            _remove(gauge, model, worker)
        for state in ("running", "waiting"):
            _remove(self.worker_requests, model, worker, state)


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass  # never set
