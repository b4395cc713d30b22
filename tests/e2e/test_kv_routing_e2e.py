"""KV-aware routing end to end, processes started as a user starts them.

One mocker process simulating 8 workers, a kv-mode frontend and a round-robin frontend on the same
fleet. A shared-prefix workload (16 groups of requests sharing a long system prompt, shuffled, 8 at a
time) runs through each; the engine-reported cached-token fraction must be far higher with kv routing,
and kv routing must still spread the requests.

The same check with two real vLLM workers (a prompt sharing a long prefix with an earlier one lands on
the worker that cached it) runs on the two-worker kv stack of tests/e2e/test_api_serving_modes.py, so
that two engines start once for both.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import openai
import pytest

from dynamo_lite.protocol.messages import WorkerStatsRequest
from dynamo_lite.transport.client import RequestClient
from tests.e2e.conftest import _new_group, start_stack
from tests.e2e.harness import DEFAULT_MODEL_PATH, healthy_instances, wait_until

GROUPS = 16
REQUESTS_PER_GROUP = 8
CONCURRENCY = 8
FLEET = 8


async def _completed(addresses: list[str]) -> dict[str, int]:
    client = RequestClient()
    try:
        return {a: (await client.call(a, WorkerStatsRequest(), timeout=5)).completed_requests for a in addresses}
    finally:
        await client.close()


def completed_per_worker(base_url: str, model: str) -> dict[str, int]:
    return asyncio.run(_completed(sorted(i["address"] for i in healthy_instances(base_url, model))))


def shared_prefix_workload(salt: str, seed: int) -> list[list[dict]]:
    """GROUPS x REQUESTS_PER_GROUP chats; a group shares a system prompt of several hundred tokens.
    The group's identity comes first, so groups share no KV block (not even the first)."""
    chats = []
    for group in range(GROUPS):
        system = (f"[{salt} group {group}] You are assistant number {group} of the {salt} fleet. "
                  + " ".join(f"Rule {k} of group {group}: answer politely and precisely." for k in range(24)))
        for question in range(REQUESTS_PER_GROUP):
            chats.append([{"role": "system", "content": system},
                          {"role": "user", "content": f"Question {question}: what is {group} times {question}?"}])
    random.Random(seed).shuffle(chats)
    return chats


async def run_workload(base_url: str, model: str, chats: list[list[dict]]) -> tuple[int, int]:
    """(sum of prompt tokens, sum of cached tokens) from the usage of every answer."""
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(client: openai.AsyncOpenAI, messages: list[dict]) -> tuple[int, int]:
        async with semaphore:
            answer = await client.chat.completions.create(model=model, messages=messages, max_tokens=16)
        usage = answer.usage
        return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens

    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                                  timeout=60) as client:
        results = await asyncio.gather(*(one(client, chat) for chat in chats))
    return sum(p for p, _ in results), sum(c for _, c in results)


def measure(base_url: str, model: str, salt: str) -> tuple[float, dict[str, int]]:
    before = completed_per_worker(base_url, model)
    prompt_tokens, cached_tokens = asyncio.run(run_workload(base_url, model, shared_prefix_workload(salt, 7)))
    after = completed_per_worker(base_url, model)
    return cached_tokens / prompt_tokens, {a: after[a] - before.get(a, 0) for a in after}


@pytest.mark.parametrize("event_plane", ["nats", "embedded"])
def test_kv_routing_beats_round_robin_on_shared_prefixes(tmp_path_factory, etcd_endpoint, request, event_plane):
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
    # With no NATS_SERVER every process takes the embedded event plane (its peers found through etcd).
    nats_url = request.getfixturevalue("nats_url") if event_plane == "nats" else ""
    group = _new_group(tmp_path_factory, etcd_endpoint, nats_url, f"kv-fleet-{event_plane}")
    try:
        stack = start_stack(group, "dynamo_lite.mocker",
                            ["--model-path", str(DEFAULT_MODEL_PATH), "--served-model-name", "kv-mock",
                             "--num-workers", str(FLEET), "--speedup-ratio", "2"],
                            model="kv-mock", router_mode="kv", expected_instances=FLEET)
        rr_frontend, rr_url = stack.start_frontend("frontend-rr", "--router-mode", "round-robin")
        wait_until(lambda: len(healthy_instances(rr_url, "kv-mock")) == FLEET, 30,
                   "the round-robin frontend to see the fleet", [rr_frontend])
        # Different salts: the second run finds nothing the first one cached (same as resetting caches).
        kv_fraction, kv_served = measure(stack.base_url, "kv-mock", "kv")
        rr_fraction, rr_served = measure(rr_url, "kv-mock", "rr")
        print(f"\ncached-token fraction: kv {kv_fraction:.3f}, round-robin {rr_fraction:.3f}")
        print(f"requests per worker: kv {sorted(kv_served.values())}, round-robin {sorted(rr_served.values())}")
        total = GROUPS * REQUESTS_PER_GROUP
        assert sum(kv_served.values()) == total and sum(rr_served.values()) == total
        assert kv_fraction >= rr_fraction + 0.2
        mean = total / FLEET
        assert max(kv_served.values()) <= 2 * mean, kv_served
        metrics = httpx.get(f"{stack.base_url}/metrics", timeout=5).text
        assert "dynamo_lite_router_decisions_total" in metrics
        assert 'dynamo_lite_router_kv_resyncs_total{model="kv-mock",result="ok"}' in metrics
        logs = (group.run_dir / "frontend.log").read_text()
        assert ("embedded event bus" in logs) == (event_plane == "embedded")  # the plane asked for
        # A kv frontend started now saw none of the events: it learns the fleet's caches by resync alone.
        late, late_url = stack.start_frontend("frontend-late", "--router-mode", "kv")
        chat = shared_prefix_workload("kv", 7)[0]

        def overlap() -> int | None:
            r = httpx.post(f"{late_url}/debug/route", json={"model": "kv-mock", "messages": chat}, timeout=5)
            best = max((w["overlap_blocks"] for w in r.json()["workers"]), default=0) if r.status_code == 200 else 0
            return best or None

        assert wait_until(overlap, 30, "the late frontend to resync the fleet's blocks", [late]) >= 3
    finally:
        group.stop()
