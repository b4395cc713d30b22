"""Forced tool_choice answers as tool calls, whole and streamed; the "required" schema."""

from __future__ import annotations

import json

import jsonschema
import pytest

from dynamo_lite.frontend.tool_calls import ForcedToolCalls, finish_reason_with_tools, required_calls_schema

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "now"}}]
REQUIRED_ANSWER = '[{"name": "get_weather", "parameters": {"city": "Par\\"is [x]"}}, {"name": "now", "parameters": {}}]'


def streamed(shaper, text: str, size: int):
    pieces = []
    for start in range(0, len(text), size):
        if delta := shaper.feed(text[start:start + size]):
            pieces.extend(delta.tool_calls)
    if delta := shaper.finish():
        pieces.extend(delta.tool_calls)
    return pieces


def test_required_answer_becomes_calls_whole():
    message = ForcedToolCalls(None).parse_whole(REQUIRED_ANSWER)
    assert message.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": 'Par"is [x]'}), ("now", {})]
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in message.tool_calls)
    assert len({c.id for c in message.tool_calls}) == 2


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_required_answer_streams_each_call_once_complete(size):
    shaper = ForcedToolCalls(None)
    pieces = streamed(shaper, REQUIRED_ANSWER, size)
    whole = ForcedToolCalls(None).parse_whole(REQUIRED_ANSWER)
    assert [(p.index, p.name, p.arguments) for p in pieces] == [
        (i, c.name, c.arguments) for i, c in enumerate(whole.tool_calls)]
    assert shaper.called_tools
    assert pieces[0].to_openai()["type"] == "function" and pieces[0].to_openai()["id"] == pieces[0].id


def test_required_answer_cut_off_yields_only_complete_calls():
    cut = REQUIRED_ANSWER[:REQUIRED_ANSWER.index('{"name": "now"') + 5]
    assert [c.name for c in ForcedToolCalls(None).parse_whole(cut).tool_calls] == []  # not JSON: none, as vLLM
    assert [p.name for p in streamed(ForcedToolCalls(None), cut, 4)] == ["get_weather"]


def test_named_function_answer_is_its_arguments():
    text = '{"city": "Paris"}'
    message = ForcedToolCalls("get_weather").parse_whole(text)
    assert [(c.name, c.arguments) for c in message.tool_calls] == [("get_weather", text)]
    pieces = streamed(ForcedToolCalls("get_weather"), text, 5)
    assert pieces[0].name == "get_weather" and pieces[0].id and all(p.id is None for p in pieces[1:])
    assert "".join(p.arguments for p in pieces) == text
    assert pieces[1].to_openai() == {"index": 0, "function": {"arguments": pieces[1].arguments}}


def test_required_schema_accepts_calls_and_refuses_others():
    schema = required_calls_schema(TOOLS, parallel_tool_calls=True)
    jsonschema.validate(json.loads(REQUIRED_ANSWER), schema)
    for bad in ([], [{"name": "nope", "parameters": {}}], [{"name": "get_weather", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = required_calls_schema(TOOLS, parallel_tool_calls=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(REQUIRED_ANSWER), single)


def test_finish_reason_follows_vllm():
    assert finish_reason_with_tools("required", True, "stop") == "tool_calls"
    assert finish_reason_with_tools("required", False, "length") == "length"
    assert finish_reason_with_tools("named", True, "stop") == "stop"
    assert finish_reason_with_tools("auto", True, "stop") == "tool_calls"
    assert finish_reason_with_tools("auto", False, "stop") == "stop"
