"""/v1/responses (OpenAI Responses) and /v1/messages (Anthropic Messages) over the chat path, on the
in-memory stack of test_frontend_app: request translation, answer and event shapes (checked against the
openai and anthropic packages' own types), event order, and the 400s for what is not honoured."""

from __future__ import annotations

import json

import pydantic
import pytest
from anthropic.types import Message as AnthropicMessage
from anthropic.types import RawMessageStreamEvent
from openai.types.responses import Response as OpenAIResponse
from openai.types.responses import ResponseStreamEvent

from tests.integration.test_frontend_app import (CONTEXT, MODEL, REPLY, REPLY_IDS, TEMPLATE, TOKENIZER,
                                                 PreferRouter, ScriptedEngine, chat_prompt_ids,
                                                 dying_worker_server, model_dir, over_real_http,
                                                 running_stack, wait_until)

__all__ = ["model_dir"]  # the module-scoped fixture, shared

KEY = "sk-test-key"
RESPONSE_EVENTS = pydantic.TypeAdapter(ResponseStreamEvent)
ANTHROPIC_EVENTS = pydantic.TypeAdapter(RawMessageStreamEvent)

TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", *["response.output_text.delta"] * (len(REPLY_IDS) - 1),
               "response.output_text.done", "response.content_part.done", "response.output_item.done",
               "response.completed"]


def named_events(body: str) -> list[tuple[str, dict]]:
    """`event: NAME\\ndata: JSON` blocks -> [(NAME, data)]; every block must have both lines."""
    events = []
    for block in body.split("\n\n"):
        if not block:
            continue
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        events.append((name_line[len("event: "):], json.loads(data_line[len("data: "):])))
    return events


def templated_ids(messages: list[dict]) -> list[int]:
    """The prompt the chat template of the test model makes of these messages."""
    import jinja2

    text = jinja2.Template(TEMPLATE).render(messages=messages, add_generation_prompt=True)
    return TOKENIZER.encode(text).ids


# ====================================================================== /v1/responses


async def test_responses_text_answer_and_prompt(model_dir):
    async with running_stack() as stack:
        engine = ScriptedEngine(model_dir, cached_tokens=4)
        await stack.add_worker(engine)
        response = await stack.http.post("/v1/responses", json={"model": MODEL, "input": "Say hello",
                                                                "instructions": "Be brief", "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        parsed = OpenAIResponse.model_validate(body)  # the openai package's own type
        assert parsed.output_text == REPLY
        assert body["id"].startswith("resp_") and body["object"] == "response"
        assert body["status"] == "completed" and body["incomplete_details"] is None
        assert body["model"] == MODEL and body["instructions"] == "Be brief"
        [item] = body["output"]
        assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "completed"
        assert item["id"].startswith("msg_")
        assert item["content"] == [{"type": "output_text", "text": REPLY, "annotations": [],
                                    "logprobs": None}]
        prompt = templated_ids([{"role": "system", "content": "Be brief"},
                                {"role": "user", "content": "Say hello"}])
        assert body["usage"] == {"input_tokens": len(prompt),
                                 "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
                                 "output_tokens": len(REPLY_IDS),
                                 "output_tokens_details": {"reasoning_tokens": 0},
                                 "total_tokens": len(prompt) + len(REPLY_IDS)}
        sent = engine.requests[0]
        assert sent.token_ids == prompt
        assert sent.sampling.temperature == 0


async def test_responses_message_items_and_max_output_tokens(model_dir):
    async with running_stack() as stack:
        engine = ScriptedEngine(model_dir)
        await stack.add_worker(engine)
        items = [{"role": "developer", "content": "Rules"},
                 {"type": "message", "role": "user",
                  "content": [{"type": "input_text", "text": "one"}, {"type": "input_text", "text": "two"}]},
                 {"role": "assistant", "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
                 {"role": "user", "content": "Say hello"}]
        response = await stack.http.post("/v1/responses", json={"model": MODEL, "input": items,
                                                                "max_output_tokens": 5})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "incomplete"
        assert body["incomplete_details"] == {"reason": "max_output_tokens"}
        assert body["output"][0]["content"][0]["text"] == REPLY[:5] and body["max_output_tokens"] == 5
        assert engine.requests[0].sampling.max_tokens == 5
        assert engine.requests[0].token_ids == templated_ids(
            [{"role": "system", "content": "Rules"}, {"role": "user", "content": "one\ntwo"},
             {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Say hello"}])


async def test_responses_stream_events(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.post("/v1/responses", json={"model": MODEL, "input": "Say hello",
                                                                "stream": True})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = named_events(response.text)
        assert [name for name, _ in events] == TEXT_EVENTS
        for name, data in events:
            assert data["type"] == name
            RESPONSE_EVENTS.validate_python(data)  # each event has the openai package's shape
        assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
        created, in_progress = events[0][1]["response"], events[1][1]["response"]
        assert created["status"] == in_progress["status"] == "in_progress" and created["output"] == []
        deltas = [data for name, data in events if name == "response.output_text.delta"]
        assert "".join(d["delta"] for d in deltas) == REPLY
        item_id = events[2][1]["item"]["id"]
        assert {d["item_id"] for d in deltas} == {item_id} and item_id.startswith("msg_")
        assert events[-4][1]["text"] == REPLY and events[-3][1]["part"]["text"] == REPLY
        done = events[-1][1]["response"]
        assert done["status"] == "completed" and done["id"] == created["id"]
        assert done["output"] == [events[-2][1]["item"]]
        assert done["output"][0]["content"][0]["text"] == REPLY
        assert done["usage"]["output_tokens"] == len(REPLY_IDS)
        assert done["usage"]["input_tokens"] == len(chat_prompt_ids("Say hello"))


async def test_responses_stream_client_gone_aborts_the_worker(model_dir):
    """The translated stream still closes the chat stream, aborting the worker request."""
    async with running_stack() as stack:
        shell = await stack.add_worker(ScriptedEngine(model_dir, token_delay=0.2))
        async with over_real_http(stack) as http:
            body = {"model": MODEL, "input": "Say hello", "stream": True}
            async with http.stream("POST", "/v1/responses", json=body) as response:
                async for line in response.aiter_lines():
                    if "response.output_text.delta" in line:
                        break
            await wait_until(lambda: shell.stats.aborted_requests == 1)
        metrics = (await stack.http.get("/metrics")).text
        assert f'dynamo_lite_frontend_inflight_requests{{model="{MODEL}"}} 0.0' in metrics
        assert f'endpoint="responses",model="{MODEL}",status="499"}} 1.0' in metrics


@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"background": True}, "background"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "text.format"),  # no name
    ({"input": 5}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"truncation": "auto"}, "truncation"),
])
async def test_responses_refuses_what_it_cannot_honour(model_dir, extra, param):
    async with running_stack() as stack:
        engine = ScriptedEngine(model_dir)
        await stack.add_worker(engine)
        response = await stack.http.post("/v1/responses", json={"model": MODEL, "input": "hi", **extra})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"].startswith(param), error
        assert engine.requests == []


async def test_responses_store_false_and_metadata_are_accepted(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.post("/v1/responses", json={"model": MODEL, "input": "hi", "store": False,
                                                                "metadata": {"k": "v"}, "user": "u1"})
        assert response.status_code == 200, response.text
        assert response.json()["metadata"] == {"k": "v"} and response.json()["store"] is False


async def test_responses_unknown_model_is_404(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.post("/v1/responses", json={"model": "nope", "input": "hi"})
        assert response.status_code == 404 and response.json()["error"]["param"] == "model"


# ====================================================================== /v1/messages


def messages_body(**extra) -> dict:
    return {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "Say hello"}], **extra}


async def test_messages_answer_shape_and_prompt(model_dir):
    async with running_stack() as stack:
        engine = ScriptedEngine(model_dir, cached_tokens=4)
        await stack.add_worker(engine)
        body = messages_body(system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}],
                             messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}],
                             temperature=0.0, top_k=5, metadata={"user_id": "u1"})
        response = await stack.http.post("/v1/messages", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        AnthropicMessage.model_validate(answer)
        prompt = templated_ids([{"role": "system", "content": "Be brief"},
                                {"role": "user", "content": "Say hello"}])
        assert answer["id"].startswith("msg_")
        assert {k: v for k, v in answer.items() if k != "id"} == {
            "type": "message", "role": "assistant", "model": MODEL,
            "content": [{"type": "text", "text": REPLY}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": len(prompt) - 4, "output_tokens": len(REPLY_IDS),
                      "cache_read_input_tokens": 4}}
        sent = engine.requests[0]
        assert sent.token_ids == prompt
        assert sent.sampling.max_tokens == 64 and sent.sampling.top_k == 5


async def test_messages_max_tokens_and_stop_sequences(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        answer = (await stack.http.post("/v1/messages", json=messages_body(max_tokens=5))).json()
        assert answer["stop_reason"] == "max_tokens" and answer["content"][0]["text"] == REPLY[:5]
        body = messages_body(stop_sequences=["here", "STOP"])
        answer = (await stack.http.post("/v1/messages", json=body)).json()
        assert answer["content"][0]["text"] == "Hello world! "
        assert (answer["stop_reason"], answer["stop_sequence"]) == ("stop_sequence", "STOP")  # first found
        response = await stack.http.post("/v1/messages", json={**body, "stream": True})
        events = named_events(response.text)
        assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}
        text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
        assert text == "Hello world! "


async def test_messages_stream_events(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir, cached_tokens=4))
        response = await stack.http.post("/v1/messages", json=messages_body(stream=True))
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = named_events(response.text)
        names = [name for name, _ in events]
        assert names == ["message_start", "content_block_start",
                         *["content_block_delta"] * (len(REPLY_IDS) - 1),
                         "content_block_stop", "message_delta", "message_stop"]
        for name, data in events:
            assert data["type"] == name
            ANTHROPIC_EVENTS.validate_python(data)  # the anthropic package's own event types
        start = events[0][1]["message"]
        assert start["id"].startswith("msg_") and start["content"] == [] and start["model"] == MODEL
        # The prompt is known before the first token; as in vLLM, nothing is counted as cached yet.
        prompt = len(templated_ids([{"role": "user", "content": "Say hello"}]))
        assert start["usage"] == {"input_tokens": prompt, "output_tokens": 0}
        assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text",
                                                                                          "text": ""}}
        text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
        assert text == REPLY
        delta = events[-2][1]
        assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
        assert delta["usage"] == {"input_tokens": prompt - 4, "output_tokens": len(REPLY_IDS),
                                  "cache_read_input_tokens": 4}


@pytest.mark.parametrize("body, status, error_type, words", [
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request_error",
     "max_tokens"),
    (messages_body(tools=[{"name": "f", "input_schema": {}}]), 400, "invalid_request_error", "tools"),
    (messages_body(thinking={"type": "enabled", "budget_tokens": 1024}), 400, "invalid_request_error",
     "thinking"),
    (messages_body(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]), 400,
     "invalid_request_error", "messages[0].content"),
    (messages_body(messages=[{"role": "system", "content": "x"}]), 400, "invalid_request_error", "role"),
    (messages_body(max_tokens="5"), 400, "invalid_request_error", "max_tokens"),
    (messages_body(model="nope"), 404, "not_found_error", "nope"),
])
async def test_messages_errors_in_anthropic_shape(model_dir, body, status, error_type, words):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.post("/v1/messages", json=body)
        assert response.status_code == status, response.text
        error = response.json()
        assert error["type"] == "error" and error["error"]["type"] == error_type
        assert words in error["error"]["message"]


async def test_messages_too_long_for_the_context_is_400(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.post("/v1/messages", json=messages_body(max_tokens=CONTEXT * 2))
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path, headers, status", [
    ("/v1/messages", {"x-api-key": KEY}, 200),
    ("/v1/messages", {"Authorization": f"Bearer {KEY}"}, 200),
    ("/v1/messages", {"x-api-key": "sk-wrong"}, 401),
    ("/v1/messages", {}, 401),
    ("/v1/responses", {"Authorization": f"Bearer {KEY}"}, 200),
    ("/v1/responses", {"x-api-key": KEY}, 401),  # OpenAI's API takes bearer tokens only
])
async def test_api_keys_on_the_adapters(model_dir, path, headers, status):
    async with running_stack(api_key=(KEY,)) as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        body = messages_body() if path == "/v1/messages" else {"model": MODEL, "input": "hi"}
        response = await stack.http.post(path, json=body, headers=headers)
        assert response.status_code == status, response.text
        if status == 401 and path == "/v1/messages":
            assert response.json()["type"] == "error"
            assert response.json()["error"]["type"] == "authentication_error"


async def test_messages_stream_client_gone_aborts_the_worker(model_dir):
    async with running_stack() as stack:
        shell = await stack.add_worker(ScriptedEngine(model_dir, token_delay=0.2))
        async with over_real_http(stack) as http:
            async with http.stream("POST", "/v1/messages", json=messages_body(stream=True)) as response:
                async for line in response.aiter_lines():
                    if "content_block_delta" in line:
                        break
            await wait_until(lambda: shell.stats.aborted_requests == 1)
        metrics = (await stack.http.get("/metrics")).text
        assert f'endpoint="messages",model="{MODEL}",status="499"}} 1.0' in metrics


async def test_a_worker_dying_mid_stream_is_an_error_event_on_both(model_dir):
    """After the first text the status line is out: the failure is an `error` event in each API's shape,
    and the stream ends there (no response.completed / message_stop)."""
    router = PreferRouter()
    async with running_stack(router) as stack:
        server, address = await dying_worker_server(tokens_before_death=4)
        stack.servers.append(server)
        router.preferred = await stack.register(address, str(model_dir), migration_limit=0)
        body = {"model": MODEL, "input": "hi", "stream": True}
        response = await stack.http.post("/v1/responses", json=body)
        events = named_events(response.text)
        assert [name for name, _ in events][-2:] == ["response.output_text.delta", "error"]
        error = events[-1][1]
        RESPONSE_EVENTS.validate_python(error)
        assert error["sequence_number"] == len(events) - 1 and "closed the stream" in error["message"]

        router.preferred = await stack.register(address, str(model_dir), migration_limit=0)
        response = await stack.http.post("/v1/messages", json=messages_body(stream=True))
        events = named_events(response.text)
        assert [name for name, _ in events][-2:] == ["content_block_delta", "error"]
        assert events[-1][1]["type"] == "error" and events[-1][1]["error"]["type"] == "overloaded_error"


TOOL = {"type": "function", "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


async def test_responses_function_tools_answer_function_call_items(model_dir):
    from tests.integration.test_tool_choice import REQUIRED_ANSWER, AnsweringEngine

    async with running_stack() as stack:
        engine = AnsweringEngine(model_dir, REQUIRED_ANSWER)
        await stack.add_worker(engine)
        body = {"model": MODEL, "input": "Weather in Paris?", "tools": [TOOL], "tool_choice": "required"}
        response = await stack.http.post("/v1/responses", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        OpenAIResponse.model_validate(answer)
        [call] = answer["output"]
        assert call["type"] == "function_call" and call["name"] == "get_weather"
        assert json.loads(call["arguments"]) == {"city": "Paris"} and call["call_id"].startswith("call_")
        assert answer["tools"] == [TOOL] and answer["tool_choice"] == "required"

        streamed = await stack.http.post("/v1/responses", json={**body, "stream": True})
        events = named_events(streamed.text)
        for _, data in events:
            RESPONSE_EVENTS.validate_python(data)
        assert [name for name, _ in events] == [
            "response.created", "response.in_progress", "response.output_item.added",
            "response.function_call_arguments.delta", "response.function_call_arguments.done",
            "response.output_item.done", "response.completed"]
        [final] = events[-1][1]["response"]["output"]
        assert final["type"] == "function_call" and json.loads(final["arguments"]) == {"city": "Paris"}


async def test_responses_stream_a_named_calls_arguments_as_they_are_generated(model_dir):
    from tests.integration.test_tool_choice import AnsweringEngine

    arguments = '{"city": "Paris"}'
    async with running_stack() as stack:
        await stack.add_worker(AnsweringEngine(model_dir, arguments))  # 3 tokens a frame
        body = {"model": MODEL, "input": "Weather in Paris?", "tools": [TOOL], "stream": True,
                "tool_choice": {"type": "function", "name": "get_weather"}}
        response = await stack.http.post("/v1/responses", json=body)
        assert response.status_code == 200, response.text
        events = named_events(response.text)
        for _, data in events:
            RESPONSE_EVENTS.validate_python(data)
        names = [name for name, _ in events]
        deltas = [data for name, data in events if name == "response.function_call_arguments.delta"]
        assert len(deltas) > 2  # in pieces, not one delta at the end
        assert names == ["response.created", "response.in_progress", "response.output_item.added",
                         *["response.function_call_arguments.delta"] * len(deltas),
                         "response.function_call_arguments.done", "response.output_item.done",
                         "response.completed"]
        added = events[2][1]["item"]
        assert added["type"] == "function_call" and added["name"] == "get_weather"
        assert added["arguments"] == "" and added["status"] == "in_progress"
        assert {d["item_id"] for d in deltas} == {added["id"]} and {d["output_index"] for d in deltas} == {0}
        assert "".join(d["delta"] for d in deltas) == arguments == events[-3][1]["arguments"]
        [final] = events[-1][1]["response"]["output"]
        assert final == events[-2][1]["item"]
        assert (final["id"], final["arguments"], final["status"]) == (added["id"], arguments, "completed")


async def test_responses_json_schema_format_constrains_the_worker(model_dir):
    async with running_stack() as stack:
        engine = ScriptedEngine(model_dir)
        await stack.add_worker(engine)
        schema = {"type": "object", "properties": {"a": {"type": "string"}}}
        text = {"format": {"type": "json_schema", "name": "x", "schema": schema, "strict": True}}
        response = await stack.http.post("/v1/responses", json={"model": MODEL, "input": "hi", "text": text})
        assert response.status_code == 200, response.text
        assert json.loads(engine.requests[0].sampling.structured_output.json) == schema
        assert response.json()["text"] == text
