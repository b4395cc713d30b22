"""Disaggregated serving at the frontend: prefill on a prefill worker, decode on a backend worker.

For each new request (`PrefillPolicy.prepare`), when prefill workers serve the model:
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
   kv_transfer_params={"do_remote_decode": true} (the same attempt step as every request, frontend/attempt.py);
   its last frame carries vLLM's transfer params, sent unchanged with the real request to the decode
   worker, whose stream is the answer.

Failures never reach the client from the prefill side: a prefill worker that cannot be reached or
answers 503 is marked failed, any other failure (engine error, no params) is logged, and the request
prefills on the decode worker. Only a 4xx (the request itself is bad) propagates. Cancelling the
request while the prefill runs closes the prefill stream, which aborts it on the prefill worker.

Prometheus (metrics.py): disagg_requests{mode, reason}, pool_inflight_requests{pool}, remote prefill
time, decode time to first token, and per request the KV blocks handed over (remote_block_ids) and
the bytes/seconds of the pull when the decode worker's engine measured them (GenerateFrame fields).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import msgspec

from dynamo_lite.frontend.attempt import POOL_DECODE, POOL_PREFILL, Attempt, Dispatcher
from dynamo_lite.frontend.metrics import FrontendMetrics
from dynamo_lite.frontend.preprocess import GenerationPlan
from dynamo_lite.protocol.errors import EngineError, NoWorkerAvailableError, WorkerFailedError
from dynamo_lite.protocol.messages import FinishReason, GenerateFrame, GenerateRequest, InstanceRecord

logger = logging.getLogger(__name__)

# Reasons (metric label) a request was prefilled where it was.
DISAGGREGATED = "disaggregated"
NO_PREFILL_WORKERS = "no_prefill_workers"
SHORT_PROMPT = "short_prompt"
PREFILL_POOL_BUSY = "prefill_pool_busy"
PREFILL_FAILED = "prefill_failed"
DISABLED = "disabled"  # --no-disaggregation while prefill workers are registered
# n > 1: vLLM splits the request into n children that would each pull the same remote blocks through
# the NixlConnector (one transfer id, freed after the first pull): the decode worker prefills once itself.
PARALLEL_SAMPLING = "parallel_sampling"
# Prompt logprobs (echo with logprobs, vLLM's prompt_logprobs) come from the engine that computes the prompt's
# logits: a decode worker that pulled the prompt's KV computes only its last token, so it prefills itself.
PROMPT_LOGPROBS = "prompt_logprobs"


@dataclass(frozen=True)
class DisaggSettings:
    enabled: bool = True  # False: serve aggregated even when prefill workers exist
    min_prefill_tokens: int = 256  # uncached prompt tokens below which the decode worker prefills
    max_prefill_queue: int = 4  # in-flight prefills per prefill worker; 0 = no limit
    enforce: bool = False  # no prefill worker -> 503 instead of aggregated serving


@dataclass(frozen=True)
class ServingPlan:
    """Where a request runs: its decode (or aggregated) attempt, already routed, and, if its prompt was
    prefilled remotely, the params the decode request carries."""

    attempt: Attempt
    kv_transfer_params: dict | None
    reason: str


def remote_block_count(params: dict | None) -> int:
    """Blocks named by a prefill's remote_block_ids (one list per KV-cache group, or one flat list)."""
    ids = (params or {}).get("remote_block_ids") or []
    return sum(len(group) if isinstance(group, (list, tuple)) else 1 for group in ids)


def record_handoff(metrics: FrontendMetrics, model: str, params: dict, frame: GenerateFrame, sent_at: float) -> None:
    """The first frame of a decode request that carried a prefill's params: record the handoff."""
    metrics.decode_first_token.labels(model).observe(time.monotonic() - sent_at)
    metrics.kv_transfer_blocks.labels(model).observe(remote_block_count(params))
    if frame.kv_transfer_bytes is not None:
        metrics.kv_transfer_bytes.labels(model).observe(frame.kv_transfer_bytes)
    if frame.kv_transfer_seconds is not None:
        metrics.kv_transfer_seconds.labels(model).observe(frame.kv_transfer_seconds)


class PrefillPolicy:
    """Decides where each new request's prompt is prefilled, and runs the remote prefill when it pays."""

    def __init__(self, settings: DisaggSettings, dispatcher: Dispatcher, metrics: FrontendMetrics):
        self.settings = settings
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._rotation = 0

    async def prepare(self, plan: GenerationPlan) -> ServingPlan:
        """The request's decode attempt (routed: the caller must close it), prefilled remotely or not."""
        model = plan.model.name
        prefill = self._dispatcher.workers(model, POOL_PREFILL)
        if not prefill:
            if self.settings.enforce:
                raise NoWorkerAvailableError(f"no prefill worker is available for model {model} and this "
                                             "frontend serves disaggregated only (--enforce-disagg)")
            return self._count(ServingPlan(self._aggregated(plan), None, NO_PREFILL_WORKERS), model)
        if not self.settings.enabled:
            return self._count(ServingPlan(self._aggregated(plan), None, DISABLED), model)
        decode, overlap_tokens = self._pick_decode(plan)
        if plan.sampling.n > 1:
            return self._count(ServingPlan(decode, None, PARALLEL_SAMPLING), model)
        if plan.sampling.prompt_logprobs is not None:
            return self._count(ServingPlan(decode, None, PROMPT_LOGPROBS), model)
        try:
            uncached = len(plan.prompt_ids) - overlap_tokens
            if uncached < self.settings.min_prefill_tokens:
                logger.debug("request %s: %d uncached prompt tokens on %x: local prefill", plan.request_id,
                             uncached, decode.worker.instance_id)
                return self._count(ServingPlan(decode, None, SHORT_PROMPT), model)
            limit = self.settings.max_prefill_queue
            candidates = [r for r in prefill
                          if not limit or self._dispatcher.inflight(POOL_PREFILL, r.instance_id) < limit]
            if not candidates:
                return self._count(ServingPlan(decode, None, PREFILL_POOL_BUSY), model)
            params = await self._remote_prefill(plan, candidates)
        except BaseException:
            decode.close()  # the decode attempt routed above is not going to run
            raise
        if params is None:
            return self._count(ServingPlan(decode, None, PREFILL_FAILED), model)
        return self._count(ServingPlan(decode, params, DISAGGREGATED), model)

    def _count(self, serving: ServingPlan, model: str) -> ServingPlan:
        mode = "disaggregated" if serving.kv_transfer_params is not None else "aggregated"
        self._metrics.disagg_requests.labels(model, mode, serving.reason).inc()
        return serving

    def _aggregated(self, plan: GenerationPlan) -> Attempt:
        model = plan.model.name
        backend = self._dispatcher.workers(model, POOL_DECODE)
        if not backend:
            raise NoWorkerAvailableError(f"no worker is available for model {model}")
        return self._dispatcher.route(POOL_DECODE, model, plan.request_id, plan.prompt_ids, backend)

    def _pick_decode(self, plan: GenerationPlan) -> tuple[Attempt, int]:
        """-> (decode attempt, prompt tokens the router predicts its worker has cached)."""
        dispatcher = self._dispatcher
        model = plan.model.name
        backend = dispatcher.workers(model, POOL_DECODE)
        if not backend:
            raise NoWorkerAvailableError(f"no decode worker is available for model {model}")
        router = dispatcher.router
        if router.knows_cache_overlap:
            attempt = dispatcher.route(POOL_DECODE, model, plan.request_id, plan.prompt_ids, backend)
            block_size = router.block_size(model) or plan.model.card.kv_block_size
            return attempt, attempt.decision.overlap_blocks * block_size
        # A router that knows no cache knows no load either: pick by our own in-flight counts, and leave
        # its state (e.g. round-robin's counter) to the prefill pool it picks from.
        least = min(dispatcher.inflight(POOL_DECODE, r.instance_id) for r in backend)
        tied = [r for r in backend if dispatcher.inflight(POOL_DECODE, r.instance_id) == least]
        chosen = tied[self._rotation % len(tied)]
        self._rotation += 1
        return dispatcher.attempt_on(POOL_DECODE, model, plan.request_id, chosen), 0

    async def _remote_prefill(self, plan: GenerationPlan, candidates: list[InstanceRecord]) -> dict | None:
        """Run the prompt on a prefill worker; its transfer params, or None if it failed (logged)."""
        model = plan.model.name
        request = GenerateRequest(
            request_id=f"{plan.request_id}-prefill", token_ids=plan.prompt_ids,
            sampling=msgspec.structs.replace(plan.sampling, max_tokens=1, min_tokens=0),
            kv_transfer_params={"do_remote_decode": True})
        started = time.monotonic()
        # Closing the attempt's frames (a cancelled request) closes the stream: the prefill aborts there.
        with self._dispatcher.route(POOL_PREFILL, model, request.request_id, plan.prompt_ids, candidates) as attempt:
            try:
                async with contextlib.aclosing(attempt.frames(request)) as frames:
                    last = [frame async for frame in frames][-1]  # frames() ends with the last frame, or raises
            except WorkerFailedError as e:
                attempt.worker_failed(e)
                logger.info("request %s: prefilling on the decode worker instead", plan.request_id)
                return None
            except EngineError as e:
                logger.warning("prefill of request %s on %x failed (%s): prefilling on the decode worker",
                               plan.request_id, attempt.worker.instance_id, e.message)
                return None
        params = last.kv_transfer_params if last.finish_reason not in (FinishReason.ABORT, FinishReason.ERROR) else None
        if params is None:
            logger.warning("prefill worker %x returned no KV transfer params for request %s: prefilling on "
                           "the decode worker", attempt.worker.instance_id, plan.request_id)
            return None
        self._metrics.remote_prefill_duration.labels(model).observe(time.monotonic() - started)
        logger.debug("request %s: prefilled on %x in %.3fs, %d blocks to hand over", plan.request_id,
                     attempt.worker.instance_id, time.monotonic() - started, remote_block_count(params))
        return params
