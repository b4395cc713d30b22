"""vLLM's extra sampling fields and structured outputs reach the worker as SamplingOptions, and the
detokenization options act on the answer (scripted loopback workers of test_frontend_app)."""

from __future__ import annotations

import json

import pytest

from dynamo_lite.protocol.messages import StructuredOutput
from tests.integration.test_frontend_app import (EOS, MODEL, REPLY, TOKENIZER, ScriptedEngine,  # noqa: F401
                                              chat_body, model_dir, running_stack, sse_events)


async def test_vllm_sampling_fields_reach_the_engine(model_dir):
    async with running_stack() as stack:
        engine = ScriptedEngine(model_dir)
        await stack.add_worker(engine)
        response = await stack.http.post("/v1/completions", json={
            "model": MODEL, "prompt": "a", "min_p": 0.05, "repetition_penalty": 1.3,
            "logit_bias": {"65": -100, "66": 2.5}, "allowed_token_ids": [65, 66, 67], "bad_words": ["no way"]})
        assert response.status_code == 200, response.text
        sampling = engine.requests[-1].sampling
        assert sampling.min_p == 0.05 and sampling.repetition_penalty == 1.3
        assert sampling.logit_bias == {65: -100.0, 66: 2.5}
        assert sampling.allowed_token_ids == [65, 66, 67] and sampling.bad_words == ["no way"]
        assert sampling.structured_output is None


async def test_response_format_and_structured_outputs_become_the_engine_constraint(model_dir):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    cases = [
        (chat_body(response_format={"type": "json_object"}), StructuredOutput(json_object=True)),
        (chat_body(response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema,
                                                                            "strict": True}}),
         StructuredOutput(json=json.dumps(schema, separators=(",", ":")))),
        (chat_body(response_format={"type": "text"}), None),
        (chat_body(structured_outputs={"choice": ["yes", "no"]}), StructuredOutput(choice=["yes", "no"])),
        (chat_body(structured_outputs={"regex": "[0-9]+", "disable_any_whitespace": False}),
         StructuredOutput(regex="[0-9]+")),
        (chat_body(structured_outputs={"grammar": 'root ::= "a"'}), StructuredOutput(grammar='root ::= "a"')),
        (chat_body(structured_outputs={"json": json.dumps(schema)}),
         StructuredOutput(json=json.dumps(schema, separators=(",", ":")))),
    ]
    async with running_stack() as stack:
        engine = ScriptedEngine(model_dir)
        await stack.add_worker(engine)
        for body, expected in cases:
            response = await stack.http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, (body, response.text)
            assert engine.requests[-1].sampling.structured_output == expected, body


async def test_include_stop_str_in_output_keeps_the_stop_string(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        for include, expected in ((False, REPLY.split("STOP")[0]), (True, REPLY.split("STOP")[0] + "STOP")):
            response = await stack.http.post("/v1/completions", json={
                "model": MODEL, "prompt": "a", "stop": ["STOP"], "include_stop_str_in_output": include})
            assert response.json()["choices"][0]["text"] == expected


async def test_skip_special_tokens_false_shows_special_tokens(model_dir):
    # REPLY ends with the EOS token <|im_end|>; ignore_eos lets it through as an output token.
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        texts = {}
        for skip in (True, False):
            response = await stack.http.post("/v1/completions", json={
                "model": MODEL, "prompt": "a", "ignore_eos": True, "max_tokens": len(REPLY) + 1,
                "skip_special_tokens": skip})
            texts[skip] = response.json()["choices"][0]["text"]
        assert texts[True] == REPLY and texts[False] == REPLY + "<|im_end|>"


async def test_the_stop_token_is_hidden_unless_include_stop_str_in_output(model_dir):
    # REPLY ends with EOS (a stop token): shown only with include_stop_str_in_output and special tokens
    # kept, as vLLM's detokenizer does; counted in usage either way.
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        answers = {}
        for include in (False, True):
            response = await stack.http.post("/v1/completions", json={
                "model": MODEL, "prompt": "a", "skip_special_tokens": False, "include_stop_str_in_output": include})
            answers[include] = response.json()
        assert answers[False]["choices"][0]["text"] == REPLY
        assert answers[True]["choices"][0]["text"] == REPLY + "<|im_end|>"
        assert answers[False]["usage"]["completion_tokens"] == answers[True]["usage"]["completion_tokens"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_stop_reason_names_the_stop_string_or_stop_token_as_vllm_does(model_dir, path):
    # vLLM's extra field: the matched stop string, the stop_token_ids entry that stopped the choice, or
    # null for EOS and length; whole, and streamed on the chunk with the finish_reason.
    bang = TOKENIZER.token_to_id("!")
    cases = [({"stop": ["STOP"]}, "stop", "STOP"), ({"stop_token_ids": [bang]}, "stop", bang),
             ({}, "stop", None), ({"max_tokens": 3}, "length", None),
             ({"stop": ["STOP"], "include_stop_str_in_output": True}, "stop", "STOP"),
             ({"stop_token_ids": [EOS]}, "stop", None)]  # the tokenizer's EOS stays null, as in vLLM
    chat = path == "/v1/chat/completions"
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        for fields, finish, stop_reason in cases:
            for extra in ({}, {"logprobs": True} if chat else {"echo": True}):  # the plain path and the other
                body = {**(chat_body() if chat else {"model": MODEL, "prompt": "a"}), **fields, **extra}
                whole = await stack.http.post(path, json=body)
                assert whole.status_code == 200, whole.text
                choice = whole.json()["choices"][0]
                assert (choice["finish_reason"], choice["stop_reason"]) == (finish, stop_reason), body
                streamed = await stack.http.post(path, json={**body, "stream": True})
                chunks = [e["choices"][0] for e in sse_events(streamed.text)[:-1]]
                last = chunks[-1]
                assert (last["finish_reason"], last["stop_reason"]) == (finish, stop_reason), body
                if chat:  # vLLM's chat chunks have the field on the finish chunk only
                    assert all("stop_reason" not in c for c in chunks[:-1])
                else:
                    assert all(c["stop_reason"] is None for c in chunks[:-1])
