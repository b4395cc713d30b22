"""The Discovery invariants (dynamo_lite/discovery/base.py), checked on every implementation.

The `backend` fixture runs each test over memory, etcd (the session's real etcd) and embedded (a fresh
directory). Tests that need two clients of one store (a worker that dies, a frontend that restarts) run
where clients are separate processes' views: etcd and embedded. What only one implementation has
(memory's test controls, etcd's reconnects, embedded's journal) is tested in that implementation's file.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field

import aetcd
import pytest

from dynamo_lite.discovery.base import Discovery, WatchEvent
from dynamo_lite.discovery.embedded import EmbeddedDiscovery
from dynamo_lite.discovery.etcd import EtcdDiscovery, parse_endpoints
from dynamo_lite.discovery.memory import MemoryDiscovery
from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.protocol.errors import TransportError
from tests.unit.test_watcher import register

TTL = 2.0  # etcd grants whole seconds, at least about 2


@dataclass
class Backend:
    """Clients of one store, closed at the end of the test."""

    name: str
    etcd_endpoint: str = ""
    directory: str = ""
    prefix: str = field(default_factory=lambda: f"/t-{uuid.uuid4().hex[:8]}/")  # etcd is shared
    clients: list[Discovery] = field(default_factory=list)
    _memory: MemoryDiscovery | None = None

    async def connect(self) -> Discovery:
        if self.name == "memory":
            self._memory = self._memory or MemoryDiscovery()
            client: Discovery = self._memory
        elif self.name == "etcd":
            client = await EtcdDiscovery.connect(self.etcd_endpoint)
        else:
            client = await EmbeddedDiscovery.open(self.directory)
        self.clients.append(client)
        return client

    async def compact(self, discovery: Discovery) -> None:
        """Drop the store's history up to its current revision."""
        if isinstance(discovery, EtcdDiscovery):
            _, revision = await discovery.get_prefix(self.prefix)
            host, port = parse_endpoints(self.etcd_endpoint)[0]
            async with aetcd.Client(host=host, port=port) as admin:
                await admin.compact(revision)
        elif isinstance(discovery, MemoryDiscovery):
            discovery.compact()
        else:
            await discovery.compact()


async def _backend(request, tmp_path):
    b = Backend(request.param)
    if b.name == "etcd":
        b.etcd_endpoint = request.getfixturevalue("etcd_endpoint")  # started only when an etcd test runs
    b.directory = str(tmp_path / "discovery")
    try:
        yield b
    finally:
        for client in b.clients:
            await client.close()


@pytest.fixture(params=["memory", "etcd", "embedded"])
async def backend(request, tmp_path):
    async for b in _backend(request, tmp_path):
        yield b


@pytest.fixture(params=["etcd", "embedded"])
async def shared(request, tmp_path):
    """A backend whose clients are separate (each a process's view, closed on its own)."""
    async for b in _backend(request, tmp_path):
        yield b


async def next_events(stream, count: int, timeout: float = 5.0) -> list[WatchEvent]:
    events = []
    async with asyncio.timeout(timeout):
        while len(events) < count:
            events.append(await anext(stream))
    return events


async def wait_until(condition, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(interval)
    return await condition()


async def test_get_prefix_is_sorted_under_the_prefix_and_reports_the_revision(backend):
    d, p = await backend.connect(), backend.prefix
    _, start = await d.get_prefix(p)
    await d.put(p + "b", b"2")
    await d.put(p + "a", b"1")
    await d.put("/other" + p + "c", b"3")
    items, revision = await d.get_prefix(p)
    assert items == [(p + "a", b"1"), (p + "b", b"2")]
    assert revision == start + 3
    await d.delete(p + "missing")  # matches nothing: the revision stays
    assert (await d.get_prefix(p))[1] == revision


async def test_snapshot_then_watch_misses_and_repeats_nothing(backend):
    d, p = await backend.connect(), backend.prefix
    await d.put(p + "a", b"1")
    _, revision = await d.get_prefix(p)
    await d.put(p + "b", b"2")  # after the snapshot, before the watch starts
    await d.delete(p + "a")
    await d.put("/not-under" + p, b"x")
    async with contextlib.aclosing(d.watch_prefix(p, revision + 1)) as stream:
        events = await next_events(stream, 2)
        assert [(e.kind, e.key, e.value) for e in events] == [("put", p + "b", b"2"),
                                                              ("delete", p + "a", b"")]
        assert [e.revision for e in events] == [revision + 1, revision + 2]
        await d.put(p + "c", b"3")
        [live] = await next_events(stream, 1)
        assert (live.kind, live.key, live.value, live.revision) == ("put", p + "c", b"3", revision + 4)


async def test_a_second_client_sees_the_same_store(shared):
    writer, reader = await shared.connect(), await shared.connect()
    p = shared.prefix
    _, revision = await reader.get_prefix(p)
    async with contextlib.aclosing(reader.watch_prefix(p, revision + 1)) as stream:
        await writer.put(p + "k", b"v")
        [event] = await next_events(stream, 1)
        assert (event.kind, event.key, event.value) == ("put", p + "k", b"v")
        assert await reader.get_prefix(p) == ([(p + "k", b"v")], event.revision)


async def test_revoke_removes_all_keys_of_the_lease_in_one_revision(backend):
    d, p = await backend.connect(), backend.prefix
    lease = await d.grant_lease(10)
    other = await d.grant_lease(10)
    assert lease.id > 0 and other.id > 0 and other.id != lease.id
    await d.put(p + "a", b"1", lease)
    await d.put(p + "b", b"2", lease)
    await d.put(p + "c", b"3", other)
    _, revision = await d.get_prefix(p)
    await lease.revoke()
    await lease.revoke()  # safe twice
    assert (await d.get_prefix(p))[0] == [(p + "c", b"3")]
    async with contextlib.aclosing(d.watch_prefix(p, revision + 1)) as stream:
        events = await next_events(stream, 2)
    assert {(e.kind, e.key) for e in events} == {("delete", p + "a"), ("delete", p + "b")}
    assert {e.revision for e in events} == {revision + 1}
    assert not lease.lost
    with pytest.raises(TransportError):
        await d.put(p + "d", b"4", lease)  # a revoked lease cannot hold keys


async def test_keepalive_holds_the_lease_past_its_ttl(shared):
    observer, worker = await shared.connect(), await shared.connect()
    p = shared.prefix
    lease = await worker.grant_lease(TTL)
    await worker.put(p + "w", b"v", lease)
    await asyncio.sleep(TTL * 1.75)
    assert (await observer.get_prefix(p))[0] == [(p + "w", b"v")]
    assert not lease.lost


async def test_a_client_that_stops_without_revoking_loses_its_keys_within_the_ttl(shared):
    observer, worker = await shared.connect(), await shared.connect()
    p = shared.prefix
    lease = await worker.grant_lease(TTL)
    await worker.put(p + "w", b"v", lease)
    _, revision = await observer.get_prefix(p)
    async with contextlib.aclosing(observer.watch_prefix(p, revision + 1)) as stream:
        await worker.close()  # keep-alive stops, no revoke: like a crashed worker
        stopped = time.monotonic()
        [event] = await next_events(stream, 1, timeout=TTL + 3)
        assert (event.kind, event.key) == ("delete", p + "w")
        assert time.monotonic() - stopped < TTL + 1.5
    assert (await observer.get_prefix(p))[0] == []


async def test_watch_from_a_compacted_revision_yields_reset_then_ends(backend):
    d, p = await backend.connect(), backend.prefix
    await d.put(p + "a", b"1")
    _, old_revision = await d.get_prefix(p)
    await d.put(p + "a", b"2")
    await backend.compact(d)
    async with contextlib.aclosing(d.watch_prefix(p, old_revision)) as stream:
        assert await next_events(stream, 1) == [WatchEvent("reset", "")]
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
    # The current state survives the compaction, and a watch from the next revision works.
    items, revision = await d.get_prefix(p)
    assert items == [(p + "a", b"2")]
    async with contextlib.aclosing(d.watch_prefix(p, revision + 1)) as stream:
        await d.put(p + "b", b"3")
        assert [(e.kind, e.key) for e in await next_events(stream, 1)] == [("put", p + "b")]


async def test_close_ends_open_watches(backend):
    d, p = await backend.connect(), backend.prefix
    _, revision = await d.get_prefix(p)

    async def drain() -> list[WatchEvent]:
        async with contextlib.aclosing(d.watch_prefix(p, revision + 1)) as stream:
            return [event async for event in stream]

    task = asyncio.create_task(drain())
    await asyncio.sleep(0.2)
    await d.close()
    await d.close()  # safe twice
    assert await asyncio.wait_for(task, 5) == []


async def test_restarted_frontend_sees_workers_already_up_and_drops_expired_ones(shared):
    namespace = uuid.uuid4().hex[:8]
    frontend_side, worker_side = await shared.connect(), await shared.connect()
    lease, record = await register(worker_side, namespace=namespace, ttl=TTL)
    watcher = InstanceWatcher(frontend_side, namespace)
    await watcher.start()  # after the worker: the snapshot must show it
    try:
        assert watcher.instances() == [record]
        assert watcher.card("m").kv_block_size == 16
        await worker_side.close()  # the worker dies without revoking
        died = time.monotonic()
        assert await watcher.wait_for(lambda: watcher.instances() == [], timeout=lease.ttl + 1)
        assert time.monotonic() - died <= lease.ttl + 1
        assert watcher.models() == []
    finally:
        await watcher.close()


async def test_watcher_follows_live_registrations(backend):
    namespace = uuid.uuid4().hex[:8]
    d = await backend.connect()
    watcher = InstanceWatcher(d, namespace)
    await watcher.start()
    try:
        lease, record = await register(d, namespace=namespace)
        assert await watcher.wait_for(lambda: watcher.instances() == [record], timeout=5)
        await lease.revoke()
        assert await watcher.wait_for(lambda: watcher.instances() == [], timeout=5)
    finally:
        await watcher.close()
