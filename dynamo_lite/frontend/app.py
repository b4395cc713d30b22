"""The OpenAI-compatible HTTP app: create_app(deps) -> FastAPI.

All state lives in the objects built here from `deps` (no module-level state), so tests can build
an app around MemoryDiscovery and loopback workers, and main() around etcd.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import msgspec
import pydantic
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.frontend import errors, responses
from dynamo_lite.frontend.admission import Admission, AdmissionSettings, Ticket, is_busy
from dynamo_lite.frontend.anthropic_api import MessagesService
from dynamo_lite.frontend.attempt import POOL_DECODE, POOL_PREFILL, Dispatcher
from dynamo_lite.frontend.config import FrontendConfig
from dynamo_lite.frontend.disconnect import ClientDisconnected, unless_disconnected
from dynamo_lite.frontend.metrics import CONTENT_TYPE, UNKNOWN_MODEL, FrontendMetrics
from dynamo_lite.frontend.middleware import install_middleware, request_id_of
from dynamo_lite.frontend.models import ModelRegistry
from dynamo_lite.frontend.openapi import build_openapi
from dynamo_lite.frontend.choice_answers import ChoiceAnswers, is_plain
from dynamo_lite.frontend.pipeline import ChoiceDelta, Generation, PipelineDeps
from dynamo_lite.frontend.prefill_policy import DisaggSettings, PrefillPolicy
from dynamo_lite.frontend.preprocess import ChatParsers, plan_chat, plan_completion
from dynamo_lite.frontend.responses_api import ResponsesService
from dynamo_lite.frontend.stages import STAGE_HEADER
from dynamo_lite.frontend.schemas import ChatCompletionRequest, CompletionRequest
from dynamo_lite.frontend.embeddings_api import EmbeddingsService
from dynamo_lite.frontend.tokenize_api import TokenizeService
from dynamo_lite.protocol.errors import DynamoLiteError, InvalidRequestError, OverloadedError
from dynamo_lite.protocol.messages import json_encoder
from dynamo_lite.router.base import Router
from dynamo_lite.transport.client import RequestClient

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # status recorded for a client that hung up (nginx's convention)



@dataclass
class FrontendDeps:
    """What the app needs; main() builds these from etcd, tests from in-memory parts."""

    watcher: InstanceWatcher  # started by the caller
    client: RequestClient
    router: Router
    registry: CollectorRegistry
    config: FrontendConfig = field(default_factory=FrontendConfig)


def _json(body, status: int = 200) -> Response:
    return Response(json_encoder.encode(body), status_code=status, media_type="application/json")


class OpenAIService:
    """The request handlers, holding the per-app state."""

    def __init__(self, deps: FrontendDeps):
        self.deps = deps
        self.metrics = FrontendMetrics(deps.registry)
        self.models = ModelRegistry(deps.watcher, deps.client, deps.config.tokenizer_timeout)
        config = deps.config
        self.dispatcher = Dispatcher(deps.watcher, deps.client, deps.router, self.metrics,
                                     config.request_timeout, config.heartbeat_timeout)
        self.prefill = PrefillPolicy(
            DisaggSettings(enabled=config.disaggregation, min_prefill_tokens=config.disagg_min_prefill_tokens,
                           max_prefill_queue=config.max_prefill_queue, enforce=config.enforce_disagg),
            self.dispatcher, self.metrics)
        self.pipeline = PipelineDeps(dispatcher=self.dispatcher, prefill=self.prefill, metrics=self.metrics)
        admission = AdmissionSettings(max_concurrency=config.max_concurrency, busy_kv_usage=config.busy_kv_usage,
                                      busy_waiting_requests=config.busy_waiting_requests,
                                      queue_timeout=config.queue_timeout, max_queued=config.max_queued_requests)
        self.admission = Admission(admission, self._workers_busy, self.metrics)
        if admission.checks_busy and not (config.router_mode == "kv" and config.kv_events):
            logger.warning("--busy-kv-usage / --busy-waiting-requests read the workers' load reports, which only "
                           "the kv router with KV events follows (--router-mode kv): no worker will count as busy")
        self.started = int(time.time())
        self.parsers = ChatParsers(tool_call=config.tool_call_parser, reasoning=config.reasoning_parser)
        # The one path by which the router hears of workers leaving (a KvRoutingService follows the
        # watcher from its start already; following again changes nothing).
        deps.router.follow(deps.watcher)

    def _workers_busy(self, model: str) -> bool:
        """Every backend worker of `model` is over a busy threshold (none registered: not busy; the
        pipeline answers that 503 itself)."""
        workers = self.dispatcher.workers(model, POOL_DECODE)
        settings, router = self.admission.settings, self.deps.router
        return bool(workers) and all(is_busy(router.load_report(r.instance_id), settings) for r in workers)

    # ------------------------------------------------------------------ generation endpoints

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, ChatCompletionRequest, "chat_completions", chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, CompletionRequest, "completions", chat=False)

    async def chat_from_body(self, http_request: Request, data: dict, endpoint: str,
                             usage_first: bool = False) -> Response:
        """A chat completion from a request body another API was translated into (/v1/responses,
        /v1/messages): the answer is the chat endpoint's, JSON or server-sent events, counted under
        `endpoint`. usage_first: a stream's first chunk carries the prompt's usage (what vLLM's
        continuous usage stats put there; /v1/messages reports it in message_start)."""
        return await self._generate(http_request, ChatCompletionRequest, endpoint, chat=True, data=data,
                                    usage_first=usage_first)

    async def _generate(self, http_request: Request, schema: type[pydantic.BaseModel], endpoint: str,
                        chat: bool, data: dict | None = None, usage_first: bool = False) -> Response:
        arrival = time.monotonic()
        model = UNKNOWN_MODEL
        try:
            if data is None:
                body = schema.model_validate_json(await http_request.body())
            else:
                body = schema.model_validate(data)
            served = await self.models.get(body.model)
            model = served.name
            request_id = request_id_of(http_request)
            parsed = time.monotonic()
            plan = await (plan_chat(served, body, request_id, self.parsers) if chat
                          else plan_completion(served, body, request_id))
            self.dispatcher.stages.begin(plan.request_id, arrival, parsed, time.monotonic())
            ticket = await unless_disconnected(http_request, self.admission.admit(model))
            generation = Generation(self.pipeline, plan, arrival)
            if body.stream:
                # The stream releases the ticket when it ends (or fails to start).
                return await self._stream(http_request, generation, endpoint, chat, body.include_usage,
                                          arrival, usage_first, ticket)
            try:
                return await self._complete(http_request, generation, endpoint, chat, arrival)
            finally:
                ticket.release()
        except ClientDisconnected:
            response = Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; counted as 499
        except pydantic.ValidationError as e:
            response = errors.pydantic_error_response(e)
        except DynamoLiteError as e:
            # A refusal under overload is counted (rejected_requests), not logged: a flood would flood the log.
            if e.status >= 500 and not isinstance(e, OverloadedError):
                logger.warning("%s request for %s failed: %s", endpoint, model, e.message)
            response = errors.dynamo_error_response(e)
        self._count(model, endpoint, response.status_code, arrival)
        return response

    def _count(self, model: str, endpoint: str, status: int, arrival: float) -> None:
        self.metrics.requests.labels(model, endpoint, str(status)).inc()
        self.metrics.request_duration.labels(model, endpoint).observe(time.monotonic() - arrival)

    def _count_tokens(self, generation: Generation) -> None:
        model = generation.plan.model.name
        self.dispatcher.stages.finish(generation.plan.request_id, model)
        self.metrics.input_tokens.labels(model).inc(generation.prompt_tokens)
        self.metrics.output_tokens.labels(model).inc(generation.completion_tokens)
        if generation.engine_reported_usage:
            self.metrics.cached_tokens.labels(model).inc(generation.cached_tokens)
            self.deps.router.record_usage(model, generation.prompt_tokens, generation.cached_tokens)

    async def _complete(self, http_request: Request, generation: Generation, endpoint: str, chat: bool,
                        arrival: float) -> Response:
        model = generation.plan.model.name
        inflight = self.metrics.inflight.labels(model)
        inflight.inc()
        plain = is_plain(generation)
        answers = None if plain else ChoiceAnswers(generation, chat)

        timeline = self.dispatcher.stages.get(generation.plan.request_id)

        async def collect() -> list[str]:
            async with contextlib.aclosing(generation.deltas()) as deltas:
                if answers is None:
                    parts = []
                    async for delta in deltas:
                        if not parts and timeline is not None:
                            timeline.mark_first_delta()
                        parts.append(delta.text)
                    return parts
                async for delta in deltas:
                    if timeline is not None:
                        timeline.mark_first_delta()
                    answers.collect(delta)
                return []

        try:
            parts = await unless_disconnected(http_request, collect())
        finally:
            inflight.dec()
            self._count_tokens(generation)
        usage = responses.usage(generation.prompt_tokens, generation.completion_tokens, generation.cached_tokens)
        plan = generation.plan
        name = plan.model.requested_name
        if answers is not None:
            body = answers.body(usage)
        elif chat:
            choice = responses.chat_choice(0, "".join(parts), generation.finish_reason,
                                           stop_reason=generation.stop_reason)
            body = responses.chat_completion(plan.request_id, name, [choice], usage)
        else:
            choice = responses.text_choice(0, "".join(parts), generation.finish_reason,
                                           stop_reason=generation.stop_reason)
            body = responses.text_completion(plan.request_id, name, [choice], usage)
        self._count(model, endpoint, 200, arrival)
        headers = None
        if timeline is not None and STAGE_HEADER in http_request.headers:
            headers = {STAGE_HEADER: timeline.header()}
        return Response(body, media_type="application/json", headers=headers)

    async def _stream(self, http_request: Request, generation: Generation, endpoint: str, chat: bool,
                      include_usage: bool, arrival: float, usage_first: bool, ticket: Ticket) -> Response:
        """SSE. The first delta is awaited before answering, so a request that cannot start (no
        worker, every worker failing) still gets a proper status code instead of a broken stream."""
        model = generation.plan.model.name
        deltas = generation.deltas()
        inflight = self.metrics.inflight.labels(model)
        inflight.inc()
        timeline = self.dispatcher.stages.get(generation.plan.request_id)
        try:
            first: ChoiceDelta | None = await unless_disconnected(http_request, anext(deltas))
        except StopAsyncIteration:
            first = None
        except BaseException:
            inflight.dec()
            ticket.release()
            await deltas.aclose()
            self._count_tokens(generation)
            raise
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if timeline is not None:
            timeline.mark_first_delta()
            if STAGE_HEADER in http_request.headers:
                headers[STAGE_HEADER] = timeline.header()
        encoder = responses.ChunkEncoder(generation.plan.request_id, generation.plan.model.requested_name, chat,
                                         include_usage)
        closed = False

        async def close(status: int) -> None:
            """Close the worker stream (aborting the request there) and count the request, once."""
            nonlocal closed
            if closed:
                return
            closed = True
            # On a client disconnect this runs inside a cancelled scope: shield it so the abort
            # cannot be interrupted.
            with anyio.CancelScope(shield=True):
                await deltas.aclose()
            inflight.dec()
            ticket.release()
            self._count_tokens(generation)
            self._count(model, endpoint, status, arrival)

        sse = self._sse(generation, deltas, first, encoder, close, usage_first)
        return _ClosingStreamingResponse(sse, close, media_type="text/event-stream", headers=headers)

    async def _sse(self, generation: Generation, deltas: AsyncIterator[ChoiceDelta],
                   first: ChoiceDelta | None, encoder: responses.ChunkEncoder, close,
                   usage_first: bool = False) -> AsyncIterator[bytes]:
        status = CLIENT_CLOSED_REQUEST  # unless the stream completes
        try:
            if encoder.chat:
                # As vLLM's continuous usage stats have it on the first chunk: the prompt, nothing cached yet.
                prompt = generation.prompt_tokens
                first_usage = ({"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
                               if usage_first else None)
                for index in range(generation.plan.sampling.n):
                    yield encoder.role(index, first_usage if index == 0 else None)
            if first is not None:
                if is_plain(generation):
                    # The common case: one choice of plain text, each chunk spliced into pre-encoded bytes.
                    last = first
                    if first.text:
                        yield encoder.text(first.text)
                    async for delta in deltas:
                        if delta.text:
                            yield encoder.text(delta.text)
                        last = delta
                    yield encoder.finish(last.finish_reason, 0, last.stop_reason)
                else:
                    answers = ChoiceAnswers(generation, encoder.chat)
                    for chunk in answers.chunks(first, encoder):
                        yield chunk
                    async for delta in deltas:
                        for chunk in answers.chunks(delta, encoder):
                            yield chunk
            if encoder.include_usage:
                yield encoder.usage(responses.usage(generation.prompt_tokens, generation.completion_tokens,
                                                    generation.cached_tokens))
            yield responses.DONE
            status = 200
        except DynamoLiteError as e:
            # Headers are out: report the failure in-band, as OpenAI-compatible servers do.
            logger.warning("stream %s failed: %s", generation.plan.request_id, e.message)
            status = e.status
            yield encoder.error(e.status, e.message, e.error_type)
            yield responses.DONE
        finally:
            await close(status)

    # ------------------------------------------------------------------ other endpoints

    async def list_models(self, request: Request) -> Response:
        data = [{"id": name, "object": "model", "created": self.started, "owned_by": "dynamo_lite"}
                for name in self.deps.watcher.models()]
        return _json({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        records = self.deps.watcher.instances()
        models = self.deps.watcher.models()
        body = {"status": "healthy" if models else "unhealthy", "models": models,
                "instances": msgspec.to_builtins(records)}
        if not models:
            body["message"] = "no worker is serving a model yet"
        return _json(body, 200 if models else 503)

    async def live(self, request: Request) -> Response:
        return _json({"status": "live"})

    async def debug_route(self, request: Request) -> Response:
        """What the router would weigh for a prompt ({"model", "messages" | "prompt"}), per worker,
        and the worker it would choose. Nothing is dispatched and no load is recorded."""
        router = self.deps.router
        if not router.knows_cache_overlap:
            return self._nothing_to_explain()
        try:
            try:
                data = msgspec.json.decode(await request.body())
            except msgspec.DecodeError as e:
                raise InvalidRequestError(f"the body is not valid JSON: {e}") from e
            if not isinstance(data, dict) or ("messages" in data) == ("prompt" in data):
                raise InvalidRequestError('the body needs "model" and one of "messages" or "prompt"')
            chat = "messages" in data
            body = (ChatCompletionRequest if chat else CompletionRequest).model_validate(data)
            served = await self.models.get(body.model)
            plan = await (plan_chat(served, body, parsers=self.parsers) if chat else plan_completion(served, body))
            pools = {pool: self.dispatcher.workers(served.name, pool) for pool in (POOL_DECODE, POOL_PREFILL)}
            explanation = router.explain(served.name, plan.prompt_ids, [r.instance_id for r in pools[POOL_DECODE]])
            if explanation is None:
                return self._nothing_to_explain()
            if pools[POOL_PREFILL]:
                # Disaggregated serving: how the same router would pick among the prefill workers.
                explanation["prefill"] = router.explain(served.name, plan.prompt_ids,
                                                        [r.instance_id for r in pools[POOL_PREFILL]])
        except pydantic.ValidationError as e:
            return errors.pydantic_error_response(e)
        except DynamoLiteError as e:
            return errors.dynamo_error_response(e)
        addresses = {r.instance_id: r.address for r in self.deps.watcher.instances(served.name)}
        for row in [*explanation["workers"], *(explanation.get("prefill") or {}).get("workers", [])]:
            row.setdefault("worker", f"{row['worker_id']:x}")  # the kv router labels DP ranks "{id}-dp{rank}"
            row["address"] = addresses.get(row["worker_id"])
        return _json({"model": served.name, "prompt_tokens": len(plan.prompt_ids), **explanation})

    def _nothing_to_explain(self) -> Response:
        return errors.error_response(
            400, f"/debug/route explains the kv router, but this frontend routes with --router-mode "
                 f"{self.deps.config.router_mode} (start it with --router-mode kv)", "invalid_request_error")

    async def prometheus(self, request: Request) -> Response:
        counts: dict[str, int] = {}
        for record in self.deps.watcher.instances():
            counts[record.model] = counts.get(record.model, 0) + 1
        self.metrics.set_workers(counts)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


def create_app(deps: FrontendDeps) -> FastAPI:
    """The HTTP app. The caller owns deps' lifecycles (watcher started, client closed at the end)."""
    service = OpenAIService(deps)
    app = FastAPI(title="dynamo_lite", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    # Plain Starlette routes: handlers read the body themselves (one pydantic pass, our own errors),
    # which skips FastAPI's dependency machinery on the hot path.
    app.add_route("/v1/chat/completions", service.chat_completions, methods=["POST"])
    app.add_route("/v1/completions", service.completions, methods=["POST"])
    app.add_route("/v1/models", service.list_models, methods=["GET"])
    app.add_route("/v1/responses", ResponsesService(service).create, methods=["POST"])
    app.add_route("/v1/messages", MessagesService(service).create, methods=["POST"])
    app.add_route("/health", service.health, methods=["GET"])
    app.add_route("/live", service.live, methods=["GET"])
    app.add_route("/metrics", service.prometheus, methods=["GET"])
    app.add_route("/debug/route", service.debug_route, methods=["POST"])
    tokenization = TokenizeService(deps.watcher, service.models)
    app.add_route("/tokenize", tokenization.tokenize, methods=["POST"])
    app.add_route("/detokenize", tokenization.detokenize, methods=["POST"])
    app.add_route("/version", tokenization.version, methods=["GET"])
    embeddings = EmbeddingsService(service.dispatcher, service.models, service.metrics, service.admission)
    app.add_route("/v1/embeddings", embeddings.embeddings, methods=["POST"])
    document = json_encoder.encode(build_openapi())  # built once: it only depends on the schemas
    app.add_route("/openapi.json", lambda request: Response(document, media_type="application/json"),
                  methods=["GET"])
    install_middleware(app, deps.config)
    app.add_exception_handler(DynamoLiteError, errors.handle_dynamo_error)
    app.add_exception_handler(RequestValidationError, errors.handle_request_validation)
    app.add_exception_handler(HTTPException, errors.handle_http_exception)
    app.add_exception_handler(Exception, errors.handle_unexpected)
    return app


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always runs `on_close(499)` when it ends.

    A client that leaves while the first token is awaited is caught earlier (`unless_disconnected`).
    One that leaves after that but before the body generator first runs makes Starlette cancel the
    send loop, and the generator's own `finally` never runs: this is what still aborts the worker
    request and keeps the in-flight gauge right. `on_close` is idempotent.
    """

    def __init__(self, content, on_close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close(CLIENT_CLOSED_REQUEST)
