"""The frontend's HTTP middleware, as vLLM's server has it: API keys, request ids, CORS (and the
size and time limits of frontend/http_limits.py).

Pure ASGI classes (no BaseHTTPMiddleware): they look at the headers and pass the request on, adding
nothing to the streaming path. Outermost first: the request id (so every answer, a 401 included,
carries it), the size and time limits, CORS (so a browser can read a 401 too), then the API key check.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dynamo_lite.frontend import errors
from dynamo_lite.frontend.anthropic_api import ANTHROPIC_PATH, anthropic_error
from dynamo_lite.frontend.config import FrontendConfig
from dynamo_lite.frontend.http_limits import HttpLimitsMiddleware

REQUEST_ID_HEADER = b"x-request-id"
# vLLM's server checks keys on these paths only: /health, /live, /metrics, /tokenize, /detokenize,
# /version and /debug/route stay open (probes and scrapers need no key; nothing there generates).
GUARDED_PREFIXES = ("/v1",)
# Anthropic's SDK sends its key as `x-api-key`, not as a bearer token: both are taken on ANTHROPIC_PATH.


@dataclass(frozen=True)
class RequestId:
    value: str
    from_client: bool  # the client's X-Request-Id: not necessarily unique


def request_id_of(request: Request) -> RequestId:
    """The request's id: the client's X-Request-Id, else one made for it (set by RequestIdMiddleware)."""
    state = request.scope.get("state", {})
    if not state.get("request_id"):  # an app built without the middleware (tests)
        return RequestId(uuid.uuid4().hex, from_client=False)
    return RequestId(state["request_id"], from_client=state["request_id_from_client"])


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class RequestIdMiddleware:
    """Takes X-Request-Id from the request (or makes a uuid4 hex one), keeps it in the request's state
    for the handlers (the id of the generation, on the worker and in vLLM) and echoes it in the response
    headers, streamed responses included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, REQUEST_ID_HEADER)
        raw = given or uuid.uuid4().hex.encode()
        state = scope.setdefault("state", {})
        state["request_id"] = raw.decode("latin-1")
        state["request_id_from_client"] = given is not None

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, raw)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class ApiKeyMiddleware:
    """Requests under GUARDED_PREFIXES need 'Authorization: Bearer KEY' with one of the keys, else a 401
    in OpenAI's error shape. Keys are compared as SHA-256 digests in constant time (as vLLM does), so
    neither a key's length nor its prefix leaks through timing. CORS preflights (OPTIONS) pass: browsers
    send them without credentials."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    def _matches(self, token: bytes) -> bool:
        digest = hashlib.sha256(token).digest()
        found = False
        for known in self._digests:
            found |= secrets.compare_digest(digest, known)  # no early exit: every key is compared
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] == "OPTIONS"
                or not scope["path"].startswith(GUARDED_PREFIXES)):
            await self.app(scope, receive, send)
            return
        header = _header(scope, b"authorization")
        scheme, _, token = (header or b"").partition(b" ")
        if header is not None and scheme.lower() == b"bearer" and self._matches(token.strip()):
            await self.app(scope, receive, send)
            return
        if scope["path"] == ANTHROPIC_PATH:
            await self._anthropic(scope, receive, send, header)
            return
        if header is None:
            message, code = ("You didn't provide an API key. Send it in an Authorization header using Bearer "
                             "auth (Authorization: Bearer YOUR_KEY).", None)
        else:
            message, code = "Incorrect API key provided.", "invalid_api_key"
        response = errors.error_response(401, message, "invalid_request_error", code=code)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


    async def _anthropic(self, scope: Scope, receive: Receive, send: Send,
                         authorization: bytes | None) -> None:
        key = _header(scope, b"x-api-key")
        if key is not None and self._matches(key.strip()):
            await self.app(scope, receive, send)
            return
        given = key is not None or authorization is not None
        message = "invalid x-api-key" if given else "x-api-key header is required"
        await anthropic_error(401, message)(scope, receive, send)


def install_middleware(app, config: FrontendConfig) -> None:
    """Add the middleware `config` asks for (Starlette runs the last one added first)."""
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, keys=config.api_key)
    if config.allowed_origins:
        # Without origins nothing is allowed cross-origin, with or without the middleware: leave it out.
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=list(config.allowed_methods),
                           allow_headers=list(config.allowed_headers),
                           allow_credentials=config.allow_credentials)
    # Inside the request id (a 413 carries it too), outside CORS and keys: nothing reads a body too large.
    app.add_middleware(HttpLimitsMiddleware, max_header_bytes=config.max_header_bytes,
                       max_body_bytes=config.max_body_bytes, body_read_timeout=config.body_read_timeout)
    app.add_middleware(RequestIdMiddleware)
