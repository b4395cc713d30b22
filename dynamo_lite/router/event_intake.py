"""KvEventIntake: the event plane feeding a KvRoutingService's per-model KvRouters.

- per model, one subscription to keys.kv_events_subject and one to keys.load_subject. A subscription's
  messages are handled one by one in arrival order, so each worker's batches reach its KvRouter in
  seq order (how the router tells a lost batch from an old one). An undecodable message is logged
  and dropped.
- when a KvRouter reports a gap (apply_batch -> False), and for every worker that appears (a router
  that attaches late, or a worker back after a failure cooldown, has not seen its earlier batches),
  the worker's block set is requested on keys.resync_subject with a bounded timeout. Failures are
  retried with backoff while the worker is live; they never stop the intake.
- the last LoadReport per worker is kept (and exported as metrics).

Workers are keyed by router/dp_ranks.py's rank keys: a batch or load report of data-parallel rank r of
instance i belongs to the key of (i, r), and that rank is resynced on its own subject. The live workers map
holds the key of every rank.

The intake neither routes nor watches discovery. Its owner (router/kv_routing.py) shares its routers by
model and its live workers (id -> model) read-only, and says when a model or worker appears or goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from dynamo_lite.events.base import EventBus, Subscription
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.errors import DynamoLiteError
from dynamo_lite.protocol.messages import KvResyncRequest, LoadReport, kv_batch_decoder, load_decoder, msgpack_encoder
from dynamo_lite.router import dp_ranks
from dynamo_lite.router.kv_router import KvRouter
from dynamo_lite.router.metrics import KvRouterMetrics, worker_label

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResyncSettings:
    timeout: float = 2.0  # seconds to wait for a worker's block set
    backoff: float = 0.5  # first delay before retrying a failed resync (doubles each time)
    backoff_max: float = 10.0


class KvEventIntake:
    def __init__(self, namespace: str, routers: Mapping[str, KvRouter], workers: Mapping[int, str],
                 resync: ResyncSettings = ResyncSettings(), metrics: KvRouterMetrics | None = None) -> None:
        self.metrics = metrics
        self.load_reports: dict[int, LoadReport] = {}
        self._namespace = namespace
        self._routers = routers
        self._workers = workers
        self._resync_settings = resync
        self._bus: EventBus | None = None
        self._subscribed: set[str] = set()
        self._subscriptions: list[Subscription] = []
        self._tasks: set[asyncio.Task] = set()
        self._resyncing: dict[int, asyncio.Task] = {}
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def attached(self) -> bool:
        return self._bus is not None

    async def attach(self, bus: EventBus) -> None:
        """Start following the event plane: subscribe for every known model, resync every live worker."""
        if self._closed:
            return
        self._bus = bus
        for model in list(self._routers):
            await self._subscribe(model)
        for worker_id, model in list(self._workers.items()):
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

    # ------------------------------------------------------------------ what the owner reports

    def model_added(self, model: str) -> None:
        """A router for `model` now exists: follow its subjects and resync its workers already live."""
        if not self._following():
            return
        self._spawn(self._subscribe(model), f"kv-subscribe-{model}")
        for worker_id, worker_model in list(self._workers.items()):
            if worker_model == model:
                self._schedule_resync(model, worker_id)

    def worker_added(self, model: str, worker_id: int) -> None:
        if not self._following() or model not in self._routers:
            return
        # Subscribing again is a no-op, unless an earlier subscription failed: then this retries it.
        self._spawn(self._subscribe(model), f"kv-subscribe-{model}")
        self._schedule_resync(model, worker_id)

    def worker_removed(self, model: str, worker_id: int) -> None:
        task = self._resyncing.pop(worker_id, None)
        if task is not None:
            task.cancel()
        self.load_reports.pop(worker_id, None)
        if self.metrics is not None:
            self.metrics.forget_worker(model, worker_id)

    def _following(self) -> bool:
        return self._bus is not None and not self._closed

    def _is_live(self, worker_id: int) -> bool:
        return worker_id in self._workers

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
        namespace = self._namespace
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
        if batch.dp_rank:  # the router knows the rank as a worker of its own
            batch = msgspec.structs.replace(batch,
                                            worker_id=dp_ranks.rank_key(batch.worker_id, batch.dp_rank))
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
        if report.dp_rank:
            report = msgspec.structs.replace(report,
                                             worker_id=dp_ranks.rank_key(report.worker_id, report.dp_rank))
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
                                                      name=f"kv-resync-{dp_ranks.label(worker_id)}")
        self._resyncing[worker_id] = task

    async def _resync(self, model: str, worker_id: int) -> None:
        settings, metrics = self._resync_settings, self.metrics
        instance_id, dp_rank = dp_ranks.split_rank_key(worker_id)
        subject = keys.resync_subject(self._namespace, instance_id, dp_rank)
        request = msgpack_encoder.encode(KvResyncRequest())
        delay = settings.backoff
        attempt = 0
        try:
            while self._bus is not None and not self._closed and self._is_live(worker_id):
                router = self._routers.get(model)
                if router is None or (attempt and router.is_synced(worker_id)):
                    return  # e.g. its first batch arrived meanwhile
                attempt += 1
                try:
                    snapshot = kv_batch_decoder.decode(
                        await self._bus.request(subject, request, settings.timeout))
                    if (snapshot.worker_id, snapshot.dp_rank) != (instance_id, dp_rank):
                        raise ValueError(f"answer names worker {snapshot.worker_id:x} "
                                         f"rank {snapshot.dp_rank}")
                    if dp_rank:
                        snapshot = msgspec.structs.replace(snapshot, worker_id=worker_id)
                except TimeoutError as e:
                    result = "timeout"
                    log = logger.warning if attempt == 1 else logger.debug
                    log("kv router: resync of worker %s (attempt %d) failed: %s; retrying in %.1fs",
                        dp_ranks.label(worker_id), attempt, e, delay)
                except (DynamoLiteError, msgspec.DecodeError, ValueError, OSError) as e:
                    result = "error"
                    logger.warning("kv router: resync of worker %s (attempt %d) failed: %r; retrying in "
                                   "%.1fs", dp_ranks.label(worker_id), attempt, e, delay)
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
                    delay = settings.backoff  # answered, but batches after it are missing: ask again
                    continue
                if metrics is not None:
                    metrics.resyncs.labels(model, result).inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, settings.backoff_max)
        finally:
            if self._resyncing.get(worker_id) is asyncio.current_task():
                del self._resyncing[worker_id]
