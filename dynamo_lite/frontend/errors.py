"""Errors -> OpenAI error bodies: {"error": {"message", "type", "param", "code"}}.

The frontend is the only place that renders errors for clients. Bad input is always a 4xx with a
message that names the offending field; nothing a client sends may turn into a 500.
"""

from __future__ import annotations

import logging

import pydantic
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from dynamo_lite.protocol.errors import DynamoLiteError
from dynamo_lite.protocol.messages import json_encoder

logger = logging.getLogger(__name__)

_STATUS_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                 413: "invalid_request_error", 503: "service_unavailable"}


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(status: int, message: str, error_type: str, param: str | None = None,
                   code: str | None = None) -> Response:
    return Response(json_encoder.encode(error_body(message, error_type, param, code)), status_code=status,
                    media_type="application/json")


def dynamo_error_response(error: DynamoLiteError) -> Response:
    response = error_response(error.status, error.message, error.error_type, error.param, error.code)
    retry_after = getattr(error, "retry_after", None)  # an overloaded frontend says when to come back
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "tuple", "set"}


def _is_union_tag(item: object) -> bool:
    """pydantic puts the union member tried into the location ('str', 'list[int]', 'TextPart',
    'constrained-str'); our field names are lower snake_case, so these are easy to tell apart."""
    if not isinstance(item, str):
        return False
    return item in _TYPE_NAMES or "[" in item or "-" in item or item[:1].isupper()


def _strip_tags(loc) -> tuple:
    return tuple(item for item in loc if not _is_union_tag(item))


def _location(loc: tuple) -> str:
    """pydantic's error location ('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    parts: list[str] = []
    for item in loc:
        if item == "body" and not parts:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif parts:
            parts.append(f".{item}")
        else:
            parts.append(str(item))
    return "".join(parts)


def validation_error_response(errors: list[dict]) -> Response:
    """A 400 naming the first invalid field, like OpenAI does."""
    if not errors:
        return error_response(400, "invalid request body", "invalid_request_error")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON body: {first.get('msg', '')}", "invalid_request_error")
    # Each member of a union reports an error; the field path without the members' type tags is the
    # useful one, and the member that got furthest (deepest location, not a mere type mismatch)
    # explains the problem best: stop=[""] is "too short", not "not a string".
    field = _location(_strip_tags(first.get("loc", ())))
    same_field = [e for e in errors if _location(_strip_tags(e.get("loc", ()))).startswith(field)]
    first = max(same_field, key=lambda e: (len(e.get("loc", ())), not e.get("type", "").endswith("_type")))
    field = _location(_strip_tags(first.get("loc", ())))
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        text = f"'{field}' is a required property"
    elif field:
        text = f"invalid value for '{field}': {message}"
    else:
        text = f"invalid request body: {message}"
    return error_response(400, text, "invalid_request_error", param=field or None)


def pydantic_error_response(error: pydantic.ValidationError) -> Response:
    return validation_error_response(error.errors(include_url=False, include_context=False))


async def handle_dynamo_error(request: Request, error: DynamoLiteError) -> Response:
    if error.status >= 500:
        logger.warning("%s %s failed: %s", request.method, request.url.path, error.message)
    return dynamo_error_response(error)


async def handle_request_validation(request: Request, error: RequestValidationError) -> Response:
    return validation_error_response(list(error.errors()))


async def handle_http_exception(request: Request, error: HTTPException) -> Response:
    error_type = _STATUS_TYPES.get(error.status_code, "invalid_request_error")
    return error_response(error.status_code, str(error.detail), error_type)


async def handle_unexpected(request: Request, error: Exception) -> Response:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(error).__name__}", "internal_error")
