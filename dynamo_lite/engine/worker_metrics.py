"""The worker shell's metrics on the side port's /metrics, read from the shells at scrape time.

A prometheus_client Collector rather than Counters updated on the hot path: the shell already keeps
running totals (requests, tokens, blocks), the KV event publisher its relay totals and the engine its
load and KV transfer totals, so a scrape reads them and the request path pays nothing. Every sample is
labelled with the model, the worker (its instance id in hex, as the router's metrics and etcd keys) and
its role; a process of the mocker serves several workers. Names are listed in docs/configuration.md
(metrics section); the Grafana dashboard test reads them from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from dynamo_lite.engine.worker import WorkerShell

PREFIX = "dynamo_lite_worker"
LABELS = ["model", "worker", "role"]


class WorkerMetricsCollector(Collector):
    def __init__(self, shells: list[WorkerShell]):
        self._shells = shells

    def describe(self) -> list:
        # Names without values, so registering checks them against the registry's others.
        return list(self._families().values())

    def collect(self) -> Iterator:
        families = self._families()
        for shell in self._shells:
            if shell.info is None or shell.record is None:
                continue  # not registered yet: no instance id to label it with
            labels = [shell.info.model_name, f"{shell.instance_id:x}", str(shell.config.role)]
            self._add(families, shell, labels)
        yield from families.values()

    @staticmethod
    def _families() -> dict[str, CounterMetricFamily | GaugeMetricFamily]:
        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=LABELS + list(extra))

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=LABELS)

        return {
            "ready": gauge("ready", "1 while the worker is registered and serving, 0 while it drains"),
            "requests": counter("requests", "Generate requests ended, by outcome (completed, aborted by the "
                                "client or the frontend, failed in the engine)", ("outcome",)),
            "active": gauge("active_requests", "Requests on this worker's request plane now"),
            "tokens": counter("generated_tokens", "Tokens generated"),
            "prompt_blocks": counter("prompt_blocks", "Full KV blocks of the prompts of generate requests"),
            "cached_blocks": counter("cached_blocks", "Prompt blocks the engine found in its prefix cache "
                                     "(over prompt_blocks: the hit rate weighted by blocks)"),
            "kv_active": gauge("kv_active_blocks", "KV blocks in use, as in the load reports"),
            "kv_total": gauge("kv_total_blocks", "KV blocks of the engine's cache"),
            "kv_usage": gauge("kv_usage_ratio", "kv_active_blocks / kv_total_blocks"),
            "running": gauge("running_requests", "Requests the engine is running"),
            "waiting": gauge("waiting_requests", "Requests waiting in the engine's queue"),
            "batches": counter("kv_event_batches", "KV event batches relayed to the event plane"),
            "events": counter("kv_events", "KV events relayed to the event plane"),
            "failures": counter("event_publish_failures", "Publishes to the event plane that failed "
                                "(batches and load reports; routers resync after a gap)"),
            "load_reports": counter("load_reports", "Load reports published"),
            "resyncs": counter("kv_resyncs_served", "Block-set resync requests answered"),
            "relayed": gauge("relayed_blocks", "Blocks announced on the event plane and not removed since"),
            "xfer_bytes": counter("kv_transfer_bytes", "KV bytes the engine's connector moved (NIXL reads)"),
            "xfer_seconds": counter("kv_transfer_seconds", "Time the connector's KV transfers took"),
            "xfers": counter("kv_transfers", "KV transfers the connector completed"),
        }

    @staticmethod
    def _add(families: dict, shell: WorkerShell, labels: list[str]) -> None:
        counters = shell.counters
        families["ready"].add_metric(labels, 1.0 if shell.ready else 0.0)
        for outcome in ("completed", "aborted", "failed"):
            families["requests"].add_metric(labels + [outcome], counters[outcome])
        families["active"].add_metric(labels, shell.stats.active_requests)
        families["tokens"].add_metric(labels, counters["generated_tokens"])
        families["prompt_blocks"].add_metric(labels, counters["prompt_blocks"])
        families["cached_blocks"].add_metric(labels, counters["cached_blocks"])
        try:
            load = shell.engine.load()
        except Exception:
            load = None  # an engine shutting down; its gauges are left out of this scrape
        if load is not None:
            families["kv_active"].add_metric(labels, load.active_blocks)
            families["kv_total"].add_metric(labels, load.total_blocks)
            families["kv_usage"].add_metric(labels, load.active_blocks / load.total_blocks
                                            if load.total_blocks else 0.0)
            families["running"].add_metric(labels, load.running_requests)
            families["waiting"].add_metric(labels, load.waiting_requests)
        publisher = shell.publisher
        if publisher is not None:  # none without an event plane
            families["batches"].add_metric(labels, publisher.batches_published)
            families["events"].add_metric(labels, publisher.events_published)
            families["failures"].add_metric(labels, publisher.publish_failures)
            families["load_reports"].add_metric(labels, publisher.load_reports)
            families["resyncs"].add_metric(labels, publisher.resyncs_served)
            families["relayed"].add_metric(labels, publisher.relayed_block_count)
        transfers = shell.engine.transfer_totals()
        families["xfer_bytes"].add_metric(labels, transfers.bytes)
        families["xfer_seconds"].add_metric(labels, transfers.seconds)
        families["xfers"].add_metric(labels, transfers.transfers)
