"""What the /v1/responses and /v1/messages adapters share: reading a request body, reading the chat
endpoint's answer (JSON or its SSE chunks) and putting a translated event stream in its place.

The translated stream replaces the chat response's body_iterator rather than wrapping it in a new
response: the chat response's own close hook (abort the worker request, count the request) then still
runs however the stream ends, a client leaving before the first byte included.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from dynamo_lite.protocol.errors import InvalidRequestError
from dynamo_lite.protocol.messages import json_encoder

CHAT_PREFIX = "chatcmpl-"


async def read_json_object(request: Request) -> dict:
    try:
        data = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as e:
        raise InvalidRequestError(f"malformed JSON body: {e}") from e
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return data


def id_suffix(chat_id: str) -> str:
    """The chat completion's id without its prefix: the adapters' ids carry the same request id."""
    return chat_id.removeprefix(CHAT_PREFIX)


def is_stream(response: Response) -> bool:
    return isinstance(response, StreamingResponse)


def json_of(response: Response) -> dict:
    return msgspec.json.decode(response.body)


async def chat_chunks(body: AsyncIterator[bytes | str]) -> AsyncIterator[dict]:
    """The chat stream's `data:` payloads, decoded; [DONE] ends it."""
    buffer = b""
    async for piece in body:
        buffer += piece.encode() if isinstance(piece, str) else piece
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                yield msgspec.json.decode(payload)


def sse_event(event_type: str, data: dict) -> bytes:
    """A named server-sent event, as OpenAI's Responses and Anthropic's Messages streams send them."""
    return b"event: " + event_type.encode() + b"\ndata: " + json_encoder.encode(data) + b"\n\n"


def replace_stream(response: StreamingResponse,
                   translate: Callable[[AsyncIterator[dict]], AsyncIterator[bytes]]) -> StreamingResponse:
    """Let `response` stream translate(chat chunks) instead of the chat chunks. The chat body is closed
    when the translation ends, so the worker request is aborted at once if the client left."""
    chat_body = response.body_iterator

    async def translated() -> AsyncIterator[bytes]:
        try:
            async for event in translate(chat_chunks(chat_body)):
                yield event
        finally:
            await chat_body.aclose()

    response.body_iterator = translated()
    return response
