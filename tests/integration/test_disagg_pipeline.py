"""Disaggregated serving through the frontend app, over real loopback workers: MockerEngine prefill and
decode workers in WorkerShells (MemoryDiscovery), the app driven over ASGI. The mocker answers a
do_remote_decode request with one token and transfer params, and a decode request carrying params
skips its prefill, like vLLM with the NixlConnector. The last test follows KV events over NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import httpx
import pytest
from prometheus_client import CollectorRegistry

from dynamo_lite.discovery.memory import MemoryDiscovery
from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.engine.worker import WorkerShell, WorkerShellConfig
from dynamo_lite.events.nats import NatsEventBus
from dynamo_lite.frontend.app import FrontendDeps, create_app
from dynamo_lite.frontend.config import FrontendConfig
from dynamo_lite.mocker.config import MockerConfig, ModelFacts
from dynamo_lite.mocker.engine import MockerEngine
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.errors import EngineError
from dynamo_lite.protocol.messages import GenerateRequest, InstanceRecord, ModelCard, json_encoder
from dynamo_lite.router.base import Router
from dynamo_lite.router.policies import RoundRobinRouter
from dynamo_lite.router.kv_routing import KvRoutingService, KvRoutingSettings
from dynamo_lite.transport.client import RequestClient
from tests.integration.test_frontend_app import TOKENIZER, closed_port_address, tokenizer_files

MODEL = "tiny"
BLOCK = 16
WAIT = 5.0  # bound on every wait
LONG = "Tell me everything about the history of the region. " * 12  # ~620 tokens (byte tokenizer)
SHORT = "Hi"


class RecordingMocker(MockerEngine):
    """A mocker that keeps the requests it received, and can hold prefills until released or fail them."""

    def __init__(self, *args, gate: asyncio.Event | None = None, fail: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests: list[GenerateRequest] = []
        self.gate = gate
        self.fail = fail

    async def generate(self, request: GenerateRequest):
        self.requests.append(request)
        if self.fail:
            raise EngineError("simulated engine failure")
        if self.gate is not None:
            await self.gate.wait()
        async for frame in super().generate(request):
            yield frame


def engine(**kwargs) -> RecordingMocker:
    config = MockerConfig(block_size=BLOCK, num_gpu_blocks_override=4096, speedup_ratio=1000.0)
    facts = ModelFacts(path=kwargs.pop("path"), served_model_name=MODEL, context_length=4096,
                       vocab_size=TOKENIZER.get_vocab_size(), first_token_id=0, end_token_id=256)
    return RecordingMocker(config, facts=facts, **kwargs)


class DisaggStack:
    def __init__(self, model_dir, router: Router | None, config: FrontendConfig, events=None):
        self.model_dir = str(model_dir)
        self.namespace = config.namespace
        self.discovery = MemoryDiscovery()
        self.watcher = InstanceWatcher(self.discovery, self.namespace, failed_cooldown=60.0)
        self.router = router
        self.config = config
        self.events = events
        self.registry = CollectorRegistry()
        self.client = RequestClient(connect_timeout=2.0)
        self.shells: list[WorkerShell] = []

    async def start(self, router_factory=None) -> None:
        await self.watcher.start()
        if router_factory is not None:
            self.router = router_factory(self.watcher)
        self.app = create_app(FrontendDeps(watcher=self.watcher, client=self.client, router=self.router,
                                           registry=self.registry, config=self.config))
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://frontend",
                                      timeout=10.0)

    async def add(self, role: str, **engine_kwargs) -> tuple[WorkerShell, RecordingMocker]:
        mocker = engine(path=self.model_dir, **engine_kwargs)
        component = keys.COMPONENT_PREFILL if role == "prefill" else keys.COMPONENT_BACKEND
        shell = WorkerShell(mocker, self.discovery, self.events, WorkerShellConfig(
            namespace=self.namespace, component=component, role=role, host="127.0.0.1", drain_timeout=1.0,
            load_report_interval=0.05, engine_kind="mocker"))
        self.shells.append(shell)
        await shell.start()
        assert await self.watcher.wait_for(
            lambda: any(r.instance_id == shell.instance_id for r in self.watcher.instances()), WAIT)
        return shell, mocker

    async def register_dead_prefill(self) -> int:
        """A prefill instance whose address refuses connections (a worker that died, lease not yet expired)."""
        lease = await self.discovery.grant_lease(30.0)
        card = ModelCard(name=MODEL, path=self.model_dir, context_length=4096, kv_block_size=BLOCK, engine="mocker")
        record = InstanceRecord(instance_id=lease.id, component=keys.COMPONENT_PREFILL, address=closed_port_address(),
                                model=MODEL, host="127.0.0.1", pid=0, role="prefill")
        await self.discovery.put(keys.model_card_key(self.namespace, MODEL, lease.id), json_encoder.encode(card), lease)
        await self.discovery.put(keys.instance_key(self.namespace, keys.COMPONENT_PREFILL, lease.id),
                                 json_encoder.encode(record), lease)
        assert await self.watcher.wait_for(
            lambda: any(r.instance_id == lease.id for r in self.watcher.instances()), WAIT)
        return lease.id

    async def chat(self, content: str, **extra) -> httpx.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 5,
                "temperature": 0, **extra}
        return await self.http.post("/v1/chat/completions", json=body)

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def served(self, mode: str, reason: str) -> float:
        return self.metric("dynamo_lite_frontend_disagg_requests_total", model=MODEL, mode=mode, reason=reason)

    async def close(self) -> None:
        await self.http.aclose()
        if isinstance(self.router, KvRoutingService):
            await self.router.close()
        for shell in self.shells:
            await shell.shutdown()
        await self.client.close()
        await self.watcher.close()
        await self.discovery.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("disagg-model")
    for name, data in tokenizer_files().items():
        (folder / name).write_bytes(data)
    return folder


@contextlib.asynccontextmanager
async def disagg_stack(model_dir, router: Router | None = None, router_factory=None, events=None, **config):
    stack = DisaggStack(model_dir, router or RoundRobinRouter(),
                        FrontendConfig(namespace=f"dis-{uuid.uuid4().hex[:8]}", **config), events)
    await stack.start(router_factory)
    try:
        yield stack
    finally:
        await stack.close()


def remote_decode(request: GenerateRequest) -> bool:
    return bool((request.kv_transfer_params or {}).get("do_remote_decode"))


async def test_long_prompt_prefills_remotely_then_decodes(model_dir):
    async with disagg_stack(model_dir) as s:
        _, prefill = await s.add("prefill")
        _, decode = await s.add("decode")
        response = await s.chat(LONG)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["completion_tokens"] == 5
        [p_request] = prefill.requests
        assert remote_decode(p_request) and p_request.sampling.max_tokens == 1
        [d_request] = decode.requests
        assert d_request.token_ids == p_request.token_ids
        assert d_request.sampling.max_tokens == 5
        # The decode worker got the prefill worker's params unchanged (they name its engine and blocks).
        params = d_request.kv_transfer_params
        assert params["do_remote_prefill"] and params["remote_engine_id"] == prefill.engine_id
        blocks = len(params["remote_block_ids"])
        assert blocks == -(-len(p_request.token_ids) // BLOCK)
        # The prefill worker computed the prompt; the decode worker only its last token (as vLLM does).
        assert prefill.stats.prefill_tokens == len(p_request.token_ids) and decode.stats.prefill_tokens <= 1
        assert s.served("disaggregated", "disaggregated") == 1
        assert s.metric("dynamo_lite_frontend_kv_transfer_blocks_sum", model=MODEL) == blocks
        assert s.metric("dynamo_lite_frontend_remote_prefill_seconds_count", model=MODEL) == 1
        assert s.metric("dynamo_lite_frontend_remote_decode_first_token_seconds_count", model=MODEL) == 1
        for pool in ("prefill", "decode"):
            assert s.metric("dynamo_lite_frontend_pool_inflight_requests", model=MODEL, pool=pool) == 0


async def test_streaming_answer_is_the_decode_stream(model_dir):
    async with disagg_stack(model_dir) as s:
        _, prefill = await s.add("prefill")
        _, decode = await s.add("decode")
        response = await s.chat(LONG, stream=True, stream_options={"include_usage": True})
        assert response.status_code == 200
        assert response.text.rstrip().endswith("data: [DONE]")
        assert '"completion_tokens":5' in response.text
        assert len(prefill.requests) == 1 and decode.requests[0].kv_transfer_params is not None


async def test_short_prompt_stays_on_the_decode_worker(model_dir):
    async with disagg_stack(model_dir) as s:
        _, prefill = await s.add("prefill")
        _, decode = await s.add("decode")
        response = await s.chat(SHORT)
        assert response.status_code == 200, response.text
        assert prefill.requests == []
        [d_request] = decode.requests
        assert d_request.kv_transfer_params is None
        assert s.served("aggregated", "short_prompt") == 1 and s.served("disaggregated", "disaggregated") == 0


async def test_threshold_flag_decides_what_counts_as_short(model_dir):
    async with disagg_stack(model_dir, disagg_min_prefill_tokens=10_000) as s:
        _, prefill = await s.add("prefill")
        await s.add("decode")
        assert (await s.chat(LONG)).status_code == 200
        assert prefill.requests == [] and s.served("aggregated", "short_prompt") == 1


async def test_no_prefill_workers_serves_aggregated(model_dir):
    async with disagg_stack(model_dir) as s:
        _, worker = await s.add("aggregated")
        response = await s.chat(LONG)
        assert response.status_code == 200
        assert worker.requests[0].kv_transfer_params is None
        assert s.served("aggregated", "no_prefill_workers") == 1


async def test_enforce_disagg_without_prefill_workers_is_503(model_dir):
    async with disagg_stack(model_dir, enforce_disagg=True) as s:
        _, worker = await s.add("decode")
        for stream in (False, True):
            response = await s.chat(LONG, stream=stream)
            assert response.status_code == 503
            error = response.json()["error"]
            assert "prefill" in error["message"] and "--enforce-disagg" in error["message"]
        assert worker.requests == []


async def test_no_disaggregation_flag_keeps_prefill_workers_idle(model_dir):
    async with disagg_stack(model_dir, disaggregation=False) as s:
        _, prefill = await s.add("prefill")
        _, decode = await s.add("decode")
        assert (await s.chat(LONG)).status_code == 200
        assert prefill.requests == [] and decode.requests[0].kv_transfer_params is None
        assert s.served("aggregated", "disabled") == 1


async def test_unreachable_prefill_worker_falls_back_to_local_prefill(model_dir):
    async with disagg_stack(model_dir) as s:
        dead = await s.register_dead_prefill()
        _, decode = await s.add("decode")
        response = await s.chat(LONG)
        assert response.status_code == 200, response.text
        assert decode.requests[0].kv_transfer_params is None
        assert s.served("aggregated", "prefill_failed") == 1
        # Marked failed: the next request does not try it again.
        assert dead not in [r.instance_id for r in s.watcher.instances(MODEL)]
        assert (await s.chat(LONG)).status_code == 200
        assert s.served("aggregated", "no_prefill_workers") == 1


async def test_prefill_engine_error_falls_back_without_failing_the_client(model_dir):
    async with disagg_stack(model_dir) as s:
        _, prefill = await s.add("prefill", fail=True)
        _, decode = await s.add("decode")
        response = await s.chat(LONG)
        assert response.status_code == 200, response.text
        assert len(prefill.requests) == 1 and decode.requests[0].kv_transfer_params is None
        assert s.served("aggregated", "prefill_failed") == 1


async def wait_until(predicate, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_busy_prefill_pool_prefills_on_the_decode_worker(model_dir):
    gate = asyncio.Event()
    async with disagg_stack(model_dir, max_prefill_queue=1) as s:
        _, prefill = await s.add("prefill", gate=gate)
        _, decode = await s.add("decode")
        held = asyncio.create_task(s.chat(LONG))
        try:
            await wait_until(lambda: len(prefill.requests) == 1)
            assert s.metric("dynamo_lite_frontend_pool_inflight_requests", model=MODEL, pool="prefill") == 1
            response = await s.chat(LONG + " and more")
            assert response.status_code == 200
            assert s.served("aggregated", "prefill_pool_busy") == 1
            assert decode.requests[0].kv_transfer_params is None
            gate.set()
            assert (await asyncio.wait_for(held, WAIT)).status_code == 200
            assert s.served("disaggregated", "disaggregated") == 1
        finally:
            gate.set()
            held.cancel()


async def test_cancelled_request_aborts_the_prefill(model_dir):
    gate = asyncio.Event()
    async with disagg_stack(model_dir) as s:
        prefill_shell, prefill = await s.add("prefill", gate=gate)
        _, decode = await s.add("decode")
        task = asyncio.create_task(s.chat(LONG, stream=True))
        await wait_until(lambda: prefill_shell.stats.active_requests == 1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await wait_until(lambda: prefill_shell.stats.aborted_requests == 1)
        assert decode.requests == []
        assert s.metric("dynamo_lite_frontend_pool_inflight_requests", model=MODEL, pool="prefill") == 0


async def test_kv_mode_routes_a_shared_prefix_to_the_prefill_worker_holding_it(model_dir, nats_url):
    bus = await NatsEventBus.connect(nats_url)
    router_bus = await NatsEventBus.connect(nats_url)
    try:
        namespace_holder = {}

        def kv_service(watcher):
            service = KvRoutingService(watcher, KvRoutingSettings(namespace=namespace_holder["ns"]))
            return service

        stack = DisaggStack(model_dir, None, FrontendConfig(namespace=f"dis-{uuid.uuid4().hex[:8]}",
                                                            router_mode="kv"), bus)
        namespace_holder["ns"] = stack.namespace
        await stack.start(kv_service)
        try:
            service: KvRoutingService = stack.router
            await service.attach_events(router_bus)
            shell_a, prefill_a = await stack.add("prefill")
            shell_b, prefill_b = await stack.add("prefill")
            _, decode = await stack.add("decode")
            first = await stack.chat(LONG)
            assert first.status_code == 200
            holder, other = ((shell_a, shell_b) if prefill_a.requests else (shell_b, shell_a))
            kv_router = service.router_for(MODEL)
            # The prefill worker's KV events reach the router's index like any worker's.
            await wait_until(lambda: kv_router.indexer.block_count(holder.instance_id) > 0)
            for i in range(3):
                # A new tail longer than the threshold: the decode worker (which pulled LONG's blocks)
                # lacks enough of it to prefill locally, so each goes to the prefill pool.
                tail = f" Question {i}: what happened in year {1000 + i}?" * 8
                assert (await stack.chat(LONG + tail)).status_code == 200
            holder_engine = prefill_a if holder is shell_a else prefill_b
            other_engine = prefill_b if holder is shell_a else prefill_a
            assert len(holder_engine.requests) == 4 and other_engine.requests == []
            # /debug/route explains the prefill pick too.
            explained = (await stack.http.post("/debug/route", json={
                "model": MODEL, "messages": [{"role": "user", "content": LONG}]})).json()
            assert explained["prefill"]["choice"] == holder.instance_id
            assert {row["worker_id"] for row in explained["prefill"]["workers"]} == {shell_a.instance_id,
                                                                                      shell_b.instance_id}
            assert len(decode.requests) == 4 and all(r.kv_transfer_params is not None for r in decode.requests)
            assert stack.served("disaggregated", "disaggregated") == 4
        finally:
            await stack.close()
    finally:
        await bus.close()
        await router_bus.close()


async def test_round_robin_spreads_prefills_and_decodes_over_both_pools(model_dir):
    async with disagg_stack(model_dir) as s:
        prefills = [(await s.add("prefill"))[1] for _ in range(2)]
        decodes = [(await s.add("decode"))[1] for _ in range(2)]
        for i in range(4):
            assert (await s.chat(f"Request {i}. " + LONG)).status_code == 200
        assert [len(p.requests) for p in prefills] == [2, 2]
        assert [len(d.requests) for d in decodes] == [2, 2]
        assert s.served("disaggregated", "disaggregated") == 4



async def test_n_choices_and_prompt_logprobs_prefill_on_the_decode_worker(model_dir):
    async with disagg_stack(model_dir) as s:
        _, prefill = await s.add("prefill")
        _, decode = await s.add("decode")
        response = await s.chat(LONG, n=3, temperature=1.0, seed=4, logprobs=True, top_logprobs=2)
        assert response.status_code == 200, response.text
        choices = response.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1, 2]
        assert all(len(c["logprobs"]["content"]) == 5 for c in choices)
        assert s.served("aggregated", "parallel_sampling") == 1
        response = await s.http.post("/v1/completions", json={"model": MODEL, "prompt": LONG, "max_tokens": 2,
                                                               "echo": True, "logprobs": 1})
        assert response.status_code == 200, response.text
        logprobs = response.json()["choices"][0]["logprobs"]
        assert logprobs["token_logprobs"][0] is None and None not in logprobs["token_logprobs"][1:]
        assert s.served("aggregated", "prompt_logprobs") == 1
        assert prefill.requests == [] and len(decode.requests) == 2
        assert decode.requests[1].sampling.prompt_logprobs == 1


async def test_logprobs_of_a_disaggregated_request_come_from_the_decode_worker(model_dir):
    async with disagg_stack(model_dir) as s:
        await s.add("prefill")
        _, decode = await s.add("decode")
        response = await s.chat(LONG, logprobs=True)
        assert response.status_code == 200, response.text
        assert s.served("disaggregated", "disaggregated") == 1
        content = response.json()["choices"][0]["logprobs"]["content"]
        assert len(content) == response.json()["usage"]["completion_tokens"] == 5  # the first token's too
        assert decode.requests[0].sampling.logprobs == 0
