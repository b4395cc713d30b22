"""Structured outputs: a request's response_format or vLLM's `structured_outputs` field, as the
constraint the worker hands to vLLM's structured-output engine (protocol StructuredOutput).

Schemas are checked here, so a request whose schema is not JSON Schema is a 400 naming the field
instead of an engine error after routing. Whether the grammar engine can compile a valid schema is
the worker's to say (also a 400).
"""

from __future__ import annotations

from typing import Any

import jsonschema
import msgspec

from dynamo_lite.frontend.schemas import SamplingFields
from dynamo_lite.frontend.tool_calls import required_calls_schema, tool_parameters
from dynamo_lite.protocol.errors import InvalidRequestError
from dynamo_lite.protocol.messages import StructuredOutput

# The constraints of vLLM's StructuredOutputsParams, exactly one of which a request may set.
CONSTRAINTS = ("json_", "regex", "choice", "grammar", "json_object")
# vLLM's StructuredOutputsParams carries these too, but its xgrammar and guidance backends read them
# from the engine's --structured-outputs-config alone: a request's copy would be accepted and ignored.
ENGINE_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")


def forced_tool_schema(request: SamplingFields) -> str | None:
    """For chat requests with tools: every tool's parameters checked, and the JSON schema (as text)
    that a "required" or named tool_choice constrains the answer to (None for "auto" and "none")."""
    tools = getattr(request, "tools", None)
    if not tools:
        return None
    tool_dicts = request.template_tools()
    for index, tool in enumerate(tool_dicts):
        if "parameters" in tool["function"]:
            check_json_schema(tool["function"]["parameters"], f"tools[{index}].function.parameters")
    choice = request.effective_tool_choice()
    if choice == "required":
        return check_json_schema(required_calls_schema(tool_dicts, request.parallel_tool_calls), "tools")
    if isinstance(choice, str):
        return None
    return check_json_schema(tool_parameters(tool_dicts, choice.function.name), "tools")


def check_json_schema(schema: Any, param: str) -> str:
    """The schema as JSON text, after checking that it is a JSON Schema (draft of its $schema, else
    2020-12)."""
    if not isinstance(schema, dict):
        raise InvalidRequestError("the JSON schema must be an object", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise InvalidRequestError(f"not a valid JSON Schema: {e.message}", param=param) from e
    return msgspec.json.encode(schema).decode()


def structured_output_of(request: SamplingFields) -> StructuredOutput | None:
    forced = forced_tool_schema(request)
    if forced is not None:
        if request.response_format is not None or request.structured_outputs is not None:
            raise InvalidRequestError("a forced tool_choice is a constraint of its own: it cannot be combined "
                                      "with response_format or structured_outputs", param="tool_choice")
        return StructuredOutput(json=forced)
    response_format = request.response_format
    if response_format is not None:
        if response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return StructuredOutput(json_object=True)
        if response_format.json_schema is None:
            raise InvalidRequestError("response_format of type 'json_schema' needs 'json_schema'",
                                      param="response_format.json_schema")
        schema = response_format.json_schema.json_schema
        return StructuredOutput(json=check_json_schema(schema, "response_format.json_schema.schema"))
    field = request.structured_outputs
    if field is None:
        return None
    given = _set_fields(field, CONSTRAINTS)
    if len(given) != 1:
        raise InvalidRequestError(
            "structured_outputs needs exactly one of json, regex, choice, grammar, json_object "
            f"(got {', '.join(name.rstrip('_') for name in given) or 'none'})", param="structured_outputs")
    if refused := _set_fields(field, ENGINE_OPTIONS):
        name = refused[0]
        raise InvalidRequestError(
            f"structured_outputs.{name} is a setting of the workers' grammar engine, not of a "
            "request: set it on the workers with --structured-outputs-config "
            f"'{{\"backend\": \"xgrammar\", \"{name}\": ...}}'",
            param=f"structured_outputs.{name}")
    if field.json_ is not None:
        schema = field.json_
        if isinstance(schema, str):
            try:
                schema = msgspec.json.decode(schema)
            except msgspec.DecodeError as e:
                raise InvalidRequestError(f"structured_outputs.json is not JSON: {e}",
                                          param="structured_outputs.json") from e
        return StructuredOutput(json=check_json_schema(schema, "structured_outputs.json"))
    if field.json_object:
        return StructuredOutput(json_object=True)
    return StructuredOutput(regex=field.regex, choice=field.choice, grammar=field.grammar)


def _set_fields(field, names: tuple[str, ...]) -> list[str]:
    """Those of `names` that the request set to something other than their default."""
    return [name for name in names if getattr(field, name) not in (None, False)]
