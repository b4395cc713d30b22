"""MemoryDiscovery keeps the Discovery invariants (base.py) that unit tests of other parts rely on."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from dynamo_lite.discovery.base import WatchEvent
from dynamo_lite.discovery.memory import MemoryDiscovery
from dynamo_lite.protocol.errors import TransportError


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


async def test_get_prefix_is_sorted_and_reports_revision():
    d = MemoryDiscovery()
    await d.put("/ns/b", b"2")
    await d.put("/ns/a", b"1")
    await d.put("/other/c", b"3")
    items, revision = await d.get_prefix("/ns/")
    assert items == [("/ns/a", b"1"), ("/ns/b", b"2")]
    assert revision == d.revision == 4  # empty store at 1, three puts


async def test_snapshot_then_watch_misses_and_repeats_nothing():
    d = MemoryDiscovery()
    await d.put("/ns/a", b"1")
    _, revision = await d.get_prefix("/ns/")
    await d.put("/ns/b", b"2")  # after the snapshot, before the watch starts
    await d.delete("/ns/a")
    events = await collect(d, "/ns/", revision + 1, 2)
    assert [(e.kind, e.key, e.value) for e in events] == [("put", "/ns/b", b"2"), ("delete", "/ns/a", b"")]
    assert [e.revision for e in events] == [revision + 1, revision + 2]


async def test_watch_sees_live_changes_only_under_prefix():
    d = MemoryDiscovery()
    _, revision = await d.get_prefix("/ns/")
    task = asyncio.create_task(collect(d, "/ns/", revision + 1, 1))
    await asyncio.sleep(0)
    await d.put("/elsewhere", b"x")
    await d.put("/ns/k", b"v")
    events = await task
    assert events == [WatchEvent("put", "/ns/k", b"v", revision + 2)]


async def test_revoke_removes_all_keys_of_the_lease_in_one_revision():
    d = MemoryDiscovery()
    lease = await d.grant_lease(10)
    other = await d.grant_lease(10)
    assert lease.id > 0 and other.id != lease.id
    await d.put("/ns/a", b"1", lease)
    await d.put("/ns/b", b"2", lease)
    await d.put("/ns/c", b"3", other)
    _, revision = await d.get_prefix("/ns/")
    await lease.revoke()
    await lease.revoke()  # safe twice
    items, _ = await d.get_prefix("/ns/")
    assert items == [("/ns/c", b"3")]
    events = await collect(d, "/ns/", revision + 1, 2)
    assert {e.key for e in events} == {"/ns/a", "/ns/b"}
    assert {e.revision for e in events} == {revision + 1}
    assert not lease.lost
    with pytest.raises(TransportError):
        await d.put("/ns/d", b"4", lease)  # a revoked lease cannot hold keys


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


async def test_close_ends_open_watches():
    d = MemoryDiscovery()
    task = asyncio.create_task(collect(d, "/ns/", d.revision + 1, 1))
    await asyncio.sleep(0)
    await d.close()
    assert await task == []
