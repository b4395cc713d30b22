"""What one HTTP request may cost the frontend (frontend/http_limits.py): 413 for a body over
--max-body-bytes (declared or streamed), 431 for headers over --max-header-bytes, 408 for a body slower
than --body-read-timeout; each in OpenAI's error JSON (Anthropic's on /v1/messages). Over real uvicorn
where the wire matters (chunked uploads, a client that stalls)."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.test_frontend_app import (
    MODEL,
    ScriptedEngine,
    chat_body,
    model_dir,
    over_real_http,
    running_stack,
)

__all__ = ["model_dir"]  # the module-scoped fixture, shared

POST_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/tokenize",
              "/detokenize", "/debug/route"]


def openai_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == code and error["message"]
    return error


@pytest.mark.parametrize("path", POST_PATHS)
async def test_a_declared_body_over_the_limit_is_413_on_every_endpoint(model_dir, path):
    async with running_stack(max_body_bytes=1000) as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.post(path, json={"model": MODEL, "prompt": "x" * 2000})
        error = openai_error(response, 413, "request_too_large")
        assert "--max-body-bytes" in error["message"]
        assert response.headers["x-request-id"]  # the request id still comes back
        # Under the limit, the endpoint answers as ever (not 413).
        small = await stack.http.post(path, json={"model": MODEL, "prompt": "x"})
        assert small.status_code != 413


async def test_anthropic_messages_gets_413_in_its_own_shape(model_dir):
    async with running_stack(max_body_bytes=1000) as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 2000}]}
        response = await stack.http.post("/v1/messages", json=body)
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "request_too_large"


async def test_a_chunked_body_over_the_limit_is_413(model_dir):
    async with running_stack(max_body_bytes=10_000) as stack:
        await stack.add_worker(ScriptedEngine(model_dir))

        async def chunks():
            yield b'{"model": "tiny", "prompt": "'
            for _ in range(1000):  # 1 MB, in 1 KiB chunks, no Content-Length: refused past 10 kB
                yield b"x" * 1024
            yield b'"}'

        async with over_real_http(stack) as http:
            response = await http.post("/v1/completions", content=chunks())
            openai_error(response, 413, "request_too_large")
            # Normal requests on the same server still work.
            assert (await http.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_headers_over_the_limit_are_431(model_dir):
    async with running_stack(max_header_bytes=4096) as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        async with over_real_http(stack) as http:
            response = await http.post("/v1/chat/completions", json=chat_body(), headers={"x-big": "y" * 8000})
            error = openai_error(response, 431, "request_header_fields_too_large")
            assert "--max-header-bytes" in error["message"]
            ok = await http.post("/v1/chat/completions", json=chat_body(), headers={"x-small": "y" * 100})
            assert ok.status_code == 200


async def test_a_client_that_stalls_its_body_gets_408(model_dir):
    async with running_stack(body_read_timeout=0.5) as stack:
        engine = ScriptedEngine(model_dir)
        await stack.add_worker(engine)
        async with over_real_http(stack) as http:
            port = int(str(http.base_url).rsplit(":", 1)[1].rstrip("/"))
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 500\r\n\r\n{\"model\": \"tiny\"")  # then nothing more
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 408"), head
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                body = await asyncio.wait_for(reader.readexactly(length), 5)
                assert b'"code":"request_timeout"' in body and b"--body-read-timeout" in body
            finally:
                writer.close()
            assert engine.requests == []  # nothing reached a worker
            assert (await http.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_defaults_leave_ordinary_large_requests_alone(model_dir):
    """A 1 MB prompt and 16 KiB of headers are below the defaults: the prompt is refused for its length
    (400, as before), not for its size."""
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 1_000_000},
                                         headers={"x-big": "y" * 16_000})
        assert response.status_code == 400, response.text
