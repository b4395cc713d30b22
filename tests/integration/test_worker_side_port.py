"""The worker side port (--metrics-endpoint-port) of run_workers, in process: a fake engine, in-memory
planes and the real request plane and HTTP server. What a kubelet and Prometheus see: /live from the
start, /ready only while loaded + registered and not draining, /metrics with the shell's counters."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import httpx
import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from dynamo_lite.discovery.memory import MemoryDiscovery
from dynamo_lite.engine.worker import WorkerShellConfig, run_workers
from dynamo_lite.events.memory import MemoryEventBus
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.protocol.messages import BlockStored, instance_json_decoder
from dynamo_lite.transport.client import RequestClient
from tests.integration.test_worker_shell import NS, WAIT, FakeEngine, request
from tests.services import free_tcp_port


class SlowStartEngine(FakeEngine):
    """Starts only when `loaded` is set (an engine loading its weights)."""

    def __init__(self, model_path: str):
        super().__init__(model_path)
        self.loaded = asyncio.Event()

    async def start(self):
        await self.loaded.wait()
        return await super().start()


def samples(text: str, name: str) -> dict[tuple, float]:
    """{sorted label items: value} of one sample name in Prometheus text."""
    return {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


async def wait_for(check, what: str, timeout: float = WAIT):
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := await check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return result


@pytest.fixture
async def side_port_worker(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    engine = SlowStartEngine(str(tmp_path))
    discovery, bus = MemoryDiscovery(), MemoryEventBus()
    port = free_tcp_port()
    config = WorkerShellConfig(namespace=NS, host="127.0.0.1", lease_ttl=5.0, drain_timeout=WAIT,
                               load_report_interval=0.05, metrics_endpoint_port=port)
    shutdown = asyncio.Event()
    task = asyncio.create_task(run_workers([engine], [config], discovery, bus, shutdown=shutdown))
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT)
    try:
        yield engine, discovery, shutdown, task, http
    finally:
        shutdown.set()
        engine.loaded.set()
        engine.release.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 3 * WAIT)
        await http.aclose()
        await bus.close()
        await discovery.close()


async def instance_address(discovery: MemoryDiscovery) -> str | None:
    values, _ = await discovery.get_prefix(keys.instances_prefix(NS))
    return instance_json_decoder.decode(values[0][1]).address if values else None


async def status(http: httpx.AsyncClient, path: str) -> int:
    return (await http.get(path)).status_code


async def test_live_at_once_ready_after_registration_and_not_while_draining(side_port_worker):
    engine, discovery, shutdown, task, http = side_port_worker
    await wait_for(lambda: _answers(http), "the side port to answer")
    # Loading: alive (a liveness probe must not kill a worker loading its weights), not ready.
    assert (await status(http, "/live"), await status(http, "/ready")) == (200, 503)
    engine.loaded.set()
    await wait_for(lambda: _is(http, "/ready", 200), "/ready 200")
    address = await instance_address(discovery)
    assert address is not None  # ready means registered

    client = RequestClient(connect_timeout=2.0)
    try:
        async with aclosing(client.stream(address, request("hold-1", max_tokens=4))) as frames:
            first = await anext(frames)
            assert first.token_ids == [100]
            await asyncio.wait_for(engine.held.wait(), WAIT)
            shutdown.set()
            # Draining the held request: deregistered, so not ready; the process still lives.
            await wait_for(lambda: _is(http, "/ready", 503), "/ready 503 while draining")
            assert await status(http, "/live") == 200
            assert await instance_address(discovery) is None
            engine.release.set()
            rest = [frame async for frame in frames]
        assert rest[-1].last
    finally:
        await client.close()
    await asyncio.wait_for(task, 2 * WAIT)
    with pytest.raises(httpx.ConnectError):  # the side port closes with the worker
        await http.get("/live")


async def test_metrics_count_requests_blocks_and_relayed_events(side_port_worker):
    engine, discovery, shutdown, task, http = side_port_worker
    engine.loaded.set()
    await wait_for(lambda: _is(http, "/ready", 200), "/ready 200")
    address = await instance_address(discovery)
    client = RequestClient(connect_timeout=2.0)
    try:
        frames = [f async for f in client.stream(address, request("r1", max_tokens=3))]
        assert frames[-1].last
        assert [f async for f in client.stream(address, request("fail-1"))][0].message == "engine said no"
    finally:
        await client.close()
    engine.kv_queue.put_nowait([BlockStored(block_hashes=[11, 12], parent_block_hash=None,
                                            token_ids=[1] * 8, block_size=4)])

    async def relayed():
        text = (await http.get("/metrics")).text
        return text if sum(samples(text, "dynamo_lite_worker_kv_events_total").values()) == 1 else None

    text = await wait_for(relayed, "the KV event to be relayed")
    r = await http.get("/metrics")
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST
    worker = next(iter(samples(text, "dynamo_lite_worker_ready")))
    labels = dict(worker)
    assert labels["model"] == "org/fake-model" and labels["role"] == "aggregated"
    requests = {dict(k)["outcome"]: v for k, v in samples(text, "dynamo_lite_worker_requests_total").items()}
    assert requests == {"completed": 1.0, "aborted": 0.0, "failed": 1.0}
    assert samples(text, "dynamo_lite_worker_generated_tokens_total") == {worker: 3.0}
    # FakeEngine reports 5 prompt tokens with blocks of 4 and no cache hits: 1 full block each request.
    assert samples(text, "dynamo_lite_worker_prompt_blocks_total") == {worker: 1.0}
    assert samples(text, "dynamo_lite_worker_cached_blocks_total") == {worker: 0.0}
    assert samples(text, "dynamo_lite_worker_kv_event_batches_total") == {worker: 1.0}
    assert samples(text, "dynamo_lite_worker_relayed_blocks") == {worker: 2.0}
    assert samples(text, "dynamo_lite_worker_kv_usage_ratio") == {worker: 3 / 64}
    assert samples(text, "dynamo_lite_worker_load_reports_total")[worker] >= 1
    assert samples(text, "dynamo_lite_worker_kv_transfer_bytes_total") == {worker: 0.0}
    assert "process_cpu_seconds_total" in text  # prometheus_client's default registry, the engine's here


async def test_unknown_path_and_method(side_port_worker):
    engine, discovery, shutdown, task, http = side_port_worker
    await wait_for(lambda: _answers(http), "the side port to answer")
    assert await status(http, "/nope") == 404
    assert (await http.post("/ready")).status_code == 405
    assert (await http.head("/live")).status_code == 200


async def test_a_taken_port_is_a_config_error_naming_the_flag(tmp_path):
    blocker = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    engine = FakeEngine(str(tmp_path))
    config = WorkerShellConfig(namespace=NS, host="127.0.0.1", metrics_endpoint_port=port)
    discovery = MemoryDiscovery()
    try:
        with pytest.raises(ConfigError) as caught:
            await run_workers([engine], [config], discovery, None, shutdown=asyncio.Event())
        assert caught.value.param == "--metrics-endpoint-port"
        assert engine.shutdown_calls == 0  # refused before the engine was started
    finally:
        blocker.close()
        await discovery.close()


async def _answers(http: httpx.AsyncClient) -> bool:
    try:
        await http.get("/live")
    except httpx.TransportError:
        return False
    return True


async def _is(http: httpx.AsyncClient, path: str, code: int) -> bool:
    return await status(http, path) == code
