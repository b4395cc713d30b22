"""A planned request's generation: its attempts on workers as one stream of choice deltas, migrating on
worker failure.

One `Generation` per request. Its `deltas()` async generator yields `ChoiceDelta`s: text and logprobs
of choice `index` (0..n-1; with n > 1 the choices interleave), each choice's last one carrying its
finish_reason. Each choice has its own detokenizer and stop strings; a choice that meets a stop
string ends there while the others go on. Closing the generator early (client disconnect), or every
choice having ended, closes the worker stream, which makes the worker abort the request.

Each attempt is one request on one worker (frontend/attempt.py). Before the first, the prefill policy
(frontend/prefill_policy.py) decides where the prompt is prefilled, may run it on a prefill worker,
and hands back the first attempt, routed; it then carries the prefill's kv_transfer_params to the
decode worker. Retries and migrations prefill locally.

Failures:
- before the first token of an attempt (connect refused, worker died during prefill): nothing has
  reached the client, so the request is simply sent to another worker (the failed one is excluded);
- after tokens were produced: the request migrates (prompt + tokens so far, fewer max_tokens) if
  the model card's migration_limit allows, otherwise the error reaches the client. With n > 1 each
  unfinished choice continues as its own request (its prompt holds its own tokens so far), the new
  requests at once on the new worker, their deltas merged. A structured output (response_format, a
  forced tool call, a grammar) migrates too: the request says how many of its prompt's tokens were
  generated, and the new worker's grammar starts after them (vllm/structured_resume.py).
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
from dynamo_lite.frontend.stream_merge import merge
from dynamo_lite.protocol.errors import NoWorkerAvailableError, WorkerFailedError
from dynamo_lite.protocol.messages import FinishReason, GenerateRequest, TokenLogprob

logger = logging.getLogger(__name__)

# Retries of attempts that failed before their first token. Each failure excludes that worker, so
# this only bounds a pathological case (every worker failing the same way).
MAX_UNSTARTED_RETRIES = 3


@dataclasses.dataclass
class PipelineDeps:
    dispatcher: Dispatcher
    prefill: PrefillPolicy
    metrics: FrontendMetrics


@dataclasses.dataclass(slots=True)
class ChoiceDelta:
    """A piece of choice `index`: new text ("" when only logprobs or the end come with it), the logprobs of
    the tokens it covers (when asked for), and on the choice's last delta its finish reason and vLLM's
    stop_reason (the stop string matched, the stop token id of a stop_token_ids entry, None otherwise)."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


class _Choice:
    __slots__ = ("detokenizer", "finish_reason", "generated", "index", "stop_reason")

    def __init__(self, index: int, detokenizer: IncrementalDetokenizer):
        self.index = index
        self.detokenizer = detokenizer
        self.generated: list[int] = []  # tokens counted (up to a stop string's last, the hidden stop token)
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None


def _produced(choices: list[_Choice]) -> int:
    """Tokens generated so far for `choices`."""
    return sum(len(choice.generated) for choice in choices)


def _any_open(choices: list[_Choice]) -> bool:
    return any(choice.finish_reason is None for choice in choices)


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
        self.completion_tokens = 0  # of all choices
        self.migrations = 0
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # when sampling.prompt_logprobs is set
        tokenizer = plan.model.tokenizer.tokenizer
        self.choices = [_Choice(index, IncrementalDetokenizer(
            tokenizer, plan.stop, plan.prompt_ids, skip_special_tokens=plan.skip_special_tokens,
            include_stop_str=plan.include_stop_str_in_output)) for index in range(plan.sampling.n)]
        self._attempts = 0  # requests sent to workers for it
        self._first_token_at: float | None = None
        self._last_frame_at = 0.0
        self.serving_reason: str | None = None  # how the prompt was prefilled (frontend/prefill_policy.py reasons)

    @property
    def finish_reason(self) -> FinishReason | None:
        """The first choice's (the only one unless n > 1)."""
        return self.choices[0].finish_reason

    @property
    def stop_reason(self) -> str | int | None:
        """The first choice's."""
        return self.choices[0].stop_reason

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """The deltas of every choice, across migrations; each choice's last one has its finish_reason."""
        async with contextlib.aclosing(self._serve(self.choices)) as deltas:
            async for delta in deltas:
                yield delta

    async def _serve(self, choices: list[_Choice],
                     last_failure: WorkerFailedError | None = None) -> AsyncIterator[ChoiceDelta]:
        """The deltas of `choices`, served by one request at a time, across retries and migrations. The
        first request serves all n choices; one that fails with tokens generated for several choices is
        continued by one request per choice, at once (each with its own tokens so far as prompt)."""
        unstarted_retries = 0
        while True:
            kv_transfer_params = None
            number = self._attempts  # requests of this generation so far: names this one on the worker
            self._attempts += 1
            if number == 0:
                # Prefill on a prefill worker first, or decide to prefill on the decode worker itself.
                serving = await self._deps.prefill.prepare(self.plan)
                attempt, kv_transfer_params = serving.attempt, serving.kv_transfer_params
                self.serving_reason = serving.reason
            else:
                attempt = self._route_again(last_failure, choices)
            produced_before = _produced(choices)
            try:
                with attempt:
                    # aclosing: if our consumer stops, the attempt (and its worker stream) closes now.
                    request = self._request_for(number, choices, kv_transfer_params)
                    async with contextlib.aclosing(self._deltas(attempt, request, choices,
                                                                kv_transfer_params)) as deltas:
                        async for delta in deltas:
                            yield delta
                return
            except WorkerFailedError as e:
                last_failure = e
                attempt.worker_failed(e)  # the watcher reports the removal to the router
                if _produced(choices) == produced_before:
                    unstarted_retries += 1
                    if unstarted_retries > MAX_UNSTARTED_RETRIES:
                        raise
                elif self.migrations >= self.plan.model.card.migration_limit:
                    raise
                else:
                    self.migrations += 1
                    self._deps.metrics.migrations.labels(self._model_label).inc()
                    logger.info("request %s: migrating after %d tokens (%s)", self.plan.request_id,
                                self.completion_tokens, e.message)
            choices = [choice for choice in choices if choice.finish_reason is None]
            for choice in choices:
                if len(choice.generated) >= self.plan.sampling.max_tokens:
                    yield self._end(choice, FinishReason.LENGTH)
            choices = [choice for choice in choices if choice.finish_reason is None]
            if not choices:
                return
            if len(choices) > 1 and _produced(choices):
                # n > 1 mid-answer: the choices' prompts differ now (each continues its own tokens), and
                # the new worker's prefix cache shares what they have in common.
                async with contextlib.aclosing(merge([self._serve([choice], last_failure)
                                                      for choice in choices])) as deltas:
                    async for delta in deltas:
                        yield delta
                return

    def _route_again(self, last_failure: WorkerFailedError, choices: list[_Choice]) -> Attempt:
        """The next attempt after a failed one, on another worker (the failed one is excluded by now)."""
        name = self.plan.model.name
        dispatcher = self._deps.dispatcher
        workers = dispatcher.workers(name, POOL_DECODE)
        if not workers:
            raise NoWorkerAvailableError(f"the worker serving model {name} failed ({last_failure.message}) "
                                         "and no other worker is available") from last_failure
        # The router tracks a request by id: the requests that continue n > 1 choices at once need their own.
        tracked = (self.plan.request_id if len(choices) == len(self.choices)
                   else f"{self.plan.request_id}/choice{choices[0].index}")
        return dispatcher.route(POOL_DECODE, name, tracked, self._prompt_for(choices), workers)

    def _prompt_for(self, choices: list[_Choice]) -> list[int]:
        """The prompt that continues `choices`: the request's own, followed by the tokens a lone choice has
        generated (several choices in one request have none yet: _serve splits them once they have)."""
        generated = choices[0].generated if len(choices) == 1 else []
        return self.plan.prompt_ids + generated if generated else self.plan.prompt_ids

    def _request_for(self, number: int, choices: list[_Choice],
                     kv_transfer_params: dict | None = None) -> GenerateRequest:
        plan = self.plan
        if number == 0:
            return GenerateRequest(request_id=plan.request_id, token_ids=plan.prompt_ids, sampling=plan.sampling,
                                   kv_transfer_params=kv_transfer_params)
        token_ids = self._prompt_for(choices)
        done = len(token_ids) - len(plan.prompt_ids)
        sampling = msgspec.structs.replace(plan.sampling, n=len(choices), max_tokens=plan.sampling.max_tokens - done,
                                           min_tokens=max(0, plan.sampling.min_tokens - done))
        if self.prompt_logprobs is not None:  # already received: a migrated prompt holds generated tokens too
            sampling = msgspec.structs.replace(sampling, prompt_logprobs=None)
        # resumed_tokens: a structured output's grammar on the new worker starts after the tokens so far.
        return GenerateRequest(request_id=f"{plan.request_id}-{number}", token_ids=token_ids,
                               sampling=sampling, resumed_tokens=done)

    async def _deltas(self, attempt: Attempt, request: GenerateRequest, choices: list[_Choice],
                      kv_transfer_params: dict | None) -> AsyncIterator[ChoiceDelta]:
        """The deltas of one attempt, whose choice i is choices[i]."""
        handoff_pending = kv_transfer_params is not None
        include_stop = self.plan.include_stop_str_in_output
        async with contextlib.aclosing(attempt.frames(request)) as frames:
            async for frame in frames:
                if handoff_pending:
                    handoff_pending = False
                    record_handoff(self._deps.metrics, self._model_label, kv_transfer_params, frame, attempt.sent_at)
                if not self.completion_tokens and frame.cached_tokens is not None:
                    self.cached_tokens = frame.cached_tokens  # usage reports the engine's own count
                    self.engine_reported_usage = True
                if frame.prompt_logprobs is not None and self.prompt_logprobs is None:
                    self.prompt_logprobs = frame.prompt_logprobs
                if not 0 <= frame.index < len(choices):
                    raise WorkerFailedError(f"{attempt.name} sent choice {frame.index} of a request for "
                                            f"{len(choices)}", instance_id=attempt.worker.instance_id)
                choice = choices[frame.index]
                if choice.finish_reason is None:
                    text, logprobs = "", None
                    if frame.token_ids:
                        # The token that stopped the engine (EOS, a stop_token_ids entry) counts but is not
                        # shown, as in vLLM's detokenizer, unless include_stop_str_in_output.
                        hide_last = frame.finish_reason == FinishReason.STOP and not include_stop
                        text, kept = self._accept_tokens(choice, frame.token_ids, hide_last)
                        if frame.logprobs is not None:
                            logprobs = frame.logprobs[:kept]
                        if choice.detokenizer.stopped:
                            yield self._end(choice, FinishReason.STOP, text, logprobs,
                                            choice.detokenizer.stop_string)
                            if not _any_open(choices):
                                return  # leaving the async-with closes the stream: the worker aborts
                            continue
                    reason = frame.finish_reason
                    if reason in (FinishReason.ABORT, FinishReason.ERROR):
                        if text or logprobs:
                            yield ChoiceDelta(choice.index, text, logprobs)
                        # "error": e.g. vLLM could not load the request's KV. Another attempt can
                        # succeed, so it counts as a worker failure (retry or migrate).
                        raise WorkerFailedError(f"{attempt.name} ended the request with {reason!r}",
                                                instance_id=attempt.worker.instance_id)
                    if reason is not None:
                        stop_reason = None  # EOS, length
                        if reason == FinishReason.STOP and frame.token_ids:
                            if frame.token_ids[-1] in self.plan.stop_reason_ids:
                                stop_reason = frame.token_ids[-1]  # a stop_token_ids entry
                        yield self._end(choice, reason, text, logprobs, stop_reason)
                    elif text or logprobs:
                        yield ChoiceDelta(choice.index, text, logprobs)
                if frame.last:
                    for choice in choices:  # a stream that ended a choice without saying why
                        if choice.finish_reason is None:
                            yield self._end(choice, FinishReason.STOP)
                    return
                if not _any_open(choices):
                    return

    def _end(self, choice: _Choice, reason: FinishReason, text: str = "",
             logprobs: list[TokenLogprob] | None = None, stop_reason: str | int | None = None) -> ChoiceDelta:
        """The choice's last delta: `text` and what its stop-string matcher held back (none after a stop)."""
        choice.finish_reason = reason
        choice.stop_reason = stop_reason
        return ChoiceDelta(choice.index, text + choice.detokenizer.flush(), logprobs, reason, stop_reason)

    def _accept_tokens(self, choice: _Choice, token_ids: list[int],
                       hide_last: bool = False) -> tuple[str, int]:
        """-> (text to show now, how many of token_ids count: fewer after a stop string)."""
        now = time.monotonic()
        metrics = self._deps.metrics
        if self._first_token_at is None:
            self._first_token_at = now
            metrics.time_to_first_token.labels(self._model_label).observe(now - self._arrival)
        else:
            self._inter_token_latency.observe(now - self._last_frame_at)
        self._last_frame_at = now
        detokenizer = choice.detokenizer
        shown = token_ids[:-1] if hide_last else token_ids
        before = detokenizer.token_count
        text, _ = detokenizer.push(shown)
        accepted = detokenizer.token_count - before
        kept = len(token_ids) if accepted == len(shown) else accepted
        choice.generated.extend(token_ids if kept == len(token_ids) else token_ids[:kept])
        self.completion_tokens += kept
        return text, kept
