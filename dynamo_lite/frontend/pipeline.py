"""Route a planned request to a worker, stream its frames back as text, migrate on worker failure.

One `Generation` per request. Its `text()` async generator yields text deltas; when it ends,
`finish_reason` and the token counts are set. Closing the generator early (client disconnect,
stop string) closes the worker stream, which makes the worker abort the request.

Disaggregated serving (frontend/disagg.py): before the first attempt, the DisaggCoordinator decides
where the prompt is prefilled and may run it on a prefill worker; the first attempt then carries the
prefill's kv_transfer_params to the decode worker. Retries and migrations prefill locally.

Failures:
- before the first token of an attempt (connect refused, worker died during prefill): nothing has
  reached the client, so the request is simply sent to another worker (the failed one is excluded);
- after tokens were produced: the request migrates (prompt + tokens so far, fewer max_tokens) if
  the model card's migration_limit allows, otherwise the error reaches the client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import msgspec

from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.frontend.detokenizer import IncrementalDetokenizer
from dynamo_lite.frontend.disagg import POOL_DECODE, DisaggCoordinator, frames_with_timeout
from dynamo_lite.frontend.metrics import FrontendMetrics
from dynamo_lite.frontend.preprocess import GenerationPlan
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.errors import EngineError, NoWorkerAvailableError, WorkerFailedError, worker_error
from dynamo_lite.protocol.messages import ErrorFrame, GenerateFrame, GenerateRequest, InstanceRecord, Reply
from dynamo_lite.router.base import Router
from dynamo_lite.transport.client import RequestClient

logger = logging.getLogger(__name__)

# Retries of attempts that failed before their first token. Each failure excludes that worker, so
# this only bounds a pathological case (every worker failing the same way).
MAX_UNSTARTED_RETRIES = 3


@dataclasses.dataclass
class PipelineDeps:
    watcher: InstanceWatcher
    client: RequestClient
    router: Router
    metrics: FrontendMetrics
    request_timeout: float = 0.0  # seconds per frame; 0 = no limit
    disagg: DisaggCoordinator | None = None  # None: always aggregated (no prefill pool handling)


class Generation:
    def __init__(self, deps: PipelineDeps, plan: GenerationPlan, arrival: float):
        self._deps = deps
        self.plan = plan
        self._arrival = arrival
        self._model_label = plan.model.name
        self._inter_token_latency = deps.metrics.inter_token_latency.labels(plan.model.name)
        self.prompt_tokens = len(plan.prompt_ids)
        self.cached_tokens = 0
        self.engine_reported_usage = False  # a worker's first frame told us its cached prompt tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.migrations = 0
        self._generated: list[int] = []
        self._detokenizer = IncrementalDetokenizer(plan.model.tokenizer.tokenizer, plan.stop, plan.prompt_ids)
        self._first_token_at: float | None = None
        self._last_frame_at = 0.0
        self._attempt_has_tokens = False  # the router hears first_token once per attempt
        self.serving_reason: str | None = None  # how the prompt was prefilled (frontend/disagg.py reasons)

    async def text(self) -> AsyncIterator[str]:
        """Text deltas (never empty strings) of the whole generation, across migrations."""
        unstarted_retries = 0
        attempt = 0
        last_failure: WorkerFailedError | None = None
        disagg = self._deps.disagg
        while True:
            kv_transfer_params = None
            if attempt == 0 and disagg is not None:
                # Prefill on a prefill worker first, or decide to prefill on the decode worker itself.
                serving = await disagg.prepare(self.plan, lambda: self._pick_worker(None))
                record, kv_transfer_params = serving.worker, serving.kv_transfer_params
                self.serving_reason = serving.reason
            else:
                record = self._pick_worker(last_failure)
            produced_before = len(self._generated)
            try:
                # aclosing: if our consumer stops, the attempt (and its worker stream) closes now.
                async with contextlib.aclosing(self._attempt(record, attempt, kv_transfer_params)) as deltas:
                    async for delta in deltas:
                        yield delta
                return
            except WorkerFailedError as e:
                last_failure = e
                self._worker_failed(record, e)
                if len(self._generated) == produced_before:
                    unstarted_retries += 1
                    if unstarted_retries > MAX_UNSTARTED_RETRIES:
                        raise
                elif self.migrations >= self.plan.model.card.migration_limit:
                    raise
                else:
                    self.migrations += 1
                    self._deps.metrics.migrations.labels(self._model_label).inc()
                    logger.info("request %s: migrating after %d tokens (%s)", self.plan.request_id,
                                len(self._generated), e.message)
                if len(self._generated) >= self.plan.sampling.max_tokens:
                    self.finish_reason = "length"
                    tail = self._detokenizer.flush()
                    if tail:
                        yield tail
                    return
                attempt += 1

    def _pick_worker(self, last_failure: WorkerFailedError | None) -> InstanceRecord:
        name = self.plan.model.name
        instances = self._deps.watcher.instances(name, keys.COMPONENT_BACKEND)
        if not instances:
            if last_failure is not None:
                raise NoWorkerAvailableError(f"the worker serving model {name} failed ({last_failure.message}) "
                                             "and no other worker is available") from last_failure
            raise NoWorkerAvailableError(f"no worker is available for model {name}")
        if len(instances) == 1:
            record = instances[0]
            self._deps.router.route(self.plan.request_id, self._tokens_so_far(), [record.instance_id])
            return record
        by_id = {record.instance_id: record for record in instances}
        decision = self._deps.router.route(self.plan.request_id, self._tokens_so_far(), list(by_id))
        return by_id[decision.worker_id]

    def _tokens_so_far(self) -> list[int]:
        return self.plan.prompt_ids + self._generated if self._generated else self.plan.prompt_ids

    def _worker_failed(self, record: InstanceRecord, error: WorkerFailedError) -> None:
        logger.warning("worker %x failed on request %s: %s", record.instance_id, self.plan.request_id,
                       error.message)
        # The watcher reports the removal to its listeners, the router among them (see app.py).
        self._deps.watcher.mark_failed(record.instance_id)

    def _request_for(self, attempt: int, kv_transfer_params: dict | None = None) -> GenerateRequest:
        plan = self.plan
        if attempt == 0:
            return GenerateRequest(request_id=plan.request_id, token_ids=plan.prompt_ids, sampling=plan.sampling,
                                   kv_transfer_params=kv_transfer_params)
        done = len(self._generated)
        sampling = msgspec.structs.replace(plan.sampling, max_tokens=plan.sampling.max_tokens - done,
                                           min_tokens=max(0, plan.sampling.min_tokens - done))
        return GenerateRequest(request_id=f"{plan.request_id}-{attempt}", token_ids=self._tokens_so_far(),
                               sampling=sampling)

    async def _attempt(self, record: InstanceRecord, attempt: int,
                       kv_transfer_params: dict | None = None) -> AsyncIterator[str]:
        deps = self._deps
        request_id = self.plan.request_id
        self._attempt_has_tokens = False
        sent_at = time.monotonic()
        stream = deps.client.stream(record.address, self._request_for(attempt, kv_transfer_params))
        frames = frames_with_timeout(stream, deps.request_timeout, record) if deps.request_timeout > 0 else stream
        tracking = (deps.disagg.track(POOL_DECODE, self._model_label, record.instance_id)
                    if deps.disagg is not None else contextlib.nullcontext())
        handoff_pending = kv_transfer_params is not None and deps.disagg is not None
        try:
            async with contextlib.AsyncExitStack() as scope:
                scope.enter_context(tracking)
                await scope.enter_async_context(contextlib.aclosing(stream))
                await scope.enter_async_context(contextlib.aclosing(frames))
                async for frame in frames:
                    if not isinstance(frame, GenerateFrame):
                        self._raise_for(frame, record)
                    if handoff_pending:
                        handoff_pending = False
                        deps.disagg.observe_decode_start(self._model_label, kv_transfer_params, frame, sent_at)
                    if not self._generated and frame.cached_tokens is not None:
                        self.cached_tokens = frame.cached_tokens  # usage reports the engine's own count
                        self.engine_reported_usage = True
                    if frame.token_ids:
                        text = self._accept_tokens(frame.token_ids)
                        if text:
                            yield text
                        if self._detokenizer.stopped:
                            # Leaving the async-with closes the stream: the worker aborts the request.
                            self.finish_reason = "stop"
                            return
                    if frame.last:
                        if frame.finish_reason in ("abort", "error"):
                            # "error": e.g. vLLM could not load the request's KV. Another attempt can
                            # succeed, so it counts as a worker failure (retry or migrate).
                            raise WorkerFailedError(f"worker {record.instance_id:x} ended the request with "
                                                    f"{frame.finish_reason!r}", instance_id=record.instance_id)
                        self.finish_reason = frame.finish_reason or "stop"
                        tail = self._detokenizer.flush()
                        if tail:
                            yield tail
                        return
            raise WorkerFailedError(f"worker {record.instance_id:x} ended the stream without a last frame",
                                    instance_id=record.instance_id)
        finally:
            deps.router.finished(request_id)

    def _accept_tokens(self, token_ids: list[int]) -> str:
        now = time.monotonic()
        metrics = self._deps.metrics
        if not self._attempt_has_tokens:
            self._attempt_has_tokens = True
            self._deps.router.first_token(self.plan.request_id)
        if self._first_token_at is None:
            self._first_token_at = now
            metrics.time_to_first_token.labels(self._model_label).observe(now - self._arrival)
        else:
            self._inter_token_latency.observe(now - self._last_frame_at)
        self._last_frame_at = now
        before = self._detokenizer.token_count
        text, _ = self._detokenizer.push(token_ids)
        accepted = self._detokenizer.token_count - before
        self._generated.extend(token_ids[:accepted] if accepted < len(token_ids) else token_ids)
        self.completion_tokens = len(self._generated)
        return text

    @staticmethod
    def _raise_for(frame: Reply, record: InstanceRecord) -> None:
        if isinstance(frame, ErrorFrame):
            raise worker_error(frame.status, frame.message, worker=f"worker {record.instance_id:x}",
                               instance_id=record.instance_id)
        raise EngineError(f"worker {record.instance_id:x} answered with an unexpected {type(frame).__name__}")
