"""Fuzzing the frontend against its own OpenAPI document (GET /openapi.json) with schemathesis: every
endpoint, bodies that follow the schema and bodies that break it, over real HTTP (uvicorn, the size limits
and the app as deployed) to a loopback worker. No answer may be a 5xx, and every error must be OpenAI's
error JSON (Anthropic's on /v1/messages).

The budget is fixed (EXAMPLES per endpoint and mode, derandomized: the same cases on every run), so CI
spends the same few seconds each time and a failure reproduces.
"""

from __future__ import annotations

import asyncio
import json
import threading

import hypothesis
import pytest
import schemathesis
import uvicorn
from hypothesis import strategies as st
from schemathesis import GenerationMode

from dynamo_lite.frontend.openapi import build_openapi
from tests.integration.test_frontend_app import MODEL, ScriptedEngine, model_dir, running_stack

__all__ = ["model_dir"]  # the module-scoped fixture, shared

EXAMPLES = 50  # per endpoint and generation mode
SCHEMA = schemathesis.openapi.from_dict(build_openapi())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


@pytest.fixture(scope="module")
def live_frontend(model_dir):
    """The in-memory stack with one scripted worker, served by uvicorn on a free port from a thread of its
    own (schemathesis calls the server synchronously). Yields the base URL."""
    ready = threading.Event()
    stop: dict = {}
    found: dict = {}

    async def serve() -> None:
        stop["event"] = asyncio.Event()
        stop["loop"] = asyncio.get_running_loop()
        async with running_stack(max_body_bytes=256 * 1024) as stack:
            await stack.add_worker(ScriptedEngine(model_dir))
            server = uvicorn.Server(uvicorn.Config(stack.app, host="127.0.0.1", port=0, lifespan="off",
                                                   log_level="warning", http="httptools"))
            serving = asyncio.create_task(server.serve())
            try:
                while not server.started:
                    await asyncio.sleep(0.01)
                found["url"] = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
                ready.set()
                await stop["event"].wait()
            finally:
                server.should_exit = True
                await asyncio.wait_for(serving, 10)

    thread = threading.Thread(target=lambda: asyncio.run(serve()), name="fuzzed-frontend", daemon=True)
    thread.start()
    assert ready.wait(30), "the frontend did not start"
    try:
        yield found["url"]
    finally:
        stop["loop"].call_soon_threadsafe(stop["event"].set)
        thread.join(15)


def assert_error_shape(path: str, status: int, text: str) -> None:
    body = json.loads(text)
    if path == "/v1/messages":
        assert body["type"] == "error" and isinstance(body["error"]["message"], str), text
        assert isinstance(body["error"]["type"], str), text
        return
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], text
    assert isinstance(error["type"], str), text


# A GET takes no body and no parameters: there is nothing to break, only valid calls to make.
CASES = [pytest.param(op, mode, id=f"{op.method.upper()} {op.path} {mode.value}") for op in OPERATIONS
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if op.method == "post" or mode == GenerationMode.POSITIVE]


@pytest.mark.parametrize("operation, mode", CASES)
def test_no_5xx_and_every_error_is_openai_json(live_frontend, operation, mode):
    @hypothesis.settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                         suppress_health_check=list(hypothesis.HealthCheck),
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode), served=st.booleans())
    def check(case, served: bool) -> None:
        if served and isinstance(case.body, dict):
            case.body["model"] = MODEL  # half the cases reach the model and its worker
        response = case.call(base_url=live_frontend, timeout=20)
        status, text = response.status_code, response.text
        assert status < 500, f"{case.method} {case.path} {case.body!r} -> {status} {text[:500]}"
        if status >= 400:
            assert_error_shape(case.path, status, text)

    check()
