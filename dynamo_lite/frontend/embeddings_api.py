"""/v1/embeddings in OpenAI's shapes, served by workers started as pooling models (vLLM `--runner pooling`).

The frontend tokenizes the input (each string as /v1/completions encodes a prompt), sends all prompts of a
request to one worker as one EmbedRequest, and answers {"object": "list", "data": [...], "model", "usage"}.
Fields OpenAI defines and this server cannot honour, and unknown fields, are a 400 naming them.
"""

from __future__ import annotations

import base64
import logging
import struct
import time
import uuid
from typing import Annotated, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from dynamo_lite.frontend import errors
from dynamo_lite.frontend.admission import UNLIMITED, Admission
from dynamo_lite.frontend.attempt import POOL_DECODE, Dispatcher
from dynamo_lite.frontend.metrics import UNKNOWN_MODEL, FrontendMetrics
from dynamo_lite.frontend.middleware import request_id_of
from dynamo_lite.frontend.models import ModelRegistry, ServedModel
from dynamo_lite.protocol.errors import (DynamoLiteError, EngineError, InvalidRequestError,
                                         NoWorkerAvailableError, OverloadedError, WorkerFailedError,
                                         worker_error)
from dynamo_lite.protocol.messages import EmbedReply, EmbedRequest, ErrorFrame, json_encoder

logger = logging.getLogger(__name__)

ENDPOINT = "embeddings"  # the endpoint label of the frontend's request metrics

TokenId = Annotated[StrictInt, Field(ge=0)]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    # A string, a list of strings, one token-id list, or a list of token-id lists (OpenAI's four forms).
    input: StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: StrictStr | None = None  # accepted, as OpenAI does; not used


def prompts_of(model: ServedModel, value: str | list) -> list[list[int]]:
    """The request's inputs as token-id lists (strings encoded with the model's special tokens)."""
    if isinstance(value, str):
        items: list = [value]
    elif value and all(isinstance(v, int) for v in value):
        items = [value]
    else:
        items = list(value)
    if not items:
        raise InvalidRequestError("input is empty", param="input")
    vocab_size = model.tokenizer.vocab_size
    prompts = []
    for index, item in enumerate(items):
        ids = model.tokenizer.encode(item, True) if isinstance(item, str) else list(item)
        if not ids:
            raise InvalidRequestError(f"input[{index}] is empty", param="input")
        if len(ids) > model.card.context_length:
            raise InvalidRequestError(f"input[{index}] has {len(ids)} tokens, more than the model's context "
                                      f"length {model.card.context_length}", param="input")
        if max(ids) >= vocab_size:
            raise InvalidRequestError(f"input[{index}]: token id {max(ids)} is outside the vocabulary "
                                      f"(size {vocab_size})", param="input")
        prompts.append(ids)
    return prompts


def encode_embedding(values: list[float], encoding_format: str) -> list[float] | str:
    """OpenAI's base64 form: the float32 little-endian bytes of the vector (what numpy's frombuffer reads)."""
    if encoding_format == "float":
        return values
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


class EmbeddingsService:
    def __init__(self, dispatcher: Dispatcher, models: ModelRegistry, metrics: FrontendMetrics,
                 admission: Admission | None = None):
        self._dispatcher = dispatcher
        self._models = models
        self._metrics = metrics
        self._admission = admission

    async def embeddings(self, http_request: Request) -> Response:
        """Counted in the request metrics as chat and completions are: by model, endpoint and status."""
        arrival = time.monotonic()
        model = UNKNOWN_MODEL
        metrics = self._metrics
        try:
            body = EmbeddingRequest.model_validate_json(await http_request.body())
            served = await self._models.get(body.model)
            model = served.name
            if served.card.runner != "pooling":
                raise InvalidRequestError(f"the model {body.model} is a generating model: embeddings need a "
                                          "worker started with --runner pooling", param="model")
            prompts = prompts_of(served, body.input)
            request_id = "embd-" + request_id_of(http_request).value + "-" + uuid.uuid4().hex[:8]
            ticket = await self._admission.admit(model) if self._admission is not None else UNLIMITED
            inflight = metrics.inflight.labels(model)
            inflight.inc()
            try:
                reply = await self._embed(served, EmbedRequest(request_id=request_id, prompts=prompts,
                                                               dimensions=body.dimensions))
            finally:
                inflight.dec()
                ticket.release()
        except pydantic.ValidationError as e:
            response = errors.pydantic_error_response(e)
        except DynamoLiteError as e:
            if e.status >= 500 and not isinstance(e, OverloadedError):
                logger.warning("embeddings request for %s failed: %s", model, e.message)
            response = errors.dynamo_error_response(e)
        else:
            metrics.input_tokens.labels(model).inc(reply.prompt_tokens)
            data = [{"object": "embedding", "index": i,
                     "embedding": encode_embedding(values, body.encoding_format)}
                    for i, values in enumerate(reply.embeddings)]
            usage = {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}
            answer = {"object": "list", "data": data, "model": served.requested_name, "usage": usage}
            response = Response(json_encoder.encode(answer), media_type="application/json")
        metrics.requests.labels(model, ENDPOINT, str(response.status_code)).inc()
        metrics.request_duration.labels(model, ENDPOINT).observe(time.monotonic() - arrival)
        return response

    async def _embed(self, served: ServedModel, request: EmbedRequest) -> EmbedReply:
        workers = self._dispatcher.workers(served.name, POOL_DECODE)
        if not workers:
            raise NoWorkerAvailableError(f"no worker serves {served.name}")
        # The router picks by the first prompt's prefix and load; it tracks the request until the reply.
        with self._dispatcher.route(POOL_DECODE, served.name, request.request_id, request.prompts[0],
                                    workers) as attempt:
            stream = self._dispatcher.client.stream(attempt.worker.address, request)
            try:
                async for reply in stream:
                    if isinstance(reply, EmbedReply):
                        return reply
                    if isinstance(reply, ErrorFrame):
                        raise worker_error(reply.status, reply.message, worker=attempt.name,
                                           instance_id=attempt.worker.instance_id)
                    raise EngineError(f"{attempt.name} answered with an unexpected {type(reply).__name__}")
            finally:
                await stream.aclose()
            raise WorkerFailedError(f"{attempt.name} ended the stream without a reply",
                                    instance_id=attempt.worker.instance_id)
