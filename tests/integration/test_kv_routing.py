"""KV-aware routing wired end to end over each event plane (a real nats-server, and the embedded bus):
WorkerShell + MockerEngine workers (in-process, MemoryDiscovery) relay KV events; the KvRoutingService
follows them, resyncs on gaps, and forgets removed workers. The last tests drive the frontend app in kv
mode over the same parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import httpx
import pytest
from prometheus_client import CollectorRegistry

from dynamo_lite import planes
from dynamo_lite.discovery.memory import MemoryDiscovery
from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.engine.worker import WorkerShell, WorkerShellConfig
from dynamo_lite.events.base import EventBus
from dynamo_lite.frontend.app import FrontendDeps, create_app
from dynamo_lite.frontend.config import FrontendConfig
from dynamo_lite.frontend.router_setup import build_router
from dynamo_lite.mocker.config import MockerConfig, ModelFacts
from dynamo_lite.mocker.engine import MockerEngine
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.protocol.hashing import block_hashes
from dynamo_lite.protocol.messages import GenerateFrame, GenerateRequest, SamplingOptions
from dynamo_lite.router.metrics import KvRouterMetrics
from dynamo_lite.router.policies import RoundRobinRouter
from dynamo_lite.router.kv_routing import KvRoutingService, KvRoutingSettings
from dynamo_lite.transport.client import RequestClient
from tests.integration.test_frontend_app import TOKENIZER, tokenizer_files

MODEL = "tiny"
BLOCK = 4
WAIT = 5.0  # bound on every wait


class LossyBus(EventBus):
    """The worker's bus, able to lose its next KV event batch (NATS core is at-most-once)."""

    def __init__(self, inner: EventBus):
        self.inner = inner
        self.drop_next_kv_batch = False
        self.dropped = 0

    async def publish(self, subject: str, data: bytes) -> None:
        if self.drop_next_kv_batch and ".kv_events." in subject:
            self.drop_next_kv_batch = False
            self.dropped += 1
            return
        await self.inner.publish(subject, data)

    async def subscribe(self, subject: str):
        return await self.inner.subscribe(subject)

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        return await self.inner.request(subject, data, timeout)

    async def serve(self, subject: str, handler):
        return await self.inner.serve(subject, handler)

    async def close(self) -> None:
        pass  # the inner bus is closed by the cluster


def prompt(seed: int, blocks: int = 6) -> list[int]:
    return [(seed * 37 + i) % 250 + 1 for i in range(blocks * BLOCK + 1)]  # a partial last block too


class Cluster:
    def __init__(self, event_plane: str, model_dir):
        self.event_plane = event_plane  # the event bus URL: nats://… or embedded://
        self.model_dir = model_dir
        self.namespace = f"kv-{uuid.uuid4().hex[:8]}"
        self.discovery = MemoryDiscovery()
        self.watcher = InstanceWatcher(self.discovery, self.namespace, failed_cooldown=60.0)
        self.client = RequestClient(connect_timeout=2.0)
        self.shells: list[WorkerShell] = []
        self.engines: list[MockerEngine] = []
        self.buses: list[LossyBus] = []
        self.service: KvRoutingService | None = None
        self.registry = CollectorRegistry()
        self._closed = False

    async def start(self) -> None:
        self.worker_bus = await self.connect_bus()
        self.router_bus = await self.connect_bus()
        await self.watcher.start()

    async def connect_bus(self) -> EventBus:
        return await planes.connect_event_bus(self.event_plane, discovery=self.discovery,
                                              namespace=self.namespace)

    async def start_service(self) -> KvRoutingService:
        self.service = KvRoutingService(self.watcher, KvRoutingSettings(namespace=self.namespace, resync_timeout=1.0,
                                                                        resync_backoff=0.1),
                                        KvRouterMetrics(self.registry))
        await self.service.attach_events(self.router_bus)
        return self.service

    async def add_worker(self) -> tuple[WorkerShell, MockerEngine, LossyBus]:
        config = MockerConfig(block_size=BLOCK, num_gpu_blocks_override=4096, speedup_ratio=1000.0)
        facts = ModelFacts(path=str(self.model_dir), served_model_name=MODEL, context_length=1024,
                           vocab_size=TOKENIZER.get_vocab_size(), first_token_id=0, end_token_id=256)
        engine = MockerEngine(config, facts=facts)
        bus = LossyBus(self.worker_bus)
        shell = WorkerShell(engine, self.discovery, bus,
                            WorkerShellConfig(namespace=self.namespace, host="127.0.0.1", drain_timeout=1.0,
                                              load_report_interval=0.05, engine_kind="mocker"))
        self.shells.append(shell)
        await shell.start()
        assert await self.watcher.wait_for(
            lambda: any(r.instance_id == shell.instance_id for r in self.watcher.instances()), WAIT)
        self.engines.append(engine)
        self.buses.append(bus)
        return shell, engine, bus

    async def generate(self, shell: WorkerShell, token_ids: list[int], max_tokens: int = 3) -> list[GenerateFrame]:
        request = GenerateRequest(request_id=uuid.uuid4().hex, token_ids=token_ids,
                                  sampling=SamplingOptions(max_tokens=max_tokens))
        frames = []
        async with asyncio.timeout(WAIT):
            async for frame in self.client.stream(shell.address, request):
                frames.append(frame)
        assert frames[-1].last
        return frames

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.service is not None:
            await self.service.close()
        for shell in self.shells:
            await shell.shutdown()
        await self.client.close()
        await self.watcher.close()
        for bus in (getattr(self, "worker_bus", None), getattr(self, "router_bus", None)):
            if bus is not None:
                await bus.close()
        await self.discovery.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv-model")
    for name, data in tokenizer_files().items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(params=["nats", "embedded"])
def event_plane(request) -> str:
    """The event bus URL a test runs on: the session's nats-server, or the embedded bus."""
    return request.getfixturevalue("nats_url") if request.param == "nats" else "embedded://"


@contextlib.asynccontextmanager
async def cluster(event_plane, model_dir):
    c = Cluster(event_plane, model_dir)
    try:
        await c.start()
        yield c
    finally:
        await c.close()


def engine_blocks(engine: MockerEngine) -> set[int]:
    return {h for event in engine.cached_blocks() for h in event.block_hashes}


async def wait_for(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def metric(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_events_reach_the_router_and_it_routes_the_prefix_back(event_plane, model_dir):
    async with cluster(event_plane, model_dir) as c:
        (a, engine_a, _), (b, engine_b, _) = await c.add_worker(), await c.add_worker()
        service = await c.start_service()
        router = service.router_for(MODEL)
        assert router is not None and router.block_size == BLOCK  # from the model card
        tokens = prompt(1)
        await c.generate(b, tokens)
        hashes = block_hashes(tokens, BLOCK)
        await wait_for(lambda: router.indexer.blocks_of(b.instance_id) == engine_blocks(engine_b),
                       "b's blocks in the index")
        assert router.indexer.find_matches(hashes) == {b.instance_id: len(hashes)}
        assert router.indexer.block_count(a.instance_id) == 0
        # A garbled message on the subject is dropped; later batches still apply.
        await c.router_bus.publish(keys.kv_events_subject(c.namespace, MODEL), b"\xc1 not msgpack")
        await c.generate(a, prompt(2))
        await wait_for(lambda: router.indexer.blocks_of(a.instance_id) == engine_blocks(engine_a),
                       "a's blocks in the index")
        assert metric(c.registry, "dynamo_lite_router_kv_events_total", model=MODEL, outcome="dropped") == 1
        assert metric(c.registry, "dynamo_lite_router_kv_events_total", model=MODEL, outcome="applied") > 0
        decision = service.route(MODEL, "r1", tokens + [9, 9], sorted([a.instance_id, b.instance_id]))
        assert (decision.worker_id, decision.overlap_blocks) == (b.instance_id, len(hashes))
        service.finished("r1")
        await wait_for(lambda: b.instance_id in service.load_reports, "a load report from b")
        assert service.load_reports[b.instance_id].total_blocks == 4096
        # What admission control's busy thresholds read (Router.load_report).
        assert service.load_report(b.instance_id) is service.load_reports[b.instance_id]
        assert service.load_report(12345) is None


async def test_a_lost_batch_triggers_a_resync_and_the_view_matches_the_worker(event_plane, model_dir):
    async with cluster(event_plane, model_dir) as c:
        shell, engine, bus = await c.add_worker()
        service = await c.start_service()
        router = service.router_for(MODEL)
        await c.generate(shell, prompt(3))
        await wait_for(lambda: router.indexer.blocks_of(shell.instance_id) == engine_blocks(engine), "first view")
        bus.drop_next_kv_batch = True
        lost = prompt(4)
        await c.generate(shell, lost)  # the batch storing its prompt blocks never reaches NATS
        assert bus.dropped == 1
        await c.generate(shell, prompt(5))  # the next batch shows the gap
        await wait_for(lambda: router.indexer.blocks_of(shell.instance_id) == engine_blocks(engine)
                       and not router.needs_resync(shell.instance_id), "the view to match the worker after a resync")
        assert set(block_hashes(lost, BLOCK)) <= router.indexer.blocks_of(shell.instance_id)
        assert metric(c.registry, "dynamo_lite_router_kv_resyncs_total", model=MODEL, result="ok") >= 1


async def test_a_router_that_starts_late_resyncs_every_worker(event_plane, model_dir):
    async with cluster(event_plane, model_dir) as c:
        shell, engine, _ = await c.add_worker()
        await c.generate(shell, prompt(6))
        await c.generate(shell, prompt(7))
        # Every batch is out before the router starts, so it sees none of them: wait until the worker has
        # relayed (published) every block its engine holds.
        await wait_for(lambda: engine_blocks(engine) and shell.relayed_blocks() >= engine_blocks(engine),
                       "the worker to relay its batches")
        service = await c.start_service()  # it missed batch 1 and after: only a resync can tell it
        router = service.router_for(MODEL)
        await wait_for(lambda: router.is_synced(shell.instance_id), "the late router to sync")
        assert router.indexer.blocks_of(shell.instance_id) == engine_blocks(engine) != set()


async def test_a_frontend_router_that_connects_its_own_bus_after_the_worker_resyncs_it(event_plane,
                                                                                      model_dir):
    """As a frontend process started after the workers: its own event-bus connection, made by build_router."""
    async with cluster(event_plane, model_dir) as c:
        shell, engine, _ = await c.add_worker()
        await c.generate(shell, prompt(10))
        await wait_for(lambda: engine_blocks(engine) and shell.relayed_blocks() >= engine_blocks(engine),
                       "the worker to relay its batches")
        planes = ({"event_plane": "embedded"} if c.event_plane == "embedded://"
                  else {"event_plane": "nats", "nats_server": c.event_plane})
        config = FrontendConfig(namespace=c.namespace, router_mode="kv", **planes)
        async with contextlib.AsyncExitStack() as stack:
            service = await asyncio.wait_for(build_router(config, c.watcher, stack, c.registry), WAIT)
            assert service.events_attached
            router = service.router_for(MODEL)
            await wait_for(lambda: router.is_synced(shell.instance_id), "the new router to sync")
            assert router.indexer.blocks_of(shell.instance_id) == engine_blocks(engine)
            await c.generate(shell, prompt(11))  # and it follows the events from there on
            await wait_for(lambda: router.indexer.blocks_of(shell.instance_id) == engine_blocks(engine),
                           "events after the resync")


async def test_a_worker_removed_from_discovery_loses_its_blocks_at_once(event_plane, model_dir):
    async with cluster(event_plane, model_dir) as c:
        (a, engine_a, _), (b, _, _) = await c.add_worker(), await c.add_worker()
        service = await c.start_service()
        router = service.router_for(MODEL)
        tokens = prompt(8)
        await c.generate(a, tokens)
        await wait_for(lambda: router.indexer.blocks_of(a.instance_id) == engine_blocks(engine_a), "a's blocks")
        removed = asyncio.Event()
        c.watcher.add_listener(lambda kind, record: removed.set() if kind == "removed" else None)
        await a.shutdown()  # revokes its lease: the instance key vanishes from discovery
        await asyncio.wait_for(removed.wait(), WAIT)
        assert router.indexer.block_count(a.instance_id) == 0  # at the removal itself, not later
        assert router.indexer.find_matches(block_hashes(tokens, BLOCK)) == {}
        assert a.instance_id not in service.load_reports
        assert service.route(MODEL, "r2", tokens, [b.instance_id]).worker_id == b.instance_id
        await asyncio.sleep(0.2)  # batches still in flight from a must not revive it
        assert router.indexer.block_count(a.instance_id) == 0


# --------------------------------------------------------------------------- through the frontend app


@contextlib.asynccontextmanager
async def kv_frontend(c: Cluster, router):
    config = FrontendConfig(namespace=c.namespace, router_mode="kv" if router is c.service else "round-robin")
    app = create_app(FrontendDeps(watcher=c.watcher, client=c.client, router=router, registry=c.registry,
                                  config=config))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://frontend",
                                 timeout=10.0) as http:
        yield http


async def test_frontend_routes_a_shared_prefix_to_the_same_worker_and_reports_engine_cached_tokens(
        event_plane, model_dir):
    async with cluster(event_plane, model_dir) as c:
        shells = [(await c.add_worker())[0] for _ in range(3)]
        service = await c.start_service()
        async with kv_frontend(c, service) as http:
            system = "You are a helpful assistant. " * 8
            body = {"model": MODEL, "messages": [{"role": "system", "content": system},
                                                 {"role": "user", "content": "first question"}], "max_tokens": 2}
            first = (await http.post("/v1/chat/completions", json=body)).json()
            assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            explain_body = {"model": MODEL, "messages": [{"role": "system", "content": system},
                                                         {"role": "user", "content": "second question"}]}
            router = service.router_for(MODEL)
            await wait_for(lambda: router.indexer.block_count() > 0, "events of the first request")
            r = await http.post("/debug/route", json=explain_body)
            assert r.status_code == 200, r.text
            explained = r.json()
            rows = {row["worker_id"]: row for row in explained["workers"]}
            assert sorted(rows) == sorted(s.instance_id for s in shells)
            chosen = explained["choice"]
            assert rows[chosen]["overlap_blocks"] > 10  # the long shared system prompt
            assert all(row["overlap_blocks"] == 0 for w, row in rows.items() if w != chosen)
            assert explained["block_size"] == BLOCK and explained["kv_events"] is True
            second = (await http.post("/v1/chat/completions", json={**explain_body, "max_tokens": 2})).json()
            # The engine itself reports the hit: the request went where the prefix was cached.
            assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= rows[chosen]["overlap_blocks"] * BLOCK
            stats = {s.instance_id: s.stats.completed_requests for s in shells}
            assert stats[chosen] == 2 and sum(stats.values()) == 2
            prometheus = (await http.get("/metrics")).text
            assert f'dynamo_lite_router_decisions_total{{model="{MODEL}",worker="{chosen:x}"}} 2.0' in prometheus
            assert "dynamo_lite_router_engine_cache_hit_rate" in prometheus


async def test_debug_route_is_a_400_outside_kv_mode(event_plane, model_dir):
    async with cluster(event_plane, model_dir) as c:
        await c.add_worker()
        async with kv_frontend(c, RoundRobinRouter()) as http:
            r = await http.post("/debug/route", json={"model": MODEL, "prompt": "hello"})
            assert r.status_code == 400
            assert "--router-mode kv" in r.json()["error"]["message"]


async def test_debug_route_rejects_a_body_without_a_prompt(event_plane, model_dir):
    async with cluster(event_plane, model_dir) as c:
        await c.add_worker()
        service = await c.start_service()
        async with kv_frontend(c, service) as http:
            r = await http.post("/debug/route", json={"model": MODEL})
            assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
            r = await http.post("/debug/route", json={"model": "nope", "prompt": "hi"})
            assert r.status_code == 404


async def test_kv_mode_starts_without_nats_and_follows_events_once_it_is_up(model_dir):
    """NATS down at start: the frontend's kv router still routes (on load), and attaches when NATS comes."""
    from tests.services import free_tcp_port, start_nats

    port = free_tcp_port()
    url = f"nats://127.0.0.1:{port}"
    c = Cluster(url, model_dir)
    stack = contextlib.AsyncExitStack()
    try:
        await c.watcher.start()
        config = FrontendConfig(namespace=c.namespace, router_mode="kv", nats_server=url)
        service = await asyncio.wait_for(build_router(config, c.watcher, stack, c.registry), WAIT)
        assert isinstance(service, KvRoutingService) and not service.events_attached
        with start_nats(port) as nats:
            c.event_plane = nats.url
            await c.start()
            shell, engine, _ = await c.add_worker()
            assert service.route(MODEL, "r0", prompt(9), [shell.instance_id]).worker_id == shell.instance_id
            service.finished("r0")
            await wait_for(lambda: service.events_attached, "the background NATS connection", timeout=10)
            await c.generate(shell, prompt(9))
            router = service.router_for(MODEL)
            try:
                await wait_for(lambda: router.indexer.blocks_of(shell.instance_id) == engine_blocks(engine),
                               "events after the late connection")
            finally:  # while NATS still runs, so the buses close cleanly
                await stack.aclose()
                await c.close()
    finally:
        await stack.aclose()
        await c.close()


def test_kv_mode_without_nats_server_takes_its_events_from_the_embedded_event_plane():
    config = FrontendConfig(router_mode="kv", nats_server="")
    assert config.kv_events and config.event_plane_url == "embedded://"
    assert FrontendConfig(router_mode="kv", nats_server="nats://h:4222").event_plane_url == "nats://h:4222"
    with pytest.raises(ConfigError, match="--event-plane 'kafka'"):
        FrontendConfig(router_mode="kv", event_plane="kafka")
