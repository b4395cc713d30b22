"""Disaggregated serving at the frontend: prefill on a prefill worker, decode on a backend worker.

For each new request (`DisaggCoordinator.prepare`), when prefill workers serve the model:
1. Pick the decode worker. In kv mode the router picks it over the backend workers (its cost is the
   load it tracks plus the prompt blocks the worker would lack); with round-robin/random, the backend
   worker with the fewest streams in flight from this frontend (ties rotate).
2. Conditional disaggregation. The work disaggregation saves is the prefill the decode worker would
   otherwise do itself: the prompt minus what the router predicts is cached *on the decode worker*
   (what the prefill worker holds only changes how fast the remote prefill is, not whether offloading
   pays). If that uncached part is below --disagg-min-prefill-tokens, or every prefill worker already
   has --max-prefill-queue prefills in flight, the decode worker prefills locally (a plain request).
3. Otherwise the router picks a prefill worker (kv mode: by KV overlap over the prefill pool, whose
   KV events the router indexes like any worker's), which runs the prompt with max_tokens=1 and
   kv_transfer_params={"do_remote_decode": true}; its last frame carries vLLM's transfer params, sent
   unchanged with the real request to the decode worker, whose stream is the answer.

Failures never reach the client from the prefill side: a prefill worker that cannot be reached or
answers 503 is marked failed, any other failure (engine error, no params) is logged, and the request
prefills on the decode worker. Only a 4xx (the request itself is bad) propagates. Cancelling the
request while the prefill runs closes the prefill stream, which aborts it on the prefill worker.

Prometheus (metrics.py): disagg_requests{mode, reason}, pool_inflight_requests{pool}, remote prefill
time, decode time to first token, and per request the KV blocks handed over (remote_block_ids) and
the bytes/seconds of the pull when the decode worker's engine measured them (GenerateFrame fields).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import msgspec

from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.frontend.metrics import FrontendMetrics
from dynamo_lite.frontend.preprocess import GenerationPlan
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.errors import EngineError, NoWorkerAvailableError, WorkerFailedError, worker_error
from dynamo_lite.protocol.messages import ErrorFrame, GenerateFrame, GenerateRequest, InstanceRecord, Reply
from dynamo_lite.router.base import Router
from dynamo_lite.transport.client import RequestClient

logger = logging.getLogger(__name__)

# Reasons (metric label) a request was prefilled where it was.
DISAGGREGATED = "disaggregated"
NO_PREFILL_WORKERS = "no_prefill_workers"
SHORT_PROMPT = "short_prompt"
PREFILL_POOL_BUSY = "prefill_pool_busy"
PREFILL_FAILED = "prefill_failed"
DISABLED = "disabled"  # --no-disaggregation while prefill workers are registered

POOL_PREFILL = "prefill"
POOL_DECODE = "decode"


@dataclass(frozen=True)
class DisaggSettings:
    enabled: bool = True  # False: serve aggregated even when prefill workers exist
    min_prefill_tokens: int = 256  # uncached prompt tokens below which the decode worker prefills
    max_prefill_queue: int = 4  # in-flight prefills per prefill worker; 0 = no limit
    enforce: bool = False  # no prefill worker -> 503 instead of aggregated serving
    request_timeout: float = 0.0  # seconds per frame from a prefill worker; 0 = no limit


@dataclass(frozen=True)
class ServingPlan:
    """Where a request runs: its decode (or aggregated) worker and, if prefilled remotely, the params."""

    worker: InstanceRecord
    kv_transfer_params: dict | None
    reason: str


async def frames_with_timeout(frames: AsyncIterator[Reply], timeout: float,
                              record: InstanceRecord) -> AsyncIterator[Reply]:
    """`frames`, failing the worker if one takes longer than `timeout` seconds to arrive."""
    iterator = frames.__aiter__()
    while True:
        try:
            async with asyncio.timeout(timeout):
                frame = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError as e:
            raise WorkerFailedError(f"worker {record.instance_id:x} sent nothing for {timeout}s",
                                    instance_id=record.instance_id) from e
        yield frame


def remote_block_count(params: dict | None) -> int:
    """Blocks named by a prefill's remote_block_ids (one list per KV-cache group, or one flat list)."""
    ids = (params or {}).get("remote_block_ids") or []
    return sum(len(group) if isinstance(group, (list, tuple)) else 1 for group in ids)


class DisaggCoordinator:
    """Per-frontend state of disaggregated serving: in-flight counts per worker, and the decisions."""

    def __init__(self, settings: DisaggSettings, watcher: InstanceWatcher, client: RequestClient,
                 router: Router, metrics: FrontendMetrics):
        self.settings = settings
        self._watcher = watcher
        self._client = client
        self._router = router
        self._metrics = metrics
        self._inflight: dict[str, dict[int, int]] = {POOL_PREFILL: {}, POOL_DECODE: {}}
        self._rotation = 0

    # ------------------------------------------------------------------ in-flight tracking

    def inflight(self, pool: str, worker_id: int) -> int:
        return self._inflight[pool].get(worker_id, 0)

    @contextlib.contextmanager
    def track(self, pool: str, model: str, worker_id: int) -> Iterator[None]:
        """Count one stream on `worker_id` of `pool` while the block runs."""
        counts = self._inflight[pool]
        gauge = self._metrics.pool_inflight.labels(model, pool)
        counts[worker_id] = counts.get(worker_id, 0) + 1
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()
            left = counts.get(worker_id, 1) - 1
            if left > 0:
                counts[worker_id] = left
            else:
                counts.pop(worker_id, None)

    # ------------------------------------------------------------------ decisions

    async def prepare(self, plan: GenerationPlan, pick_aggregated: Callable[[], InstanceRecord]) -> ServingPlan:
        """Decide where the request's prompt is prefilled, running the remote prefill if it is.

        `pick_aggregated` routes the request the aggregated way (used when no prefill worker serves the
        model). In kv mode the returned worker is already routed (the router tracks `plan.request_id`).
        """
        model = plan.model.name
        prefill = self._watcher.instances(model, keys.COMPONENT_PREFILL)
        if not prefill:
            if self.settings.enforce:
                raise NoWorkerAvailableError(f"no prefill worker is available for model {model} and this "
                                             "frontend serves disaggregated only (--enforce-disagg)")
            return self._count(ServingPlan(pick_aggregated(), None, NO_PREFILL_WORKERS), model)
        if not self.settings.enabled:
            return self._count(ServingPlan(pick_aggregated(), None, DISABLED), model)
        decode, overlap_tokens = self._pick_decode(plan)
        try:
            uncached = len(plan.prompt_ids) - overlap_tokens
            if uncached < self.settings.min_prefill_tokens:
                logger.debug("request %s: %d uncached prompt tokens on %x: local prefill", plan.request_id,
                             uncached, decode.instance_id)
                return self._count(ServingPlan(decode, None, SHORT_PROMPT), model)
            limit = self.settings.max_prefill_queue
            candidates = [r for r in prefill if not limit or self.inflight(POOL_PREFILL, r.instance_id) < limit]
            if not candidates:
                return self._count(ServingPlan(decode, None, PREFILL_POOL_BUSY), model)
            params = await self._remote_prefill(plan, candidates)
        except BaseException:
            self._router.finished(plan.request_id)  # the decode route above is not going to run
            raise
        if params is None:
            return self._count(ServingPlan(decode, None, PREFILL_FAILED), model)
        return self._count(ServingPlan(decode, params, DISAGGREGATED), model)

    def _count(self, serving: ServingPlan, model: str) -> ServingPlan:
        mode = "disaggregated" if serving.kv_transfer_params is not None else "aggregated"
        self._metrics.disagg_requests.labels(model, mode, serving.reason).inc()
        return serving

    def _pick_decode(self, plan: GenerationPlan) -> tuple[InstanceRecord, int]:
        """-> (decode worker, prompt tokens the router predicts it has cached)."""
        model = plan.model.name
        backend = self._watcher.instances(model, keys.COMPONENT_BACKEND)
        if not backend:
            raise NoWorkerAvailableError(f"no decode worker is available for model {model}")
        by_id = {r.instance_id: r for r in backend}
        block_size = self._router_block_size(model) or plan.model.card.kv_block_size
        if self._is_kv_router():
            decision = self._router.route(plan.request_id, plan.prompt_ids, list(by_id))
            return by_id[decision.worker_id], decision.overlap_blocks * block_size
        # A stateless policy knows no load and no cache: pick by our own in-flight counts, and leave the
        # policy's state (e.g. round-robin's counter) to the prefill pool it picks from.
        least = min(self.inflight(POOL_DECODE, i) for i in by_id)
        tied = [i for i in by_id if self.inflight(POOL_DECODE, i) == least]
        chosen = tied[self._rotation % len(tied)]
        self._rotation += 1
        return by_id[chosen], 0

    def _is_kv_router(self) -> bool:
        return hasattr(self._router, "router_for")  # router.service.KvRoutingService

    def _router_block_size(self, model: str) -> int:
        router_for = getattr(self._router, "router_for", None)
        kv_router = router_for(model) if router_for is not None else None
        return kv_router.block_size if kv_router is not None else 0

    # ------------------------------------------------------------------ the remote prefill

    async def _remote_prefill(self, plan: GenerationPlan, candidates: list[InstanceRecord]) -> dict | None:
        """Run the prompt on a prefill worker; its transfer params, or None if it failed (logged)."""
        model = plan.model.name
        key = f"{plan.request_id}-prefill"
        by_id = {r.instance_id: r for r in candidates}
        record = by_id[self._router.route(key, plan.prompt_ids, list(by_id)).worker_id]
        request = GenerateRequest(
            request_id=key, token_ids=plan.prompt_ids,
            sampling=msgspec.structs.replace(plan.sampling, max_tokens=1, min_tokens=0),
            kv_transfer_params={"do_remote_decode": True})
        started = time.monotonic()
        try:
            with self.track(POOL_PREFILL, model, record.instance_id):
                params = await self._run_prefill(record, request)
        except WorkerFailedError as e:
            logger.warning("prefill worker %x failed on request %s (%s): prefilling on the decode worker",
                           record.instance_id, plan.request_id, e.message)
            self._watcher.mark_failed(record.instance_id)  # the app relays the removal to the router
            return None
        except EngineError as e:
            logger.warning("prefill of request %s on %x failed (%s): prefilling on the decode worker",
                           plan.request_id, record.instance_id, e.message)
            return None
        finally:
            self._router.finished(key)
        if params is None:
            logger.warning("prefill worker %x returned no KV transfer params for request %s: prefilling on "
                           "the decode worker", record.instance_id, plan.request_id)
            return None
        self._metrics.remote_prefill_duration.labels(model).observe(time.monotonic() - started)
        logger.debug("request %s: prefilled on %x in %.3fs, %d blocks to hand over", plan.request_id,
                     record.instance_id, time.monotonic() - started, remote_block_count(params))
        return params

    async def _run_prefill(self, record: InstanceRecord, request: GenerateRequest) -> dict | None:
        stream = self._client.stream(record.address, request)
        timeout = self.settings.request_timeout
        frames = frames_with_timeout(stream, timeout, record) if timeout > 0 else stream
        # aclosing: a cancelled request closes the stream here, which aborts the prefill on the worker.
        async with contextlib.aclosing(stream), contextlib.aclosing(frames):
            async for frame in frames:
                if isinstance(frame, ErrorFrame):  # a 4xx propagates: the decode worker would refuse it too
                    raise worker_error(frame.status, frame.message, worker=f"prefill worker {record.instance_id:x}",
                                       instance_id=record.instance_id)
                if not isinstance(frame, GenerateFrame):
                    raise EngineError(f"prefill worker {record.instance_id:x} answered with an unexpected "
                                      f"{type(frame).__name__}")
                if frame.token_ids:
                    self._router.first_token(request.request_id)
                if frame.last:
                    if frame.finish_reason in ("abort", "error"):
                        return None
                    return frame.kv_transfer_params
        raise WorkerFailedError(f"prefill worker {record.instance_id:x} ended the stream without a last frame",
                                instance_id=record.instance_id)

    # ------------------------------------------------------------------ decode side

    def observe_decode_start(self, model: str, params: dict, frame: GenerateFrame, sent_at: float) -> None:
        """The first frame of a decode request that carried a prefill's params: record the handoff."""
        metrics = self._metrics
        metrics.decode_first_token.labels(model).observe(time.monotonic() - sent_at)
        metrics.kv_transfer_blocks.labels(model).observe(remote_block_count(params))
        if frame.kv_transfer_bytes is not None:
            metrics.kv_transfer_bytes.labels(model).observe(frame.kv_transfer_bytes)
        if frame.kv_transfer_seconds is not None:
            metrics.kv_transfer_seconds.labels(model).observe(frame.kv_transfer_seconds)
