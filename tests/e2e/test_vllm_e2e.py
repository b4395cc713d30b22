"""The real path: official openai client -> frontend -> etcd discovery -> vLLM worker (default model).

The module's last test kills the worker's vLLM engine core: the worker must deregister and exit non-zero
(for a supervisor). It runs on this module's stack, after everything else, so that it costs no engine
start of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from dynamo_lite.planes import connect_discovery
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.messages import WorkerStatsRequest
from dynamo_lite.transport.client import RequestClient
from tests.e2e.harness import DEFAULT_MODEL_PATH, healthy_instances, wait_until

pytestmark = pytest.mark.vllm

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(vllm_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vllm_stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_PATH))


def worker_stats(base_url: str, model: str):
    address = healthy_instances(base_url, model)[0]["address"]

    async def ask():
        rc = RequestClient()
        try:
            return await rc.call(address, WorkerStatsRequest(), timeout=5)
        finally:
            await rc.close()

    return asyncio.run(ask())


def test_models_lists_the_served_model(client, vllm_stack):
    assert [m.id for m in client.models.list().data] == [vllm_stack.model]


def test_chat_answers_paris(client, vllm_stack):
    reply = client.chat.completions.create(model=vllm_stack.model, messages=QUESTION, temperature=0,
                                           max_tokens=32)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant"


def test_chat_stream_answers_paris_and_matches_non_streaming(client, vllm_stack):
    full = client.chat.completions.create(model=vllm_stack.model, messages=QUESTION, temperature=0,
                                          max_tokens=32)
    chunks = list(client.chat.completions.create(model=vllm_stack.model, messages=QUESTION, temperature=0,
                                                 max_tokens=32, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_usage_agrees_with_the_tokenizer(client, vllm_stack, hf_tokenizer):
    reply = client.chat.completions.create(model=vllm_stack.model, messages=QUESTION, temperature=0,
                                           max_tokens=16)
    prompt_ids = hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # The answer re-tokenizes to (about) the tokens the engine produced; EOS is counted but not shown.
    answer_tokens = len(hf_tokenizer.encode(reply.choices[0].message.content, add_special_tokens=False))
    assert abs(reply.usage.completion_tokens - answer_tokens) <= 2


def test_completions_honour_max_tokens(client, vllm_stack, hf_tokenizer):
    prompt = "The three primary colors are"
    reply = client.completions.create(model=vllm_stack.model, prompt=prompt, max_tokens=7, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7
    assert reply.usage.prompt_tokens == len(hf_tokenizer(prompt)["input_ids"])
    assert reply.choices[0].text.strip()


def test_stop_string_cuts_the_text_where_it_appears(client, vllm_stack):
    prompt = "Count from one to twenty in words: one, two, three,"
    full = client.completions.create(model=vllm_stack.model, prompt=prompt, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    # Pick a stop string from the middle of what the model writes, so the test holds for any output.
    middle = len(full) // 2
    stop = full[middle:middle + 3]
    assert stop.strip(), f"degenerate output: {full!r}"
    stopped = client.completions.create(model=vllm_stack.model, prompt=prompt, max_tokens=30, temperature=0,
                                        stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[:full.index(stop)]


def test_client_disconnect_stops_generation_on_the_worker(vllm_stack):
    before = worker_stats(vllm_stack.base_url, vllm_stack.model)
    body = {"model": vllm_stack.model, "messages": QUESTION, "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{vllm_stack.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 3:
                break  # leaving the block closes the connection mid-stream
    # 1500 tokens take minutes on this CPU: the worker only goes idle this fast if it aborted.
    after = wait_until(lambda: (s := worker_stats(vllm_stack.base_url, vllm_stack.model)).active_requests == 0
                       and s.aborted_requests > before.aborted_requests and s,
                       timeout=15, what="the worker to abort the abandoned request")
    assert after.generated_tokens - before.generated_tokens < 1500


@pytest.mark.parametrize("body, status, needle", [
    ({"model": "no-such-model", "messages": QUESTION}, 404, "no-such-model"),
    ({"messages": QUESTION}, 400, "model"),
    ({"model": "{model}", "messages": []}, 400, "messages"),
    ({"model": "{model}", "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "{model}", "messages": QUESTION, "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "{model}", "messages": [{"role": "user", "content": "word " * 5000}]}, 400, "context"),
    ({"model": "{model}", "messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
])
def test_bad_input_gets_openai_error_json(vllm_stack, body, status, needle):
    body = {k: (vllm_stack.model if v == "{model}" else v) for k, v in body.items()}
    r = httpx.post(f"{vllm_stack.base_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] or needle == error.get("param"), error


def test_malformed_json_gets_400(vllm_stack):
    r = httpx.post(f"{vllm_stack.base_url}/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["message"]


def registered(etcd_endpoint: str, namespace: str) -> int:
    """How many instance records the namespace holds in etcd."""

    async def count() -> int:
        discovery = await connect_discovery(etcd_endpoint)
        try:
            items, _ = await discovery.get_prefix(keys.instances_prefix(namespace))
            return len(items)
        finally:
            await discovery.close()

    return asyncio.run(count())


def engine_core_pid(pid: int) -> int:
    """The child process vLLM V1 runs its engine core in (titled VLLM::EngineCore), of worker `pid`."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            title = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"EngineCore" in title:
                found.append(int(child))
    assert len(found) == 1, f"engine core processes of {pid}: {found}"
    return found[0]


def test_killed_engine_core_makes_the_worker_deregister_and_exit_non_zero(vllm_stack, etcd_endpoint):
    """Last in the module: it ends the module's worker (the fixture's teardown stops the rest)."""
    (worker,) = vllm_stack.workers
    assert registered(etcd_endpoint, vllm_stack.namespace) == 1
    os.kill(engine_core_pid(worker.pid), signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: not worker.alive(), 60, "the worker to exit after its engine core died")
    assert worker.returncode not in (0, None), worker.log_tail()
    assert time.monotonic() - killed_at < 60
    assert registered(etcd_endpoint, vllm_stack.namespace) == 0  # it revoked its lease on the way out
    assert "the engine died" in worker.log_tail(60)
