"""Operations on the frontend app: /tokenize, /detokenize, /version, API keys, X-Request-Id, CORS and
model aliases, over real loopback workers (the in-memory stack of test_frontend_app)."""

from __future__ import annotations

import pytest

from dynamo_lite.engine.base import EngineInfo
from tests.integration.test_frontend_app import (CONTEXT, EOS, MODEL, REPLY, TOKENIZER, ScriptedEngine,
                                                 chat_body, chat_prompt_ids, model_dir, running_stack,
                                                 sse_events)

__all__ = ["model_dir"]  # the module-scoped fixture, shared

KEY = "sk-test-key"
OTHER_KEY = "sk-second-key"
ALIAS = "tiny-chat"


class AliasedEngine(ScriptedEngine):
    """A worker started with `--served-model-name tiny tiny-chat`."""

    async def start(self) -> EngineInfo:
        info = await super().start()
        return EngineInfo(model_name=info.model_name, model_path=info.model_path,
                          context_length=info.context_length, kv_block_size=info.kv_block_size,
                          total_kv_blocks=info.total_kv_blocks, model_aliases=(ALIAS,))


# ====================================================================== /tokenize, /detokenize, /version


async def test_tokenize_a_prompt_with_and_without_token_strings(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.post("/tokenize", json={"model": MODEL, "prompt": "Hi there"})
        assert response.status_code == 200, response.text
        ids = TOKENIZER.encode("Hi there").ids
        assert response.json() == {"count": len(ids), "max_model_len": CONTEXT, "tokens": ids,
                                   "token_strs": None}

        # `model` may be left out while one model is served; token strings are the vocabulary's.
        response = await stack.http.post("/tokenize", json={"prompt": "Hi there", "return_token_strs": True})
        token_strs = response.json()["token_strs"]
        assert token_strs == [TOKENIZER.id_to_token(i) for i in ids] == [*"Hi", "Ġ", *"there"]


async def test_tokenize_chat_messages_renders_the_template(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        messages = [{"role": "user", "content": "Say hello"}]
        body = (await stack.http.post("/tokenize", json={"model": MODEL, "messages": messages})).json()
        assert body["tokens"] == chat_prompt_ids("Say hello") and body["count"] == len(body["tokens"])

        # Without the generation prompt, and continuing a final assistant message where it stops.
        body = (await stack.http.post("/tokenize", json={"messages": messages,
                                                         "add_generation_prompt": False})).json()
        text = TOKENIZER.decode(body["tokens"], skip_special_tokens=False)
        assert text == "<|im_start|>user\nSay hello<|im_end|>\n"
        partial = [*messages, {"role": "assistant", "content": "Hello wor"}]
        body = (await stack.http.post("/tokenize", json={"messages": partial, "add_generation_prompt": False,
                                                         "continue_final_message": True})).json()
        assert TOKENIZER.decode(body["tokens"], skip_special_tokens=False).endswith(
            "<|im_start|>assistant\nHello wor")


async def test_detokenize_keeps_special_tokens(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        ids = TOKENIZER.encode(REPLY).ids + [EOS]
        response = await stack.http.post("/detokenize", json={"model": MODEL, "tokens": ids})
        assert response.status_code == 200, response.text
        assert response.json() == {"prompt": REPLY + "<|im_end|>"}


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("/tokenize", {"model": MODEL, "prompt": "x", "chat_template": "{{ 1 }}"}, 400, "chat_template"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, 400,
     "continue_final_message"),  # together with the default add_generation_prompt=true
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/detokenize", {"model": MODEL, "tokens": [-1]}, 400, "tokens[0]"),
    ("/detokenize", {"model": MODEL, "tokens": [10**9]}, 400, "tokens[0]"),
])
async def test_tokenize_and_detokenize_refuse_bad_input_by_name(model_dir, path, body, status, param):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.post(path, json=body)
        assert response.status_code == status, response.text
        assert response.json()["error"]["param"] == param


async def test_version_answers_without_workers():
    import dynamo_lite

    async with running_stack() as stack:
        response = await stack.http.get("/version")
        assert response.status_code == 200 and response.json() == {"version": dynamo_lite.__version__}


# ====================================================================== API keys


@pytest.mark.parametrize("headers, status, code", [
    ({}, 401, None),
    ({"Authorization": "Bearer sk-wrong"}, 401, "invalid_api_key"),
    ({"Authorization": f"Basic {KEY}"}, 401, "invalid_api_key"),
    ({"Authorization": f"Bearer {KEY}"}, 200, None),
    ({"Authorization": f"bearer {OTHER_KEY}"}, 200, None),
])
async def test_api_keys_guard_v1(model_dir, headers, status, code):
    async with running_stack(api_key=(KEY, OTHER_KEY)) as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert response.status_code == status, response.text
        models = await stack.http.get("/v1/models", headers=headers)
        assert models.status_code == status
        if status == 401:
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", code)
            assert response.headers["www-authenticate"] == "Bearer"


async def test_probes_metrics_and_tokenizer_endpoints_stay_open_with_keys(model_dir):
    async with running_stack(api_key=(KEY,)) as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        for path in ("/health", "/live", "/metrics", "/version"):
            assert (await stack.http.get(path)).status_code == 200, path
        assert (await stack.http.post("/tokenize", json={"prompt": "x"})).status_code == 200
        assert (await stack.http.post("/detokenize", json={"tokens": [1]})).status_code == 200


# ====================================================================== X-Request-Id


async def test_request_id_from_the_client_is_echoed_and_reaches_the_handler(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        for body in (chat_body(), chat_body(stream=True)):
            response = await stack.http.post("/v1/chat/completions", json=body,
                                             headers={"X-Request-Id": "abc-123"})
            assert response.status_code == 200
            assert response.headers["x-request-id"] == "abc-123"
        assert sse_events(response.text)[-1] == "[DONE]"

        # Made up when the client sends none: one per request, on errors too.
        made = {(await stack.http.get("/v1/models")).headers["x-request-id"] for _ in range(3)}
        assert len(made) == 3 and all(len(i) == 32 for i in made)
        assert "x-request-id" in (await stack.http.post("/v1/completions", json={"model": "nope",
                                                                                 "prompt": "x"})).headers


async def test_request_id_is_in_the_request_state():
    """Handlers read the id from request.state (the generation's id on the worker, as vLLM's
    chatcmpl-{X-Request-Id})."""
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse

    from dynamo_lite.frontend.middleware import request_id_of

    async with running_stack() as stack:
        async def echo(request: Request):
            return PlainTextResponse(request_id_of(request).value)

        stack.app.add_route("/echo-id", echo, methods=["GET"])
        response = await stack.http.get("/echo-id", headers={"X-Request-Id": "given"})
        assert response.text == "given" == response.headers["x-request-id"]
        response = await stack.http.get("/echo-id")
        assert response.text == response.headers["x-request-id"]


async def test_a_401_carries_the_request_id(model_dir):
    async with running_stack(api_key=(KEY,)) as stack:
        response = await stack.http.get("/v1/models", headers={"X-Request-Id": "denied-1"})
        assert response.status_code == 401 and response.headers["x-request-id"] == "denied-1"


# ====================================================================== CORS


async def test_cors_off_by_default(model_dir):
    async with running_stack() as stack:
        response = await stack.http.get("/v1/models", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers


async def test_cors_preflight_and_simple_requests_for_allowed_origins(model_dir):
    config = {"allowed_origins": ("https://app.example",), "allowed_methods": ("GET", "POST"),
              "allowed_headers": ("Authorization", "Content-Type"), "allow_credentials": True,
              "api_key": (KEY,)}
    async with running_stack(**config) as stack:
        preflight = await stack.http.options("/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200  # no key needed: browsers send preflights without one
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert preflight.headers["access-control-allow-credentials"] == "true"
        assert set(preflight.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST"}

        denied = await stack.http.options("/v1/chat/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers

        # A browser can read the 401 too (CORS headers on it).
        response = await stack.http.get("/v1/models", headers={"Origin": "https://app.example"})
        assert response.status_code == 401
        assert response.headers["access-control-allow-origin"] == "https://app.example"


# ====================================================================== model aliases


async def test_an_alias_is_listed_and_routed_to_the_model(model_dir):
    async with running_stack() as stack:
        engine = AliasedEngine(model_dir)
        await stack.add_worker(engine)
        models = (await stack.http.get("/v1/models")).json()
        assert sorted(m["id"] for m in models["data"]) == sorted([MODEL, ALIAS])
        assert sorted((await stack.http.get("/health")).json()["models"]) == sorted([MODEL, ALIAS])

        for name in (MODEL, ALIAS):
            response = await stack.http.post("/v1/chat/completions", json={**chat_body(), "model": name})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == REPLY
        assert len(engine.requests) == 2
        # /tokenize takes either name; leaving `model` out is fine: the two names are one model.
        for body in ({"model": ALIAS, "prompt": "x"}, {"prompt": "x"}):
            assert (await stack.http.post("/tokenize", json=body)).status_code == 200

        # The registry resolves the alias to the model (what routing and metrics use) and remembers
        # the name the client used (what responses answer with).
        served = await stack.app.state.service.models.get(ALIAS)
        assert (served.name, served.requested_name) == (MODEL, ALIAS)
        assert (await stack.app.state.service.models.get(MODEL)).requested_name == MODEL


async def test_an_alias_goes_with_its_worker(model_dir):
    async with running_stack() as stack:
        shell = await stack.add_worker(AliasedEngine(model_dir))
        await shell.shutdown()
        assert await stack.watcher.wait_for(lambda: not stack.watcher.instances(), 5.0)
        assert (await stack.http.get("/v1/models")).json()["data"] == []
        response = await stack.http.post("/v1/chat/completions", json={**chat_body(), "model": ALIAS})
        assert response.status_code == 404
        assert response.json()["error"]["message"].startswith(f"The model `{ALIAS}`")

