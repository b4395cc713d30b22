"""MockerEngine: one simulated worker behind the Engine interface.

A background task runs scheduler steps back to back while there is work. For each step it waits
until the step's tokens are due (timing.py: the end of the step, or with --timing dynamo the end of its
prefill part), hands each request its new token, publishes the step's KV events, and waits out the
rest of the step before planning the next. Sleeps are only taken once the simulated clock is at least MIN_SLEEP_SECONDS ahead
of the wall clock (the debt carries over), so sub-millisecond steps cost no timer wake-up and
--speedup-ratio 100000 runs as fast as Python allows while the average rate stays right; such
steps run back to back for up to STEP_SLICE_SECONDS between yields to the event loop. A busy engine's
next step starts when its last one ended even if the loop woke up late (by up to MAX_CATCH_UP_SECONDS):
the lateness is the host's, so the simulated GPU keeps its configured speed on a loaded event loop.

Token ids are reproducible: each request draws from its own random.Random seeded with
sampling.seed, or with a content hash of the prompt when there is none. They come from the model's
ordinary-token range (config.ModelFacts), so the mocker never emits EOS or another special token:
a request ends after max_tokens ("length"), at the context length, or on one of its stop_token_ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dynamo_lite.engine.base import Engine, EngineInfo, EngineLoad
from dynamo_lite.mocker.block_pool import BlockPool
from dynamo_lite.mocker.choices import generate_choices
from dynamo_lite.mocker.config import MockerConfig, ModelFacts, load_model_facts
from dynamo_lite.mocker.scheduler import Scheduler, SchedRequest, StepOutput
from dynamo_lite.mocker.timing import DynamoStepTimeModel, StepTimeModel, timing_model
from dynamo_lite.protocol.errors import EngineError, InvalidRequestError
from dynamo_lite.protocol.hashing import hash_block
from dynamo_lite.protocol.messages import BlockStored, FinishReason, GenerateFrame, GenerateRequest, KvEvent

logger = logging.getLogger(__name__)

# Below this, a timer costs more than it simulates (epoll rounds timeouts up to 1 ms).
MIN_SLEEP_SECONDS = 1e-3
# Steps shorter than MIN_SLEEP_SECONDS run back to back for up to this long before the loop gets
# control back. A real engine steps in its own process whatever the server does, and its output
# collector merges the tokens a busy consumer has not read yet; this gives the same coalescing
# (several tokens per frame under load) instead of one wake-up and one frame per token per step.
STEP_SLICE_SECONDS = 1e-3
# How far behind the simulated clock may fall and still be caught up (a loop that woke a little late). A
# longer stall (the process was descheduled) is dropped rather than raced through in zero-time steps.
MAX_CATCH_UP_SECONDS = 10e-3
# KV event batches kept while no reader is attached (e.g. a shell running without NATS).
MAX_UNREAD_KV_BATCHES = 4096


# Sampling options that constrain which tokens may come out (grammars, allowed/banned tokens): the
# mocker cannot honour them, so it refuses them.
UNSIMULATED_CONSTRAINTS = ("structured_output", "allowed_token_ids", "logit_bias", "bad_words")

class _TokenStream:
    """Hand-off from the step loop to one generate() consumer: cheaper than an asyncio.Queue per token."""

    __slots__ = ("tokens", "finish_reason", "block_ids", "error", "waiter", "arrived", "admitted", "first_token")

    def __init__(self) -> None:
        # Loop times: handed to the engine, first scheduled (its step's simulated start), first token out.
        self.arrived = self.admitted = self.first_token = 0.0
        self.tokens: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.block_ids: list[int] = []  # blocks held at finish (a prefill's transfer params name them)
        self.error: str | None = None
        self.waiter: asyncio.Future | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


@dataclass
class MockerStats:
    """Work the simulated GPU has done (for tests and benchmarks)."""

    steps: int = 0
    prefill_tokens: int = 0  # tokens computed in prefill (prefix-cache hits and transferred KV excluded)
    decode_tokens: int = 0
    preemptions: int = 0
    simulated_seconds: float = 0.0  # sum of step times, after --speedup-ratio


class MockerEngine(Engine):
    def __init__(self, config: MockerConfig, *, facts: ModelFacts | None = None, engine_id: str | None = None,
                 timing: StepTimeModel | DynamoStepTimeModel | None = None):
        self.config = config
        self.engine_id = engine_id or f"mocker-{uuid.uuid4().hex[:12]}"
        self._facts = facts
        self._timing = timing or timing_model(
            config.timing, speedup_ratio=config.speedup_ratio,
            capacity_tokens=config.num_gpu_blocks_override * config.block_size)
        self._pool = BlockPool(config.num_gpu_blocks_override, config.block_size,
                               config.enable_prefix_caching)
        self._scheduler: Scheduler | None = None
        self._info: EngineInfo | None = None
        # KV event batches not yet read by kv_events(). Unbounded while someone reads them (the
        # shell relays as fast as they come); capped when nobody does (a shell without NATS).
        self._kv_batches: deque[list[KvEvent]] = deque()
        self._kv_ready = asyncio.Event()
        self._kv_readers = 0
        self._kv_dropping = False
        self._active: set[SchedRequest] = set()
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._closed = False
        self.stats = MockerStats()

    # ------------------------------------------------------------------ Engine interface

    async def start(self) -> EngineInfo:
        if self._info is not None:
            return self._info
        facts = self._facts or await asyncio.to_thread(load_model_facts, self.config)
        self._facts = facts
        self._scheduler = Scheduler(self._pool, max_num_seqs=self.config.max_num_seqs,
                                    max_num_batched_tokens=self.config.max_num_batched_tokens,
                                    token_range=(facts.first_token_id, facts.end_token_id),
                                    max_model_len=facts.context_length)
        self._wake = asyncio.Event()
        self._loop_task = asyncio.create_task(self._run_steps(), name=f"mocker-steps-{self.engine_id}")
        self._info = EngineInfo(model_name=facts.served_model_name, model_path=facts.path,
                                context_length=facts.context_length, kv_block_size=self.config.block_size,
                                total_kv_blocks=self.config.num_gpu_blocks_override)
        logger.info("mocker engine %s: model %s, %d blocks of %d tokens, speedup %s", self.engine_id,
                    facts.served_model_name, self.config.num_gpu_blocks_override, self.config.block_size,
                    self.config.speedup_ratio)
        return self._info

    @property
    def info(self) -> EngineInfo | None:
        return self._info

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateFrame]:
        if self._facts is not None:
            self._admit(request)  # bad requests fail before any choice starts
        vocab = self._facts.vocab_size if self._facts is not None else 1
        async with contextlib.aclosing(generate_choices(request, self._generate_one, vocab)) as frames:
            async for frame in frames:
                yield frame

    async def _generate_one(self, request: GenerateRequest) -> AsyncIterator[GenerateFrame]:
        scheduler, wake = self._scheduler, self._wake
        if scheduler is None or wake is None or self._closed:
            raise EngineError("the mocker engine is not running")
        sched_request, remote_decode = self._admit(request)
        stream: _TokenStream = sched_request.sink  # type: ignore[assignment]
        self._active.add(sched_request)
        loop = asyncio.get_running_loop()
        stream.arrived = loop.time()
        scheduler.add_request(sched_request)
        wake.set()
        first = True
        try:
            while True:
                if not stream.tokens and stream.finish_reason is None and stream.error is None:
                    stream.waiter = loop.create_future()
                    await stream.waiter
                if stream.error is not None:
                    raise EngineError(stream.error)
                frame = GenerateFrame(token_ids=stream.tokens)
                stream.tokens = []
                if first:
                    frame.prompt_tokens = sched_request.prompt_len
                    frame.cached_tokens = sched_request.cached_tokens or 0
                    if stream.admitted and stream.first_token:
                        frame.queue_seconds = max(0.0, stream.admitted - stream.arrived)
                        frame.prefill_seconds = max(0.0, stream.first_token - stream.admitted)
                    first = False
                if stream.finish_reason is None:
                    yield frame
                    continue
                frame.finish_reason = stream.finish_reason
                frame.last = True
                if remote_decode:
                    frame.kv_transfer_params = self._transfer_params(stream.block_ids)
                yield frame
                return
        finally:
            self._active.discard(sched_request)
            if stream.finish_reason is None and scheduler.abort(sched_request):
                logger.debug("request %s aborted", request.request_id)
                wake.set()  # freed blocks may let a waiting request in

    async def kv_events(self) -> AsyncIterator[list[KvEvent]]:
        self._kv_readers += 1
        try:
            while True:
                while self._kv_batches:
                    yield self._kv_batches.popleft()
                if self._closed:
                    return
                self._kv_ready.clear()
                await self._kv_ready.wait()
        finally:
            self._kv_readers -= 1

    def load(self) -> EngineLoad:
        scheduler = self._scheduler
        return EngineLoad(active_blocks=self._pool.num_used_blocks, total_blocks=self._pool.num_blocks,
                          running_requests=len(scheduler.running) if scheduler else 0,
                          waiting_requests=len(scheduler.waiting) if scheduler else 0)

    def cached_blocks(self) -> list[BlockStored]:
        """Every cached block as BlockStored events, parents first (what a KV resync answers)."""
        return self._pool.cached_blocks()

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._fail_all("the mocker engine shut down")
        self._kv_ready.set()  # readers get what is left, then their iterators end
        logger.info("mocker engine %s stopped", self.engine_id)

    # ------------------------------------------------------------------ internals

    def _admit(self, request: GenerateRequest) -> tuple[SchedRequest, bool]:
        """Validate like vLLM's input processor and build the scheduler's request."""
        facts = self._facts
        assert facts is not None
        prompt, sampling = request.token_ids, request.sampling
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if len(prompt) >= facts.context_length:
            raise InvalidRequestError(
                f"This model's maximum context length is {facts.context_length} tokens, but the prompt has "
                f"{len(prompt)} tokens, which leaves no room to generate.", param="messages",
                code="context_length_exceeded")
        if sampling.n < 1:
            raise InvalidRequestError("n must be at least 1", param="n")
        if sampling.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        if min(prompt) < 0 or max(prompt) >= facts.vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in [0, {facts.vocab_size})", param="prompt")
        for name in UNSIMULATED_CONSTRAINTS:
            if getattr(sampling, name) is not None:
                # Its tokens are drawn without regard to them: a client would get output that breaks them.
                raise InvalidRequestError(f"the mocker does not simulate '{name}' (it needs a real engine)",
                                          param=name)
        params = request.kv_transfer_params or {}
        remote_decode = bool(params.get("do_remote_decode"))
        # A decode request carrying a prefill's params finds its prompt KV already transferred.
        remote_prefill = not remote_decode and bool(params.get("do_remote_prefill") or
                                                    params.get("remote_block_ids"))
        max_tokens = 1 if remote_decode else min(sampling.max_tokens, facts.context_length - len(prompt))
        seed = sampling.seed if sampling.seed is not None else hash_block(None, prompt)
        sched_request = SchedRequest(request.request_id, prompt, max_tokens, seed=seed,
                                     min_tokens=sampling.min_tokens, stop_token_ids=sampling.stop_token_ids,
                                     kv_ready_tokens=len(prompt) if remote_prefill else 0,
                                     sink=_TokenStream())
        return sched_request, remote_decode

    def _transfer_params(self, block_ids: list[int]) -> dict:
        """What vLLM's NixlConnector returns from a prefill, with this simulated engine's identity."""
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
                "remote_block_ids": block_ids, "remote_host": self.config.advertise_host, "remote_port": 0,
                "tp_size": 1}

    async def _run_steps(self) -> None:
        scheduler, wake = self._scheduler, self._wake
        assert scheduler is not None and wake is not None
        loop = asyncio.get_running_loop()
        busy_until = loop.time()  # when the simulated GPU finishes the work handed to it so far
        slice_start = busy_until  # when the loop last got control back
        try:
            while True:
                out = scheduler.step() if scheduler.has_work else None
                if out is None or (out.is_empty and not out.preempted):
                    # Idle, or waiting requests that cannot fit until something finishes or is aborted.
                    # (A step that only preempted changed the state: step again at once.)
                    self._publish_events()
                    await wake.wait()
                    wake.clear()
                    # Idle until now: the next step cannot have started earlier.
                    busy_until = slice_start = loop.time()
                    continue
                seconds = self._timing.step_seconds(out)
                self._count(out, seconds)
                now = loop.time()
                started = max(busy_until, now - MAX_CATCH_UP_SECONDS)
                for request in out.admitted:
                    request.sink.admitted = started  # type: ignore[union-attr]
                busy_until = started + seconds
                tokens_at = started + self._timing.token_seconds(out)  # at or before busy_until
                slept = False
                delay = tokens_at - now
                if delay >= MIN_SLEEP_SECONDS:
                    await asyncio.sleep(delay)
                    slept = True
                    self._deliver(out, loop.time())
                else:
                    self._deliver(out, tokens_at)
                self._publish_events()
                # What is left of the step after its tokens went out (--timing dynamo's decode pass).
                remaining = busy_until - loop.time()
                if remaining >= MIN_SLEEP_SECONDS:
                    await asyncio.sleep(remaining)
                    slept = True
                if slept:
                    slice_start = loop.time()
                    continue
                if now - slice_start >= STEP_SLICE_SECONDS:
                    await asyncio.sleep(0)
                    slice_start = loop.time()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("mocker engine %s: step loop failed", self.engine_id)
            self._closed = True  # new requests are refused rather than left waiting forever
            self._fail_all("the mocker engine's step loop failed")
            self._kv_ready.set()

    def _count(self, out: StepOutput, seconds: float) -> None:
        stats = self.stats
        stats.steps += 1
        stats.prefill_tokens += out.prefill_tokens
        stats.decode_tokens += out.decode_requests
        stats.preemptions += len(out.preempted)
        stats.simulated_seconds += seconds

    def _deliver(self, out: StepOutput, now: float) -> None:
        for request, token in out.new_tokens:
            stream = request.sink
            if not stream.first_token:  # type: ignore[union-attr]
                stream.first_token = now  # type: ignore[union-attr]
            stream.tokens.append(token)  # type: ignore[union-attr]
            stream.wake()  # type: ignore[union-attr]
        for request in out.finished:
            stream = request.sink
            stream.finish_reason = request.finish_reason  # type: ignore[union-attr]
            stream.block_ids = request.final_block_ids  # type: ignore[union-attr]
            stream.wake()  # type: ignore[union-attr]

    def _publish_events(self) -> None:
        events = self._pool.drain_events()
        if not events:
            return
        if not self._kv_readers and len(self._kv_batches) >= MAX_UNREAD_KV_BATCHES:
            self._kv_batches.popleft()
            if not self._kv_dropping:
                logger.warning("mocker engine %s: nobody reads its KV events; keeping the newest %d batches",
                               self.engine_id, MAX_UNREAD_KV_BATCHES)
                self._kv_dropping = True
        self._kv_batches.append(events)
        self._kv_ready.set()

    def _fail_all(self, message: str) -> None:
        for sched_request in list(self._active):
            stream: _TokenStream = sched_request.sink  # type: ignore[assignment]
            stream.error = message
            stream.wake()
