"""Data-parallel ranks end to end, processes started as a user starts them: a kv-mode frontend and one
mocker process simulating 2 workers of `--data-parallel-size 2` each (4 ranks, each its own KV cache).

Shared-prefix groups are sent 8 at a time (the router's own load tracking spreads them over every rank),
then each group once more: the router must send the repeat to the (worker, rank) that cached the group's
prefix, which the engine confirms with cached tokens (another rank, even of the same worker, has nothing
cached). ~10 s on the 2-core CI machine.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.e2e.conftest import _new_group, start_stack
from tests.e2e.harness import DEFAULT_MODEL_PATH, healthy_instances, metric_samples

MODEL = "dp-mock"
WORKERS, RANKS = 2, 2
GROUPS = 8


def system_prompt(group: int) -> str:
    return (f"[dp group {group}] You are assistant number {group}. "
            + " ".join(f"Rule {k} of group {group}: answer politely and precisely." for k in range(12)))


def chat(group: int, question: int) -> list[dict]:
    return [{"role": "system", "content": system_prompt(group)},
            {"role": "user", "content": f"Question {question}: what is {group} times {question}?"}]


def decisions(base_url: str) -> dict[str, float]:
    """Requests routed per worker label ("{id}" for rank 0, "{id}-dp{rank}" above) from /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    return {labels["worker"]: value
            for labels, value in metric_samples(text, "dynamo_lite_router_decisions_total", model=MODEL)}


async def ask(client: openai.AsyncOpenAI, messages: list[dict]) -> int:
    answer = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32)
    return answer.usage.prompt_tokens_details.cached_tokens


@pytest.fixture(scope="module")
def dp_stack(tmp_path_factory, etcd_endpoint, nats_url):
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
    group = _new_group(tmp_path_factory, etcd_endpoint, nats_url, "dp-mocker")
    try:
        yield start_stack(group, "dynamo_lite.mocker",
                          ["--model-path", str(DEFAULT_MODEL_PATH), "--served-model-name", MODEL,
                           "--num-workers", str(WORKERS), "--data-parallel-size", str(RANKS),
                           "--speedup-ratio", "10"],
                          model=MODEL, router_mode="kv", expected_instances=WORKERS)
    finally:
        group.stop()


def test_kv_routing_uses_every_rank_and_sends_a_repeated_prefix_to_its_worker_and_rank(dp_stack):
    url = dp_stack.base_url
    instances = healthy_instances(url, MODEL)
    assert [i["data_parallel_size"] for i in instances] == [RANKS] * WORKERS
    ranks = {f"{i['instance_id']:x}" + (f"-dp{r}" if r else "") for i in instances for r in range(RANKS)}

    async def first_round() -> list[int]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
            return await asyncio.gather(*(ask(c, chat(g, 0)) for g in range(GROUPS)))

    assert asyncio.run(first_round()) == [0] * GROUPS  # every group new: nothing cached anywhere
    spread = decisions(url)
    print(f"\nfirst round per (worker, rank): {spread}")
    assert set(spread) == ranks and all(spread[r] >= 1 for r in ranks)  # all 4 ranks used

    async def repeat(group: int) -> tuple[str, int]:
        route = httpx.post(f"{url}/debug/route", json={"model": MODEL, "messages": chat(group, 1)}, timeout=5)
        route.raise_for_status()
        body = route.json()
        (best,) = [row for row in body["workers"]
                   if (row["worker_id"], row["dp_rank"]) == (body["choice"], body["choice_dp_rank"])]
        assert best["overlap_blocks"] > 0 and sum(row["overlap_blocks"] > 0 for row in body["workers"]) == 1
        before = decisions(url)
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
            cached = await ask(c, chat(group, 1))
        after = decisions(url)
        (chosen,) = [label for label in after if after[label] != before.get(label, 0)]
        assert chosen == best["worker"]  # routed where /debug/route said: that (worker, rank)
        return chosen, cached

    for group in range(GROUPS):
        chosen, cached = asyncio.run(repeat(group))
        # The system prompt's blocks were cached on that rank only: the engine found them there.
        assert cached >= 16 * 8, (group, chosen, cached)
