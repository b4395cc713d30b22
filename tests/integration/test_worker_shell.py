"""WorkerShell with in-memory discovery and event bus, a fake engine, and the real request plane."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from dynamo_lite.discovery.memory import MemoryDiscovery
from dynamo_lite.engine.base import Engine, EngineInfo, EngineLoad
from dynamo_lite.engine.worker import WorkerShell, WorkerShellConfig, serve_workers
from dynamo_lite.events.memory import MemoryEventBus
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.errors import EngineError, WorkerFailedError
from dynamo_lite.protocol.messages import (
    AllBlocksCleared, BlockRemoved, BlockStored, ErrorFrame, GenerateFrame, GenerateRequest, KvEventBatch,
    KvResyncRequest, LoadReport, SamplingOptions, TokenizerFiles, TokenizerFilesRequest, WorkerStats,
    WorkerStatsRequest, card_json_decoder, instance_json_decoder, kv_batch_decoder, load_decoder,
    msgpack_encoder)
from dynamo_lite.transport.client import RequestClient
from tests.services import free_tcp_port

WAIT = 5.0
NS = "test-ns"
MODEL = "org/fake-model"


class FakeEngine(Engine):
    """Streams tokens 100, 101, ...; a request id starting with "hold" waits for `release` after its
    first token; "fail" raises EngineError. KV events are whatever the test puts in `kv_queue`."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self.kv_queue: asyncio.Queue = asyncio.Queue()
        self.release = asyncio.Event()
        self.held = asyncio.Event()
        self.aborted: list[str] = []
        self.shutdown_calls = 0

    async def start(self) -> EngineInfo:
        return EngineInfo(model_name=MODEL, model_path=self.model_path, context_length=2048,
                          kv_block_size=4, total_kv_blocks=64)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateFrame]:
        if request.request_id.startswith("fail"):
            raise EngineError("engine said no")
        n = request.sampling.max_tokens
        try:
            for i in range(n):
                if i == 1 and request.request_id.startswith("hold"):
                    self.held.set()
                    await self.release.wait()
                last = i == n - 1
                yield GenerateFrame(token_ids=[100 + i], prompt_tokens=len(request.token_ids) if i == 0 else None,
                                    finish_reason="length" if last else None, last=last)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request.request_id)
            raise

    async def kv_events(self) -> AsyncIterator[list]:
        while True:
            yield await self.kv_queue.get()

    def load(self) -> EngineLoad:
        return EngineLoad(active_blocks=3, total_blocks=64, running_requests=1, waiting_requests=0)

    async def shutdown(self) -> None:
        self.shutdown_calls += 1


def request(request_id: str, max_tokens: int = 3) -> GenerateRequest:
    return GenerateRequest(request_id=request_id, token_ids=[1, 2, 3, 4, 5],
                           sampling=SamplingOptions(max_tokens=max_tokens))


@pytest.fixture
async def worker(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {}}')
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (tmp_path / "model.safetensors").write_bytes(b"weights are never sent")
    engine = FakeEngine(str(tmp_path))
    discovery, bus = MemoryDiscovery(), MemoryEventBus()
    config = WorkerShellConfig(namespace=NS, host="127.0.0.1", lease_ttl=5.0, drain_timeout=WAIT,
                               migration_limit=2, load_report_interval=0.05, engine_kind="mocker")
    shell = WorkerShell(engine, discovery, bus, config)
    client = RequestClient(connect_timeout=2.0)
    try:
        await asyncio.wait_for(shell.start(), WAIT)
        yield shell, engine, discovery, bus, client
    finally:
        await client.close()
        await asyncio.wait_for(shell.shutdown(), 2 * WAIT)
        await bus.close()
        await discovery.close()


async def registered(discovery: MemoryDiscovery) -> tuple[list, list]:
    instances, _ = await discovery.get_prefix(keys.instances_prefix(NS))
    cards, _ = await discovery.get_prefix(keys.models_prefix(NS))
    return ([instance_json_decoder.decode(v) for _, v in instances], [card_json_decoder.decode(v) for _, v in cards])


async def test_registers_instance_and_model_card_under_its_lease(worker):
    shell, engine, discovery, bus, client = worker
    instances, cards = await registered(discovery)
    assert len(instances) == 1 and len(cards) == 1
    record, card = instances[0], cards[0]
    assert record.instance_id == shell.instance_id > 0
    assert record.component == keys.COMPONENT_BACKEND and record.role == "aggregated"
    assert record.model == MODEL and record.address == shell.address and record.address.startswith("127.0.0.1:")
    assert (card.name, card.path, card.context_length, card.kv_block_size, card.total_kv_blocks,
            card.migration_limit, card.engine) == (MODEL, engine.model_path, 2048, 4, 64, 2, "mocker")
    keys_present = {k for k, _ in (await discovery.get_prefix(f"/{NS}/"))[0]}
    assert keys_present == {keys.instance_key(NS, keys.COMPONENT_BACKEND, shell.instance_id),
                            keys.model_card_key(NS, MODEL, shell.instance_id)}


async def test_generate_stream_and_stats(worker):
    shell, engine, discovery, bus, client = worker
    frames = [f async for f in client.stream(shell.address, request("r1", max_tokens=4))]
    assert [t for f in frames for t in f.token_ids] == [100, 101, 102, 103]
    assert frames[0].prompt_tokens == 5 and frames[-1].last and frames[-1].finish_reason == "length"
    stats = await client.call(shell.address, WorkerStatsRequest(), timeout=WAIT)
    assert stats == WorkerStats(active_requests=0, completed_requests=1, aborted_requests=0, generated_tokens=4)


async def test_engine_error_reaches_the_client_as_an_error_frame(worker):
    shell, engine, discovery, bus, client = worker
    frames = [f async for f in client.stream(shell.address, request("fail-1"))]
    assert frames == [ErrorFrame(message="engine said no", status=500)]


async def test_client_closing_the_stream_aborts_the_request(worker):
    shell, engine, discovery, bus, client = worker
    async with aclosing(client.stream(shell.address, request("hold-1", max_tokens=5))) as frames:
        async for frame in frames:
            assert frame.token_ids == [100]
            break
    for _ in range(int(WAIT / 0.01)):
        if engine.aborted:
            break
        await asyncio.sleep(0.01)
    assert engine.aborted == ["hold-1"]
    assert shell.stats.aborted_requests == 1 and shell.stats.active_requests == 0
    assert shell.stats.completed_requests == 0


async def test_tokenizer_files_come_from_the_model_folder(worker):
    shell, engine, discovery, bus, client = worker
    reply = await client.call(shell.address, TokenizerFilesRequest(), timeout=WAIT)
    assert isinstance(reply, TokenizerFiles)
    # Only what a frontend tokenizes with: the folder's config.json (and weights) stay on the worker.
    assert reply.files == {"tokenizer.json": b'{"model": {}}'}


async def next_message(subscription) -> bytes:
    return await asyncio.wait_for(anext(aiter(subscription)), WAIT)


async def test_kv_events_relayed_with_sequence_numbers_and_resync_rebuilds_chains(worker):
    shell, engine, discovery, bus, client = worker
    sub = await bus.subscribe(keys.kv_events_subject(NS, MODEL))
    try:
        chain = BlockStored(block_hashes=[11, 12, 13], parent_block_hash=None,
                            token_ids=list(range(12)), block_size=4)
        branch = BlockStored(block_hashes=[21], parent_block_hash=12, token_ids=[50, 51, 52, 53], block_size=4)
        other = BlockStored(block_hashes=[31, 32], parent_block_hash=None, token_ids=list(range(90, 98)),
                            block_size=4)
        engine.kv_queue.put_nowait([chain])
        engine.kv_queue.put_nowait([branch, other])
        engine.kv_queue.put_nowait([BlockRemoved(block_hashes=[32])])
        batches = [kv_batch_decoder.decode(await next_message(sub)) for _ in range(3)]
    finally:
        await sub.close()
    assert [(b.worker_id, b.seq) for b in batches] == [(shell.instance_id, 1), (shell.instance_id, 2),
                                                       (shell.instance_id, 3)]
    assert batches[0].events == [chain] and batches[1].events == [branch, other]

    reply = await bus.request(keys.resync_subject(NS, shell.instance_id),
                              msgpack_encoder.encode(KvResyncRequest()), timeout=WAIT)
    snapshot = kv_batch_decoder.decode(reply)
    assert snapshot.worker_id == shell.instance_id and snapshot.seq == 3
    # Hashes and chains only: routers index content hashes, and token ids would bloat a large snapshot.
    assert snapshot.events == [
        AllBlocksCleared(),
        BlockStored(block_hashes=[11, 12, 13], parent_block_hash=None, token_ids=[], block_size=4),
        BlockStored(block_hashes=[21], parent_block_hash=12, token_ids=[], block_size=4),
        BlockStored(block_hashes=[31], parent_block_hash=None, token_ids=[], block_size=4),
    ]


async def test_load_reports_are_published(worker):
    shell, engine, discovery, bus, client = worker
    sub = await bus.subscribe(keys.load_subject(NS, MODEL))
    try:
        report = load_decoder.decode(await next_message(sub))
    finally:
        await sub.close()
    assert isinstance(report, LoadReport)
    assert (report.worker_id, report.active_blocks, report.total_blocks, report.running_requests) == \
        (shell.instance_id, 3, 64, 1)


async def test_lost_lease_is_replaced_and_the_new_instance_announces_its_blocks(worker):
    shell, engine, discovery, bus, client = worker
    sub = await bus.subscribe(keys.kv_events_subject(NS, MODEL))
    try:
        stored = BlockStored(block_hashes=[7], parent_block_hash=None, token_ids=[1, 2, 3, 4], block_size=4)
        engine.kv_queue.put_nowait([stored])
        assert kv_batch_decoder.decode(await next_message(sub)).seq == 1
        old_id = shell.instance_id
        discovery.expire_lease(old_id)
        announced = kv_batch_decoder.decode(await next_message(sub))
    finally:
        await sub.close()
    assert shell.instance_id != old_id
    assert (announced.worker_id, announced.seq) == (shell.instance_id, 1)
    assert announced.events == [AllBlocksCleared(), BlockStored(block_hashes=[7], parent_block_hash=None,
                                                                token_ids=[], block_size=4)]
    instances, cards = await registered(discovery)
    assert [i.instance_id for i in instances] == [shell.instance_id]
    assert [i.address for i in instances] == [shell.address]
    assert len(cards) == 1
    reply = await bus.request(keys.resync_subject(NS, shell.instance_id),
                              msgpack_encoder.encode(KvResyncRequest()), timeout=WAIT)
    assert kv_batch_decoder.decode(reply).worker_id == shell.instance_id


async def test_shutdown_deregisters_first_then_drains_in_flight_requests(worker):
    shell, engine, discovery, bus, client = worker
    address = shell.address
    stream = asyncio.create_task(
        asyncio.wait_for(_collect(client, address, request("hold-drain", max_tokens=3)), 2 * WAIT))
    await asyncio.wait_for(engine.held.wait(), WAIT)

    shutting_down = asyncio.create_task(shell.shutdown())
    for _ in range(int(WAIT / 0.01)):  # deregistration comes before the drain finishes
        if (await registered(discovery)) == ([], []):
            break
        await asyncio.sleep(0.01)
    assert await registered(discovery) == ([], [])
    assert not shutting_down.done() and not stream.done()

    other = RequestClient(connect_timeout=1.0)  # nothing new is accepted while draining
    try:
        with pytest.raises(WorkerFailedError):
            await other.call(address, WorkerStatsRequest(), timeout=WAIT)
    finally:
        await other.close()

    engine.release.set()
    frames = await stream
    assert [t for f in frames for t in f.token_ids] == [100, 101, 102] and frames[-1].last
    await asyncio.wait_for(shutting_down, WAIT)
    assert engine.shutdown_calls == 1 and engine.aborted == []
    await shell.shutdown()  # idempotent
    assert engine.shutdown_calls == 1


async def test_shutdown_cancels_requests_still_running_after_the_drain_timeout(tmp_path):
    engine = FakeEngine(str(tmp_path))
    discovery = MemoryDiscovery()
    shell = WorkerShell(engine, discovery, None, WorkerShellConfig(namespace=NS, host="127.0.0.1",
                                                                   drain_timeout=0.2))
    client = RequestClient()
    try:
        await shell.start()
        stream = asyncio.create_task(_collect(client, shell.address, request("hold-forever")))
        await asyncio.wait_for(engine.held.wait(), WAIT)
        await asyncio.wait_for(shell.shutdown(), WAIT)
        with pytest.raises(WorkerFailedError):
            await asyncio.wait_for(stream, WAIT)
        assert engine.aborted == ["hold-forever"] and engine.shutdown_calls == 1
    finally:
        await client.close()
        await shell.shutdown()
        await discovery.close()


async def _collect(client: RequestClient, address: str, req) -> list:
    return [f async for f in client.stream(address, req)]


async def _wait_for_instances(discovery, namespace: str) -> list:
    for _ in range(int(WAIT / 0.05)):
        items, _ = await discovery.get_prefix(keys.instances_prefix(namespace))
        if items:
            return [instance_json_decoder.decode(v) for _, v in items]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no instance registered under {namespace} within {WAIT} s")


@pytest.mark.parametrize("nats_reachable", [True, False], ids=["with-nats", "nats-down"])
async def test_run_workers_serves_through_etcd_and_nats_until_sigterm(etcd_endpoint, nats_url, tmp_path,
                                                                       nats_reachable):
    from dynamo_lite.discovery.etcd import EtcdDiscovery
    from dynamo_lite.events.nats import NatsEventBus

    namespace = f"run-workers-{nats_reachable}"
    engine = FakeEngine(str(tmp_path))
    config = WorkerShellConfig(namespace=namespace, host="127.0.0.1", lease_ttl=3.0, drain_timeout=2.0,
                               load_report_interval=0.05)
    nats_server = nats_url if nats_reachable else f"nats://127.0.0.1:{free_tcp_port()}"
    discovery = await EtcdDiscovery.connect(etcd_endpoint)
    bus = await NatsEventBus.connect(nats_url)
    loads = await bus.subscribe(keys.load_subject(namespace, MODEL))
    client = RequestClient()
    runner = asyncio.create_task(serve_workers([engine], [config], discovery_url=etcd_endpoint,
                                               event_bus_url=nats_server, event_bus_connect_timeout=1.0))
    try:
        [record] = await _wait_for_instances(discovery, namespace)
        frames = await _collect(client, record.address, request("via-etcd", max_tokens=2))
        assert [t for f in frames for t in f.token_ids] == [100, 101]
        if nats_reachable:
            report = load_decoder.decode(await next_message(loads))
            assert report.worker_id == record.instance_id
        else:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(aiter(loads)), 0.5)

        os.kill(os.getpid(), signal.SIGTERM)  # serve_workers installed the handler before registering
        await asyncio.wait_for(runner, 3 * WAIT)
        assert (await discovery.get_prefix(f"/{namespace}/"))[0] == []
        assert engine.shutdown_calls == 1
    finally:
        if not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        await client.close()
        await loads.close()
        await bus.close()
        await discovery.close()


def _worker_command(*args: str, timeout: float = 60.0):
    """Run a worker command to its end (bounded); -> (exit status, stderr)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    return done.returncode, done.stderr


def test_a_taken_request_plane_port_is_one_line_naming_the_flag(etcd_endpoint, nats_url, tmp_path):
    import json
    import socket

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1000, "max_position_embeddings": 512}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, stderr = _worker_command(
            "dynamo_lite.mocker", "--model-path", str(tmp_path), "--namespace", "taken-port",
            "--etcd-endpoints", etcd_endpoint, "--nats-server", nats_url, "--request-plane-port",
            str(port))
    assert status != 0
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert f"cannot bind the request plane to 0.0.0.0:{port}" in line and "--request-plane-port" in line


async def test_a_worker_whose_engine_died_deregisters_and_run_workers_raises(tmp_path):
    """Engine.failure() set (vLLM's engine core gone): the worker leaves discovery and run_workers raises
    EngineDiedError, which the worker commands turn into a non-zero exit for a supervisor to see."""
    from dynamo_lite.protocol.errors import EngineDiedError

    class DyingEngine(FakeEngine):
        dead = False

        def failure(self) -> str | None:
            return "engine core process exited" if self.dead else None

    discovery = MemoryDiscovery()
    engine = DyingEngine(str(tmp_path))
    config = WorkerShellConfig(namespace=NS, host="127.0.0.1", lease_ttl=5.0, drain_timeout=1.0)
    serving = asyncio.ensure_future(run_workers_on(engine, config, discovery))
    try:
        prefix = keys.instances_prefix(NS)
        for _ in range(int(WAIT / 0.05)):
            if (await discovery.get_prefix(prefix))[0]:
                break
            await asyncio.sleep(0.05)
        assert (await discovery.get_prefix(prefix))[0], "the worker never registered"
        engine.dead = True
        with pytest.raises(EngineDiedError, match="engine core process exited"):
            await asyncio.wait_for(serving, WAIT)
        assert (await discovery.get_prefix(prefix))[0] == []  # deregistered
        assert engine.shutdown_calls == 1
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await discovery.close()


async def run_workers_on(engine: Engine, config: WorkerShellConfig, discovery: MemoryDiscovery) -> None:
    from dynamo_lite.engine.worker import run_workers

    await run_workers([engine], [config], discovery, None, shutdown=asyncio.Event())
