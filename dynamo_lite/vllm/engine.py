"""VllmEngine: vLLM's AsyncLLM (V1 engine) in this process, behind the project's Engine interface.

Token ids in, token ids out: the frontend tokenizes, detokenizes and applies stop strings, so requests
go in as TokensPrompt with detokenize=False and stream back as DELTA outputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from vllm import PoolingParams, SamplingParams, TokensPrompt
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import SchedulerStats

from dynamo_lite.engine.base import Engine, EngineInfo, EngineLoad, TransferTotals
from dynamo_lite.protocol.errors import EngineDiedError, EngineError, InvalidRequestError
from dynamo_lite.protocol.messages import (EmbedReply, EmbedRequest, FinishReason, GenerateFrame,
                                            GenerateRequest, KvEvent, SamplingOptions, StructuredOutput,
                                            TokenLogprob)
from dynamo_lite.vllm.compat import check_vllm_version, request_error_classes, unfinished_requests
from dynamo_lite.vllm import structured_resume
from dynamo_lite.vllm.kv_events import KvEventSubscriber

logger = logging.getLogger(__name__)

# vLLM's request errors (names differ between releases): the client's fault, and the engine's.
CLIENT_ERRORS, SERVER_ERRORS = request_error_classes()

# vLLM's finish reasons -> ours. "repetition" is vLLM's repetition detector stopping the request.
# "error" (e.g. a failed KV pull under kv_load_failure_policy "fail") goes out as is: the frontend
# treats it as a worker failure and retries or migrates the request.
FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT,
                  "repetition": FinishReason.STOP, "error": FinishReason.ERROR}


def served_names(served_model_name: str | list[str] | None, model: str) -> tuple[str, ...]:
    """vLLM's --served-model-name (one name or several; the model argument when none): the first is the
    model's name, the others aliases clients may use as well."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or ())
    names = list(dict.fromkeys(name for name in names if name))  # in order, each once
    return tuple(names) or (model,)


def finish_reason(reason: str | None, request_id: str) -> FinishReason:
    if reason == "error":
        logger.warning("vLLM reported an error finishing request %s", request_id)
    return FINISH_REASONS.get(reason or "stop", FinishReason.STOP)


class SchedulerStatsRecorder(StatLoggerBase):
    """A vLLM stat logger that keeps the latest SchedulerStats (sent by the engine core each step) and
    running totals of the KV connector's transfers (NIXL reports bytes and durations per step)."""

    def __init__(self, vllm_config: Any = None, engine_index: int = 0):
        self.latest: SchedulerStats | None = None
        # Data parallelism: the engine cores' stats come with their rank (engine_idx).
        self.latest_by_rank: dict[int, SchedulerStats] = {}
        self.transfer_bytes = 0
        self.transfer_seconds = 0.0
        self.transfers = 0

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            self.latest = scheduler_stats
            self.latest_by_rank[engine_idx] = scheduler_stats
            data = scheduler_stats.kv_connector_stats
            if data:
                self.transfer_bytes += int(sum(data.get("bytes_transferred") or ()))
                self.transfer_seconds += float(sum(data.get("transfer_duration") or ()))
                self.transfers += len(data.get("transfer_duration") or ())

    def log_engine_initialized(self) -> None:
        pass


class _TransferWindow:
    """Attributes the connector's transfer totals to one remote-prefill request: the bytes moved between
    its admission and its first output are its own only if no other remote-prefill request was admitted
    or in flight meanwhile (vLLM reports transfers per step, not per request)."""

    def __init__(self, engine: VllmEngine):
        self._engine = engine
        stats = engine._stats
        self._start = (stats.transfer_bytes, stats.transfer_seconds)
        self._exclusive = engine._remote_inflight == 0
        engine._remote_inflight += 1
        engine._remote_admitted += 1
        self._admitted_at = engine._remote_admitted
        self._open = True

    def measure(self, frame: GenerateFrame) -> None:
        """Put the attributed bytes/seconds on `frame` (the request's first frame), if exact."""
        engine = self._engine
        if self._exclusive and engine._remote_admitted == self._admitted_at:
            stats = engine._stats
            frame.kv_transfer_bytes = stats.transfer_bytes - self._start[0]
            frame.kv_transfer_seconds = round(stats.transfer_seconds - self._start[1], 6)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._engine._remote_inflight -= 1


def structured_outputs_params(spec: StructuredOutput | None) -> StructuredOutputsParams | None:
    return None if spec is None else StructuredOutputsParams(**msgspec.structs.asdict(spec))


def sampling_params(options: SamplingOptions, kv_transfer_params: dict | None,
                    resumed_tokens: int = 0) -> SamplingParams:
    """Raises ValueError (from vLLM's own validation) for values it rejects."""
    extra_args = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params is not None else {}
    if resumed_tokens and options.structured_output is not None:
        if not structured_resume.supported():
            raise ValueError("this vLLM cannot resume a structured-output request's grammar after a migration")
        extra_args[structured_resume.RESUMED_TOKENS_KEY] = resumed_tokens
    return SamplingParams(
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k if options.top_k > 0 else 0,  # 0 is vLLM's "disabled"
        seed=options.seed,
        min_tokens=options.min_tokens,
        ignore_eos=options.ignore_eos,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        stop_token_ids=list(options.stop_token_ids) or None,
        n=options.n,
        min_p=options.min_p,
        repetition_penalty=options.repetition_penalty,
        logit_bias=options.logit_bias,
        allowed_token_ids=options.allowed_token_ids,
        bad_words=options.bad_words,
        logprobs=options.logprobs,
        prompt_logprobs=options.prompt_logprobs,
        structured_outputs=structured_outputs_params(options.structured_output),
        output_kind=RequestOutputKind.DELTA,
        detokenize=False,
        extra_args=extra_args or None,
    )


def _restore_pinning() -> None:
    """Undo the NIXL worker's CPU re-pinning (disagg.restore_worker_affinity explains why)."""
    import os

    from dynamo_lite.vllm.cpu_pinning import bound_cpus, restore_worker_affinity

    try:
        cpus = bound_cpus(os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""))
    except ValueError:
        return  # a bind value we do not parse: leave vLLM's placement alone
    if cpus:
        restore_worker_affinity(os.getpid(), cpus)


async def _keep_pinned(interval: float = 1.0) -> None:
    while True:
        await asyncio.to_thread(_restore_pinning)
        await asyncio.sleep(interval)


def token_logprob(token_id: int, position: dict) -> TokenLogprob:
    """One position of vLLM's logprobs (token id -> Logprob; the sampled token first, then the top-k): all
    its entries (k, or k + 1 when the sampled token is not in the top k), most likely first. The frontend
    rebuilds vLLM's order from them and reports what each API does (chat its first k, completions all)."""
    chosen = position.get(token_id)
    logprob = chosen.logprob if chosen is not None else float("-inf")
    rank = chosen.rank if chosen is not None else None
    alternatives = sorted(((tid, max(lp.logprob, -9999.0)) for tid, lp in position.items()),
                          key=lambda e: -e[1])
    return TokenLogprob(token_id=token_id, logprob=max(logprob, -9999.0), rank=rank, top=alternatives)


def prompt_logprobs(token_ids, positions) -> list[TokenLogprob | None]:
    """vLLM's prompt logprobs: one per prompt token, None for the first (nothing predicts it)."""
    return [None if position is None else token_logprob(token, position)
            for token, position in zip(token_ids, positions)]


class VllmEngine(Engine):
    def __init__(self, engine_args: AsyncEngineArgs):
        check_vllm_version()
        self._engine_args = engine_args
        self._llm: AsyncLLM | None = None
        self._info: EngineInfo | None = None
        self._stats = SchedulerStatsRecorder()
        self._subscriber = KvEventSubscriber()
        self._events_enabled = False
        self._building: asyncio.Future | None = None
        self._shut_down = False
        self._remote_inflight = 0  # decode requests with remote prefill, admitted and not yet finished
        self._remote_admitted = 0

    @property
    def info(self) -> EngineInfo | None:
        return self._info

    @property
    def async_llm(self) -> AsyncLLM | None:
        """The underlying engine (operators' tools and tests)."""
        return self._llm

    @property
    def last_scheduler_stats(self) -> SchedulerStats | None:
        """The engine core's latest per-step scheduler stats (None before the first step)."""
        return self._stats.latest

    async def start(self) -> EngineInfo:
        if self._info is not None:
            return self._info
        args = self._engine_args
        self._events_enabled = self._subscriber.configure(args)
        vllm_config = args.create_engine_config(UsageContext.OPENAI_API_SERVER)
        stats = self._stats

        def build() -> AsyncLLM:
            # Takes tens of seconds (engine core process, model load, KV cache): off the event loop.
            return AsyncLLM.from_vllm_config(
                vllm_config, usage_context=UsageContext.OPENAI_API_SERVER,
                stat_loggers=[lambda _config, _index: stats],
                enable_log_requests=args.enable_log_requests, disable_log_stats=args.disable_log_stats)

        self._building = asyncio.ensure_future(asyncio.to_thread(build))
        # With a KV connector, vLLM's NIXL worker re-pins the engine's compute thread while it initialises;
        # put it back as soon as it happens, so the profile/warm-up run stays on this engine's own core.
        pinning = (asyncio.ensure_future(_keep_pinned()) if args.kv_transfer_config is not None else None)
        try:
            # Shielded: if start() is cancelled (shutdown during start-up) shutdown() still owns the build.
            self._llm = await asyncio.shield(self._building)
        finally:
            if pinning is not None:
                pinning.cancel()
        self._building = None
        if args.kv_transfer_config is not None:
            _restore_pinning()
        model_config, cache_config = vllm_config.model_config, vllm_config.cache_config
        names = served_names(args.served_model_name, args.model)
        total_blocks = cache_config.num_gpu_blocks or 0  # filled in by the engine core's handshake
        self._subscriber.resize(total_blocks)
        self._info = EngineInfo(model_name=names[0], model_path=model_config.model,
                                context_length=model_config.max_model_len,
                                kv_block_size=cache_config.block_size, total_kv_blocks=total_blocks,
                                model_aliases=names[1:],
                                runner="pooling" if model_config.runner_type == "pooling" else "generate",
                                data_parallel_size=vllm_config.parallel_config.data_parallel_size)
        logger.info("vLLM engine ready: %s (context %d, %d KV blocks of %d tokens, prefix caching %s)",
                    self._info.model_name, self._info.context_length, total_blocks,
                    cache_config.block_size, cache_config.enable_prefix_caching)
        return self._info

    def _require_llm(self) -> AsyncLLM:
        if self._llm is None or self._shut_down:
            raise EngineError("the vLLM engine is not running")
        if self.failure() is not None:
            raise EngineDiedError("the vLLM engine died")  # a 503: the frontend sends it elsewhere
        return self._llm

    def failure(self) -> str | None:
        """Set once vLLM's engine core process is gone (AsyncLLM.errored: EngineDeadError from then on)."""
        llm = self._llm
        if llm is None or self._shut_down or not llm.errored:
            return None
        return "vLLM's engine core is dead (EngineDeadError): its process exited or its output loop failed"

    def _server_error(self, request_id: str, error: BaseException) -> Exception:
        """An engine-side failure: EngineDiedError (503: retried or migrated) when the engine core is
        gone, else EngineError (the request's own failure, reported to the client)."""
        if self.failure() is not None:
            return EngineDiedError(f"vLLM's engine died during request {request_id}")
        cause = error.__cause__ if error.__cause__ is not None else error
        return EngineError(f"vLLM failed request {request_id}: {cause}")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateFrame]:
        llm = self._require_llm()
        try:
            params = sampling_params(request.sampling, request.kv_transfer_params, request.resumed_tokens)
        except (ValueError, *CLIENT_ERRORS) as e:
            raise InvalidRequestError(str(e)) from e
        prompt = TokensPrompt(prompt_token_ids=list(request.token_ids))
        first = True
        transfer = request.kv_transfer_params or {}
        window = _TransferWindow(self) if transfer.get("do_remote_prefill") else None
        # aclosing: when our consumer stops (aclose or cancellation), vLLM's generator is closed at
        # once, and its GeneratorExit/CancelledError handler aborts the request in the engine core.
        try:
            # dp_rank: the data-parallel rank the KV router chose (None: vLLM balances its ranks itself).
            async with contextlib.aclosing(llm.generate(prompt, params, request.request_id,
                                                        data_parallel_rank=request.dp_rank)) as outputs:
                async for output in outputs:
                    # Parallel sampling (n > 1) in DELTA mode: each RequestOutput carries the deltas of
                    # one or more children (CompletionOutput.index); output.finished once all are done.
                    frames = []
                    for completion in output.outputs:
                        frame = GenerateFrame(token_ids=list(completion.token_ids), index=completion.index)
                        if completion.logprobs is not None:
                            frame.logprobs = [token_logprob(token, position)
                                              for token, position in zip(completion.token_ids,
                                                                         completion.logprobs)]
                        if completion.finish_reason is not None:
                            frame.finish_reason = finish_reason(completion.finish_reason, request.request_id)
                        frames.append(frame)
                    if first or output.finished:
                        frames = frames or [GenerateFrame()]
                    if first:
                        frame = frames[0]
                        frame.prompt_tokens = len(request.token_ids)
                        frame.cached_tokens = output.num_cached_tokens or 0
                        frame.queue_seconds, frame.prefill_seconds = queue_and_prefill(output)
                        if output.prompt_logprobs is not None:
                            frame.prompt_logprobs = prompt_logprobs(request.token_ids, output.prompt_logprobs)
                        if window is not None:
                            window.measure(frame)
                            window.close()
                        first = False
                    if output.finished:
                        frames[-1].kv_transfer_params = output.kv_transfer_params
                        frames[-1].last = True
                    for frame in frames:
                        yield frame
        except CLIENT_ERRORS as e:  # vLLM's own validation, e.g. prompt longer than the context
            raise InvalidRequestError(str(e)) from e
        except SERVER_ERRORS as e:
            raise self._server_error(request.request_id, e) from e
        finally:
            if window is not None:
                window.close()

    async def embed(self, request: EmbedRequest) -> EmbedReply:
        """One AsyncLLM.encode per prompt, run concurrently (vLLM's serving_embedding does the same)."""
        llm = self._require_llm()
        if self._info is None or self._info.runner != "pooling":
            raise InvalidRequestError("this worker runs a generating model: start it with --runner pooling")
        # normalize maps to vLLM's use_activation (the embed pooler's normalization).
        params = PoolingParams(task="embed", dimensions=request.dimensions, use_activation=request.normalize)
        try:
            params.verify(llm.model_config)
        except ValueError as e:  # e.g. dimensions on a model without Matryoshka support
            raise InvalidRequestError(str(e)) from e

        async def one(index: int, token_ids: list[int]):
            last = None
            async for output in llm.encode(TokensPrompt(prompt_token_ids=list(token_ids)), params,
                                           f"{request.request_id}-{index}"):
                last = output
            assert last is not None and last.finished
            return last.outputs.data.tolist()

        try:
            embeddings = await asyncio.gather(*(one(i, p) for i, p in enumerate(request.prompts)))
        except CLIENT_ERRORS as e:
            raise InvalidRequestError(str(e)) from e
        except SERVER_ERRORS as e:
            raise self._server_error(request.request_id, e) from e
        return EmbedReply(embeddings=list(embeddings), prompt_tokens=sum(map(len, request.prompts)))

    async def kv_events(self) -> AsyncIterator[list[KvEvent]]:
        async for _rank, events in self.rank_kv_events():
            yield events

    async def rank_kv_events(self) -> AsyncIterator[tuple[int, list[KvEvent]]]:
        if not self._events_enabled:
            return
        async with contextlib.aclosing(self._subscriber.rank_events()) as batches:
            async for rank_events in batches:
                yield rank_events

    def rank_loads(self) -> list[EngineLoad]:
        """Each data-parallel rank's load from its own engine core's scheduler stats."""
        ranks = self._info.data_parallel_size if self._info else 1
        if ranks == 1:
            return [self.load()]
        return [self._load_from(self._stats.latest_by_rank.get(rank)) for rank in range(ranks)]

    def load(self) -> EngineLoad:
        """From the scheduler stats the engine core sends each step, cross-checked with the requests this
        process still tracks: the core sends no stats when it goes idle (e.g. after an abort), so the
        last stats can claim work that has ended."""
        return self._load_from(self._stats.latest)

    def _load_from(self, stats: SchedulerStats | None) -> EngineLoad:
        total = self._info.total_kv_blocks if self._info else 0
        unfinished = unfinished_requests(self._llm) if self._llm is not None else 0
        if stats is None or unfinished == 0:
            return EngineLoad(active_blocks=0, total_blocks=total, running_requests=0, waiting_requests=0)
        running = min(stats.num_running_reqs, unfinished)
        waiting = min(stats.num_waiting_reqs + stats.num_skipped_waiting_reqs, unfinished - running)
        return EngineLoad(active_blocks=round(stats.kv_cache_usage * total), total_blocks=total,
                          running_requests=running, waiting_requests=waiting)

    def transfer_totals(self) -> TransferTotals:
        stats = self._stats
        return TransferTotals(bytes=stats.transfer_bytes, seconds=stats.transfer_seconds,
                              transfers=stats.transfers)

    def prometheus_registry(self) -> Any:
        """Where vLLM's PrometheusStatLogger put its `vllm:` metrics: AsyncLLM runs it in this process
        (it is added beside our stat logger), on prometheus_client's default registry, or on a
        multiprocess one when PROMETHEUS_MULTIPROC_DIR is set. The helper was read in 0.32's source; a
        release without it keeps its metrics on the default registry, the side port's fallback."""
        try:
            from vllm.v1.metrics.prometheus import get_prometheus_registry
        except ImportError:
            return None
        return get_prometheus_registry()

    async def shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        self._subscriber.close()
        llm = self._llm
        if llm is None and self._building is not None:
            # Shut down during start-up: let the build finish, then stop what it started.
            try:
                llm = await self._building
            except Exception:
                llm = None
        self._llm = None
        if llm is not None:
            # Stop AsyncLLM's output handler first: shutdown() runs in a thread (it blocks for seconds)
            # while this loop keeps running, and a handler still reading from the engine core it stops
            # would log an EngineDeadError traceback at every clean shutdown. The shell has drained the
            # requests by now, so the handler has nothing left to deliver.
            handler = getattr(llm, "output_handler", None)
            if handler is not None:
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)
            await asyncio.to_thread(llm.shutdown)
            logger.info("vLLM engine stopped")


def queue_and_prefill(output) -> tuple[float | None, float | None]:
    """Seconds the request waited in the engine core's queue and then took to its first token, from vLLM's
    RequestStateStats (engine-core monotonic timestamps; present unless stats logging is off)."""
    stats = getattr(output, "metrics", None)
    queued = getattr(stats, "queued_ts", 0.0) or 0.0
    scheduled = getattr(stats, "scheduled_ts", 0.0) or 0.0
    first_token = getattr(stats, "first_token_ts", 0.0) or 0.0
    if not scheduled:
        return None, None
    queue = max(0.0, scheduled - queued) if queued else None
    prefill = max(0.0, first_token - scheduled) if first_token else None
    return queue, prefill
