"""Data-parallel ranks end to end, processes started as a user starts them.

(a) A kv-mode frontend and one mocker process simulating 2 workers of `--data-parallel-size 2` each (4
    ranks, each its own KV cache). Shared-prefix groups are sent 8 at a time (the router's own load
    tracking spreads them over every rank), then each group once more: the router must send the repeat to
    the (worker, rank) that cached the group's prefix, which the engine confirms with cached tokens
    (another rank, even of the same worker, has nothing cached). ~5 s on the 2-core CI machine.
(b) One real vLLM worker with `--data-parallel-size 2` (one AsyncLLM, an engine core per rank, each pinned
    to its own core with VLLM_CPU_OMP_THREADS_BIND="0|1") behind a kv-mode frontend: two prompts sent
    together land on different ranks, both ranks' KV events reach the router, and a follow-up of each
    goes to its rank and finds its prefix cached there. ~60 s (the engine start is most of it).
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.e2e.conftest import _new_group, start_stack
from tests.e2e.harness import (
    DEFAULT_MODEL_PATH,
    SERVED_MODEL_NAME,
    healthy_instances,
    metric_samples,
    wait_until,
)

MODEL = "dp-mock"
WORKERS, RANKS = 2, 2
GROUPS = 8


def system_prompt(group: int) -> str:
    return (f"[dp group {group}] You are assistant number {group}. "
            + " ".join(f"Rule {k} of group {group}: answer politely and precisely." for k in range(12)))


def chat(group: int, question: int) -> list[dict]:
    return [{"role": "system", "content": system_prompt(group)},
            {"role": "user", "content": f"Question {question}: what is {group} times {question}?"}]


def decisions(base_url: str, model: str = MODEL) -> dict[str, float]:
    """Requests routed per worker label ("{id}" for rank 0, "{id}-dp{rank}" above) from /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    return {labels["worker"]: value
            for labels, value in metric_samples(text, "dynamo_lite_router_decisions_total", model=model)}


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

    async def ask_once(messages: list[dict]) -> int:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
            return await ask(c, messages)

    def repeat(group: int) -> tuple[str, int]:
        route = httpx.post(f"{url}/debug/route", json={"model": MODEL, "messages": chat(group, 1)}, timeout=5)
        route.raise_for_status()
        body = route.json()
        (best,) = [row for row in body["workers"]
                   if (row["worker_id"], row["dp_rank"]) == (body["choice"], body["choice_dp_rank"])]
        assert best["overlap_blocks"] > 0 and sum(row["overlap_blocks"] > 0 for row in body["workers"]) == 1
        before = decisions(url)
        cached = asyncio.run(ask_once(chat(group, 1)))
        after = decisions(url)
        (chosen,) = [label for label in after if after[label] != before.get(label, 0)]
        assert chosen == best["worker"]  # routed where /debug/route said: that (worker, rank)
        return chosen, cached

    for group in range(GROUPS):
        chosen, cached = repeat(group)
        # The system prompt's blocks were cached on that rank only: the engine found them there.
        assert cached >= 16 * 8, (group, chosen, cached)


# --------------------------------------------------------------------------- real vLLM


def context(topic: str) -> str:
    """A system prompt of several of vLLM's 128-token CPU blocks; topics share no first block."""
    return f"[{topic}] " + " ".join(f"Fact {i} about {topic}: item {i} is painted in colour number {i % 7} "
                                    f"and is checked every {i % 5 + 1} hours." for i in range(30))


@pytest.fixture(scope="module")
def vllm_dp_stack(tmp_path_factory, etcd_endpoint, nats_url):
    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.fail(f"default model missing at {DEFAULT_MODEL_PATH}: run scripts/setup.sh")
    group = _new_group(tmp_path_factory, etcd_endpoint, nats_url, "vllm-dp")
    try:
        yield start_stack(group, "dynamo_lite.vllm",
                          ["--model", str(DEFAULT_MODEL_PATH), "--served-model-name", SERVED_MODEL_NAME,
                           "--max-model-len", "2048", "--max-num-seqs", "4", "--data-parallel-size", "2"],
                          model=SERVED_MODEL_NAME, router_mode="kv",
                          # Rank r's engine core on core r (vLLM reads one "|"-separated entry per rank).
                          worker_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                          startup_timeout=300)
    finally:
        group.stop()


@pytest.mark.vllm
def test_vllm_data_parallel_worker_routes_each_prefix_to_the_rank_that_cached_it(vllm_dp_stack):
    url, model = vllm_dp_stack.base_url, vllm_dp_stack.model
    (instance,) = healthy_instances(url, model)
    assert instance["data_parallel_size"] == 2
    chats = {topic: [{"role": "system", "content": context(topic)}, {"role": "user", "content": "First?"}]
             for topic in ("lighthouses", "windmills")}

    async def together() -> list[dict]:
        async with httpx.AsyncClient(timeout=180) as client:
            replies = await asyncio.gather(*(client.post(f"{url}/v1/chat/completions", json={
                "model": model, "messages": messages, "max_tokens": 4, "temperature": 0})
                for messages in chats.values()))
        return [reply.json() for reply in replies]

    for answer in asyncio.run(together()):
        assert answer["usage"]["prompt_tokens"] > 3 * 128, answer
    rank0 = f"{instance['instance_id']:x}"
    assert sorted(decisions(url, model)) == [rank0, f"{rank0}-dp1"]  # sent together: one on each rank

    def follow_up(topic: str) -> list[dict]:
        return [chats[topic][0], {"role": "user", "content": "And the last one?"}]

    def routed(topic: str) -> dict | None:
        """/debug/route for the topic's follow-up once the router indexed the topic's blocks somewhere."""
        r = httpx.post(f"{url}/debug/route", json={"model": model, "messages": follow_up(topic)}, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        return body if max(row["overlap_blocks"] for row in body["workers"]) >= 3 else None

    # vLLM rank -> its ZMQ publisher (port + rank) -> worker -> event plane -> frontend, for each rank.
    where = {topic: wait_until(lambda t=topic: routed(t), 60, f"the router to index the {topic} blocks")
             for topic in chats}
    assert {body["choice_dp_rank"] for body in where.values()} == {0, 1}, where
    for topic, body in where.items():
        best = next(row for row in body["workers"] if row["dp_rank"] == body["choice_dp_rank"])
        before = decisions(url, model)
        r = httpx.post(f"{url}/v1/chat/completions", timeout=180, json={
            "model": model, "messages": follow_up(topic), "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 3 * 128
        after = decisions(url, model)
        assert [label for label in after if after[label] != before.get(label, 0)] == [best["worker"]]
