"""/v1/responses and /v1/messages through this project and through vLLM's own server (0.32 serves
both), with the official `openai` and `anthropic` clients: greedy answers, stop reasons, usage and the
streamed event type sequences are equal."""

from __future__ import annotations

import anthropic
import openai
import pytest

pytestmark = pytest.mark.vllm

MAX_TOKENS = 16  # short enough for the CPU engines
INSTRUCTIONS = "Answer in one short sentence."
QUESTION = "What is the capital of France?"



def _event_types(events) -> list[str]:
    """The event types in order, a run of text deltas counted once: how many tokens each delta
    carries is the server's chunking (a worker frame may hold several), not the protocol."""
    types: list[str] = []
    for event in events:
        if not (types and event.type == types[-1] and event.type.endswith("delta")):
            types.append(event.type)
    return types

def _openai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


def _anthropic(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", timeout=120, max_retries=0)


def _responses_request(model: str) -> dict:
    return {"model": model, "instructions": INSTRUCTIONS, "max_output_tokens": MAX_TOKENS, "temperature": 0,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}]}


def test_responses_greedy_equal(api_pair):
    answers = api_pair.on_both(lambda url: _openai(url).responses.create(**_responses_request(api_pair.model)))
    ours, vllm = answers["ours"], answers["vllm"]
    assert ours.output_text == vllm.output_text and "Paris" in ours.output_text
    assert ours.status == vllm.status
    assert ours.id.startswith("resp_") and ours.object == "response"
    assert [item.type for item in ours.output] == [item.type for item in vllm.output]
    assert ours.usage.input_tokens == vllm.usage.input_tokens
    assert ours.usage.output_tokens == vllm.usage.output_tokens


def test_responses_stream_events_equal(api_pair):
    runs = api_pair.on_both(
        lambda url: list(_openai(url).responses.create(**_responses_request(api_pair.model), stream=True)))
    types = {side: _event_types(events) for side, events in runs.items()}
    assert types["ours"] == types["vllm"]
    assert types["ours"][0] == "response.created" and types["ours"][-1] == "response.completed"
    texts = {side: "".join(e.delta for e in events if e.type == "response.output_text.delta")
             for side, events in runs.items()}
    assert texts["ours"] == texts["vllm"] and "Paris" in texts["ours"]
    assert [e.sequence_number for e in runs["ours"]] == list(range(len(runs["ours"])))
    finals = {side: events[-1].response for side, events in runs.items()}
    assert finals["ours"].output_text == texts["ours"]
    assert finals["ours"].usage.output_tokens == finals["vllm"].usage.output_tokens


def _messages_request(model: str) -> dict:
    # The anthropic 2.x client has no sampling arguments any more: temperature goes in the body.
    return {"model": model, "system": INSTRUCTIONS, "max_tokens": MAX_TOKENS,
            "extra_body": {"temperature": 0},
            "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]}


def test_messages_greedy_equal(api_pair):
    answers = api_pair.on_both(lambda url: _anthropic(url).messages.create(**_messages_request(api_pair.model)))
    ours, vllm = answers["ours"], answers["vllm"]
    assert [block.type for block in ours.content] == [block.type for block in vllm.content] == ["text"]
    assert ours.content[0].text == vllm.content[0].text and "Paris" in ours.content[0].text
    assert ours.stop_reason == vllm.stop_reason and ours.stop_sequence == vllm.stop_sequence
    assert ours.id.startswith("msg_") and ours.model == vllm.model
    assert ours.usage.output_tokens == vllm.usage.output_tokens
    # Anthropic's input_tokens leave out prefix-cache reads; both sides report the rest alike.
    assert (ours.usage.input_tokens + (ours.usage.cache_read_input_tokens or 0)
            == vllm.usage.input_tokens + (vllm.usage.cache_read_input_tokens or 0))


def test_messages_stream_events_equal(api_pair):
    runs = api_pair.on_both(
        lambda url: list(_anthropic(url).messages.create(**_messages_request(api_pair.model), stream=True)))
    types = {side: _event_types(events) for side, events in runs.items()}
    assert types["ours"] == types["vllm"]
    assert types["ours"][0] == "message_start" and types["ours"][-1] == "message_stop"
    texts = {side: "".join(e.delta.text for e in events if e.type == "content_block_delta")
             for side, events in runs.items()}
    assert texts["ours"] == texts["vllm"] and "Paris" in texts["ours"]
    deltas = {side: next(e for e in events if e.type == "message_delta") for side, events in runs.items()}
    assert deltas["ours"].delta.stop_reason == deltas["vllm"].delta.stop_reason
    assert deltas["ours"].usage.output_tokens == deltas["vllm"].usage.output_tokens
    # message_start: the prompt's tokens, before anything is generated.
    starts = {side: events[0].message.usage for side, events in runs.items()}
    assert starts["ours"].input_tokens == starts["vllm"].input_tokens > 0
    assert starts["ours"].output_tokens == starts["vllm"].output_tokens == 0


@pytest.mark.parametrize("stream", [False, True])
def test_messages_stop_sequence_equal(api_pair, stream):
    request = {**_messages_request(api_pair.model), "stop_sequences": ["Paris", "France"]}
    answers = {}
    for side, url in api_pair.urls().items():
        client = _anthropic(url)
        if stream:
            events = list(client.messages.create(**request, stream=True))
            delta = next(e for e in events if e.type == "message_delta").delta
            text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
            answers[side] = (text, delta.stop_reason, delta.stop_sequence)
        else:
            message = client.messages.create(**request)
            answers[side] = (message.content[0].text if message.content else "", message.stop_reason,
                             message.stop_sequence)
    assert answers["ours"] == answers["vllm"]
    assert answers["ours"][1] == "stop_sequence" and answers["ours"][2] in ("Paris", "France"), answers
