"""A planned request's generation: its attempts on workers as one text stream, migrating on worker failure.

One `Generation` per request. Its `text()` async generator yields text deltas; when it ends,
`finish_reason` and the token counts are set. Closing the generator early (client disconnect,
stop string) closes the worker stream, which makes the worker abort the request.

Each attempt is one request on one worker (frontend/attempt.py). Before the first, the prefill policy
(frontend/prefill_policy.py) decides where the prompt is prefilled, may run it on a prefill worker,
and hands back the first attempt, routed; it then carries the prefill's kv_transfer_params to the
decode worker. Retries and migrations prefill locally.

Failures:
- before the first token of an attempt (connect refused, worker died during prefill): nothing has
  reached the client, so the request is simply sent to another worker (the failed one is excluded);
- after tokens were produced: the request migrates (prompt + tokens so far, fewer max_tokens) if
  the model card's migration_limit allows, otherwise the error reaches the client. A request with a
  structured output (response_format, a forced tool call, a grammar) never migrates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import msgspec

from dynamo_lite.frontend.attempt import POOL_DECODE, Attempt, Dispatcher
from dynamo_lite.frontend.detokenizer import IncrementalDetokenizer
from dynamo_lite.frontend.metrics import FrontendMetrics
from dynamo_lite.frontend.prefill_policy import PrefillPolicy, record_handoff
from dynamo_lite.frontend.preprocess import GenerationPlan
from dynamo_lite.protocol.errors import NoWorkerAvailableError, WorkerFailedError
from dynamo_lite.protocol.messages import FinishReason, GenerateRequest

logger = logging.getLogger(__name__)

# Retries of attempts that failed before their first token. Each failure excludes that worker, so
# this only bounds a pathological case (every worker failing the same way).
MAX_UNSTARTED_RETRIES = 3


@dataclasses.dataclass
class PipelineDeps:
    dispatcher: Dispatcher
    prefill: PrefillPolicy
    metrics: FrontendMetrics


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
        self.finish_reason: FinishReason | None = None
        self.migrations = 0
        self._generated: list[int] = []
        self._detokenizer = IncrementalDetokenizer(plan.model.tokenizer.tokenizer, plan.stop, plan.prompt_ids,
                                                   skip_special_tokens=plan.skip_special_tokens,
                                                   include_stop_str=plan.include_stop_str_in_output)
        self._first_token_at: float | None = None
        self._last_frame_at = 0.0
        self.serving_reason: str | None = None  # how the prompt was prefilled (frontend/prefill_policy.py reasons)

    async def text(self) -> AsyncIterator[str]:
        """Text deltas (never empty strings) of the whole generation, across migrations."""
        unstarted_retries = 0
        number = 0  # of the attempt
        last_failure: WorkerFailedError | None = None
        while True:
            kv_transfer_params = None
            if number == 0:
                # Prefill on a prefill worker first, or decide to prefill on the decode worker itself.
                serving = await self._deps.prefill.prepare(self.plan)
                attempt, kv_transfer_params = serving.attempt, serving.kv_transfer_params
                self.serving_reason = serving.reason
            else:
                attempt = self._route_again(last_failure)
            produced_before = len(self._generated)
            try:
                with attempt:
                    # aclosing: if our consumer stops, the attempt (and its worker stream) closes now.
                    request = self._request_for(number, kv_transfer_params)
                    async with contextlib.aclosing(self._deltas(attempt, request, kv_transfer_params)) as deltas:
                        async for delta in deltas:
                            yield delta
                return
            except WorkerFailedError as e:
                last_failure = e
                attempt.worker_failed(e)  # the watcher reports the removal to the router
                if len(self._generated) == produced_before:
                    unstarted_retries += 1
                    if unstarted_retries > MAX_UNSTARTED_RETRIES:
                        raise
                elif self.migrations >= self.plan.model.card.migration_limit:
                    raise
                elif self.plan.sampling.structured_output is not None:
                    # The new worker's grammar would start again at the tokens already generated (they
                    # are its prompt), so the answer would break the schema: fail rather than migrate.
                    raise WorkerFailedError(f"{e.message}; a structured-output request cannot migrate "
                                            "(its grammar would restart mid-answer)",
                                            instance_id=e.instance_id) from e
                else:
                    self.migrations += 1
                    self._deps.metrics.migrations.labels(self._model_label).inc()
                    logger.info("request %s: migrating after %d tokens (%s)", self.plan.request_id,
                                len(self._generated), e.message)
                if len(self._generated) >= self.plan.sampling.max_tokens:
                    self.finish_reason = FinishReason.LENGTH
                    tail = self._detokenizer.flush()
                    if tail:
                        yield tail
                    return
                number += 1

    def _route_again(self, last_failure: WorkerFailedError) -> Attempt:
        """The next attempt after a failed one, on another worker (the failed one is excluded by now)."""
        name = self.plan.model.name
        dispatcher = self._deps.dispatcher
        workers = dispatcher.workers(name, POOL_DECODE)
        if not workers:
            raise NoWorkerAvailableError(f"the worker serving model {name} failed ({last_failure.message}) "
                                         "and no other worker is available") from last_failure
        return dispatcher.route(POOL_DECODE, name, self.plan.request_id, self._tokens_so_far(), workers)

    def _tokens_so_far(self) -> list[int]:
        return self.plan.prompt_ids + self._generated if self._generated else self.plan.prompt_ids

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

    async def _deltas(self, attempt: Attempt, request: GenerateRequest,
                      kv_transfer_params: dict | None) -> AsyncIterator[str]:
        handoff_pending = kv_transfer_params is not None
        async with contextlib.aclosing(attempt.frames(request)) as frames:
            async for frame in frames:
                if handoff_pending:
                    handoff_pending = False
                    record_handoff(self._deps.metrics, self._model_label, kv_transfer_params, frame, attempt.sent_at)
                if not self._generated and frame.cached_tokens is not None:
                    self.cached_tokens = frame.cached_tokens  # usage reports the engine's own count
                    self.engine_reported_usage = True
                if frame.token_ids:
                    # The token that stopped the engine (EOS, a stop_token_ids entry) counts but is not
                    # shown, as in vLLM's detokenizer, unless include_stop_str_in_output.
                    hide_last = (frame.last and frame.finish_reason == FinishReason.STOP
                                 and not self.plan.include_stop_str_in_output)
                    text = self._accept_tokens(frame.token_ids, hide_last)
                    if text:
                        yield text
                    if self._detokenizer.stopped:
                        # Leaving the async-with closes the stream: the worker aborts the request.
                        self.finish_reason = FinishReason.STOP
                        return
                if frame.last:
                    if frame.finish_reason in (FinishReason.ABORT, FinishReason.ERROR):
                        # "error": e.g. vLLM could not load the request's KV. Another attempt can
                        # succeed, so it counts as a worker failure (retry or migrate).
                        raise WorkerFailedError(f"{attempt.name} ended the request with {frame.finish_reason!r}",
                                                instance_id=attempt.worker.instance_id)
                    self.finish_reason = frame.finish_reason or FinishReason.STOP
                    tail = self._detokenizer.flush()
                    if tail:
                        yield tail
                    return

    def _accept_tokens(self, token_ids: list[int], hide_last: bool = False) -> str:
        now = time.monotonic()
        metrics = self._deps.metrics
        if self._first_token_at is None:
            self._first_token_at = now
            metrics.time_to_first_token.labels(self._model_label).observe(now - self._arrival)
        else:
            self._inter_token_latency.observe(now - self._last_frame_at)
        self._last_frame_at = now
        shown = token_ids[:-1] if hide_last else token_ids
        before = self._detokenizer.token_count
        text, _ = self._detokenizer.push(shown)
        accepted = self._detokenizer.token_count - before
        self._generated.extend(token_ids if accepted == len(shown) else token_ids[:accepted])
        self.completion_tokens = len(self._generated)
        return text
