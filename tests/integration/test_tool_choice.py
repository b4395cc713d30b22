"""Forced tool_choice through the frontend: the grammar constraint sent to the worker, and its answer
returned as OpenAI tool calls, whole and streamed (loopback workers answering a fixed JSON)."""

from __future__ import annotations

import json

from dynamo_lite.protocol.messages import GenerateFrame
from tests.integration.test_frontend_app import (EOS, MODEL, TOKENIZER, ScriptedEngine, chat_body,  # noqa: F401
                                                  model_dir, running_stack)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
REQUIRED_ANSWER = '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'


class AnsweringEngine(ScriptedEngine):
    """Streams `answer` a few tokens per frame, then EOS."""

    def __init__(self, model_path, answer: str):
        super().__init__(model_path)
        self.answer_ids = TOKENIZER.encode(answer).ids + [EOS]

    async def generate(self, request):
        self.requests.append(request)
        ids = self.answer_ids
        for start in range(0, len(ids), 3):
            last = start + 3 >= len(ids)
            first = {"prompt_tokens": len(request.token_ids), "cached_tokens": 0} if start == 0 else {}
            yield GenerateFrame(token_ids=ids[start:start + 3], finish_reason="stop" if last else None, last=last,
                                **first)


def events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


async def test_required_tool_choice_answers_tool_calls(model_dir):
    async with running_stack() as stack:
        engine = AnsweringEngine(model_dir, REQUIRED_ANSWER)
        await stack.add_worker(engine)
        body = chat_body(tools=TOOLS, tool_choice="required")
        response = await stack.http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        [call] = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        assert choice["message"]["content"] == ""
        schema = json.loads(engine.requests[-1].sampling.structured_output.json)
        assert schema["type"] == "array" and schema["minItems"] == 1
        # The tools reached the chat template's variables (this template ignores them).

        streamed = await stack.http.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = events(streamed)
        pieces = [p for c in chunks for p in c["choices"][0]["delta"].get("tool_calls", [])]
        assert [p["function"]["name"] for p in pieces] == ["get_weather"] and pieces[0]["id"].startswith("call_")
        assert json.loads("".join(p["function"]["arguments"] for p in pieces)) == {"city": "Paris"}
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_named_tool_choice_streams_arguments(model_dir):
    arguments = '{"city": "Lyon"}'
    async with running_stack() as stack:
        engine = AnsweringEngine(model_dir, arguments)
        await stack.add_worker(engine)
        body = chat_body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                         stream=True)
        chunks = events(await stack.http.post("/v1/chat/completions", json=body))
        pieces = [p for c in chunks for p in c["choices"][0]["delta"].get("tool_calls", [])]
        assert len(pieces) > 1 and pieces[0]["function"]["name"] == "get_weather"
        assert "".join(p["function"]["arguments"] for p in pieces) == arguments
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # OpenAI's rule for a named call
        assert json.loads(engine.requests[-1].sampling.structured_output.json) == TOOLS[0]["function"]["parameters"]


async def test_tool_choice_none_sends_text_and_no_constraint(model_dir):
    async with running_stack() as stack:
        engine = AnsweringEngine(model_dir, "plain words")
        await stack.add_worker(engine)
        response = await stack.http.post("/v1/chat/completions", json=chat_body(tools=TOOLS, tool_choice="none"))
        message = response.json()["choices"][0]["message"]
        assert message == {"role": "assistant", "content": "plain words"}
        assert engine.requests[-1].sampling.structured_output is None


async def test_tool_results_in_the_conversation_reach_the_worker(model_dir):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    async with running_stack() as stack:
        engine = AnsweringEngine(model_dir, "It is sunny.")
        await stack.add_worker(engine)
        response = await stack.http.post("/v1/chat/completions", json=chat_body(messages=messages, tools=TOOLS,
                                                                               tool_choice="none"))
        assert response.status_code == 200, response.text
        prompt = TOKENIZER.decode(engine.requests[-1].token_ids, skip_special_tokens=False)
        assert "<|im_start|>tool\nsunny, 21 C<|im_end|>" in prompt


async def test_auto_tool_choice_parses_hermes_calls(model_dir):
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    async with running_stack(tool_call_parser="hermes") as stack:
        await stack.add_worker(AnsweringEngine(model_dir, text))
        body = chat_body(tools=TOOLS)  # tool_choice defaults to "auto" with tools
        choice = (await stack.http.post("/v1/chat/completions", json=body)).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me check."
        [call] = choice["message"]["tool_calls"]
        assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == ("get_weather",
                                                                                        {"city": "Paris"})
        chunks = events(await stack.http.post("/v1/chat/completions", json={**body, "stream": True}))
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert "".join(d.get("content") or "" for d in deltas) == "Let me check."
        pieces = [p for d in deltas for p in d.get("tool_calls", [])]
        assert pieces[0]["function"]["name"] == "get_weather"
        assert json.loads("".join(p["function"].get("arguments", "") for p in pieces)) == {"city": "Paris"}
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_reasoning_parser_fills_the_reasoning_field(model_dir):
    async with running_stack(reasoning_parser="deepseek_r1") as stack:
        await stack.add_worker(AnsweringEngine(model_dir, "two and two</think>It is 4."))
        message = (await stack.http.post("/v1/chat/completions", json=chat_body())).json()["choices"][0]["message"]
        assert (message["reasoning"], message["content"]) == ("two and two", "It is 4.")
        chunks = events(await stack.http.post("/v1/chat/completions", json=chat_body(stream=True)))
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert "".join(d.get("reasoning", "") for d in deltas) == "two and two"
        assert "".join(d.get("content") or "" for d in deltas) == "It is 4."


async def test_a_prompt_that_closed_thinking_gets_content_not_reasoning(model_dir):
    # Qwen3's template with enable_thinking false ends the prompt with an empty <think></think>; the
    # scripted model's template cannot, so the conversation carries the closed block at its end.
    body = chat_body(messages=[{"role": "user", "content": "What is 2 + 2? <think>\n\n</think>\n\n"}])
    async with running_stack(reasoning_parser="qwen3") as stack:
        await stack.add_worker(AnsweringEngine(model_dir, "It is 4."))
        message = (await stack.http.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]
        assert (message.get("reasoning"), message["content"]) == (None, "It is 4.")
        chunks = events(await stack.http.post("/v1/chat/completions", json={**body, "stream": True}))
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert "".join(d.get("content") or "" for d in deltas) == "It is 4."
        assert not any(d.get("reasoning") for d in deltas)
        # Thinking opened again after the closed block: the answer is reasoning until </think>.
        reopened = chat_body(messages=[{"role": "user", "content": "<think></think> again <think>"}])
        message = (await stack.http.post("/v1/chat/completions", json=reopened)).json()["choices"][0]["message"]
        assert (message["reasoning"], message["content"]) == ("It is 4.", None)


def test_unknown_parsers_are_refused_at_start():
    import pytest

    from dynamo_lite.frontend.config import FrontendConfig
    from dynamo_lite.protocol.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown --tool-call-parser 'nope'.*hermes"):
        FrontendConfig(tool_call_parser="nope")
    with pytest.raises(ConfigError, match="unknown --reasoning-parser 'x'.*deepseek_r1"):
        FrontendConfig(reasoning_parser="x")
