"""OpenAI request bodies (pydantic, used at the HTTP edge only).

Field constraints here turn bad input into a 400 naming the field. What pydantic cannot express
(unsupported options, limits that depend on the model) is checked by `check_supported` and the
pipeline. Responses are not pydantic models: they are plain dicts encoded with msgspec (hot path).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from dynamo_lite.protocol.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # vLLM's server default max_logprobs (and OpenAI's top_logprobs limit)
MAX_CHOICES = 128  # n: each choice is a sequence on the worker; a bound so one request cannot fill it
# Integers travel to workers as msgpack int64: anything wider would fail there, not here.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# Strict types: a mistyped field ("max_tokens": "16", "stream": "yes") is a 400, as in OpenAI's API,
# not silently coerced. StrictFloat still takes JSON integers (temperature: 0).
TokenId = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
StopString = Annotated[StrictStr, Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")  # e.g. continuous_usage_stats: refused, not ignored
    include_usage: StrictBool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Annotated[StrictStr, Field(min_length=1, max_length=64)] = "response"
    description: StrictStr | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None  # the output always satisfies the schema (the grammar enforces it)


class ResponseFormat(BaseModel):
    """OpenAI's response_format. vLLM's structural_tag formats are refused (not implemented here)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(BaseModel):
    """vLLM's own `structured_outputs` field: exactly one constraint (json, regex, choice, grammar,
    json_object). Its whitespace and additional-properties options are known so that they can be
    refused by name (structured.ENGINE_OPTIONS)."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | StrictStr | None = Field(None, alias="json")
    regex: Annotated[StrictStr, Field(min_length=1)] | None = None
    choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    grammar: Annotated[StrictStr, Field(min_length=1)] | None = None
    json_object: StrictBool | None = None
    disable_any_whitespace: StrictBool = False
    disable_additional_properties: StrictBool = False
    whitespace_pattern: StrictStr | None = None


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions.

    Fields this server does not know are kept (`model_extra`) so that `check_supported` can refuse them
    by name: a field accepted and then ignored (response_format, tool_choice, min_p, ...) would change
    nothing the client sees but the answer it expected.
    """

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(gt=0, le=INT32_MAX)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=INT32_MAX)] | None = None  # -1 / 0 = disabled (vLLM's convention)
    seed: Annotated[StrictInt, Field(ge=-INT64_MAX - 1, le=INT64_MAX)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0, le=INT32_MAX)] = 0
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: StrictBool = False
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] = 0.0
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling fields, passed to the engine.
    min_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[StrictFloat, Field(gt=0.0, le=2.0)] = 1.0
    logit_bias: Annotated[dict[StrictStr, Annotated[StrictFloat, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=1024)] | None = None
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    bad_words: Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(max_length=256)] | None = None
    prompt_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    # Detokenization options (applied by the frontend, which detokenizes).
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    # Structured outputs: OpenAI's response_format and vLLM's own field.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[TokenId] | list[StrictStr] | list[list[TokenId]]
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    # Extra keys (tool_calls, tool_call_id, ...) are kept: chat templates may read them.
    model_config = ConfigDict(extra="allow")

    role: Annotated[StrictStr, Field(min_length=1)]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None  # calls always match the parameters when forced; see docs/api.md


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(gt=0, le=INT32_MAX)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Annotated[list[ToolDefinition], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens replaces the deprecated max_tokens in OpenAI's chat API.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as plain dicts for the chat template; text parts are joined into one string."""
        messages = []
        for index, message in enumerate(self.messages):
            item = message.model_dump(exclude_none=True)
            if isinstance(message.content, list):
                texts = []
                for part_index, part in enumerate(message.content):
                    if part.type != "text" or part.text is None:
                        raise InvalidRequestError(
                            f"content part type '{part.type}' is not supported (text only)",
                            param=f"messages[{index}].content[{part_index}].type")
                    texts.append(part.text)
                item["content"] = "\n".join(texts)
            elif message.content is None:
                item["content"] = ""
            _arguments_as_objects(item, index)
            messages.append(item)
        return messages

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates read them (None: no tools, so templates skip their tool prompt)."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None

    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: "auto" when there are tools, "none" without."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


def _arguments_as_objects(message: dict[str, Any], index: int) -> None:
    """An assistant message's tool-call arguments (JSON text in OpenAI's API) become objects, which is
    what chat templates with tool support read (Transformers' convention, as vLLM's server does)."""
    for position, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise InvalidRequestError("an assistant tool call needs a 'function' object",
                                      param=f"messages[{index}].tool_calls[{position}]")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function["arguments"] = json.loads(arguments)
            except ValueError:
                raise InvalidRequestError("tool call arguments are not JSON",
                                          param=f"messages[{index}].tool_calls[{position}].function.arguments"
                                          ) from None


def check_supported(request: SamplingFields) -> None:
    """Reject valid OpenAI options this server does not implement, with a clear 400."""
    for name in request.model_extra or {}:
        raise InvalidRequestError(f"'{name}' is not supported by this server (it would be ignored)", param=name)
    if getattr(request, "tool_choice", None) not in (None, "none") and not request.tools:
        raise InvalidRequestError("tool_choice needs 'tools'", param="tool_choice")
    if request.best_of is not None and request.best_of > 1:
        raise InvalidRequestError("best_of > 1 is not supported (n > 1 is)", param="best_of")
    if getattr(request, "top_logprobs", None) and not request.logprobs:
        raise InvalidRequestError("when using `top_logprobs`, `logprobs` must be set to true",
                                  param="top_logprobs")  # vLLM's server's answer
    if request.stream and request.prompt_logprobs:
        # The prompt's logprobs come once, with the whole prompt: vLLM's server refuses them streamed too.
        raise InvalidRequestError("`prompt_logprobs` are not available when `stream=True`",
                                  param="prompt_logprobs")
    if getattr(request, "suffix", None):
        raise InvalidRequestError("suffix is not supported", param="suffix")
    if not request.skip_special_tokens and not request.spaces_between_special_tokens:
        # vLLM then drops the spaces its slow-tokenizer path put between added tokens; this server's
        # fast detokenizer has no such option.
        raise InvalidRequestError("spaces_between_special_tokens=false is not supported",
                                  param="spaces_between_special_tokens")
    if request.response_format is not None and request.structured_outputs is not None:
        raise InvalidRequestError("give either response_format or structured_outputs, not both",
                                  param="structured_outputs")
