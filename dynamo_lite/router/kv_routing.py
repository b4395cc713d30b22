"""KvRoutingService: KV-aware routing behind the frontend's Router interface.

One KvRouter per model (block size from the model card unless overridden), made when the model's first
worker appears, or at the first request for it when its card came after that worker. The caller names
the model in route(); each request id remembers its router for first_token/finished.

The service follows the watcher (Router.follow) for workers coming and going: a removed worker (lease
ended, connection failure) loses its blocks at once. KV events and load reports reach the routers
through the event intake (router/event_intake.py) once a bus is attached; until then routing weighs
the load the routers track themselves.

Data-parallel workers (InstanceRecord.data_parallel_size > 1): every rank is a worker of its own to the
routers and the intake (router/dp_ranks.py's rank keys), so route() weighs each rank's cache and load and
its decision names the instance and the rank (RouteDecision.dp_rank) the request must run on.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.events.base import EventBus
from dynamo_lite.protocol.errors import NoWorkerAvailableError
from dynamo_lite.protocol.messages import InstanceRecord, LoadReport
from dynamo_lite.router import dp_ranks
from dynamo_lite.router.base import RouteDecision, Router
from dynamo_lite.router.event_intake import KvEventIntake, ResyncSettings
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
    # Cost per (new prompt block x request prefilling on the worker): see router/cost.py.
    interference_weight: float = 0.0
    resync_timeout: float = 2.0  # seconds to wait for a worker's block set
    resync_backoff: float = 0.5  # first delay before retrying a failed resync (doubles each time)
    resync_backoff_max: float = 10.0


class KvRoutingService(Router):
    knows_cache_overlap = True

    def __init__(self, watcher: InstanceWatcher, settings: KvRoutingSettings,
                 metrics: KvRouterMetrics | None = None, *, rng: random.Random | None = None) -> None:
        self.watcher = watcher
        self.settings = settings
        self.metrics = metrics
        self._rng = rng
        self._routers: dict[str, KvRouter] = {}
        self._worker_model: dict[int, str] = {}  # the live workers, by rank key (router/dp_ranks.py)
        self._dp_size: dict[int, int] = {}  # instance id -> its data-parallel size, where above 1
        self._request_router: dict[str, KvRouter] = {}
        self.intake = KvEventIntake(
            settings.namespace, self._routers, self._worker_model,
            ResyncSettings(settings.resync_timeout, settings.resync_backoff, settings.resync_backoff_max), metrics)
        self.follow(watcher)

    # ------------------------------------------------------------------ lifecycle

    @property
    def events_attached(self) -> bool:
        return self.intake.attached

    @property
    def load_reports(self) -> dict[int, LoadReport]:
        """The last load report of each live worker (from the event intake)."""
        return self.intake.load_reports

    def load_report(self, worker_id: int) -> LoadReport | None:
        return self.intake.load_reports.get(worker_id)

    async def attach_events(self, bus: EventBus) -> None:
        """Feed the routers from the event plane (not in approximate mode)."""
        if self.settings.use_kv_events:
            await self.intake.attach(bus)

    async def close(self) -> None:
        """Stop the event intake (the bus itself belongs to the caller). Safe to call twice."""
        await self.intake.close()

    # ------------------------------------------------------------------ Router

    def route(self, model: str, request_id: str, token_ids: Sequence[int], workers: Sequence[int]) -> RouteDecision:
        if not workers:
            raise NoWorkerAvailableError("no worker to route to")
        router = self._router(model)
        if router is None:
            raise NoWorkerAvailableError(f"no model card known for model {model}")
        ranked = self._dp_size and any(worker in self._dp_size for worker in workers)
        candidates = dp_ranks.expand(workers, self._dp_size) if ranked else workers
        decision = router.route(request_id, token_ids, candidates)
        self._request_router[request_id] = router
        if self.metrics is not None:
            self.metrics.decisions.labels(model, worker_label(decision.worker_id)).inc()
            self.metrics.overlap_blocks.labels(model).observe(decision.overlap_blocks)
        if not ranked:
            return decision
        instance_id, rank = dp_ranks.split_rank_key(decision.worker_id)
        dp_rank = rank if instance_id in self._dp_size else None
        return RouteDecision(instance_id, decision.overlap_blocks, dp_rank=dp_rank)

    def first_token(self, request_id: str) -> None:
        router = self._request_router.get(request_id)
        if router is not None:
            router.first_token(request_id)

    def finished(self, request_id: str) -> None:
        router = self._request_router.pop(request_id, None)
        if router is not None:
            router.finished(request_id)

    def worker_added(self, record: InstanceRecord) -> None:
        if record.data_parallel_size > 1:
            self._dp_size[record.instance_id] = record.data_parallel_size
        has_router = self._router(record.model) is not None
        for key in dp_ranks.rank_keys(record.instance_id, record.data_parallel_size):
            self._worker_model[key] = record.model
            if has_router:
                self.intake.worker_added(record.model, key)

    def worker_removed(self, worker_id: int) -> None:
        for key in dp_ranks.rank_keys(worker_id, self._dp_size.pop(worker_id, 1)):
            model = self._worker_model.pop(key, None)
            if model is None:
                return  # never added (or removed already: a failed worker's lease may end later)
            router = self._routers.get(model)
            if router is not None:
                router.worker_removed(key)
            self.intake.worker_removed(model, key)
        logger.info("kv router: forgot worker %x of %s", worker_id, model)

    def explain(self, model: str, token_ids: Sequence[int], workers: Sequence[int]) -> dict:
        """KvRouter.explain over `workers` (nothing is dispatched), with their last load reports."""
        router = self._router(model)
        if router is None or not workers:
            raise NoWorkerAvailableError(f"no worker is available for model {model}")
        explanation = router.explain(token_ids, dp_ranks.expand(workers, self._dp_size))
        explanation["kv_events"] = self.events_attached
        for row in explanation["workers"]:
            key = row["worker_id"]
            row["worker"] = worker_label(key)
            report = self.load_reports.get(key)
            if report is not None:
                row["reported_active_blocks"] = report.active_blocks
            row["worker_id"], rank = dp_ranks.split_rank_key(key)
            if row["worker_id"] in self._dp_size:
                row["dp_rank"] = rank
        if explanation["choice"] is not None:
            choice, rank = dp_ranks.split_rank_key(explanation["choice"])
            explanation["choice"] = choice
            if choice in self._dp_size:
                explanation["choice_dp_rank"] = rank
        return explanation

    def block_size(self, model: str) -> int:
        router = self._routers.get(model)
        return router.block_size if router is not None else 0

    def record_usage(self, model: str, prompt_tokens: int, cached_tokens: int) -> None:
        if self.metrics is not None:
            self.metrics.record_usage(model, prompt_tokens, cached_tokens)

    # ------------------------------------------------------------------ the per-model routers

    def router_for(self, model: str) -> KvRouter | None:
        return self._routers.get(model)

    def _router(self, model: str) -> KvRouter | None:
        """The model's router, made now if its card is known and it has none yet (None: no card)."""
        router = self._routers.get(model)
        if router is None:
            router = self._new_router(model)
            if router is not None:
                self._routers[model] = router
                self.intake.model_added(model)
        return router

    def _new_router(self, model: str) -> KvRouter | None:
        card = self.watcher.card(model)
        block_size = self.settings.block_size or (card.kv_block_size if card is not None else 0)
        if block_size <= 0:
            logger.warning("kv router: no block size for model %s (no model card yet)", model)
            return None
        if card is not None and card.kv_block_size != block_size:
            logger.warning("kv router: --kv-cache-block-size %d differs from %s's card (%d): KV events of "
                           "the other size will be dropped", block_size, model, card.kv_block_size)
        settings = self.settings
        logger.info("kv router for %s: block size %d, overlap weight %g, temperature %g%s", model, block_size,
                    settings.overlap_weight, settings.temperature,
                    "" if settings.use_kv_events else f", approximate (ttl {settings.approx_ttl:g}s)")
        return KvRouter(block_size, overlap_weight=settings.overlap_weight, temperature=settings.temperature,
                        approximate=not settings.use_kv_events, approx_ttl=settings.approx_ttl, rng=self._rng,
                        interference_weight=settings.interference_weight)
