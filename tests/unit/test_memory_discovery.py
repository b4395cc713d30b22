"""MemoryDiscovery's own test controls; the invariants it shares with etcd and embedded are in
tests/integration/test_discovery_conformance.py."""

from __future__ import annotations

import asyncio
import contextlib

from dynamo_lite.discovery.base import WatchEvent
from dynamo_lite.discovery.memory import MemoryDiscovery


async def collect(discovery: MemoryDiscovery, prefix: str, start_revision: int, count: int,
                  timeout: float = 1.0) -> list[WatchEvent]:
    events = []
    async with contextlib.aclosing(discovery.watch_prefix(prefix, start_revision)) as stream:
        async with asyncio.timeout(timeout):
            async for event in stream:
                events.append(event)
                if len(events) == count:
                    break
    return events


async def test_expire_lease_marks_it_lost_and_removes_keys():
    d = MemoryDiscovery()
    lease = await d.grant_lease(10)
    await d.put("/ns/a", b"1", lease)
    d.expire_lease(lease.id)
    assert lease.lost
    assert await d.get_prefix("/ns/") == ([], d.revision)


async def test_close_stops_keepalive_so_leases_expire_after_ttl():
    d = MemoryDiscovery()
    lease = await d.grant_lease(0.2)
    await d.put("/ns/a", b"1", lease)
    await d.close()
    await d.close()  # safe twice
    assert d._data  # still there right after close
    await asyncio.sleep(0.4)
    assert not d._data and lease.lost


async def test_compacted_or_broken_watch_yields_reset():
    d = MemoryDiscovery()
    await d.put("/ns/a", b"1")
    d.compact()
    assert await collect(d, "/ns/", 1, 1) == [WatchEvent("reset", "")]

    task = asyncio.create_task(collect(d, "/ns/", d.revision + 1, 5))
    await asyncio.sleep(0)
    d.break_watches()
    assert await task == [WatchEvent("reset", "")]  # ends after the reset
