"""Frontend + mocker processes through the official openai client: concurrency, spread, failures."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai

from dynamo_lite.protocol.messages import WorkerStatsRequest
from dynamo_lite.transport.client import RequestClient
from tests.e2e.conftest import _new_group, start_stack
from tests.e2e.harness import DEFAULT_MODEL_PATH, healthy_instances, metric_samples, wait_until


async def _stats(addresses: list[str]):
    rc = RequestClient()
    try:
        return [await rc.call(a, WorkerStatsRequest(), timeout=5) for a in addresses]
    finally:
        await rc.close()


def completed_per_worker(base_url: str, model: str) -> dict[str, int]:
    addresses = sorted(i["address"] for i in healthy_instances(base_url, model))
    return {a: s.completed_requests for a, s in zip(addresses, asyncio.run(_stats(addresses)))}


def test_many_concurrent_streams_complete_and_spread_round_robin(mocker_stack):
    before = completed_per_worker(mocker_stack.base_url, mocker_stack.model)
    assert len(before) == 2
    n_streams, max_tokens = 64, 16

    async def one_stream(client: openai.AsyncOpenAI, i: int) -> tuple[int, str | None]:
        stream = await client.chat.completions.create(
            model=mocker_stack.model, messages=[{"role": "user", "content": f"request {i}: tell me a story"}],
            max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
        finish, usage = None, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            usage = chunk.usage or usage
        return usage.completion_tokens, finish

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{mocker_stack.base_url}/v1", api_key="unused",
                                      max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(one_stream(client, i) for i in range(n_streams)))

    results = asyncio.run(run_all())
    assert results == [(max_tokens, "length")] * n_streams
    after = completed_per_worker(mocker_stack.base_url, mocker_stack.model)
    served = sorted(after[a] - before[a] for a in after)
    assert served == [n_streams // 2, n_streams // 2]


def test_restarted_frontend_sees_workers_already_up(mocker_stack):
    proc, url = mocker_stack.start_frontend("frontend-late")
    try:
        wait_until(lambda: len(healthy_instances(url, mocker_stack.model)) == 2, 30,
                   "the late frontend to see both workers", [proc])
        models = httpx.get(f"{url}/v1/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == [mocker_stack.model]
        r = httpx.post(f"{url}/v1/completions", json={"model": mocker_stack.model, "prompt": "hi",
                                                      "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.stop()


def indexed_blocks(base_url: str, model: str) -> dict[str, float]:
    """worker label -> blocks the kv router's index holds for it, from /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    return {labels["worker"]: value
            for labels, value in metric_samples(text, "dynamo_lite_router_indexed_blocks", model=model)}


# Short, so that the wait for its expiry after the kill is short too (etcd's minimum lease TTL is 3 s at
# its default timing).
KILLED_LEASE_TTL = 3.0


def test_killed_worker_disappears_within_lease_ttl_with_its_blocks(tmp_path_factory, etcd_endpoint, nats_url):
    group = _new_group(tmp_path_factory, etcd_endpoint, nats_url, "mocker-kill")
    try:
        stack = start_stack(group, "dynamo_lite.mocker",
                            ["--model-path", str(DEFAULT_MODEL_PATH), "--served-model-name", "doomed",
                             "--num-workers", "1", "--speedup-ratio", "50", "--lease-ttl", str(KILLED_LEASE_TTL)],
                            model="doomed", router_mode="kv")
        (worker_id,) = [i["instance_id"] for i in healthy_instances(stack.base_url, "doomed")]
        r = httpx.post(f"{stack.base_url}/v1/completions", json={"model": "doomed", "prompt": "hello " * 100,
                                                                 "max_tokens": 4}, timeout=30)
        assert r.status_code == 200, r.text
        # The worker's KV events reach the router: it indexes the prompt's blocks for that worker.
        wait_until(lambda: indexed_blocks(stack.base_url, "doomed").get(f"{worker_id:x}", 0) >= 5, 10,
                   "the router to index the worker's blocks", [stack.frontend])

        stack.workers[0].kill()  # SIGKILL: no deregistration, only the lease can expire
        killed_at = time.monotonic()
        lease_ttl = KILLED_LEASE_TTL
        wait_until(lambda: not healthy_instances(stack.base_url, "doomed"), lease_ttl + 1.0,
                   "the killed worker to vanish from /health", [stack.frontend])
        assert time.monotonic() - killed_at <= lease_ttl + 1.0
        assert f"{worker_id:x}" not in indexed_blocks(stack.base_url, "doomed")  # its blocks went with it
        r = httpx.post(f"{stack.base_url}/v1/completions", json={"model": "doomed", "prompt": "hi",
                                                                 "max_tokens": 4}, timeout=30)
        assert r.status_code == 404 and "doomed" in r.json()["error"]["message"]
    finally:
        group.stop()
