"""KvRoutingService: KV-aware routing wired to discovery and the event plane.

One KvRouter per model (block size from the model card unless overridden). The service is itself the
frontend's Router: the pipeline passes the live workers of one model, so the model is looked up from
the workers' instance records, and each request id remembers its model for first_token/finished.

Event plane (when attached; routing works on the router's own load tracking until then):
- per model, one subscription to keys.kv_events_subject and one to keys.load_subject. A subscription's
  messages are handled one by one in arrival order, so each worker's batches reach its KvRouter in
  seq order (DESIGN §7.5). An undecodable batch is logged and dropped.
- when a KvRouter reports a gap (apply_batch -> False), and for every worker that appears (a router
  that starts late, or a worker back after a failure cooldown, has not seen its earlier batches),
  the worker's block set is requested on keys.resync_subject with a bounded timeout. Failures are
  retried with backoff while the worker is live; they never stop the intake.
- the last LoadReport per worker is kept (and exported as metrics).

Workers removed by the watcher (lease ended, connection failure) lose their blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.events.base import EventBus, Subscription
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.errors import DynamoLiteError, NoWorkerAvailableError
from dynamo_lite.protocol.messages import (InstanceRecord, KvResyncRequest, LoadReport,
                                           kv_batch_decoder, load_decoder, msgpack_encoder)
from dynamo_lite.router.base import RouteDecision, Router
from dynamo_lite.router.kv_router import KvRouter
from dynamo_lite.router.metrics import KvRouterMetrics, worker_label

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KvRoutingSettings:
    namespace: str = "dynamo"
    block_size: int = 0  # tokens per KV block; 0 = the model card's kv_block_size
    overlap_weight: float = 1.0  # weight of prompt blocks not cached on a worker in its cost
    temperature: float = 0.0  # 0 = lowest cost wins; > 0 = softmax sampling over normalized costs
    use_kv_events: bool = True  # False: approximate mode (the router remembers what it routed)
    approx_ttl: float = 120.0  # seconds a routed prefix counts as cached in approximate mode
    resync_timeout: float = 2.0  # seconds to wait for a worker's block set
    resync_backoff: float = 0.5  # first delay before retrying a failed resync (doubles each time)
    resync_backoff_max: float = 10.0


class KvRoutingService(Router):
    def __init__(self, watcher: InstanceWatcher, settings: KvRoutingSettings,
                 metrics: KvRouterMetrics | None = None, *, rng: random.Random | None = None) -> None:
        self.watcher = watcher
        self.settings = settings
        self.metrics = metrics
        self.load_reports: dict[int, LoadReport] = {}
        self._rng = rng
        self._routers: dict[str, KvRouter] = {}
        self._worker_model: dict[int, str] = {}
        self._request_router: dict[str, KvRouter] = {}
        self._bus: EventBus | None = None
        self._subscribed: set[str] = set()
        self._subscriptions: list[Subscription] = []
        self._tasks: set[asyncio.Task] = set()
        self._resyncing: dict[int, asyncio.Task] = {}
        self._closed = False
        watcher.add_listener(self._on_instance_change)
        for record in watcher.instances():
            self._on_instance_change("added", record)

    # ------------------------------------------------------------------ lifecycle

    @property
    def events_attached(self) -> bool:
        return self._bus is not None

    async def attach_events(self, bus: EventBus) -> None:
        """Start following the event plane: subscribe for every known model, resync every live worker."""
        if self.settings.use_kv_events is False or self._closed:
            return
        self._bus = bus
        for model in list(self._routers):
            await self._subscribe(model)
        for worker_id, model in list(self._worker_model.items()):
            self._schedule_resync(model, worker_id)

    async def close(self) -> None:
        """Stop the intake (the bus itself belongs to the caller). Safe to call twice."""
        self._closed = True
        tasks = [*self._tasks, *self._resyncing.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.close()
        self._subscriptions.clear()

    # ------------------------------------------------------------------ Router

    def route(self, request_id: str, token_ids: Sequence[int], workers: Sequence[int]) -> RouteDecision:
        if not workers:
            raise NoWorkerAvailableError("no worker to route to")
        model = self._model_of(workers[0])
        router = self._routers.get(model) if model is not None else None
        if router is None:
            raise NoWorkerAvailableError(f"no model card known for worker {workers[0]:x}")
        decision = router.route(request_id, token_ids, workers)
        self._request_router[request_id] = router
        if self.metrics is not None:
            self.metrics.decisions.labels(model, worker_label(decision.worker_id)).inc()
            self.metrics.overlap_blocks.labels(model).observe(decision.overlap_blocks)
        return decision

    def first_token(self, request_id: str) -> None:
        router = self._request_router.get(request_id)
        if router is not None:
            router.first_token(request_id)

    def finished(self, request_id: str) -> None:
        router = self._request_router.pop(request_id, None)
        if router is not None:
            router.finished(request_id)

    def worker_removed(self, worker_id: int) -> None:
        model = self._worker_model.pop(worker_id, None)
        if model is None:
            return  # already forgotten (the watcher tells us and the app relays it too)
        router = self._routers.get(model)
        if router is not None:
            router.worker_removed(worker_id)
        task = self._resyncing.pop(worker_id, None)
        if task is not None:
            task.cancel()
        self.load_reports.pop(worker_id, None)
        if self.metrics is not None:
            self.metrics.forget_worker(model, worker_id)
        logger.info("kv router: forgot worker %x of %s", worker_id, model)

    # ------------------------------------------------------------------ queries

    def router_for(self, model: str) -> KvRouter | None:
        return self._routers.get(model)

    def explain(self, model: str, token_ids: Sequence[int]) -> dict:
        """KvRouter.explain over the model's live backend workers (nothing is dispatched)."""
        router = self._routers.get(model)
        workers = [r.instance_id for r in self.watcher.instances(model, keys.COMPONENT_BACKEND)]
        if router is None or not workers:
            raise NoWorkerAvailableError(f"no worker is available for model {model}")
        explanation = router.explain(token_ids, workers)
        explanation["kv_events"] = self.events_attached
        for row in explanation["workers"]:
            row["worker"] = worker_label(row["worker_id"])
            report = self.load_reports.get(row["worker_id"])
            if report is not None:
                row["reported_active_blocks"] = report.active_blocks
        return explanation

    def record_usage(self, model: str, prompt_tokens: int, cached_tokens: int) -> None:
        """Engine-reported usage of a finished request (the frontend sees both numbers)."""
        if self.metrics is not None:
            self.metrics.record_usage(model, prompt_tokens, cached_tokens)

    # ------------------------------------------------------------------ discovery

    def _on_instance_change(self, kind: str, record: InstanceRecord) -> None:
        if kind == "removed":
            self.worker_removed(record.instance_id)
            return
        if not self._ensure_router(record.model):
            return
        self._worker_model[record.instance_id] = record.model
        if self._bus is not None and not self._closed:
            self._spawn(self._subscribe(record.model), f"kv-subscribe-{record.model}")
            self._schedule_resync(record.model, record.instance_id)

    def _ensure_router(self, model: str) -> bool:
        if model in self._routers:
            return True
        card = self.watcher.card(model)
        block_size = self.settings.block_size or (card.kv_block_size if card is not None else 0)
        if block_size <= 0:
            logger.warning("kv router: no block size for model %s (no model card yet)", model)
            return False
        if card is not None and card.kv_block_size != block_size:
            logger.warning("kv router: --kv-cache-block-size %d differs from %s's card (%d): KV events of "
                           "the other size will be dropped", block_size, model, card.kv_block_size)
        self._routers[model] = KvRouter(block_size, overlap_weight=self.settings.overlap_weight,
                                        temperature=self.settings.temperature,
                                        approximate=not self.settings.use_kv_events,
                                        approx_ttl=self.settings.approx_ttl, rng=self._rng)
        logger.info("kv router for %s: block size %d, overlap weight %g, temperature %g%s", model, block_size,
                    self.settings.overlap_weight, self.settings.temperature,
                    "" if self.settings.use_kv_events else f", approximate (ttl {self.settings.approx_ttl:g}s)")
        return True

    def _model_of(self, worker_id: int) -> str | None:
        model = self._worker_model.get(worker_id)
        if model is None:
            for record in self.watcher.instances():
                if record.instance_id == worker_id:
                    self._on_instance_change("added", record)
                    return record.model if record.model in self._routers else None
        return model

    def _is_live(self, worker_id: int) -> bool:
        return worker_id in self._worker_model

    # ------------------------------------------------------------------ event intake

    def _spawn(self, coroutine, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _subscribe(self, model: str) -> None:
        if self._bus is None or model in self._subscribed or self._closed:
            return
        self._subscribed.add(model)
        namespace = self.settings.namespace
        try:
            events = await self._bus.subscribe(keys.kv_events_subject(namespace, model))
            loads = await self._bus.subscribe(keys.load_subject(namespace, model))
        except Exception as e:  # retried when the model's next worker appears
            self._subscribed.discard(model)
            logger.warning("kv router: cannot subscribe to %s's events: %r", model, e)
            return
        self._subscriptions += [events, loads]
        self._spawn(self._follow(model, events, self._on_batch), f"kv-events-{model}")
        self._spawn(self._follow(model, loads, self._on_load), f"kv-load-{model}")
        logger.info("kv router: following KV events and load of %s", model)

    async def _follow(self, model: str, subscription: Subscription, handle) -> None:
        async for data in subscription:
            try:
                handle(model, data)
            except Exception:  # one bad message must never stop the intake
                logger.exception("kv router: failed to handle a message for %s; dropped", model)

    def _on_batch(self, model: str, data: bytes) -> None:
        metrics = self.metrics
        try:
            batch = kv_batch_decoder.decode(data)
        except msgspec.DecodeError as e:
            logger.warning("kv router: dropped an undecodable KV event batch for %s: %s", model, e)
            if metrics is not None:
                metrics.events.labels(model, "dropped").inc()
            return
        router = self._routers.get(model)
        if router is None:
            return
        dropped_before = router.indexer.dropped_events
        in_sync = router.apply_batch(batch)
        if metrics is not None:
            dropped = router.indexer.dropped_events - dropped_before
            metrics.events.labels(model, "applied").inc(len(batch.events) - dropped)
            if dropped:
                metrics.events.labels(model, "dropped").inc(dropped)
            if batch.timestamp:
                metrics.event_lag.labels(model).observe(max(0.0, time.time() - batch.timestamp))
            if self._is_live(batch.worker_id):
                metrics.indexed_blocks.labels(model, worker_label(batch.worker_id)).set(
                    router.indexer.block_count(batch.worker_id))
        if not in_sync:
            self._schedule_resync(model, batch.worker_id)

    def _on_load(self, model: str, data: bytes) -> None:
        try:
            report = load_decoder.decode(data)
        except msgspec.DecodeError as e:
            logger.warning("kv router: dropped an undecodable load report for %s: %s", model, e)
            return
        if not self._is_live(report.worker_id):
            return  # a report in flight from a worker that is gone, or not discovered yet
        self.load_reports[report.worker_id] = report
        if self.metrics is not None:
            self.metrics.record_load(model, report)

    # ------------------------------------------------------------------ resync

    def _schedule_resync(self, model: str, worker_id: int) -> None:
        if self._bus is None or self._closed or worker_id in self._resyncing:
            return
        task = asyncio.get_running_loop().create_task(self._resync(model, worker_id),
                                                      name=f"kv-resync-{worker_id:x}")
        self._resyncing[worker_id] = task

    async def _resync(self, model: str, worker_id: int) -> None:
        settings, metrics = self.settings, self.metrics
        subject = keys.resync_subject(settings.namespace, worker_id)
        request = msgpack_encoder.encode(KvResyncRequest())
        delay = settings.resync_backoff
        attempt = 0
        try:
            while self._bus is not None and not self._closed and self._is_live(worker_id):
                router = self._routers.get(model)
                if router is None or (attempt and router.is_synced(worker_id)):
                    return  # e.g. its first batch arrived meanwhile
                attempt += 1
                try:
                    snapshot = kv_batch_decoder.decode(
                        await self._bus.request(subject, request, settings.resync_timeout))
                    if snapshot.worker_id != worker_id:
                        raise ValueError(f"answer names worker {snapshot.worker_id:x}")
                except TimeoutError as e:
                    result = "timeout"
                    log = logger.warning if attempt == 1 else logger.debug
                    log("kv router: resync of worker %x (attempt %d) failed: %s; retrying in %.1fs", worker_id,
                        attempt, e, delay)
                except (DynamoLiteError, msgspec.DecodeError, ValueError, OSError) as e:
                    result = "error"
                    logger.warning("kv router: resync of worker %x (attempt %d) failed: %r; retrying in %.1fs",
                                   worker_id, attempt, e, delay)
                else:
                    if not self._is_live(worker_id) or self._closed:
                        return  # removed while we waited: do not revive its blocks
                    synced = router.apply_resync(snapshot)
                    if metrics is not None:
                        metrics.resyncs.labels(model, "ok").inc()
                        metrics.indexed_blocks.labels(model, worker_label(worker_id)).set(
                            router.indexer.block_count(worker_id))
                    if synced:
                        return
                    delay = settings.resync_backoff  # answered, but batches after it are missing: ask again
                    continue
                if metrics is not None:
                    metrics.resyncs.labels(model, result).inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, settings.resync_backoff_max)
        finally:
            if self._resyncing.get(worker_id) is asyncio.current_task():
                del self._resyncing[worker_id]
