"""Limits on what one HTTP request may cost the frontend before any handler runs: header size, body
size, and the time a client may take to send its body.

- headers larger than --max-header-bytes in all (names and values): 431, before the body is read;
- a body larger than --max-body-bytes: 413 at once when Content-Length says so, else as soon as the
  bytes received pass the limit (a chunked upload never makes the frontend buffer more than the limit);
- a body that has not arrived whole --body-read-timeout seconds after the request began (a client that
  stalls or trickles its upload, holding a connection and a buffer): 408.

Each answer is OpenAI's error JSON (Anthropic's on /v1/messages). Within a handler, the body limit and the timeout surface as errors
raised by `receive` (RequestTooLargeError, RequestTimeoutError), so every path that reads the body —
handlers catching DynamoLiteError themselves, or the app's exception handler — answers them alike.
Idle keep-alive connections are closed by uvicorn (its timeout_keep_alive, 5 s).
"""

from __future__ import annotations

import asyncio
import time

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dynamo_lite.frontend import errors
from dynamo_lite.frontend.anthropic_api import ANTHROPIC_PATH, anthropic_error
from dynamo_lite.protocol.errors import DynamoLiteError


class RequestTooLargeError(DynamoLiteError):
    status = 413
    error_type = "invalid_request_error"


class RequestHeadersTooLargeError(DynamoLiteError):
    status = 431
    error_type = "invalid_request_error"


class RequestTimeoutError(DynamoLiteError):
    status = 408
    error_type = "invalid_request_error"


def _too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"the request body is larger than this server accepts ({limit} bytes, "
                                "--max-body-bytes)", code="request_too_large")


def _error_response(scope: Scope, error: DynamoLiteError) -> Response:
    """The error in the shape of the API asked: Anthropic's on /v1/messages, OpenAI's elsewhere."""
    if scope["path"] == ANTHROPIC_PATH:
        return anthropic_error(error.status, error.message)
    return errors.dynamo_error_response(error)


class HttpLimitsMiddleware:
    """Enforces the module doc's limits; a limit of 0 is off."""

    def __init__(self, app: ASGIApp, max_header_bytes: int, max_body_bytes: int, body_read_timeout: float):
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout = body_read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if self.max_header_bytes and sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes:
            error = RequestHeadersTooLargeError(f"the request headers are larger than this server accepts "
                                                f"({self.max_header_bytes} bytes, --max-header-bytes)",
                                                code="request_header_fields_too_large")
            await _error_response(scope, error)(scope, receive, send)
            return
        limit = self.max_body_bytes
        if limit:
            for key, value in headers:
                if key == b"content-length":
                    if value.isdigit() and int(value) > limit:
                        await _error_response(scope, _too_large(limit))(scope, receive, send)
                        return
                    break
        await self.app(scope, self._limited(receive), send)

    def _limited(self, receive: Receive) -> Receive:
        limit, timeout = self.max_body_bytes, self.body_read_timeout
        deadline = time.monotonic() + timeout if timeout else None
        received = 0
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()  # after the body: the disconnect, awaited for as long as it takes
            if deadline is None:
                message = await receive()
            else:
                try:
                    async with asyncio.timeout(deadline - time.monotonic()):
                        message = await receive()
                except TimeoutError:
                    raise RequestTimeoutError(f"the request body did not arrive within {timeout:g}s "
                                              "(--body-read-timeout)", code="request_timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if limit and received > limit:
                    raise _too_large(limit)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        return limited_receive
