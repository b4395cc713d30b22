"""The API's structured answers through the KV-routed mode and across a migration, with real vLLM.

tests/e2e/api/ compares this project with vLLM's own server on one aggregated worker. Here the same
kinds of request go through a kv-mode frontend over two vLLM workers (pinned to separate cores) that
allow one migration each: JSON-schema answers and forced tool calls stay valid whichever worker the
router picks, and a streamed answer whose worker is killed mid-stream continues on the other worker
as one unbroken answer, the tool-call parser still reading it. The disaggregated mode has the same
checks in tests/e2e/test_disagg_e2e.py, on its stack. The same two workers also show KV-aware routing
over real vLLM (a shared prefix lands on the worker that cached it) before the migration test kills one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid

import httpx
import jsonschema
import openai
import pytest

from dynamo_lite.protocol.messages import WorkerStatsRequest
from dynamo_lite.transport.client import RequestClient
from tests.e2e.conftest import _new_group
from tests.e2e.harness import DEFAULT_MODEL_PATH, SERVED_MODEL_NAME, healthy_instances, metric_sum, wait_until
from tests.e2e.test_kv_routing_e2e import completed_per_worker
from tests.services import free_tcp_port

pytestmark = pytest.mark.vllm

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 30}},
                                               "required": ["city"], "additionalProperties": False}}}]


class RoutedStack:
    def __init__(self, base_url: str, group, namespace: str, frontend):
        self.base_url, self.group, self.namespace, self.frontend = base_url, group, namespace, frontend
        self.workers: dict[str, object] = {}  # request-plane address -> its process
        self.cores: dict[str, int] = {}  # request-plane address -> the core its engine runs on

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", timeout=300)

    def metric(self, name: str) -> float:
        return metric_sum(httpx.get(f"{self.base_url}/metrics", timeout=5).text, name)

    def start_workers(self, *cores: int) -> None:
        """One worker per core, started together (each engine pinned to its own core, so they load side by
        side), waited for until the frontend lists them all; the pid in each instance record names its
        process."""
        started: dict[int, tuple[object, int]] = {}  # pid -> (its process, its core)
        for core in cores:
            # float32: in bfloat16 the survivor's one-pass prefill of prompt + generated tokens and the dead
            # worker's token-by-token decode round differently, and greedy answers drift apart after a
            # near tie (seen ~90 tokens after the seam), which would hide what this test checks.
            proc = self.group.start(f"worker{core}-{len(self.workers) + len(started)}", "dynamo_lite.vllm",
                                    "--model", str(DEFAULT_MODEL_PATH), "--served-model-name", SERVED_MODEL_NAME,
                                    "--max-model-len", "2048", "--max-num-seqs", "8", "--namespace",
                                    self.namespace, "--migration-limit", "1", "--enforce-eager", "--dtype",
                                    "float32",
                                    # JSON without free whitespace: sampled, this model can emit tabs until
                                    # max_tokens (seen in ~1 of 40 answers), which no schema bounds.
                                    "--structured-outputs-config",
                                    '{"backend": "xgrammar", "disable_any_whitespace": true}',
                                    extra_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(core)})
            started[proc.pid] = (proc, core)
        expected = len(self.workers) + len(started)
        wait_until(lambda: len(healthy_instances(self.base_url, SERVED_MODEL_NAME)) == expected, 300,
                   f"workers on cores {list(cores)} on {self.base_url}/health",
                   [self.frontend, *(proc for proc, _ in started.values())])
        for instance in healthy_instances(self.base_url, SERVED_MODEL_NAME):
            if instance["pid"] in started:
                self.workers[instance["address"]], self.cores[instance["address"]] = started[instance["pid"]]
        assert len(self.workers) == expected, (self.workers, healthy_instances(self.base_url, SERVED_MODEL_NAME))

    def replace_dead_workers(self) -> None:
        for address, proc in list(self.workers.items()):
            if not proc.alive():
                del self.workers[address]
                wait_until(lambda: address not in {i["address"] for i in healthy_instances(
                    self.base_url, SERVED_MODEL_NAME)}, 60, f"{address} gone from {self.base_url}/health", [])
                self.start_workers(self.cores.pop(address))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, etcd_endpoint, nats_url):
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
    group = _new_group(tmp_path_factory, etcd_endpoint, nats_url, "vllm-api-modes")
    namespace = f"e2e-{uuid.uuid4().hex[:8]}"
    try:
        port = free_tcp_port()
        base_url = f"http://127.0.0.1:{port}"
        frontend = group.start("frontend", "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port",
                               str(port), "--namespace", namespace, "--router-mode", "kv",
                               "--tool-call-parser", "hermes")
        routed = RoutedStack(base_url, group, namespace, frontend)
        routed.start_workers(0, 1)
        yield routed
    finally:
        group.stop()


def test_json_schema_answers_are_valid_on_either_worker(stack):
    client = stack.client()
    for name in ("Ada", "Grace", "Alan", "Edsger"):  # different prompts: the router spreads them
        answer = client.chat.completions.create(
            model=SERVED_MODEL_NAME, temperature=0, max_tokens=60,
            messages=[{"role": "user", "content": f"Describe {name}, a person, as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                   "strict": True}})
        jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)


def test_forced_tool_call_is_valid_streamed_and_whole(stack):
    client = stack.client()
    body = dict(model=SERVED_MODEL_NAME, temperature=0, max_tokens=60, tools=TOOLS, tool_choice="required",
                messages=[{"role": "user", "content": "What is the weather in Lyon?"}])
    [call] = client.chat.completions.create(**body).choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    whole = json.loads(call.function.arguments)
    jsonschema.validate(whole, TOOLS[0]["function"]["parameters"])
    arguments = "".join(tc.function.arguments or "" for chunk in client.chat.completions.create(**body, stream=True)
                        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices)
    assert json.loads(arguments) == whole


LONG_CONTEXT = " ".join(f"Fact {i}: the {i}th lighthouse on the northern coast is painted in stripes of colour "
                        f"number {i % 7}, and its keeper logs the tides every {i % 5 + 1} hours." for i in range(30))


def test_vllm_pair_routes_a_shared_prefix_to_the_worker_that_cached_it(stack):
    """KV-aware routing over real vLLM (tests/e2e/test_kv_routing_e2e.py has the mocker fleet): a prompt
    sharing a long prefix with an earlier one lands on the worker that cached it and reports cached
    tokens. Before the migration test below, which kills one of the two workers."""
    first = [{"role": "system", "content": LONG_CONTEXT}, {"role": "user", "content": "Which lighthouse is first?"}]
    second = [{"role": "system", "content": LONG_CONTEXT}, {"role": "user", "content": "Who logs the tides?"}]
    before = completed_per_worker(stack.base_url, SERVED_MODEL_NAME)
    assert len(before) == 2
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=120,
                   json={"model": SERVED_MODEL_NAME, "messages": first, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 3 * 128  # several of vLLM's 128-token CPU blocks
    after_first = completed_per_worker(stack.base_url, SERVED_MODEL_NAME)
    (first_worker,) = [a for a in after_first if after_first[a] - before[a] == 1]

    def explained() -> dict:
        response = httpx.post(f"{stack.base_url}/debug/route", json={"model": SERVED_MODEL_NAME, "messages": second},
                              timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def indexed() -> dict | None:
        explanation = explained()
        return explanation if max(w["overlap_blocks"] for w in explanation["workers"]) >= 3 else None

    # KV events travel vLLM -> worker -> NATS -> frontend: wait until the router has them.
    explanation = wait_until(indexed, 30, "the router to index the first prompt's blocks")
    choice_row = next(w for w in explanation["workers"] if w["worker_id"] == explanation["choice"])
    assert choice_row["address"] == first_worker and choice_row["overlap_blocks"] >= 3
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=120,
                   json={"model": SERVED_MODEL_NAME, "messages": second, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 3 * 128
    after_second = completed_per_worker(stack.base_url, SERVED_MODEL_NAME)
    assert after_second[first_worker] - after_first[first_worker] == 1


async def _active_worker(addresses: list[str]) -> str | None:
    client = RequestClient()
    try:
        for address in addresses:
            if (await client.call(address, WorkerStatsRequest(), timeout=5)).active_requests:
                return address
        return None
    finally:
        await client.close()


def _kill_mid_stream(stack, stream, after_chunks: int = 10) -> list:
    """The stream's chunks, its worker SIGKILLed once `after_chunks` have come."""
    chunks, killed = [], None
    for chunk in stream:
        chunks.append(chunk)
        if killed is None and len(chunks) == after_chunks:
            killed = asyncio.run(_active_worker(list(stack.workers)))
            assert killed is not None, "no worker reports the stream as active"
            os.kill(stack.workers[killed].pid, signal.SIGKILL)
    assert killed is not None, f"the stream ended after {len(chunks)} chunks, before the kill"
    return chunks


def test_streamed_answer_migrates_when_its_worker_dies(stack):
    """Killed mid-stream, the worker's answer continues on the other one: the client sees one answer,
    the same text a run without the failure gives (greedy), through the hermes tool-call parser."""
    client = stack.client()
    body = dict(model=SERVED_MODEL_NAME, temperature=0, max_tokens=120, tools=TOOLS, tool_choice="auto",
                messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}])
    reference = client.chat.completions.create(**body).choices[0]
    assert reference.finish_reason == "length"  # long enough to still be running when the kill lands
    migrations = stack.metric("dynamo_lite_frontend_migrations_total")
    chunks = [c.choices[0] for c in _kill_mid_stream(stack, client.chat.completions.create(**body, stream=True))
              if c.choices]
    pieces = [c.delta.content or "" for c in chunks]
    assert chunks[-1].finish_reason == "length"
    assert "".join(pieces) == reference.message.content
    assert stack.metric("dynamo_lite_frontend_migrations_total") == migrations + 1
    # The survivor keeps serving.
    again = client.chat.completions.create(**{**body, "max_tokens": 8})
    assert again.choices[0].message.content


FACTS = {"type": "object", "properties": {"facts": {"type": "array", "minItems": 4, "maxItems": 4,
                                                    "items": {"type": "string", "maxLength": 60}}},
         "required": ["facts"], "additionalProperties": False}


def test_structured_choices_migrate_with_their_grammar_resumed(stack):
    """n = 2 JSON-schema answers streamed, their worker killed mid-answer: each choice goes on as its own
    request on the other worker, whose grammar starts after the tokens already sent (a grammar started
    afresh would open a second JSON object inside the first). Both answers are whole and valid."""
    stack.replace_dead_workers()  # the test before killed one
    client = stack.client()
    # Four strings of at most 60 characters and no free whitespace: whole within 400 tokens.
    body = dict(model=SERVED_MODEL_NAME, max_tokens=400, n=2, temperature=0.7, seed=7,  # n > 1: sampled
                messages=[{"role": "user", "content": "Give four facts about lighthouses as JSON."}],
                response_format={"type": "json_schema", "json_schema": {"name": "facts", "schema": FACTS,
                                                                       "strict": True}})
    migrations = stack.metric("dynamo_lite_frontend_migrations_total")
    chunks = [c.choices[0] for c in _kill_mid_stream(stack, client.chat.completions.create(**body, stream=True))
              if c.choices]
    for index in (0, 1):
        mine = [c for c in chunks if c.index == index]
        text = "".join(c.delta.content or "" for c in mine)
        assert mine[-1].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), FACTS)
    assert stack.metric("dynamo_lite_frontend_migrations_total") == migrations + 1
