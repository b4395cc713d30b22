"""Anthropic's /v1/messages as an adapter over the chat-completions path.

Text only: string or text-block content, a system prompt, sampling fields and stop sequences. Anything
else (tools, images, thinking, ...) is a 400 in Anthropic's error shape, as is every error here, so
Anthropic's SDK raises its own exception types. Streams carry the events vLLM's anthropic server sends
(message_start, content_block_start, content_block_delta, content_block_stop, message_delta,
message_stop); like vLLM, no `ping` is sent (clients ignore it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from dynamo_lite.frontend import errors
from dynamo_lite.frontend.chat_bridge import (id_suffix, is_stream, json_of, read_json_object, replace_stream,
                                              sse_event)
from dynamo_lite.frontend.schemas import INT32_MAX, MAX_STOP_STRINGS
from dynamo_lite.protocol.errors import DynamoLiteError
from dynamo_lite.protocol.messages import json_encoder

ENDPOINT = "messages"
ANTHROPIC_PATH = "/v1/messages"  # errors on this path are in Anthropic's shape, the middleware's too

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error", 529: "overloaded_error"}

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextBlock(_Strict):
    type: Literal["text"]
    text: StrictStr
    cache_control: dict[str, Any] | None = None  # a caching hint: nothing to do without it changing output


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: StrictStr | list[TextBlock]


class Metadata(_Strict):
    user_id: StrictStr | None = None


class MessagesRequest(_Strict):
    model: StrictStr
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(gt=0, le=INT32_MAX)]
    system: StrictStr | list[TextBlock] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0, le=INT32_MAX)] | None = None
    stop_sequences: Annotated[list[Annotated[StrictStr, Field(min_length=1)]],
                              Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: StrictBool = False
    metadata: Metadata | None = None  # user_id is for abuse tracking: it does not change the answer


def anthropic_error(status: int, message: str) -> Response:
    error_type = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    return Response(json_encoder.encode(body), status_code=status, media_type="application/json")


def _from_openai_error(response: Response) -> Response:
    """An OpenAI error answer (the chat path's, or errors.py's) in Anthropic's shape."""
    try:
        message = json_of(response)["error"]["message"]
    except (ValueError, KeyError, TypeError):  # not an OpenAI error body
        message = "request failed"
    translated = anthropic_error(response.status_code, message)
    if "retry-after" in response.headers:  # an overloaded frontend's hint (frontend/admission.py)
        translated.headers["Retry-After"] = response.headers["retry-after"]
    return translated


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


def to_chat_body(request: MessagesRequest) -> dict:
    messages = []
    if request.system is not None:
        messages.append({"role": "system", "content": _text(request.system)})
    messages += [{"role": m.role, "content": _text(m.content)} for m in request.messages]
    body: dict[str, Any] = {"model": request.model, "messages": messages,
                            "max_completion_tokens": request.max_tokens}
    for name in ("temperature", "top_p", "top_k"):
        if getattr(request, name) is not None:
            body[name] = getattr(request, name)
    if request.stop_sequences:
        body["stop"] = request.stop_sequences
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # message_delta carries the usage
    return body


def _usage(chat_usage: dict | None) -> dict:
    """Anthropic's input_tokens leave out the tokens read from the prefix cache (as vLLM computes it)."""
    if not chat_usage:
        return {"input_tokens": 0, "output_tokens": 0}
    usage = {"input_tokens": chat_usage["prompt_tokens"],
             "output_tokens": chat_usage.get("completion_tokens") or 0}
    details = chat_usage.get("prompt_tokens_details")
    if details and details.get("cached_tokens") is not None:
        usage["input_tokens"] = max(0, usage["input_tokens"] - details["cached_tokens"])
        usage["cache_read_input_tokens"] = details["cached_tokens"]
    return usage


def _stop_reason(finish_reason: str | None, stop_reason: int | str | None) -> tuple[str | None, str | None]:
    """-> (Anthropic's stop_reason, stop_sequence), as vLLM's server maps them: a matched stop string (the
    chat choice's stop_reason, a str) is "stop_sequence"; a stop token id or EOS is "end_turn"."""
    if finish_reason in ("stop", "tool_calls") and isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return (_STOP_REASONS.get(finish_reason) if finish_reason else None), None


def _complete(chat: dict) -> dict:
    choice = chat["choices"][0]
    stop_reason, stop_sequence = _stop_reason(choice.get("finish_reason"), choice.get("stop_reason"))
    return {"id": f"msg_{id_suffix(chat['id'])}", "type": "message", "role": "assistant",
            "model": chat["model"],
            "content": [{"type": "text", "text": choice["message"].get("content") or ""}],
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": _usage(chat.get("usage"))}


async def _translate(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    started = opened = False
    finish_reason = stop_reason = None
    async for chunk in chunks:
        if "error" in chunk:
            error = chunk["error"]
            status = error.get("code") if isinstance(error.get("code"), int) else 500
            yield sse_event("error", {"type": "error", "error": {
                "type": _ERROR_TYPES.get(status, "api_error"), "message": error.get("message")}})
            return
        if not started:
            # The first chunk (the role) carries the prompt's usage (chat_from_body's usage_first).
            started = True
            yield sse_event("message_start", {"type": "message_start", "message": {
                "id": f"msg_{id_suffix(chunk['id'])}", "type": "message", "role": "assistant", "content": [],
                "model": chunk["model"], "stop_reason": None, "stop_sequence": None,
                "usage": _usage(chunk.get("usage"))}})
        choices = chunk.get("choices") or []
        if not choices:  # the usage chunk, last before [DONE]
            if opened:
                opened = False
                yield sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
            reason, sequence = _stop_reason(finish_reason or "stop", stop_reason)
            yield sse_event("message_delta", {"type": "message_delta",
                                              "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                              "usage": _usage(chunk.get("usage"))})
            continue
        choice = choices[0]
        if choice.get("finish_reason") is not None:
            finish_reason, stop_reason = choice["finish_reason"], choice.get("stop_reason")
        text = (choice.get("delta") or {}).get("content")
        if not text:
            continue
        if not opened:
            opened = True
            yield sse_event("content_block_start", {"type": "content_block_start", "index": 0,
                                                    "content_block": {"type": "text", "text": ""}})
        yield sse_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": text}})
    if not started:
        return
    if opened:
        yield sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield sse_event("message_stop", {"type": "message_stop"})


class MessagesService:
    """POST /v1/messages."""

    def __init__(self, service):
        self.service = service  # the OpenAIService (chat_from_body)

    async def create(self, http_request: Request) -> Response:
        try:
            data = await read_json_object(http_request)
            for name in data:
                if name not in MessagesRequest.model_fields:
                    return anthropic_error(
                        400, f"'{name}' is not supported by this server (it would be ignored)")
            request = MessagesRequest.model_validate(data)
        except pydantic.ValidationError as e:
            return _from_openai_error(errors.pydantic_error_response(e))
        except DynamoLiteError as e:
            return anthropic_error(e.status, e.message)
        response = await self.service.chat_from_body(http_request, to_chat_body(request), ENDPOINT,
                                                     usage_first=True)
        if response.status_code != 200:
            return _from_openai_error(response)
        if is_stream(response):
            return replace_stream(response, _translate)
        return Response(json_encoder.encode(_complete(json_of(response))), media_type="application/json")
