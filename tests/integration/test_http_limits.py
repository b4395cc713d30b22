"""What one HTTP request may cost the frontend (frontend/http_limits.py): 413 for a body over
--max-body-bytes (declared or streamed), 431 for headers over --max-header-bytes, 408 for a body slower
than --body-read-timeout and for headers slower than --header-read-timeout ("slowloris"); each in
OpenAI's error JSON (Anthropic's on /v1/messages). Over real uvicorn where the wire matters (chunked
uploads, a client that stalls or trickles, raw sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest
import uvicorn

from dynamo_lite.frontend.http_limits import http_protocol
from tests.integration.test_frontend_app import (
    MODEL,
    ScriptedEngine,
    chat_body,
    model_dir,
    over_real_http,
    running_stack,
    wait_until,
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


HEADER_TIMEOUT = 0.5


@contextlib.asynccontextmanager
async def serving_with_header_timeout(stack):
    """The stack's app on real uvicorn with the frontend's own protocol (http_protocol); yields the port."""
    server = uvicorn.Server(uvicorn.Config(stack.app, host="127.0.0.1", port=0, lifespan="off",
                                           log_level="warning", http=http_protocol(HEADER_TIMEOUT)))
    serving = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=10)


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP answer's head and its Content-Length body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


async def trickled_request_answer(writer: asyncio.StreamWriter,
                                  reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Send a request line, then header bytes one every 0.1 s (each would have reset uvicorn's own
    keep-alive timer) for up to 4 times the timeout; the answer (head, body) that comes meanwhile."""

    async def trickle() -> None:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        for byte in b"X-Slow: " + b"a" * int(HEADER_TIMEOUT * 40):
            await asyncio.sleep(0.1)
            writer.write(bytes([byte]))
            await writer.drain()

    sending = asyncio.create_task(trickle())
    try:
        return await read_response(reader)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending


async def test_a_client_trickling_its_headers_gets_408_and_is_closed(model_dir):
    async with running_stack() as stack:
        engine = ScriptedEngine(model_dir)
        await stack.add_worker(engine)
        async with serving_with_header_timeout(stack) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                head, body = await trickled_request_answer(writer, reader)
                assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), head
                assert b"connection: close" in head.lower()
                assert b'"code":"request_timeout"' in body and b"--header-read-timeout" in body
                assert b'"type":"invalid_request_error"' in body
                assert await asyncio.wait_for(reader.read(), 5) == b""  # then the connection is closed
            finally:
                writer.close()
            assert engine.requests == []
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                assert (await http.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        async with serving_with_header_timeout(stack) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, not left open forever
            finally:
                writer.close()


async def test_the_header_timeout_runs_again_for_each_request_of_a_kept_alive_connection(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        async with serving_with_header_timeout(stack) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                await writer.drain()
                head, _ = await read_response(reader)
                assert head.startswith(b"HTTP/1.1 200"), head
                # The second request on the same connection:
                head, body = await trickled_request_answer(writer, reader)
                assert head.startswith(b"HTTP/1.1 408"), head
                assert b"--header-read-timeout" in body
            finally:
                writer.close()


async def test_a_stream_longer_than_the_header_timeout_is_not_cut(model_dir):
    """The timeout ends with the headers: neither a slow answer nor the body is under it."""
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir, token_delay=0.05))  # ~25 tokens: over 1 s
        async with (serving_with_header_timeout(stack) as port,
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http):
            began = time.monotonic()
            async with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as response:
                assert response.status_code == 200
                lines = [line async for line in response.aiter_lines() if line]
            assert time.monotonic() - began > HEADER_TIMEOUT  # precondition: it outlasted the timeout
            assert lines[-1] == "data: [DONE]"
            assert any('"finish_reason":"stop"' in line for line in lines)
