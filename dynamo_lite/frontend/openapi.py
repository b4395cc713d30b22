"""The frontend's OpenAPI document (GET /openapi.json), built from the pydantic models the handlers
validate with, so the schema says what the server accepts (tests/integration/test_fuzz_api.py fuzzes the
server against it with schemathesis).

The handlers are plain Starlette routes (app.py says why), which FastAPI's own generator cannot see:
each route is listed here by hand, its body schema taken from the model that validates it. Responses
are described only as far as every one shares a shape: errors are OpenAI's error object (Anthropic's on
/v1/messages).
"""

from __future__ import annotations

from typing import Any

import pydantic
from pydantic.json_schema import models_json_schema

import dynamo_lite
from dynamo_lite.frontend.anthropic_api import MessagesRequest
from dynamo_lite.frontend.embeddings_api import EmbeddingRequest
from dynamo_lite.frontend.responses_api import ResponsesRequest
from dynamo_lite.frontend.schemas import ChatCompletionRequest, CompletionRequest
from dynamo_lite.frontend.tokenize_api import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)

REF = "#/components/schemas/{model}"

# path -> (model validating the body, or a schema; summary)
_POSTS: dict[str, tuple[Any, str]] = {
    "/v1/chat/completions": (ChatCompletionRequest, "Chat completion (JSON, or server-sent events)"),
    "/v1/completions": (CompletionRequest, "Text completion (JSON, or server-sent events)"),
    "/v1/responses": (ResponsesRequest, "OpenAI Responses API (text, function calls)"),
    "/v1/messages": (MessagesRequest, "Anthropic Messages API (text)"),
    "/v1/embeddings": (EmbeddingRequest, "Embeddings (workers started with --runner pooling)"),
    "/tokenize": ((TokenizeCompletionRequest, TokenizeChatRequest), "Tokenize a prompt or chat messages"),
    "/detokenize": (DetokenizeRequest, "Token ids to text"),
    "/debug/route": ({"type": "object", "properties": {"model": {"type": "string"},
                                                         "prompt": {"type": "string"},
                                                         "messages": {"type": "array"}}},
                     "What the kv router would weigh for a prompt"),
}
_GETS = {"/v1/models": "Served models", "/health": "Health: 200 with live workers, else 503",
         "/live": "Liveness", "/metrics": "Prometheus metrics", "/version": "Server version",
         "/openapi.json": "This document"}

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "integer", "null"]}}}}}


def _responses() -> dict:
    json_any = {"application/json": {"schema": {}}}
    return {"200": {"description": "The answer", "content": json_any},
            "default": {"description": "An error in OpenAI's shape",
                        "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}}}


def build_openapi() -> dict:
    models: list[type[pydantic.BaseModel]] = []
    for body, _ in _POSTS.values():
        if isinstance(body, tuple):
            models += body
        elif isinstance(body, type):
            models.append(body)
    refs, definitions = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas = {**definitions.get("$defs", {}), "Error": _ERROR}
    paths: dict[str, dict] = {}
    for path, (body, summary) in _POSTS.items():
        if isinstance(body, tuple):
            schema = {"anyOf": [refs[(m, "validation")] for m in body]}
        elif isinstance(body, type):
            schema = refs[(body, "validation")]
        else:
            schema = body
        paths[path] = {"post": {"summary": summary, "operationId": "post" + path.replace("/", "_"),
                                "requestBody": {"required": True,
                                                "content": {"application/json": {"schema": schema}}},
                                "responses": _responses()}}
    for path, summary in _GETS.items():
        paths[path] = {"get": {"summary": summary, "operationId": "get" + path.replace("/", "_"),
                               "responses": _responses()}}
    return {"openapi": "3.1.0", "info": {"title": "dynamo_lite", "version": dynamo_lite.__version__},
            "paths": paths, "components": {"schemas": schemas}}
