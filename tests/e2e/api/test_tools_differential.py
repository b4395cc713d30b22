"""Forced tool calls through this project and through vLLM's own server (hermes parser there): the
same calls at temperature 0, valid against the tools' parameters, with the official openai client,
streamed and whole."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.vllm

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"type": "string", "enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 30}},
                                               "required": ["city"], "additionalProperties": False}}}]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris, in Celsius?"}]
CHOICES = {"required": "required",
           "named": {"type": "function", "function": {"name": "get_weather"}}}


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)


def _calls(message_or_deltas) -> list[tuple[str, dict]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in message_or_deltas]


def _streamed_calls(stream) -> tuple[list[tuple[str, dict]], str]:
    names, arguments, finish = {}, {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        for piece in choice.delta.tool_calls or ():
            if piece.function.name:
                names[piece.index] = piece.function.name
            arguments[piece.index] = arguments.get(piece.index, "") + (piece.function.arguments or "")
        finish = choice.finish_reason or finish
    return [(names[i], json.loads(arguments[i])) for i in sorted(names)], finish


@pytest.mark.parametrize("choice", CHOICES)
def test_forced_tool_calls_equal_and_valid(api_pair, choice):
    answers = api_pair.on_both(lambda url: _client(url).chat.completions.create(
        model=api_pair.model, messages=MESSAGES, tools=TOOLS, tool_choice=CHOICES[choice], temperature=0,
        max_tokens=120).choices[0])
    ours, vllm = answers["ours"], answers["vllm"]
    assert ours.message.tool_calls and _calls(ours.message.tool_calls) == _calls(vllm.message.tool_calls)
    assert ours.finish_reason == vllm.finish_reason == ("tool_calls" if choice == "required" else "stop")
    for name, arguments in _calls(ours.message.tool_calls):
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)
        jsonschema.validate(arguments, schema)
    assert all(call.id.startswith("call_") for call in ours.message.tool_calls)


@pytest.mark.parametrize("choice", CHOICES)
def test_streamed_forced_tool_calls_equal_the_whole_answer(api_pair, choice):
    client = _client(api_pair.ours.base_url)
    whole = client.chat.completions.create(model=api_pair.model, messages=MESSAGES, tools=TOOLS,
                                           tool_choice=CHOICES[choice], temperature=0, max_tokens=120)
    stream = client.chat.completions.create(model=api_pair.model, messages=MESSAGES, tools=TOOLS,
                                            tool_choice=CHOICES[choice], temperature=0, max_tokens=120,
                                            stream=True)
    calls, finish = _streamed_calls(stream)
    assert calls == _calls(whole.choices[0].message.tool_calls)
    assert finish == whole.choices[0].finish_reason


def test_a_tool_result_in_the_conversation_is_answered_alike(api_pair):
    messages = [*MESSAGES,
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_abc", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
                {"role": "tool", "tool_call_id": "call_abc", "content": "21 degrees, sunny"}]
    texts = api_pair.on_both(lambda url: _client(url).chat.completions.create(
        model=api_pair.model, messages=messages, tools=TOOLS, tool_choice="none", temperature=0,
        max_tokens=30).choices[0].message.content)
    assert texts["ours"] == texts["vllm"] and texts["ours"]


def test_auto_tool_choice_answers_alike(api_pair):
    # SmolLM2's template shows no tools, so the model answers in prose: the hermes parser on both sides
    # must leave it as content, with no calls.
    answers = api_pair.on_both(lambda url: _client(url).chat.completions.create(
        model=api_pair.model, messages=MESSAGES, tools=TOOLS, tool_choice="auto", temperature=0,
        max_tokens=30).choices[0])
    assert answers["ours"].message.content == answers["vllm"].message.content
    assert not answers["ours"].message.tool_calls and not answers["vllm"].message.tool_calls
    assert answers["ours"].finish_reason == answers["vllm"].finish_reason
