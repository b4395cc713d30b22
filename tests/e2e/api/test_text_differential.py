"""Plain text through this project and through vLLM's own server: greedy answers are equal."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.vllm


def _both(api_pair, path: str, body: dict) -> dict[str, dict]:
    replies = api_pair.on_both(lambda url: httpx.post(f"{url}{path}", json={"model": api_pair.model, **body},
                                                      timeout=120))
    answers = {}
    for side, r in replies.items():
        assert r.status_code == 200, f"{side}: {r.status_code} {r.text}"
        answers[side] = r.json()
    return answers


def test_greedy_chat_equal(api_pair):
    answers = _both(api_pair, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                     "max_tokens": 24, "temperature": 0})
    ours, vllm = (answers[s]["choices"][0] for s in ("ours", "vllm"))
    assert ours["message"]["content"] == vllm["message"]["content"]
    assert "Paris" in ours["message"]["content"]
    assert ours["finish_reason"] == vllm["finish_reason"]
    assert answers["ours"]["usage"]["prompt_tokens"] == answers["vllm"]["usage"]["prompt_tokens"]


def test_greedy_completion_equal(api_pair):
    answers = _both(api_pair, "/v1/completions",
                    {"prompt": "The three primary colors are", "max_tokens": 24, "temperature": 0})
    assert answers["ours"]["choices"][0]["text"] == answers["vllm"]["choices"][0]["text"]
