"""Tool calls in chat answers: the OpenAI shapes, and the calls a forced tool_choice produces.

`tool_choice: "required"` and a named function are guaranteed by structured output (the worker's
grammar), as in vLLM's server: "required" constrains the answer to a JSON array of
{"name", "parameters"} objects, one per call; a named function constrains it to that function's
parameters. `ForcedToolCalls` turns such an answer into tool calls, whole or streamed. `auto` is
the tool-call parser's job (frontend/chat_output.py).
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Protocol

from dynamo_lite.protocol.errors import InvalidRequestError

_ID_ALPHABET = string.ascii_letters + string.digits


def random_alnum(length: int) -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def make_tool_call_id() -> str:
    """`call_` and 24 random letters and digits, as vLLM's server makes them."""
    return "call_" + random_alnum(24)


@dataclass
class ToolCallDelta:
    """One piece of a streamed delta.tool_calls[]: id and name on a call's first piece only."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        # As vLLM streams them: the first piece carries id, type and name (and arguments only if it
        # has some); later pieces only arguments.
        piece: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            piece.update(id=self.id, type="function")
        function: dict[str, Any] = {}
        if self.name is not None:
            function["name"] = self.name
        if self.arguments or self.name is None:
            function["arguments"] = self.arguments
        piece["function"] = function
        return piece


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class OutputDelta:
    """What one streamed chunk of a choice carries."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


@dataclass
class ParsedMessage:
    """A whole answer split into its parts (content None: no text besides reasoning and calls)."""

    content: str | None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


class AnswerShaper(Protocol):
    """Splits one choice's text into content, reasoning and tool calls (ForcedToolCalls, ChatOutput)."""

    @property
    def called_tools(self) -> bool: ...
    def feed(self, text: str) -> OutputDelta | None: ...
    def finish(self) -> OutputDelta | None: ...
    def parse_whole(self, text: str) -> ParsedMessage: ...


def finish_reason_with_tools(tool_choice: str, called_tools: bool, reason: str | None) -> str | None:
    """OpenAI's finish reason when tools may be called (vLLM's rule): "tool_calls" when the model chose
    to call ("auto") or had to ("required", unless cut off by length); a named call ends with the
    engine's own reason."""
    if tool_choice == "auto" and called_tools:
        return "tool_calls"
    if tool_choice == "required" and reason == "stop":
        return "tool_calls"
    return reason


def tool_parameters(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for tool in tools:
        if tool["function"]["name"] == name:
            return tool["function"].get("parameters") or {"type": "object", "properties": {}}
    raise InvalidRequestError(f"tool_choice names function '{name}', which is not in 'tools'",
                              param="tool_choice")


def required_calls_schema(tools: list[dict[str, Any]], parallel_tool_calls: bool) -> dict[str, Any]:
    """The JSON schema of a "required" answer: [{"name": ..., "parameters": {...}}, ...] (vLLM's)."""
    variants, defs = [], {}
    for tool in tools:
        function = tool["function"]
        parameters = dict(function.get("parameters") or {"type": "object", "properties": {}})
        for name, schema in parameters.pop("$defs", {}).items():
            if defs.setdefault(name, schema) != schema:
                raise InvalidRequestError(f"tools define '$defs/{name}' differently", param="tools")
        variants.append({"properties": {"name": {"type": "string", "enum": [function["name"]]},
                                        "parameters": parameters},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


class ForcedToolCalls:
    """The answer of a request whose tool_choice forced calls, as tool calls.

    `function`: the named function (the whole answer is its arguments), or None for "required" (the
    answer is a JSON array of calls). Streaming a named call sends its arguments as they come;
    streaming "required" sends each call once its array element is complete (the element must be
    parsed to know its name and arguments).
    """

    def __init__(self, function: str | None):
        self._function = function
        self._id: str | None = None
        self._text = ""  # "required": the answer so far
        self._scanned = 0  # how much of _text the element scanner has read
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._element_start = -1
        self._calls = 0

    @property
    def called_tools(self) -> bool:
        return self._calls > 0

    def parse_whole(self, text: str) -> ParsedMessage:
        if self._function is not None:
            if not text.strip():
                return ParsedMessage(content="")
            return ParsedMessage(content="", tool_calls=[ToolCall(make_tool_call_id(), self._function, text)])
        try:
            items = json.loads(text)
        except ValueError:
            items = None  # cut off by max_tokens: no complete call (vLLM answers none either)
        calls = [ToolCall(make_tool_call_id(), item["name"], json.dumps(item["parameters"], ensure_ascii=False))
                 for item in items or () if isinstance(item, dict) and "name" in item and "parameters" in item]
        return ParsedMessage(content="", tool_calls=calls)

    def feed(self, text: str) -> OutputDelta | None:
        if self._function is not None:
            if not text:
                return None
            if self._id is None:
                self._id = make_tool_call_id()
                self._calls = 1
                return OutputDelta(tool_calls=[ToolCallDelta(0, self._id, self._function, text)])
            return OutputDelta(tool_calls=[ToolCallDelta(0, arguments=text)])
        self._text += text
        calls = [ToolCallDelta(self._calls + i, make_tool_call_id(), item["name"],
                               json.dumps(item["parameters"], ensure_ascii=False))
                 for i, item in enumerate(self._complete_elements())]
        self._calls += len(calls)
        return OutputDelta(tool_calls=calls) if calls else None

    def finish(self) -> OutputDelta | None:
        return None  # an element still open at the end was cut off: nothing to send

    def _complete_elements(self) -> list[dict[str, Any]]:
        """Array elements completed since the last call (a small JSON scanner: depth and strings)."""
        done = []
        text = self._text
        for position in range(self._scanned, len(text)):
            char = text[position]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "[{":
                self._depth += 1
                if self._depth == 2:
                    self._element_start = position
            elif char in "]}":
                self._depth -= 1
                if self._depth == 1 and self._element_start >= 0:
                    item = json.loads(text[self._element_start:position + 1])
                    self._element_start = -1
                    if isinstance(item, dict) and "name" in item and "parameters" in item:
                        done.append(item)
        self._scanned = len(text)
        return done
