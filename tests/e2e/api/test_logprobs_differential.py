"""Logprobs and n > 1 through this project and through vLLM's own server: greedy token logprobs equal
within 1e-3 (their token strings equal), echo with the prompt's logprobs, streamed logprobs equal to the
whole answer's, seeded n choices equal choice by choice, the official `openai` client for each shape,
and the same 400 for top_logprobs past the limit."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.vllm

TOLERANCE = 1e-3
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PROMPT = "The three primary colors are"


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120)


def _both(api_pair, path: str, body: dict) -> dict[str, dict]:
    answers = {}
    for side, url in api_pair.urls().items():
        r = _post(url, path, {"model": api_pair.model, **body})
        assert r.status_code == 200, f"{side}: {r.status_code} {r.text}"
        answers[side] = r.json()
    return answers


def _stream(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _close(a: float | None, b: float | None) -> bool:
    return a is None and b is None or a is not None and b is not None and abs(a - b) <= TOLERANCE


def _assert_chat_entries_equal(ours: list[dict], vllm: list[dict]) -> None:
    assert [e["token"] for e in ours] == [e["token"] for e in vllm]
    assert [e["bytes"] for e in ours] == [e["bytes"] for e in vllm]
    for mine, theirs in zip(ours, vllm):
        assert _close(mine["logprob"], theirs["logprob"]), (mine, theirs)
        assert [t["token"] for t in mine["top_logprobs"]] == [t["token"] for t in theirs["top_logprobs"]]
        assert [t["bytes"] for t in mine["top_logprobs"]] == [t["bytes"] for t in theirs["top_logprobs"]]
        pairs = zip(mine["top_logprobs"], theirs["top_logprobs"])
        assert all(_close(a["logprob"], b["logprob"]) for a, b in pairs)


def _assert_completion_logprobs_equal(ours: dict, vllm: dict) -> None:
    assert ours["tokens"] == vllm["tokens"]
    assert ours["text_offset"] == vllm["text_offset"]
    assert all(_close(a, b) for a, b in zip(ours["token_logprobs"], vllm["token_logprobs"], strict=True))
    for mine, theirs in zip(ours["top_logprobs"], vllm["top_logprobs"], strict=True):
        if theirs is None:
            assert mine is None
            continue
        assert list(mine) == list(theirs)  # the same token strings, in vLLM's order
        assert all(_close(mine[k], theirs[k]) for k in theirs)


def test_greedy_chat_logprobs_equal(api_pair):
    answers = _both(api_pair, "/v1/chat/completions", {
        "messages": QUESTION, "max_tokens": 16, "temperature": 0, "logprobs": True, "top_logprobs": 5})
    ours, vllm = (answers[s]["choices"][0] for s in ("ours", "vllm"))
    assert ours["message"]["content"] == vllm["message"]["content"]
    content = ours["logprobs"]["content"]
    assert len(content) == answers["ours"]["usage"]["completion_tokens"]
    assert all(len(e["top_logprobs"]) == 5 for e in content)
    _assert_chat_entries_equal(content, vllm["logprobs"]["content"])


def test_greedy_completion_logprobs_equal(api_pair):
    answers = _both(api_pair, "/v1/completions", {"prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                                                  "logprobs": 3})
    ours, vllm = (answers[s]["choices"][0] for s in ("ours", "vllm"))
    assert ours["text"] == vllm["text"]
    assert "".join(ours["logprobs"]["tokens"]) == ours["text"]
    _assert_completion_logprobs_equal(ours["logprobs"], vllm["logprobs"])


def test_echo_with_logprobs_equal(api_pair):
    answers = _both(api_pair, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                                  "echo": True, "logprobs": 2})
    ours, vllm = (answers[s]["choices"][0] for s in ("ours", "vllm"))
    assert ours["text"] == vllm["text"] and ours["text"].startswith(PROMPT)
    assert ours["logprobs"]["token_logprobs"][0] is None  # nothing predicts the prompt's first token
    _assert_completion_logprobs_equal(ours["logprobs"], vllm["logprobs"])
    # vLLM's own prompt_logprobs field, per prompt token: {token id: {logprob, rank, decoded_token}}.
    mine, theirs = ours["prompt_logprobs"], vllm["prompt_logprobs"]
    assert len(mine) == len(theirs) and mine[0] is None and theirs[0] is None
    for a, b in zip(mine[1:], theirs[1:]):
        assert list(a) == list(b)
        for token_id in b:
            assert a[token_id]["rank"] == b[token_id]["rank"]
            assert a[token_id]["decoded_token"] == b[token_id]["decoded_token"]
            assert _close(a[token_id]["logprob"], b[token_id]["logprob"])


def test_echo_without_logprobs_equal(api_pair):
    answers = _both(api_pair, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                                  "echo": True})
    assert answers["ours"]["choices"][0]["text"] == answers["vllm"]["choices"][0]["text"]
    assert answers["ours"]["choices"][0]["logprobs"] is None


def test_chat_prompt_logprobs_equal(api_pair):
    answers = _both(api_pair, "/v1/chat/completions", {
        "messages": QUESTION, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 1})
    mine, theirs = answers["ours"]["prompt_logprobs"], answers["vllm"]["prompt_logprobs"]
    assert len(mine) == answers["ours"]["usage"]["prompt_tokens"] == len(theirs)
    for a, b in zip(mine[1:], theirs[1:]):
        assert {k: (v["rank"], v["decoded_token"]) for k, v in a.items()} == {
            k: (v["rank"], v["decoded_token"]) for k, v in b.items()}


def test_streamed_chat_logprobs_equal_the_whole_answer(api_pair):
    body = {"model": api_pair.model, "messages": QUESTION, "max_tokens": 16, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    whole = _post(api_pair.ours.base_url, "/v1/chat/completions", body).json()["choices"][0]
    streams = {side: _stream(url, "/v1/chat/completions", body) for side, url in api_pair.urls().items()}
    entries = {side: [e for c in chunks for choice in c["choices"] if choice.get("logprobs")
                      for e in choice["logprobs"]["content"]] for side, chunks in streams.items()}
    assert entries["ours"] == whole["logprobs"]["content"]
    _assert_chat_entries_equal(entries["ours"], entries["vllm"])


def test_streamed_completion_logprobs_equal_the_whole_answer(api_pair):
    body = {"model": api_pair.model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 2,
            "echo": True}
    whole = _post(api_pair.ours.base_url, "/v1/completions", body).json()["choices"][0]
    for side, url in api_pair.urls().items():
        pieces = [c["choices"][0] for c in _stream(url, "/v1/completions", body) if c["choices"]]
        joined = {key: [e for p in pieces if p["logprobs"] for e in p["logprobs"][key]]
                  for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        assert "".join(p["text"] for p in pieces) == whole["text"], side
        if side == "ours":
            assert joined == whole["logprobs"]
        else:
            _assert_completion_logprobs_equal(whole["logprobs"], joined)


SEEDED = {"n": 3, "seed": 1234, "temperature": 1.0, "max_tokens": 12}


def test_seeded_n_chat_choices_equal(api_pair):
    answers = _both(api_pair, "/v1/chat/completions", {"messages": QUESTION, **SEEDED})
    texts = {side: [c["message"]["content"] for c in a["choices"]] for side, a in answers.items()}
    assert [c["index"] for c in answers["ours"]["choices"]] == [0, 1, 2]
    assert texts["ours"] == texts["vllm"]
    assert len(set(texts["ours"])) > 1, "the choices are all alike: n was not sampled"
    for key in ("prompt_tokens", "completion_tokens"):  # completion tokens: all choices'
        assert answers["ours"]["usage"][key] == answers["vllm"]["usage"][key], key


def test_seeded_n_completion_choices_equal_with_logprobs(api_pair):
    answers = _both(api_pair, "/v1/completions", {"prompt": PROMPT, **SEEDED, "logprobs": 1})
    for ours, vllm in zip(answers["ours"]["choices"], answers["vllm"]["choices"], strict=True):
        assert ours["index"] == vllm["index"] and ours["text"] == vllm["text"]
        assert ours["finish_reason"] == vllm["finish_reason"]
        _assert_completion_logprobs_equal(ours["logprobs"], vllm["logprobs"])
    assert answers["ours"]["usage"]["completion_tokens"] == answers["vllm"]["usage"]["completion_tokens"]


def test_streamed_n_choices_have_every_index_and_equal_vllms(api_pair):
    body = {"model": api_pair.model, "messages": QUESTION, **SEEDED}
    texts = {}
    for side, url in api_pair.urls().items():
        chunks = _stream(url, "/v1/chat/completions", body)
        by_index: dict[int, list[str]] = {}
        finishes: dict[int, list[str]] = {}
        for chunk in chunks:
            for choice in chunk["choices"]:
                by_index.setdefault(choice["index"], []).append(choice["delta"].get("content") or "")
                if choice["finish_reason"]:
                    finishes.setdefault(choice["index"], []).append(choice["finish_reason"])
        assert sorted(by_index) == [0, 1, 2], side
        assert all(len(finishes[i]) == 1 for i in range(3)), (side, finishes)
        texts[side] = ["".join(by_index[i]) for i in range(3)]
    assert texts["ours"] == texts["vllm"]


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


def test_openai_client_reads_chat_logprobs_and_n(api_pair):
    sampled = {"n": 2, "seed": 99, "temperature": 1.0, "max_tokens": 8}
    answers = {side: _client(url).chat.completions.create(
        model=api_pair.model, messages=QUESTION, logprobs=True, top_logprobs=2, **sampled)
        for side, url in api_pair.urls().items()}
    ours, vllm = answers["ours"], answers["vllm"]
    assert [c.index for c in ours.choices] == [0, 1]
    for mine, theirs in zip(ours.choices, vllm.choices, strict=True):
        assert mine.message.content == theirs.message.content
        assert [e.token for e in mine.logprobs.content] == [e.token for e in theirs.logprobs.content]
        assert [[t.token for t in e.top_logprobs] for e in mine.logprobs.content] == [
            [t.token for t in e.top_logprobs] for e in theirs.logprobs.content]
    stream = _client(api_pair.ours.base_url).chat.completions.create(
        model=api_pair.model, messages=QUESTION, logprobs=True, stream=True, **sampled)
    tokens: dict[int, list[str]] = {0: [], 1: []}
    for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs is not None:
                tokens[choice.index].extend(e.token for e in choice.logprobs.content)
    assert [tokens[0], tokens[1]] == [[e.token for e in c.logprobs.content] for c in vllm.choices]


def test_openai_client_reads_completion_logprobs_and_echo(api_pair):
    answers = {side: _client(url).completions.create(
        model=api_pair.model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2, echo=True)
        for side, url in api_pair.urls().items()}
    ours, vllm = answers["ours"].choices[0], answers["vllm"].choices[0]
    assert ours.text == vllm.text
    assert ours.logprobs.tokens == vllm.logprobs.tokens
    assert ours.logprobs.text_offset == vllm.logprobs.text_offset
    assert [list(t) if t else None for t in ours.logprobs.top_logprobs] == [
        list(t) if t else None for t in vllm.logprobs.top_logprobs]
    stream = _client(api_pair.ours.base_url).completions.create(
        model=api_pair.model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2, echo=True, stream=True)
    streamed = [t for chunk in stream for choice in chunk.choices if choice.logprobs
                for t in choice.logprobs.tokens]
    assert streamed == vllm.logprobs.tokens


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 21}, "logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ("/v1/chat/completions", {"messages": QUESTION, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "n": 2, "temperature": 0}, None),  # greedy n: vLLM's rule
], ids=["top_logprobs-21", "logprobs-21", "top_logprobs-alone", "prompt_logprobs-streamed", "greedy-n"])
def test_bad_logprobs_and_n_are_400_on_both(api_pair, path, fields, param):
    for side, url in api_pair.urls().items():
        r = _post(url, path, {"model": api_pair.model, "max_tokens": 4, **fields})
        assert r.status_code == 400, f"{side}: {r.status_code} {r.text}"
    body = {"model": api_pair.model, "max_tokens": 4, **fields}
    error = _post(api_pair.ours.base_url, path, body).json()["error"]
    if param is not None:
        assert error["param"] == param, error
