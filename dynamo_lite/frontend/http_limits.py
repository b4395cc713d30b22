"""Limits on what one HTTP request may cost the frontend before any handler runs: header size, body
size, and the time a client may take to send its headers and its body.

- request line and headers not received whole --header-read-timeout seconds after the connection
  opened (or, on a kept-alive connection, after the request's first byte): 408 and the connection
  closed; closed without a word if the client sent nothing at all. uvicorn has no such timeout (its
  keep-alive timer stops at the first byte), so a client trickling its headers ("slowloris") would
  hold a connection forever; this is `http_protocol`, uvicorn's own httptools protocol plus a timer;
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
import http
import logging
import time

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dynamo_lite.frontend import errors
from dynamo_lite.frontend.anthropic_api import ANTHROPIC_PATH, anthropic_error
from dynamo_lite.protocol.errors import (
    DynamoLiteError,
    RequestHeadersTooLargeError,
    RequestTimeoutError,
    RequestTooLargeError,
)

logger = logging.getLogger(__name__)


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


class _HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's line and headers (the module doc).
    Its own keep-alive timer still closes connections idle between requests."""

    header_read_timeout = 0.0  # set by http_protocol()
    _header_timer: asyncio.TimerHandle | None = None
    _request_begun = False  # a byte of the request whose headers are awaited has arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_begun = True
        if self._header_timer is None:  # a later request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._request_begun = False
        super().on_headers_complete()

    def _arm(self) -> None:
        if self.header_read_timeout > 0:
            self._header_timer = self.loop.call_later(self.header_read_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        if self._request_begun:
            logger.info("%s: request headers not received within %gs (--header-read-timeout): 408, closed",
                        peer, self.header_read_timeout)
            error = RequestTimeoutError(f"the request headers did not arrive within "
                                        f"{self.header_read_timeout:g}s (--header-read-timeout)",
                                        code="request_timeout")
            response = errors.dynamo_error_response(error)
            status = http.HTTPStatus(response.status_code)
            head = [f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()]
            head += [name + b": " + value + b"\r\n" for name, value in response.raw_headers]
            self.transport.write(b"".join(head) + b"connection: close\r\n\r\n" + response.body)
        else:
            logger.debug("%s sent nothing within %gs (--header-read-timeout): closed", peer,
                         self.header_read_timeout)
        self.transport.close()


def http_protocol(header_read_timeout: float) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn.Config(http=...): httptools with --header-read-timeout (0 = off)."""
    return type("HeaderTimeoutProtocol", (_HeaderTimeoutProtocol,),
                {"header_read_timeout": header_read_timeout})
