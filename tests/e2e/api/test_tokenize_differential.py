"""/tokenize, /detokenize and /version through this project and through vLLM's own server: the same
answers for text, chat messages and special tokens. Then API keys with the official `openai` client,
on a second frontend of the pair's namespace started with --api-key (no extra engine)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.harness import healthy_instances, wait_until

pytestmark = pytest.mark.vllm

TEXTS = ["The three primary colors are", "  leading spaces, tabs\tand\nnewlines ",
         "héllo wörld 世界 🙂",
         "<|im_start|>user\nhi<|im_end|>\n"]  # the last one holds the model's special tokens as text

CHATS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
     "add_generation_prompt": False},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "part one"},
                                               {"type": "text", "text": "part two"}]}]},
    {"messages": [{"role": "user", "content": "Count to three"},
                  {"role": "assistant", "content": "one, two,"}],
     "add_generation_prompt": False, "continue_final_message": True},
    {"messages": [{"role": "user", "content": "Hi"}], "add_special_tokens": True, "return_token_strs": True},
]


def _both(api_pair, path: str, body: dict, model: bool = True) -> dict[str, httpx.Response]:
    payload = {"model": api_pair.model, **body} if model else body
    return {side: httpx.post(f"{url}{path}", json=payload, timeout=60)
            for side, url in api_pair.urls().items()}


def _equal_answers(answers: dict[str, httpx.Response]) -> dict:
    for side, r in answers.items():
        assert r.status_code == 200, f"{side}: {r.status_code} {r.text}"
    assert answers["ours"].json() == answers["vllm"].json()
    return answers["ours"].json()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_tokenize_text_equal(api_pair, text, add_special_tokens):
    body = _equal_answers(_both(api_pair, "/tokenize", {"prompt": text, "return_token_strs": True,
                                                        "add_special_tokens": add_special_tokens}))
    assert body["count"] == len(body["tokens"]) > 0


@pytest.mark.parametrize("chat", CHATS, ids=["question", "multi-turn", "text-parts", "continue", "strs"])
def test_tokenize_chat_equal(api_pair, chat):
    _equal_answers(_both(api_pair, "/tokenize", chat))


def test_tokenize_without_model_equal(api_pair):
    _equal_answers(_both(api_pair, "/tokenize", {"prompt": "no model named"}, model=False))


def test_detokenize_equal_with_special_tokens(api_pair):
    for text in TEXTS:
        ids = _equal_answers(_both(api_pair, "/tokenize", {"prompt": text}))["tokens"]
        body = _equal_answers(_both(api_pair, "/detokenize", {"tokens": ids}))
        assert body["prompt"] == text


def test_unknown_model_is_404_on_both(api_pair):
    answers = _both(api_pair, "/tokenize", {"model": "no-such-model", "prompt": "x"}, model=False)
    assert {side: r.status_code for side, r in answers.items()} == {"ours": 404, "vllm": 404}


def test_version_answers(api_pair):
    for side, url in api_pair.urls().items():
        r = httpx.get(f"{url}/version", timeout=10)
        assert r.status_code == 200, side
        assert isinstance(r.json()["version"], str) and r.json()["version"]


@pytest.fixture(scope="module")
def keyed_frontend(api_pair):
    """A second frontend on the pair's workers, with two API keys."""
    proc, url = api_pair.ours.start_frontend("frontend-keys", "--api-key", "sk-one", "sk-two")
    try:
        wait_until(lambda: healthy_instances(url, api_pair.model), 60, f"{url}/health", [proc])
        yield url
    finally:
        proc.stop()


def test_api_keys_with_the_openai_client(api_pair, keyed_frontend):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    wrong = openai.OpenAI(base_url=f"{keyed_frontend}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        wrong.chat.completions.create(model=api_pair.model, messages=question, max_tokens=4)
    assert denied.value.status_code == 401
    error = denied.value.body
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    # No key at all: the same 401, in OpenAI's error JSON.
    r = httpx.post(f"{keyed_frontend}/v1/chat/completions", timeout=10,
                   json={"model": api_pair.model, "messages": question, "max_tokens": 4})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"

    for key in ("sk-one", "sk-two"):
        client = openai.OpenAI(base_url=f"{keyed_frontend}/v1", api_key=key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model=api_pair.model, messages=question, max_tokens=8, temperature=0,
            extra_headers={"X-Request-Id": f"e2e-{key}"})
        assert raw.headers["x-request-id"] == f"e2e-{key}"
        assert "Paris" in raw.parse().choices[0].message.content
        assert [m.id for m in client.models.list()] == [api_pair.model]
    # Probes and the tokenizer endpoints stay open, as on vLLM's server with --api-key.
    assert httpx.get(f"{keyed_frontend}/health", timeout=10).status_code == 200
    assert httpx.post(f"{keyed_frontend}/tokenize", json={"prompt": "x"}, timeout=10).status_code == 200
