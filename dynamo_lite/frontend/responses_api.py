"""OpenAI's /v1/responses as an adapter over the chat-completions path.

The request is validated here (fields this server cannot honour are a 400 naming them: no stored
responses, no background runs, no built-in tools), translated into a chat body and run by
`OpenAIService.chat_from_body`; the chat answer is translated back into a Response object or, streamed,
into the Responses event sequence vLLM's server and OpenAI send (response.created ... response.completed,
each with its sequence_number).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from dynamo_lite.frontend import errors
from dynamo_lite.frontend.chat_bridge import (id_suffix, is_stream, json_of, read_json_object, replace_stream,
                                              sse_event)
from dynamo_lite.frontend.schemas import INT32_MAX
from dynamo_lite.protocol.errors import DynamoLiteError, InvalidRequestError
from dynamo_lite.protocol.messages import json_encoder

ENDPOINT = "responses"

# Chat fields the request turns into, by the Responses field they came from: a 400 from the chat path
# names the field the client sent.
_CHAT_TO_RESPONSES = {"messages": "input", "max_completion_tokens": "max_output_tokens",
                      "response_format": "text.format"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputText(_Strict):
    type: Literal["input_text", "output_text"]
    text: StrictStr
    annotations: list[Any] | None = None  # output_text parts of an earlier answer carry them


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: StrictStr | list[InputText]
    id: StrictStr | None = None  # an earlier answer's output item sent back as input
    status: StrictStr | None = None


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr
    id: StrictStr | None = None
    status: StrictStr | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr
    id: StrictStr | None = None
    status: StrictStr | None = None


class FunctionTool(_Strict):
    type: Literal["function"]
    name: Annotated[StrictStr, Field(min_length=1)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class NamedToolChoice(_Strict):
    type: Literal["function"]
    name: StrictStr


class TextFormat(_Strict):
    type: Literal["text", "json_schema", "json_object"]
    name: StrictStr | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    description: StrictStr | None = None
    strict: StrictBool | None = None

    @pydantic.model_validator(mode="after")
    def _named_schema(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs 'name' and 'schema' (as in OpenAI's API)")
        return self


class TextConfig(_Strict):
    format: TextFormat | None = None


class ResponsesRequest(_Strict):
    """The fields honoured. Any other (previous_response_id, background, include, reasoning, ...) is a
    400 naming it, as are store=true and tools that are not functions."""

    model: StrictStr
    input: StrictStr | Annotated[list[MessageItem | FunctionCallItem | FunctionCallOutputItem],
                                 Field(min_length=1)]
    instructions: StrictStr | None = None
    max_output_tokens: Annotated[StrictInt, Field(gt=0, le=INT32_MAX)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    text: TextConfig | None = None
    stream: StrictBool = False
    # Nothing is stored: store=true would promise a later GET /v1/responses/{id} that cannot work.
    store: Literal[False] | None = None
    truncation: Literal["disabled"] | None = None
    metadata: dict[str, StrictStr] | None = None
    user: StrictStr | None = None


def _refuse_unknown(data: dict) -> None:
    """A clear 400 for a known-but-unsupported field (pydantic's 'extra inputs' message says less)."""
    for name in data:
        if name not in ResponsesRequest.model_fields:
            raise InvalidRequestError(f"'{name}' is not supported by this server (it would be ignored)",
                                      param=name)
    tools = data.get("tools")
    # Only a list is looked into here; any other type gets pydantic's 400 when the request is parsed.
    for index, tool in enumerate(tools if isinstance(tools, list) else []):
        if isinstance(tool, dict) and tool.get("type") != "function":
            raise InvalidRequestError(f"tools of type '{tool.get('type')}' are not supported (function only)",
                                      param=f"tools[{index}].type")
    if data.get("store") is True:
        raise InvalidRequestError("store=true is not supported: this server keeps no responses",
                                  param="store")


def _chat_messages(request: ResponsesRequest) -> list[dict]:
    messages: list[dict] = []
    if request.instructions is not None:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
        return messages
    for item in request.input:
        if isinstance(item, MessageItem):
            content = item.content
            if not isinstance(content, str):
                content = "\n".join(part.text for part in content)
            # Chat templates know "system"; OpenAI's "developer" role is the same instruction slot.
            messages.append({"role": "system" if item.role == "developer" else item.role, "content": content})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)  # parallel calls of one turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return messages


def to_chat_body(request: ResponsesRequest) -> dict:
    body: dict[str, Any] = {"model": request.model, "messages": _chat_messages(request)}
    if request.max_output_tokens is not None:
        body["max_completion_tokens"] = request.max_output_tokens
    for name in ("temperature", "top_p", "user"):
        if getattr(request, name) is not None:
            body[name] = getattr(request, name)
    if request.tools:
        body["tools"] = [{"type": "function",
                          "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                         for tool in request.tools]
    if request.tool_choice is not None:
        choice = request.tool_choice
        body["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                      "function": {"name": choice.name}}
    fmt = request.text.format if request.text else None
    if fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description,
                  "strict": fmt.strict}
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {k: v for k, v in schema.items() if v is not None}}
    elif fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # response.completed carries the usage
    return body


def _renamed_error(response: Response) -> Response:
    """The chat path's 400 naming a chat field, renamed to the Responses field it came from."""
    try:
        body = json_of(response)
        error = body["error"]
    except (ValueError, KeyError, TypeError):  # not an OpenAI error body
        return response
    param = error.get("param") or ""
    for chat_name, name in _CHAT_TO_RESPONSES.items():
        if param == chat_name or param.startswith(chat_name + "["):
            error["param"] = name + param[len(chat_name):]
            error["message"] = error["message"].replace(f"'{chat_name}", f"'{name}")
            return Response(json_encoder.encode(body), status_code=response.status_code,
                            media_type="application/json")
    return response


# ---------------------------------------------------------------------- the Response object


def _usage(chat_usage: dict | None) -> dict | None:
    if chat_usage is None:
        return None
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    # cache_write_tokens is required by OpenAI's type; the chat path does not report it.
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": chat_usage["total_tokens"]}


def _message_item(item_id: str, text: str, status: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}] if text else []
    return {"id": item_id, "type": "message", "role": "assistant", "content": content, "status": status}


def _function_call_items(tool_calls: list[dict]) -> list[dict]:
    return [{"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "call_id": call.get("id"),
             "name": call["function"]["name"], "arguments": call["function"].get("arguments", ""),
             "status": "completed"} for call in tool_calls]


class _Answer:
    """The Response object of one request, filled in as the answer arrives."""

    def __init__(self, request: ResponsesRequest, response_id: str, model: str):
        self.request = request
        self.id = response_id
        self.model = model
        self.created_at = int(time.time())

    def body(self, status: str, output: list[dict], usage: dict | None,
             finish_reason: str | None = None) -> dict:
        request = self.request
        incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
        text = request.text.model_dump(exclude_none=True, by_alias=True) if request.text else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": "incomplete" if incomplete else status, "error": None,
            "incomplete_details": incomplete, "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens, "metadata": request.metadata, "model": self.model,
            "output": output, "parallel_tool_calls": True, "previous_response_id": None, "reasoning": None,
            "store": False, "temperature": request.temperature, "text": text or {"format": {"type": "text"}},
            "tool_choice": (request.tool_choice if isinstance(request.tool_choice, str) or request.tool_choice
                            is None else request.tool_choice.model_dump()) or "auto",
            "tools": tools, "top_p": request.top_p, "truncation": "disabled", "usage": usage,
            "user": request.user, "background": False,
        }


def _complete(request: ResponsesRequest, chat: dict) -> dict:
    suffix = id_suffix(chat["id"])
    answer = _Answer(request, f"resp_{suffix}", chat["model"])
    choice = chat["choices"][0]
    message = choice["message"]
    output = []
    if message.get("content"):
        output.append(_message_item(f"msg_{suffix}", message["content"], "completed"))
    output += _function_call_items(message.get("tool_calls") or [])
    return answer.body("completed", output, _usage(chat.get("usage")), choice.get("finish_reason"))


class _EventStream:
    """Chat chunks -> Responses events, numbered in order."""

    def __init__(self, request: ResponsesRequest):
        self.request = request
        self.sequence = 0

    def event(self, event_type: str, **fields) -> bytes:
        data = {"type": event_type, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse_event(event_type, data)

    async def translate(self, chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
        """Output items one after another, as the chat deltas come: a message item while content arrives,
        a function_call item from a call's first delta, its arguments streamed as they are generated (a
        named tool call's come in pieces; a "required" answer's whole, once each call is complete). A new
        item closes the open one (the chat path streams its calls one after another)."""
        answer: _Answer | None = None
        suffix = ""
        items = _OpenItems(self)
        finish_reason = None
        usage = None
        async for chunk in chunks:
            if "error" in chunk:
                error = chunk["error"]
                yield self.event("error", code=str(error.get("code")), message=error.get("message"),
                                 param=error.get("param"))
                return
            if answer is None:
                suffix = id_suffix(chunk["id"])
                answer = _Answer(self.request, f"resp_{suffix}", chunk["model"])
                initial = answer.body("in_progress", [], None)
                yield self.event("response.created", response=initial)
                yield self.event("response.in_progress", response=initial)
            if chunk.get("usage"):
                usage = _usage(chunk["usage"])
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if choice.get("finish_reason") is not None:
                    finish_reason = choice["finish_reason"]
                if piece := delta.get("content"):
                    for event in items.text(piece, f"msg_{suffix}"):
                        yield event
                for call in delta.get("tool_calls") or []:
                    for event in items.call(call):
                        yield event
        if answer is None:
            return
        for event in items.close():
            yield event
        yield self.event("response.completed",
                         response=answer.body("completed", items.output, usage, finish_reason))


class _OpenItems:
    """The output items of a streamed Response: those done, and the one being streamed."""

    def __init__(self, stream: _EventStream):
        self._stream = stream
        self.output: list[dict] = []  # done items, in order
        self._kind: str | None = None  # of the open item: "message" or "call"
        self._item: dict = {}
        self._text: list[str] = []
        self._call_index: int | None = None  # the chat tool-call index of the open call
        self._messages = 0

    def _index(self) -> int:
        return len(self.output)  # the open item's output_index

    def text(self, piece: str, message_id: str) -> list[bytes]:
        event = self._stream.event
        out = []
        if self._kind != "message":
            out += self.close()
            self._messages += 1
            item_id = message_id if self._messages == 1 else f"{message_id}_{self._messages}"
            self._kind, self._item, self._text = "message", _message_item(item_id, "", "in_progress"), []
            out.append(event("response.output_item.added", output_index=self._index(), item=self._item))
            out.append(event("response.content_part.added", item_id=item_id, output_index=self._index(),
                             content_index=0,
                             part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        self._text.append(piece)
        out.append(event("response.output_text.delta", item_id=self._item["id"], output_index=self._index(),
                         content_index=0, delta=piece, logprobs=[]))
        return out

    def call(self, delta: dict) -> list[bytes]:
        """A chat tool-call delta: its first opens a function_call item, each arguments piece is a delta."""
        event = self._stream.event
        out = []
        index = delta.get("index", 0)
        function = delta.get("function") or {}
        if self._kind != "call" or self._call_index != index:
            out += self.close()
            self._kind, self._call_index = "call", index
            self._item = {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "call_id": delta.get("id"),
                          "name": function.get("name") or "", "arguments": "", "status": "in_progress"}
            out.append(event("response.output_item.added", output_index=self._index(), item=dict(self._item)))
        else:
            self._item["call_id"] = self._item["call_id"] or delta.get("id")
            self._item["name"] += function.get("name") or ""
        if arguments := function.get("arguments"):
            self._item["arguments"] += arguments
            out.append(event("response.function_call_arguments.delta", item_id=self._item["id"],
                             output_index=self._index(), delta=arguments))
        return out

    def close(self) -> list[bytes]:
        """The done events of the open item, if any."""
        event = self._stream.event
        index, item = self._index(), self._item
        if self._kind == "message":
            full = "".join(self._text)
            part = {"type": "output_text", "text": full, "annotations": [], "logprobs": None}
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out = [event("response.output_text.done", **where, text=full, logprobs=[]),
                   event("response.content_part.done", **where, part=part)]
            item = _message_item(item["id"], full, "completed")
        elif self._kind == "call":
            item = dict(item, status="completed")
            out = [event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                         arguments=item["arguments"], name=item["name"])]
        else:
            return []
        out.append(event("response.output_item.done", output_index=index, item=item))
        self.output.append(item)
        self._kind, self._item, self._call_index = None, {}, None
        return out


class ResponsesService:
    """POST /v1/responses."""

    def __init__(self, service):
        self.service = service  # the OpenAIService (chat_from_body)

    async def create(self, http_request: Request) -> Response:
        try:
            data = await read_json_object(http_request)
            _refuse_unknown(data)
            request = ResponsesRequest.model_validate(data)
        except pydantic.ValidationError as e:
            return errors.pydantic_error_response(e)
        except DynamoLiteError as e:
            return errors.dynamo_error_response(e)
        response = await self.service.chat_from_body(http_request, to_chat_body(request), ENDPOINT)
        if response.status_code != 200:
            return _renamed_error(response)
        if is_stream(response):
            return replace_stream(response, _EventStream(request).translate)
        return Response(json_encoder.encode(_complete(request, json_of(response))),
                        media_type="application/json")
