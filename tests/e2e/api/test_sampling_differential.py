"""vLLM's extra sampling fields and structured outputs, through this project and through vLLM's own
server: greedy answers equal, and structured answers valid against their constraint on both."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

pytestmark = pytest.mark.vllm

QUESTION = [{"role": "user", "content": "Describe Paris in one sentence."}]


def _both(api_pair, path: str, body: dict) -> dict[str, dict]:
    replies = api_pair.on_both(lambda url: httpx.post(f"{url}{path}", json={"model": api_pair.model, **body},
                                                      timeout=120))
    answers = {}
    for side, r in replies.items():
        assert r.status_code == 200, f"{side}: {r.status_code} {r.text}"
        answers[side] = r.json()["choices"][0]
    return answers


def _chat_texts(api_pair, **fields) -> dict[str, str]:
    answers = _both(api_pair, "/v1/chat/completions",
                    {"messages": QUESTION, "max_tokens": 24, "temperature": 0, **fields})
    return {side: answer["message"]["content"] for side, answer in answers.items()}


@pytest.mark.parametrize("fields", [
    {"repetition_penalty": 1.3},
    {"min_p": 0.3, "temperature": 0.8, "seed": 7},
    {"bad_words": ["Paris"]},
], ids=lambda f: ",".join(f))
def test_sampling_fields_change_the_answer_the_same_way(api_pair, fields):
    texts = _chat_texts(api_pair, **fields)
    assert texts["ours"] == texts["vllm"]
    assert texts["ours"] != _chat_texts(api_pair)["ours"], "the field changed nothing: not tested"


def test_min_tokens_continue_past_the_end_the_same_way(api_pair):
    short = [{"role": "user", "content": "What is the capital of France? One word."}]
    answers = {}
    for min_tokens in (0, 30):
        answers[min_tokens] = _both(api_pair, "/v1/chat/completions", {
            "messages": short, "max_tokens": 40, "temperature": 0, "min_tokens": min_tokens})
    assert answers[0]["ours"]["message"]["content"] == answers[0]["vllm"]["message"]["content"]
    assert answers[30]["ours"]["message"]["content"] == answers[30]["vllm"]["message"]["content"]
    assert len(answers[30]["ours"]["message"]["content"]) > len(answers[0]["ours"]["message"]["content"])


def _token_ids(api_pair, text: str) -> list[int]:
    r = httpx.post(f"{api_pair.reference_url}/tokenize",
                   json={"model": api_pair.model, "prompt": text, "add_special_tokens": False})
    return r.json()["tokens"]


@pytest.mark.parametrize("field", ["logit_bias", "stop_token_ids"])
def test_token_fields_change_the_answer_the_same_way(api_pair, field):
    plain = _chat_texts(api_pair)["ours"]
    token = _token_ids(api_pair, " city")[0]
    assert token in _token_ids(api_pair, plain), plain  # what the field acts on is in the plain answer
    fields = {"logit_bias": {str(token): -100}} if field == "logit_bias" else {"stop_token_ids": [token]}
    texts = _chat_texts(api_pair, **fields)
    assert texts["ours"] == texts["vllm"] != plain


def _finish_chunk(api_pair, url: str, path: str, body: dict) -> dict:
    """The streamed choice that carries the finish_reason."""
    r = httpx.post(f"{url}{path}", json={"model": api_pair.model, **body, "stream": True}, timeout=120)
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    return next(c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])


CITIES = "The largest city in France is Paris. The largest city in Italy is Rome. The largest city in"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stop_reason_is_vllms_whole_and_streamed(api_pair, path):
    token = _token_ids(api_pair, " city")[0]
    short = [{"role": "user", "content": "What is the capital of France? One word."}]
    cases = [({"stop": ["city"]}, QUESTION), ({"stop_token_ids": [token]}, QUESTION),
             ({"max_tokens": 3}, QUESTION), ({}, short)]  # a stop string, a stop token, length, EOS
    seen = set()
    for fields, messages in cases:
        prompt = {"messages": messages} if path == "/v1/chat/completions" else {"prompt": CITIES}
        body = {"max_tokens": 40, "temperature": 0, **prompt, **fields}
        whole = _both(api_pair, path, body)
        mine = (whole["ours"]["finish_reason"], whole["ours"]["stop_reason"])
        assert mine == (whole["vllm"]["finish_reason"], whole["vllm"]["stop_reason"]), fields
        streamed = api_pair.on_both(lambda url: _finish_chunk(api_pair, url, path, body))  # noqa: B023 - called here
        assert streamed["ours"]["stop_reason"] == streamed["vllm"]["stop_reason"] == mine[1], fields
        seen.add(type(mine[1]))
    assert seen >= {str, int}, "no stop string or stop token reached: not tested"


def test_allowed_token_ids_limit_the_answer_on_both(api_pair):
    allowed = _token_ids(api_pair, " yes no,")
    answers = _both(api_pair, "/v1/completions", {"prompt": "Is water wet?", "max_tokens": 8, "temperature": 0,
                                                  "allowed_token_ids": allowed})
    assert answers["ours"]["text"] == answers["vllm"]["text"]
    assert set(answers["ours"]["text"].replace(",", " ").split()) <= {"yes", "no"}


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("fields, check", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                  "strict": True}}},
     lambda text: jsonschema.validate(json.loads(text), PERSON)),
    ({"response_format": {"type": "json_object"}}, lambda text: json.loads(text)),
    ({"structured_outputs": {"json": PERSON}}, lambda text: jsonschema.validate(json.loads(text), PERSON)),
    ({"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}},
     lambda text: re.fullmatch("[0-9]{3}-[0-9]{4}", text) or pytest.fail(text)),
    ({"structured_outputs": {"choice": ["sunny", "rainy", "cloudy"]}},
     lambda text: text in ("sunny", "rainy", "cloudy") or pytest.fail(text)),
    ({"structured_outputs": {"grammar": 'root ::= "The answer is " [0-9]+ "."'}},
     lambda text: re.fullmatch("The answer is [0-9]+[.]", text) or pytest.fail(text)),
], ids=["json_schema", "json_object", "json", "regex", "choice", "grammar"])
def test_structured_outputs_satisfy_their_constraint_on_both(api_pair, fields, check):
    body = {"messages": [{"role": "user", "content": "Give me a person as JSON, or a fact."}],
            "max_tokens": 200, "temperature": 0, **fields}
    answers = _both(api_pair, "/v1/chat/completions", body)
    for side, answer in answers.items():
        assert answer["finish_reason"] == "stop", (side, answer)  # complete, so it can be checked whole
        check(answer["message"]["content"])
    assert answers["ours"]["message"]["content"] == answers["vllm"]["message"]["content"]


def test_a_schema_the_grammar_engine_cannot_compile_is_a_400(api_pair):
    # Valid JSON Schema, but a pattern xgrammar rejects: the worker's 400, not a 500.
    schema = {"type": "string", "pattern": "(?<=a)b"}
    r = httpx.post(f"{api_pair.ours.base_url}/v1/chat/completions", timeout=60, json={
        "model": api_pair.model, "messages": QUESTION, "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
