"""Prometheus metrics of the frontend, registered on a CollectorRegistry passed in (no global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as _Counter
from prometheus_client import Gauge as _Gauge
from prometheus_client import Histogram as _Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "dynamo_lite_frontend"
CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BLOCK_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BYTE_BUCKETS = tuple(float(2 ** k) for k in range(16, 36, 2))  # 64 KiB .. 16 GiB
UNKNOWN_MODEL = "unknown"  # the model label of requests that never resolved to a served model
# Stages run from microseconds (routing) to the whole decode (stream).
STAGE_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _MemoLabels:
    """labels(*values) looked up in a dict first: prometheus_client validates, converts and locks on every
    call (~2 µs), and the frontend asks for the same few children several times per request. Children are
    never removed here, so a memoized child stays the registered one."""

    def labels(self, *values):
        try:
            return self._memo[values]
        except AttributeError:
            self._memo = {}
        except KeyError:
            pass
        child = self._memo[values] = super().labels(*values)
        return child


class Counter(_MemoLabels, _Counter):
    pass


class Gauge(_MemoLabels, _Gauge):
    pass


class Histogram(_MemoLabels, _Histogram):
    pass


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by model, endpoint and status code",
                                ["model", "endpoint", "status"], registry=registry)
        self.inflight = Gauge(f"{PREFIX}_inflight_requests", "Requests being served now", ["model"],
                              registry=registry)
        self.time_to_first_token = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                                             "Time from request arrival to the first generated token",
                                             ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(f"{PREFIX}_inter_token_latency_seconds",
                                             "Time between successive token frames of a stream",
                                             ["model"], buckets=TOKEN_GAP_BUCKETS, registry=registry)
        self.input_tokens = Counter(f"{PREFIX}_input_tokens", "Prompt tokens of finished requests",
                                    ["model"], registry=registry)
        self.cached_tokens = Counter(f"{PREFIX}_cached_tokens", "Prompt tokens the engines served from their "
                                     "prefix cache (usage.prompt_tokens_details.cached_tokens)", ["model"],
                                     registry=registry)
        self.output_tokens = Counter(f"{PREFIX}_output_tokens", "Generated tokens of finished requests",
                                     ["model"], registry=registry)
        self.request_duration = Histogram(f"{PREFIX}_request_duration_seconds",
                                          "Time from request arrival to the last byte of the answer",
                                          ["model", "endpoint"], buckets=DURATION_BUCKETS, registry=registry)
        self.workers = Gauge(f"{PREFIX}_workers", "Live worker instances serving each model", ["model"],
                             registry=registry)
        self.migrations = Counter(f"{PREFIX}_migrations", "Requests moved to another worker mid-stream",
                                  ["model"], registry=registry)
        # Disaggregated serving (frontend/prefill_policy.py).
        self.disagg_requests = Counter(f"{PREFIX}_disagg_requests", "Requests by how their prompt was prefilled: "
                                       "mode disaggregated (on a prefill worker) or aggregated (on the decode "
                                       "worker itself), and why", ["model", "mode", "reason"], registry=registry)
        self.pool_inflight = Gauge(f"{PREFIX}_pool_inflight_requests", "Requests this frontend has in flight per "
                                   "worker pool: prefill = remote prefills, decode = streams on backend workers",
                                   ["model", "pool"], registry=registry)
        self.remote_prefill_duration = Histogram(f"{PREFIX}_remote_prefill_seconds", "Time from sending a prompt "
                                                 "to a prefill worker to receiving its KV transfer params",
                                                 ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.decode_first_token = Histogram(f"{PREFIX}_remote_decode_first_token_seconds", "Time from sending a "
                                            "decode request with transfer params to its first token (KV pull "
                                            "plus the first decode step)", ["model"], buckets=LATENCY_BUCKETS,
                                            registry=registry)
        self.kv_transfer_blocks = Histogram(f"{PREFIX}_kv_transfer_blocks", "KV blocks a prefill worker handed "
                                            "to a decode worker, per request (its remote_block_ids)", ["model"],
                                            buckets=BLOCK_BUCKETS, registry=registry)
        self.kv_transfer_bytes = Histogram(f"{PREFIX}_kv_transfer_bytes", "KV bytes the decode worker pulled for "
                                           "a request, as its engine measured them (only requests it could "
                                           "attribute a transfer to)", ["model"], buckets=BYTE_BUCKETS,
                                           registry=registry)
        self.kv_transfer_seconds = Histogram(f"{PREFIX}_kv_transfer_seconds", "Duration of a request's KV pull as "
                                             "the decode worker's engine measured it", ["model"],
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.stage_seconds = Histogram(f"{PREFIX}_stage_seconds", "Time of a request in each stage of the "
                                       "frontend (frontend/stages.py): parse, tokenize, route, queue, "
                                       "first_token (split by the worker into worker_queue and prefill), "
                                       "detokenize, stream", ["model", "stage"], buckets=STAGE_BUCKETS,
                                       registry=registry)
        # Admission control (frontend/admission.py); nothing is recorded while it is off.
        self.queued_requests = Gauge(f"{PREFIX}_queued_requests", "Requests waiting in the admission queue",
                                     ["model"], registry=registry)
        self.rejected_requests = Counter(f"{PREFIX}_rejected_requests", "Requests refused with 503 by admission "
                                         "control, by reason: queue_full, concurrency_limit, workers_busy",
                                         ["model", "reason"], registry=registry)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time requests waited in the admission "
                                    "queue (0 for those admitted at once), admitted or refused after waiting",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self._worker_models: set[str] = set()

    def set_workers(self, counts: dict[str, int]) -> None:
        """Update the per-model worker gauge; models that vanished drop to 0."""
        for model in self._worker_models - counts.keys():
            self.workers.labels(model).set(0)
        for model, count in counts.items():
            self.workers.labels(model).set(count)
        self._worker_models |= counts.keys()

    def render(self) -> bytes:
        return generate_latest(self.registry)
