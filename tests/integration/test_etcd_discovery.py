"""EtcdDiscovery against a real etcd: endpoints, reconnects, restarts (the invariants every Discovery
keeps are in test_discovery_conformance.py)."""

from __future__ import annotations

import asyncio
import os
import shutil
import contextlib
import time
import uuid

import aetcd
import pytest

from dynamo_lite.discovery.base import WatchEvent
from dynamo_lite.discovery.etcd import DiscoveryError, EtcdDiscovery, parse_endpoints
from dynamo_lite.discovery.watcher import InstanceWatcher
from dynamo_lite.protocol.errors import TransportError
from tests.services import free_tcp_port, start_etcd
from tests.unit.test_watcher import register


def unique_prefix() -> str:
    """Tests share the session's etcd: each works under its own prefix."""
    return f"/t-{uuid.uuid4().hex[:8]}/"


@contextlib.asynccontextmanager
async def connected(endpoint: str):
    discovery = await EtcdDiscovery.connect(endpoint)
    try:
        yield discovery
    finally:
        await discovery.close()


async def next_events(stream, count: int, timeout: float) -> list[WatchEvent]:
    events = []
    async with asyncio.timeout(timeout):
        while len(events) < count:
            events.append(await anext(stream))
    return events


async def wait_until(condition, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(interval)
    return await condition()


def test_parse_endpoints():
    assert parse_endpoints("http://127.0.0.1:2379") == [("127.0.0.1", 2379)]
    assert parse_endpoints("etcd-0:1234, http://etcd-1:2379") == [("etcd-0", 1234), ("etcd-1", 2379)]
    assert parse_endpoints("etcd") == [("etcd", 2379)]
    with pytest.raises(ValueError):
        parse_endpoints(" , ")


async def test_lease_gone_from_the_store_is_reported_lost(etcd_endpoint):
    async with connected(etcd_endpoint) as d:
        lease = await d.grant_lease(3)
        host, port = parse_endpoints(etcd_endpoint)[0]
        async with aetcd.Client(host=host, port=port) as other:
            await other.revoke_lease(lease.id)  # e.g. expired while this process was cut off
        deadline = time.monotonic() + 5
        while not lease.lost and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert lease.lost
        await lease.revoke()  # nothing left to revoke: no error


async def test_unreachable_endpoint_raises_a_clear_error():
    dead = f"127.0.0.1:{free_tcp_port()}"
    with pytest.raises(DiscoveryError, match=dead) as raised:
        await EtcdDiscovery.connect(dead, op_timeout=2, wait=2)
    assert isinstance(raised.value, TransportError)


async def test_connect_waits_for_an_etcd_that_starts_later():
    port = free_tcp_port()
    connecting = asyncio.ensure_future(EtcdDiscovery.connect(f"127.0.0.1:{port}", wait=30))
    await asyncio.sleep(1.5)
    assert not connecting.done()  # still waiting, not failed
    with start_etcd(port):
        d = await asyncio.wait_for(connecting, 30)
        try:
            await d.put(unique_prefix() + "k", b"v")
        finally:
            await d.close()


async def test_first_reachable_endpoint_is_used(etcd_endpoint):
    dead = f"http://127.0.0.1:{free_tcp_port()}"
    async with connected(f"{dead},{etcd_endpoint}") as d:
        assert d.endpoint == etcd_endpoint
        await d.put(unique_prefix() + "k", b"v")


async def test_keepalive_and_watch_recover_after_etcd_restart():
    with start_etcd() as etcd:
        prefix = unique_prefix()
        async with connected(etcd.url) as d:
            lease = await d.grant_lease(3)
            await d.put(prefix + "worker", b"up", lease)
            _, revision = await d.get_prefix(prefix)
            async with contextlib.aclosing(d.watch_prefix(prefix, revision + 1)) as stream:
                await d.put(prefix + "before", b"1")
                assert [e.key for e in await next_events(stream, 1, timeout=5)] == [prefix + "before"]

                await asyncio.to_thread(etcd.restart, 1.0)  # same port and data dir

                await d.put(prefix + "after", b"2")  # retried until the store answers
                [event] = await next_events(stream, 1, timeout=10)
                assert (event.kind, event.key, event.value) == ("put", prefix + "after", b"2")
                # Longer than the ttl after the restart: only a recovered keep-alive keeps the key.
                await asyncio.sleep(lease.ttl + 1.5)
                assert (prefix + "worker", b"up") in (await d.get_prefix(prefix))[0]
                assert not lease.lost
                await lease.revoke()
                [gone] = await next_events(stream, 1, timeout=5)
                assert (gone.kind, gone.key) == ("delete", prefix + "worker")


async def test_watcher_relists_when_etcd_comes_back_empty():
    with start_etcd() as etcd:
        async with connected(etcd.url) as d:
            lease, record = await register(d, namespace="wiped", ttl=3)
            watcher = InstanceWatcher(d, "wiped")
            await watcher.start()
            try:
                assert watcher.instances() == [record]
                etcd.stop()
                shutil.rmtree(os.path.join(etcd.data_dir, "data"))  # the store loses everything
                await asyncio.to_thread(etcd.start)
                # The watch cannot resume (the revision went back): the watcher re-reads the store.
                assert await watcher.wait_for(lambda: watcher.instances() == [], timeout=10)
                deadline = time.monotonic() + 5
                while not lease.lost and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert lease.lost  # the worker learns its registration is gone
                _, again = await register(d, namespace="wiped")
                assert await watcher.wait_for(lambda: watcher.instances() == [again], timeout=5)
            finally:
                await watcher.close()


@pytest.mark.parametrize("scheme", ["etcd://", ""], ids=["etcd-scheme", "bare-host-port"])
async def test_planes_connect_etcd_by_url_scheme(etcd_endpoint, scheme):
    from dynamo_lite import planes

    host_port = etcd_endpoint.split("://", 1)[1]
    discovery = await planes.connect_discovery(scheme + host_port)
    try:
        assert isinstance(discovery, EtcdDiscovery)
        prefix = unique_prefix()
        await discovery.put(prefix + "k", b"v")
        assert (await discovery.get_prefix(prefix))[0] == [(prefix + "k", b"v")]
    finally:
        await discovery.close()
