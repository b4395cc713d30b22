"""Admission control on the frontend app (frontend/admission.py) over real loopback workers (the in-memory
stack of test_frontend_app): a per-model concurrency limit, worker busy thresholds, a bounded queue, and
503 + Retry-After in OpenAI's (or Anthropic's) error JSON when a request is refused."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

import pytest

from dynamo_lite.protocol.messages import LoadReport
from dynamo_lite.router.base import RouteDecision
from dynamo_lite.router.policies import RoundRobinRouter
from tests.integration.test_frontend_app import (
    MODEL,
    REPLY,
    TOKENIZER,
    ScriptedEngine,
    chat_body,
    model_dir,
    running_stack,
)

__all__ = ["model_dir"]  # the module-scoped fixture, shared

TOKEN_DELAY = 0.01  # REPLY takes ~0.25 s to stream: requests overlap


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample of the /metrics text (0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_overloaded(response, code: str | None = None) -> dict:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["type"] == "overloaded_error" and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


async def test_a_flood_gets_only_200s_and_503s_with_retry_after(model_dir):
    """60 concurrent requests (half streamed) against --max-concurrency 2 and a queue of 4 that waits 1 s:
    every answer is 200 or 503 + Retry-After, the counts match the metrics, the queue never grew past its
    bound, and everything is given back at the end."""
    async with running_stack(max_concurrency=2, queue_timeout=1.0, max_queued_requests=4) as stack:
        await stack.add_worker(ScriptedEngine(model_dir, token_delay=TOKEN_DELAY))
        admission = stack.app.state.service.admission
        peak = {"queued": 0, "admitted": 0}

        async def watch() -> None:
            while True:
                peak["queued"] = max(peak["queued"], admission.queued(MODEL))
                peak["admitted"] = max(peak["admitted"], admission.admitted(MODEL))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            responses = await asyncio.gather(*(
                stack.http.post("/v1/chat/completions", json=chat_body(stream=i % 2 == 0)) for i in range(60)))
        finally:
            watcher.cancel()
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        codes = {assert_overloaded(r)["code"] for r in refused}
        assert codes <= {"queue_full", "concurrency_limit"} and "queue_full" in codes
        # The 2 admitted at once, and at least one of those it queued (timing decides how many more).
        assert len(ok) >= 3 and len(ok) + len(refused) == 60
        for response in ok:
            if response.headers["content-type"].startswith("text/event-stream"):
                assert response.text.endswith("data: [DONE]\n\n")
            else:
                assert response.json()["choices"][0]["message"]["content"] == REPLY
        assert peak["admitted"] == 2 and peak["queued"] == 4
        assert admission.admitted(MODEL) == 0 and admission.queued(MODEL) == 0

        text = (await stack.http.get("/metrics")).text
        requests = "dynamo_lite_frontend_requests_total"
        assert metric(text, requests, model=MODEL, status="200") == len(ok)
        assert metric(text, requests, model=MODEL, status="503") == len(refused)
        rejected = "dynamo_lite_frontend_rejected_requests_total"
        assert sum(metric(text, rejected, model=MODEL, reason=reason)
                   for reason in ("queue_full", "concurrency_limit", "workers_busy")) == len(refused)
        assert metric(text, "dynamo_lite_frontend_queued_requests", model=MODEL) == 0
        full = metric(text, rejected, model=MODEL, reason="queue_full")
        # Every request that was not refused for a full queue was admitted or timed out, waiting or not.
        assert metric(text, "dynamo_lite_frontend_queue_wait_seconds_count", model=MODEL) == 60 - full


async def test_queued_requests_are_served_in_order_once_a_slot_frees(model_dir):
    async with running_stack(max_concurrency=1, queue_timeout=10.0) as stack:
        engine = ScriptedEngine(model_dir, token_delay=TOKEN_DELAY)
        await stack.add_worker(engine)
        tasks = []
        for index in range(3):
            tasks.append(asyncio.create_task(stack.http.post(
                "/v1/completions", json={"model": MODEL, "prompt": f"p{index}", "max_tokens": 5})))
            await asyncio.sleep(0.02)  # arrive in this order
        responses = await asyncio.gather(*tasks)
        assert [r.status_code for r in responses] == [200, 200, 200]
        prompts = [TOKENIZER.decode(request.token_ids) for request in engine.requests]
        assert prompts == ["p0", "p1", "p2"]  # first come, first served
        text = (await stack.http.get("/metrics")).text
        assert metric(text, "dynamo_lite_frontend_queue_wait_seconds_count", model=MODEL) == 3
        # Two of them waited for at least one 5-token request each.
        assert metric(text, "dynamo_lite_frontend_queue_wait_seconds_sum", model=MODEL) > 4 * TOKEN_DELAY


async def test_queue_timeout_zero_refuses_at_once_and_the_stream_path_too(model_dir):
    async with running_stack(max_concurrency=1, queue_timeout=0.0) as stack:
        await stack.add_worker(ScriptedEngine(model_dir, token_delay=TOKEN_DELAY))
        first = asyncio.create_task(stack.http.post("/v1/chat/completions", json=chat_body(stream=True)))
        admission = stack.app.state.service.admission
        await asyncio.wait_for(_until(lambda: admission.admitted(MODEL) == 1), 5)
        second = await stack.http.post("/v1/chat/completions", json=chat_body(stream=True))
        error = assert_overloaded(second, "concurrency_limit")
        assert "--max-concurrency 1" in error["message"]
        assert (await first).status_code == 200
        # The slot came back with the end of the stream.
        assert (await stack.http.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_anthropic_messages_refusal_keeps_retry_after(model_dir):
    async with running_stack(max_concurrency=1, queue_timeout=0.0) as stack:
        await stack.add_worker(ScriptedEngine(model_dir, token_delay=TOKEN_DELAY))
        body = {"model": MODEL, "max_tokens": 30, "messages": [{"role": "user", "content": "hi"}]}
        first = asyncio.create_task(stack.http.post("/v1/messages", json=body))
        admission = stack.app.state.service.admission
        await asyncio.wait_for(_until(lambda: admission.admitted(MODEL) == 1), 5)
        second = await stack.http.post("/v1/messages", json=body)
        assert second.status_code == 503 and second.headers["retry-after"] == "1"
        assert second.json()["error"]["type"] == "overloaded_error"
        assert (await first).status_code == 200


class LoadReportingRouter(RoundRobinRouter):
    """Round-robin with load reports set by the test (what the kv router hears on the event plane)."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: dict[int, LoadReport] = {}

    def route(self, model: str, request_id: str, token_ids: Sequence[int], workers: Sequence[int]) -> RouteDecision:
        return super().route(model, request_id, token_ids, workers)

    def load_report(self, worker_id: int) -> LoadReport | None:
        return self.reports.get(worker_id)

    def report(self, worker_id: int, waiting: int = 0, active: int = 0) -> None:
        self.reports[worker_id] = LoadReport(worker_id=worker_id, active_blocks=active, total_blocks=100,
                                             running_requests=1, waiting_requests=waiting)


async def test_requests_wait_while_every_worker_is_busy(model_dir):
    router = LoadReportingRouter()
    async with running_stack(router, busy_waiting_requests=4, busy_kv_usage=0.9, queue_timeout=5.0) as stack:
        one = await stack.add_worker(ScriptedEngine(model_dir))
        two = await stack.add_worker(ScriptedEngine(model_dir))
        router.report(one.instance_id, waiting=4)
        router.report(two.instance_id, active=95)  # 95 % of the KV cache in use
        waiting = asyncio.create_task(stack.http.post("/v1/chat/completions", json=chat_body()))
        admission = stack.app.state.service.admission
        await asyncio.wait_for(_until(lambda: admission.queued(MODEL) == 1), 5)
        await asyncio.sleep(0.2)
        assert not waiting.done()  # both busy: it waits
        router.report(two.instance_id, active=50)  # one worker has room again
        response = await asyncio.wait_for(waiting, 5)
        assert response.status_code == 200, response.text


async def test_busy_workers_past_the_queue_timeout_are_a_503(model_dir):
    router = LoadReportingRouter()
    async with running_stack(router, busy_waiting_requests=2, queue_timeout=0.2) as stack:
        worker = await stack.add_worker(ScriptedEngine(model_dir))
        router.report(worker.instance_id, waiting=2)
        response = await stack.http.post("/v1/chat/completions", json=chat_body(stream=True))
        error = assert_overloaded(response, "workers_busy")
        assert "after waiting" in error["message"]
        text = (await stack.http.get("/metrics")).text
        assert metric(text, "dynamo_lite_frontend_rejected_requests_total", model=MODEL,
                      reason="workers_busy") == 1
        # Below the thresholds again: served.
        router.report(worker.instance_id, waiting=1)
        assert (await stack.http.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_a_client_that_leaves_the_queue_frees_its_place(model_dir):
    async with running_stack(max_concurrency=1, queue_timeout=10.0, max_queued_requests=1) as stack:
        await stack.add_worker(ScriptedEngine(model_dir, token_delay=TOKEN_DELAY))
        admission = stack.app.state.service.admission
        first = asyncio.create_task(stack.http.post("/v1/chat/completions", json=chat_body()))
        await asyncio.wait_for(_until(lambda: admission.admitted(MODEL) == 1), 5)
        queued = asyncio.create_task(stack.http.post("/v1/chat/completions", json=chat_body()))
        await asyncio.wait_for(_until(lambda: admission.queued(MODEL) == 1), 5)
        queued.cancel()  # the client gives up while queued
        with pytest.raises(asyncio.CancelledError):
            await queued
        await asyncio.wait_for(_until(lambda: admission.queued(MODEL) == 0), 5)
        assert (await first).status_code == 200
        assert (await stack.http.post("/v1/chat/completions", json=chat_body())).status_code == 200
        assert admission.admitted(MODEL) == 0


async def test_admission_is_off_by_default(model_dir):
    async with running_stack() as stack:
        await stack.add_worker(ScriptedEngine(model_dir, token_delay=TOKEN_DELAY))
        responses = await asyncio.gather(*(stack.http.post("/v1/chat/completions", json=chat_body())
                                           for _ in range(20)))
        assert {r.status_code for r in responses} == {200}
        text = (await stack.http.get("/metrics")).text
        assert "dynamo_lite_frontend_queue_wait_seconds_count{" not in text
        assert "dynamo_lite_frontend_rejected_requests_total{" not in text


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.005)
