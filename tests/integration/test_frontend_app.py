"""The frontend app end to end over real loopback workers (MemoryDiscovery + InstanceWatcher).

Workers are WorkerShells around a scripted engine that answers a fixed text on a tiny byte-level
tokenizer (one token per byte), so every stop string and every migration point falls between
tokens. The app is driven with httpx over ASGI; the client-disconnect test runs real uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dynamo_lite.discovery.memory import MemoryDiscovery
from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.engine.base import Engine, EngineInfo, EngineLoad
from dynamo_lite.engine.worker import WorkerShell, WorkerShellConfig
from dynamo_lite.frontend.app import FrontendDeps, create_app
from dynamo_lite.frontend.config import FrontendConfig
from dynamo_lite.frontend.schemas import MAX_CHOICES, MAX_LOGPROBS
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.messages import (GenerateFrame, GenerateRequest, InstanceRecord, ModelCard, Request,
                                           TokenizerFiles, TokenizerFilesRequest, json_encoder)
from dynamo_lite.router.base import RouteDecision, Router
from dynamo_lite.router.policies import RoundRobinRouter
from dynamo_lite.transport.framing import decode_request, encode_frame, read_frame
from dynamo_lite.transport.server import RequestServer

NAMESPACE = "test"
MODEL = "tiny"
CONTEXT = 512
REPLY = "Hello world! STOP here."
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WAIT = 5.0  # bound on every wait for discovery or worker state


def byte_tokenizer() -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tok


TOKENIZER = byte_tokenizer()
EOS = TOKENIZER.token_to_id("<|im_end|>")
REPLY_IDS = TOKENIZER.encode(REPLY).ids + [EOS]


def tokenizer_files() -> dict[str, bytes]:
    return {"tokenizer.json": TOKENIZER.to_str().encode(),
            "tokenizer_config.json": json.dumps({"chat_template": TEMPLATE, "eos_token": "<|im_end|>"}).encode(),
            "generation_config.json": json.dumps({"eos_token_id": EOS}).encode()}


def chat_prompt_ids(content: str) -> list[int]:
    text = f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    return TOKENIZER.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    for name, data in tokenizer_files().items():
        (folder / name).write_bytes(data)
    return folder


def reply_offset(token_ids: Sequence[int]) -> int:
    """How much of REPLY the prompt already ends with (a migrated request carries its start)."""
    for k in range(min(len(token_ids), len(REPLY_IDS)), 0, -1):
        if list(token_ids[-k:]) == REPLY_IDS[:k]:
            return k
    return 0


async def scripted_frames(request: GenerateRequest, token_delay: float = 0.0,
                          cached_tokens: int = 0) -> AsyncIterator[GenerateFrame]:
    """What a real engine would stream for REPLY: one token per frame, EOS as a stop token."""
    sampling = request.sampling
    produced = 0
    for token in REPLY_IDS[reply_offset(request.token_ids):]:
        if token_delay:
            await asyncio.sleep(token_delay)
        produced += 1
        first = {"prompt_tokens": len(request.token_ids), "cached_tokens": cached_tokens} if produced == 1 else {}
        if token in sampling.stop_token_ids or produced >= sampling.max_tokens:
            reason = "stop" if token in sampling.stop_token_ids else "length"
            yield GenerateFrame(token_ids=[token], finish_reason=reason, last=True, **first)
            return
        yield GenerateFrame(token_ids=[token], **first)
    yield GenerateFrame(finish_reason="length", last=True)


class ScriptedEngine(Engine):
    def __init__(self, model_path: Path | str, token_delay: float = 0.0, cached_tokens: int = 0):
        self.model_path = str(model_path)
        self.token_delay = token_delay
        self.cached_tokens = cached_tokens
        self.requests: list[GenerateRequest] = []

    async def start(self) -> EngineInfo:
        return EngineInfo(model_name=MODEL, model_path=self.model_path, context_length=CONTEXT,
                          kv_block_size=16, total_kv_blocks=1000)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateFrame]:
        self.requests.append(request)
        async for frame in scripted_frames(request, self.token_delay, self.cached_tokens):
            yield frame

    async def kv_events(self):
        return
        yield

    def load(self) -> EngineLoad:
        return EngineLoad(active_blocks=0, total_blocks=1000, running_requests=0, waiting_requests=0)

    async def shutdown(self) -> None:
        pass


class PreferRouter(Router):
    """Routes to `preferred` while it is live, else to the lowest id (to aim a request at a worker)."""

    def __init__(self, preferred: int = 0):
        self.preferred = preferred
        self.removed: list[int] = []

    def route(self, model: str, request_id: str, token_ids: Sequence[int], workers: Sequence[int]) -> RouteDecision:
        return RouteDecision(self.preferred if self.preferred in workers else workers[0])

    def worker_removed(self, worker_id: int) -> None:
        self.removed.append(worker_id)


class Stack:
    def __init__(self, router: Router, config: FrontendConfig):
        self.config = config
        self.discovery = MemoryDiscovery()
        self.watcher = InstanceWatcher(self.discovery, NAMESPACE, failed_cooldown=60.0)
        self.client_pool = None
        self.router = router
        self.registry = CollectorRegistry()
        self.shells: list[WorkerShell] = []
        self.servers: list = []

    async def start(self) -> None:
        from dynamo_lite.transport.client import RequestClient

        await self.watcher.start()
        self.client_pool = RequestClient(connect_timeout=2.0)
        self.app = create_app(FrontendDeps(watcher=self.watcher, client=self.client_pool, router=self.router,
                                           registry=self.registry, config=self.config))
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://frontend",
                                      timeout=10.0)

    async def close(self) -> None:
        await self.http.aclose()
        for shell in self.shells:
            await shell.shutdown()
        for server in self.servers:
            if isinstance(server, asyncio.Server):
                server.close()
                await asyncio.wait_for(server.wait_closed(), WAIT)
            else:
                await server.close()
        await self.client_pool.close()
        await self.watcher.close()
        await self.discovery.close()

    async def add_worker(self, engine: Engine, migration_limit: int = 0) -> WorkerShell:
        config = WorkerShellConfig(namespace=NAMESPACE, host="127.0.0.1", migration_limit=migration_limit,
                                   drain_timeout=1.0, engine_kind="mocker")
        shell = WorkerShell(engine, self.discovery, None, config)
        self.shells.append(shell)
        await shell.start()
        await self.wait_for_instance(shell.instance_id)
        return shell

    async def register(self, address: str, path: str, migration_limit: int = 0) -> int:
        """Register an instance served by something other than a WorkerShell."""
        lease = await self.discovery.grant_lease(30.0)
        card = ModelCard(name=MODEL, path=path, context_length=CONTEXT, kv_block_size=16,
                         migration_limit=migration_limit, engine="mocker")
        record = InstanceRecord(instance_id=lease.id, component=keys.COMPONENT_BACKEND, address=address,
                                model=MODEL, host="127.0.0.1", pid=0)
        await self.discovery.put(keys.model_card_key(NAMESPACE, MODEL, lease.id), json_encoder.encode(card), lease)
        await self.discovery.put(keys.instance_key(NAMESPACE, keys.COMPONENT_BACKEND, lease.id),
                                 json_encoder.encode(record), lease)
        await self.wait_for_instance(lease.id)
        return lease.id

    async def wait_for_instance(self, instance_id: int) -> None:
        seen = await self.watcher.wait_for(
            lambda: any(r.instance_id == instance_id for r in self.watcher.instances()), WAIT)
        assert seen, f"instance {instance_id:x} never appeared"


@contextlib.asynccontextmanager
async def running_stack(router: Router | None = None, **config):
    stack = Stack(router or RoundRobinRouter(), FrontendConfig(namespace=NAMESPACE, **config))
    await stack.start()
    try:
        yield stack
    finally:
        await stack.close()


async def dying_worker_server(tokens_before_death: int) -> tuple[asyncio.Server, str]:
    """A worker that streams a few tokens of REPLY, then drops the connection (a crash)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            payload = await read_frame(reader)
            request = decode_request(payload)
            frames = scripted_frames(request)
            for _ in range(tokens_before_death):
                writer.write(encode_frame(await anext(frames)))
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


def closed_port_address() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there once closed


def sse_events(body: str) -> list:
    events = []
    for block in body.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def chat_body(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], **extra}


# ====================================================================== tests


async def test_health_and_models_follow_workers(model_dir):
    async with running_stack() as stack:
        response = await stack.http.get("/health")
        assert response.status_code == 503 and response.json()["status"] == "unhealthy"
        assert (await stack.http.get("/live")).status_code == 200
        assert (await stack.http.get("/v1/models")).json() == {"object": "list", "data": []}

        shell = await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.get("/health")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "healthy"
        assert [(i["instance_id"], i["address"], i["model"]) for i in body["instances"]] == [
            (shell.instance_id, shell.address, MODEL)]
        models_list = (await stack.http.get("/v1/models")).json()
        assert [(m["id"], m["object"], m["owned_by"]) for m in models_list["data"]] == [
            (MODEL, "model", "dynamo_lite")]
        assert isinstance(models_list["data"][0]["created"], int)


async def test_chat_completion_non_streaming(model_dir):
    async with running_stack() as stack:
        engine = ScriptedEngine(model_dir, cached_tokens=16)
        await stack.add_worker(engine)
        response = await stack.http.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion" and body["model"] == MODEL and body["id"].startswith("chatcmpl-")
        choice = body["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": REPLY}
        assert choice["finish_reason"] == "stop"
        prompt = chat_prompt_ids("Say hello")
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(REPLY_IDS),
                                 "total_tokens": len(prompt) + len(REPLY_IDS),
                                 "prompt_tokens_details": {"cached_tokens": 16}}
        # What the engine was asked: the templated prompt, EOS as a stop token, the rest of the context.
        sent = engine.requests[0]
        assert sent.token_ids == prompt
        assert EOS in sent.sampling.stop_token_ids
        assert sent.sampling.max_tokens == CONTEXT - len(prompt)


async def test_chat_streaming_with_usage(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.post("/v1/chat/completions",
                                         json=chat_body(stream=True, stream_options={"include_usage": True}))
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        usage_chunk = chunks[-1]
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"]["completion_tokens"] == len(REPLY_IDS)
        assert usage_chunk["usage"]["prompt_tokens"] == len(chat_prompt_ids("Say hello"))
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
        assert text == REPLY


async def test_stream_without_usage_has_no_usage_chunk(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=5))
        chunks = sse_events(response.text)[:-1]
        assert all("usage" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == REPLY[:5]


async def test_stop_string_cuts_text_and_aborts_the_worker(model_dir):
    async with running_stack() as stack:
        shell = await stack.add_worker(ScriptedEngine(model_dir, token_delay=0.01))
        response = await stack.http.post("/v1/chat/completions", json=chat_body(stop=["STOP", "nope"]))
        body = response.json()
        assert body["choices"][0]["message"]["content"] == "Hello world! "
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == len(TOKENIZER.encode("Hello world! STOP").ids)
        await wait_until(lambda: shell.stats.aborted_requests == 1)
        assert shell.stats.completed_requests == 0


async def wait_until(predicate, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_completions_text_tokens_and_stream(model_dir):
    async with running_stack() as stack:
        engine = ScriptedEngine(model_dir)
        await stack.add_worker(engine)
        response = await stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "Once upon",
                                                                   "max_tokens": 5})
        body = response.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert body["choices"][0]["text"] == REPLY[:5] and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["prompt_tokens"] == len(TOKENIZER.encode("Once upon").ids)
        assert body["usage"]["completion_tokens"] == 5

        response = await stack.http.post("/v1/completions", json={"model": MODEL, "prompt": [10, 11, 12]})
        assert response.json()["choices"][0]["text"] == REPLY
        assert engine.requests[-1].token_ids == [10, 11, 12]

        response = await stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
        chunks = sse_events(response.text)[:-1]
        assert all(c["object"] == "text_completion" for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == REPLY
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


BAD_REQUESTS = [
    # (endpoint, body, status, words expected in the message, param)
    ("/v1/chat/completions", '{"model": "tiny", "messages": [', 400, "malformed JSON", None),
    ("/v1/chat/completions", chat_body(model="no-such-model"), 404, "no-such-model", "model"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model", "model"),
    ("/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", chat_body(max_tokens=CONTEXT), 400, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", chat_body(max_completion_tokens=CONTEXT * 2), 400, "max_completion_tokens",
     "max_completion_tokens"),
    ("/v1/chat/completions", chat_body(temperature=-1), 400, "temperature", "temperature"),
    ("/v1/chat/completions", chat_body(top_p=7), 400, "top_p", "top_p"),
    # Mistyped fields are rejected, not coerced; integers wider than the wire's int64 are a 400, not a 500.
    ("/v1/chat/completions", chat_body(max_tokens="16"), 400, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", chat_body(temperature="0.5"), 400, "temperature", "temperature"),
    ("/v1/chat/completions", chat_body(stream="yes"), 400, "stream", "stream"),
    ("/v1/chat/completions", chat_body(seed=2**80), 400, "seed", "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stop_token_ids": [2**70]}, 400, "stop_token_ids",
     "stop_token_ids[0]"),
    ("/v1/chat/completions", chat_body(n=MAX_CHOICES + 1), 400, "less than or equal", "n"),
    ("/v1/chat/completions", chat_body(logprobs=True, top_logprobs=MAX_LOGPROBS + 1), 400,
     "less than or equal", "top_logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "logprobs": MAX_LOGPROBS + 1}, 400,
     "less than or equal", "logprobs"),
    ("/v1/chat/completions", chat_body(top_logprobs=2), 400, "`logprobs` must be set", "top_logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "suffix": "b"}, 400, "suffix", "suffix"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": ["x"]}]}, 400,
     "messages[0].content[0]", "messages[0].content[0]"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "y" * CONTEXT}]},
     400, "maximum context length", "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "z" * (CONTEXT + 5)}, 400, "maximum context length", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "several prompts", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stop": 3}, 400, "stop", "stop"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 10**9]}, 400, "vocabulary", "prompt"),
    ("/v1/completions", "[]", 400, "invalid request body", None),
    # A field the server would ignore is refused by name, never accepted and dropped.
    ("/v1/chat/completions", chat_body(priority=3), 400, "'priority' is not supported", "priority"),
    ("/v1/chat/completions", chat_body(tool_choice="required"), 400, "tool_choice needs 'tools'", "tool_choice"),
    ("/v1/chat/completions", chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     '"auto" tool choice needs a tool-call parser', "tool_choice"),
    ("/v1/chat/completions", chat_body(tools=[{"type": "function", "function": {"name": "f"}}],
                                       tool_choice={"type": "function", "function": {"name": "g"}}), 400,
     "'g', which is not in 'tools'", "tool_choice"),
    ("/v1/chat/completions", chat_body(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "objekt"}}}], tool_choice="required"), 400, "not a valid JSON Schema",
     "tools[0].function.parameters"),
    ("/v1/chat/completions", chat_body(tools=[{"type": "web_search"}]), 400, "tools", "tools[0].type"),
    ("/v1/chat/completions", chat_body(tools=[{"type": "function", "function": {"name": "f"}}],
                                       tool_choice="required", response_format={"type": "json_object"}), 400,
     "cannot be combined", "tool_choice"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]), 400,
     "not JSON", "messages[0].tool_calls[0].function.arguments"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "cache_salt": "x"}, 400, "'cache_salt'", "cache_salt"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "min_p": 1.5}, 400, "min_p", "min_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "logit_bias": {"x": 1.0}}, 400, "not a token id",
     "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "logit_bias": {"100000": 1.0}}, 400, "vocabulary",
     "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "allowed_token_ids": [10**6]}, 400, "vocabulary",
     "allowed_token_ids"),
    ("/v1/chat/completions", chat_body(response_format={"type": "json_schema"}), 400, "needs 'json_schema'",
     "response_format.json_schema"),
    ("/v1/chat/completions", chat_body(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}), 400, "not a valid JSON Schema",
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", chat_body(response_format={"type": "structural_tag"}), 400, "response_format",
     "response_format.type"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "structured_outputs": {"regex": "a+", "choice": ["a"]}},
     400, "exactly one of", "structured_outputs"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "structured_outputs": {"json": "{not json"}}, 400,
     "not JSON", "structured_outputs.json"),
    # vLLM reads these from its engine config alone; a request's copy would be ignored.
    ("/v1/completions", {"model": MODEL, "prompt": "a", "structured_outputs": {
        "json_object": True, "disable_any_whitespace": True}}, 400,
     '"disable_any_whitespace": ...', "structured_outputs.disable_any_whitespace"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "structured_outputs": {
        "regex": "a+", "whitespace_pattern": " "}}, 400, "setting of the workers' grammar engine",
     "structured_outputs.whitespace_pattern"),
    ("/v1/chat/completions", chat_body(stream=True, stream_options={"continuous_usage_stats": True}), 400,
     "stream_options.continuous_usage_stats", "stream_options.continuous_usage_stats"),
]


async def test_long_prompts_are_tokenized_off_the_event_loop_alike(model_dir, monkeypatch):
    # Prompts over THREAD_TOKENIZE_CHARS are tokenized in a thread: the same count, the same errors.
    import threading

    from dynamo_lite.frontend.preprocess import THREAD_TOKENIZE_CHARS
    from dynamo_lite.frontend.tokenizer import ModelTokenizer

    threads = []
    encode_without_gil = ModelTokenizer.encode_without_gil

    def spy(self, text, add_special_tokens=True):
        threads.append(threading.current_thread())
        return encode_without_gil(self, text, add_special_tokens)

    monkeypatch.setattr(ModelTokenizer, "encode_without_gil", spy)
    async with running_stack() as stack:
        engine = ScriptedEngine(model_dir)
        await stack.add_worker(engine)
        long_text = "Once upon a time, " * (THREAD_TOKENIZE_CHARS // 18 + 1)
        assert len(long_text) > THREAD_TOKENIZE_CHARS
        for body in ({"model": MODEL, "prompt": long_text},
                     {"model": MODEL, "messages": [{"role": "user", "content": long_text}]}):
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            response = await stack.http.post(path, json=body)
            assert response.status_code == 400
            error = response.json()["error"]
            expected = len(TOKENIZER.encode(long_text).ids) if "prompt" in body else len(chat_prompt_ids(long_text))
            assert error["code"] == "context_length_exceeded"
            assert f"the prompt has {expected} tokens" in error["message"]
        assert engine.requests == []
        response = await stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "Once upon"})
        assert response.status_code == 200
    assert len(threads) == 2 and threading.main_thread() not in threads  # the short prompt stayed inline


async def test_bad_input_gets_openai_errors(model_dir):
    async with running_stack() as stack:
        engine = ScriptedEngine(model_dir)
        await stack.add_worker(engine)
        for path, body, status, words, param in BAD_REQUESTS:
            if isinstance(body, str):
                response = await stack.http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                response = await stack.http.post(path, json=body)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert words in error["message"], (body, error)
            if param is not None:
                assert error["param"] == param, (body, error)
        assert engine.requests == []  # nothing bad reached the worker
        response = await stack.http.get("/v1/nothing-here")
        assert response.status_code == 404 and "error" in response.json()
        response = await stack.http.get("/v1/chat/completions")
        assert response.status_code == 405 and "error" in response.json()


async def test_known_model_without_live_workers_is_503(model_dir):
    async with running_stack() as stack:
        shell = await stack.add_worker(ScriptedEngine(model_dir))
        await stack.http.post("/v1/chat/completions", json=chat_body())  # tokenizer now cached
        stack.watcher.mark_failed(shell.instance_id)
        for stream in (False, True):
            response = await stack.http.post("/v1/chat/completions", json=chat_body(stream=stream))
            assert response.status_code == 503
            assert "no worker is available" in response.json()["error"]["message"]


async def test_unreachable_worker_is_503_and_excluded(model_dir):
    async with running_stack() as stack:
        dead = await stack.register(closed_port_address(), str(model_dir))
        response = await stack.http.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["type"] == "service_unavailable" and "failed" in error["message"]
        assert dead not in [r.instance_id for r in stack.watcher.instances()]


async def test_unreachable_worker_is_skipped_when_another_serves(model_dir):
    router = PreferRouter()
    async with running_stack(router) as stack:
        router.preferred = await stack.register(closed_port_address(), str(model_dir))
        await stack.add_worker(ScriptedEngine(model_dir))
        response = await stack.http.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == REPLY
        assert router.removed == [router.preferred]


async def test_a_failed_worker_reaches_the_kv_router_once(model_dir):
    """The app wires whatever router it is given to the watcher, and a KvRoutingService follows the
    watcher itself: a removal still reaches the router by one path, once."""
    from dynamo_lite.router.kv_routing import KvRoutingService, KvRoutingSettings

    class CountingKvRouting(KvRoutingService):
        def worker_removed(self, worker_id: int) -> None:
            self.removals.append(worker_id)
            super().worker_removed(worker_id)

    stack = Stack(RoundRobinRouter(), FrontendConfig(namespace=NAMESPACE, router_mode="kv", kv_events=False))
    router = CountingKvRouting(stack.watcher, KvRoutingSettings(namespace=NAMESPACE, use_kv_events=False))
    router.removals = []
    stack.router = router
    await stack.start()
    try:
        worker = await stack.register(closed_port_address(), str(model_dir))
        response = await stack.http.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 503  # the worker refused the connection: marked failed
        assert worker not in [r.instance_id for r in stack.watcher.instances()]
        assert router.removals == [worker]
    finally:
        await stack.close()


async def assert_migrates_after_4_tokens(stack: Stack, router: PreferRouter, model_dir: Path, failing: str,
                                         stream: bool) -> None:
    """The migration both failure kinds share (a worker that dies, tests here; one that hangs,
    test_heartbeats.py): `failing` streams REPLY's first 4 tokens and then fails; it is registered as
    the router's preferred worker beside a ScriptedEngine one, both with migration_limit=1, and a chat
    request (streamed or not) must come back as one unbroken REPLY, the rest generated by the second."""
    router.preferred = await stack.register(failing, str(model_dir), migration_limit=1)
    engine = ScriptedEngine(model_dir)
    await stack.add_worker(engine, migration_limit=1)
    response = await stack.http.post("/v1/chat/completions", json=chat_body(stream=stream, max_tokens=50))
    assert response.status_code == 200, response.text
    if stream:
        chunks = sse_events(response.text)[:-1]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    else:
        body = response.json()
        text = body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] == len(REPLY_IDS)
    assert text == REPLY  # one unbroken answer
    # The second worker got the prompt plus the 4 tokens already generated, and 4 fewer max_tokens.
    moved = engine.requests[0]
    assert moved.token_ids == chat_prompt_ids("Say hello") + REPLY_IDS[:4]
    assert moved.sampling.max_tokens == 46
    metrics = (await stack.http.get("/metrics")).text
    assert f'dynamo_lite_frontend_migrations_total{{model="{MODEL}"}} 1.0' in metrics


@pytest.mark.parametrize("stream", [False, True])
async def test_migration_after_a_worker_dies_mid_stream(model_dir, stream):
    router = PreferRouter()
    async with running_stack(router) as stack:
        server, address = await dying_worker_server(tokens_before_death=4)
        stack.servers.append(server)
        await assert_migrates_after_4_tokens(stack, router, model_dir, address, stream)


async def test_structured_output_request_migrates_with_its_grammar_resumed(model_dir):
    """The new worker is told how many prompt tokens were generated: its grammar starts after them."""
    router = PreferRouter()
    async with running_stack(router) as stack:
        server, address = await dying_worker_server(tokens_before_death=4)
        stack.servers.append(server)
        router.preferred = await stack.register(address, str(model_dir), migration_limit=1)
        engine = ScriptedEngine(model_dir)
        await stack.add_worker(engine, migration_limit=1)
        response = await stack.http.post("/v1/chat/completions", json=chat_body(
            max_tokens=50, response_format={"type": "json_object"}))
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == REPLY
        [moved] = engine.requests
        assert moved.token_ids == chat_prompt_ids("Say hello") + REPLY_IDS[:4]
        assert moved.resumed_tokens == 4
        assert moved.sampling.structured_output is not None
        metrics = (await stack.http.get("/metrics")).text
        assert f'dynamo_lite_frontend_migrations_total{{model="{MODEL}"}} 1.0' in metrics


async def test_no_migration_when_the_limit_is_zero(model_dir):
    router = PreferRouter()
    async with running_stack(router) as stack:
        server, address = await dying_worker_server(tokens_before_death=4)
        stack.servers.append(server)
        router.preferred = await stack.register(address, str(model_dir), migration_limit=0)
        engine = ScriptedEngine(model_dir)
        await stack.add_worker(engine)
        response = await stack.http.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 503
        assert "closed the stream" in response.json()["error"]["message"]
        assert engine.requests == []
        # Streaming: the failure comes after the first text, so it arrives in-band, then [DONE].
        router.preferred = await stack.register(address, str(model_dir), migration_limit=0)
        response = await stack.http.post("/v1/chat/completions", json=chat_body(stream=True))
        events = sse_events(response.text)
        assert events[-1] == "[DONE]" and "error" in events[-2]
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == REPLY[:4]


async def test_silent_worker_times_out_with_request_timeout(model_dir):
    async with running_stack(request_timeout=0.2) as stack:
        # Silent for the whole test: a first token can never beat the timeout, however loaded the host.
        shell = await stack.add_worker(ScriptedEngine(model_dir, token_delay=60.0))
        response = await stack.http.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 503
        message = response.json()["error"]["message"]
        assert "sent nothing for 0.2s" in message and "no other worker is available" in message
        await wait_until(lambda: shell.stats.aborted_requests == 1)  # the frontend hung up on it


async def test_tokenizer_is_fetched_from_the_worker(model_dir):
    async with running_stack() as stack:
        asked: list[Request] = []

        async def handler(request: Request):
            asked.append(request)
            if isinstance(request, TokenizerFilesRequest):
                yield TokenizerFiles(files=tokenizer_files())
            else:
                async for frame in scripted_frames(request):
                    yield frame

        server = RequestServer(handler, "127.0.0.1", 0)
        stack.servers.append(server)
        port = await server.start()
        await stack.register(f"127.0.0.1:{port}", "/path/only/on/the/worker")
        for _ in range(2):
            response = await stack.http.post("/v1/chat/completions", json=chat_body())
            assert response.json()["choices"][0]["message"]["content"] == REPLY
        assert sum(isinstance(r, TokenizerFilesRequest) for r in asked) == 1  # fetched once, then cached


async def test_metrics_count_requests_tokens_and_workers(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir))
        await stack.http.post("/v1/chat/completions", json=chat_body())
        await stack.http.post("/v1/chat/completions", json=chat_body(stream=True))
        await stack.http.post("/v1/chat/completions", json=chat_body(max_tokens=0))
        response = await stack.http.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        text = response.text
        prompt = len(chat_prompt_ids("Say hello"))
        for line in [
            f'dynamo_lite_frontend_requests_total{{endpoint="chat_completions",model="{MODEL}",status="200"}} 2.0',
            'dynamo_lite_frontend_requests_total{endpoint="chat_completions",model="unknown",status="400"} 1.0',
            f'dynamo_lite_frontend_input_tokens_total{{model="{MODEL}"}} {2.0 * prompt}',
            f'dynamo_lite_frontend_output_tokens_total{{model="{MODEL}"}} {2.0 * len(REPLY_IDS)}',
            f'dynamo_lite_frontend_time_to_first_token_seconds_count{{model="{MODEL}"}} 2.0',
            f'dynamo_lite_frontend_inter_token_latency_seconds_count{{model="{MODEL}"}} {2.0 * (len(REPLY_IDS) - 1)}',
            f'dynamo_lite_frontend_workers{{model="{MODEL}"}} 1.0',
            f'dynamo_lite_frontend_inflight_requests{{model="{MODEL}"}} 0.0',
            f'dynamo_lite_frontend_request_duration_seconds_count{{endpoint="chat_completions",model="{MODEL}"}} 2.0',
        ]:
            assert line in text, line


@contextlib.asynccontextmanager
async def over_real_http(stack):
    """An httpx client talking to the stack's app through a real uvicorn server (disconnects are real)."""
    server = uvicorn.Server(uvicorn.Config(stack.app, host="127.0.0.1", port=0, lifespan="off",
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as http:
            yield http
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=WAIT)


async def test_client_disconnect_aborts_the_worker_request(model_dir):
    """Over real HTTP: closing the SSE connection closes the worker stream, which aborts there."""
    async with running_stack() as stack:
        shell = await stack.add_worker(ScriptedEngine(model_dir, token_delay=0.2))
        async with over_real_http(stack) as http:
            async with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if '"content":"H"' in line:
                        break  # got the first token: hang up
            await wait_until(lambda: shell.stats.aborted_requests == 1)
        assert shell.stats.completed_requests == 0
        metrics = (await stack.http.get("/metrics")).text
        assert f'dynamo_lite_frontend_inflight_requests{{model="{MODEL}"}} 0.0' in metrics
        assert ('dynamo_lite_frontend_requests_total{endpoint="chat_completions",'
                f'model="{MODEL}",status="499"}} 1.0') in metrics


@pytest.mark.parametrize("stream", [True, False])
async def test_client_gone_before_its_answer_aborts_the_worker_at_once(model_dir, stream):
    """A client that hangs up while its first token (or, non-streaming, its whole answer) is awaited: the
    worker request is aborted right away, not when the worker next produces something, the in-flight
    gauge returns to 0 and the request is counted as closed by the client (499)."""
    async with running_stack() as stack:
        engine = ScriptedEngine(model_dir, token_delay=60.0)  # a first token far beyond the test's waits
        shell = await stack.add_worker(engine)
        async with over_real_http(stack) as http:
            request = asyncio.ensure_future(http.post("/v1/chat/completions", json=chat_body(stream=stream)))
            await wait_until(lambda: len(engine.requests) == 1)
            request.cancel()  # closes the connection before any response byte
            with contextlib.suppress(asyncio.CancelledError):
                await request
            await wait_until(lambda: shell.stats.aborted_requests == 1)
        assert shell.stats.completed_requests == 0
        closed_by_client = ('dynamo_lite_frontend_requests_total{endpoint="chat_completions",'
                            f'model="{MODEL}",status="499"}} 1.0')
        metrics = (await stack.http.get("/metrics")).text
        assert closed_by_client in metrics
        assert f'dynamo_lite_frontend_inflight_requests{{model="{MODEL}"}} 0.0' in metrics
