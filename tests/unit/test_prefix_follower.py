"""PrefixFollower over MemoryDiscovery: snapshot, then changes, and only the differences after a reset."""

from __future__ import annotations

import asyncio

from dynamo_lite.discovery.memory import MemoryDiscovery
from dynamo_lite.discovery.prefix_follower import PrefixFollower


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_snapshot_then_changes_then_the_differences_after_a_reset():
    discovery = MemoryDiscovery()
    seen: list[tuple] = []
    follower = PrefixFollower(discovery, "/ns/e/", lambda k, v: seen.append(("put", k, v)),
                              lambda k: seen.append(("delete", k)))
    await discovery.put("/ns/e/1", b"one")
    await discovery.put("/ns/other", b"ignored")
    try:
        await follower.start()
        assert seen == [("put", "/ns/e/1", b"one")]
        lease = await discovery.grant_lease(10)
        await discovery.put("/ns/e/2", b"two", lease=lease)
        await lease.revoke()
        await settle()
        assert seen[1:] == [("put", "/ns/e/2", b"two"), ("delete", "/ns/e/2")]
        del seen[:]
        discovery.compact()  # the watch cannot resume: it re-reads the prefix
        discovery.break_watches()
        await settle()
        await discovery.put("/ns/e/3", b"three")
        await discovery.put("/ns/e/1", b"one")  # unchanged: not reported again
        await settle()
        assert seen == [("put", "/ns/e/3", b"three")]
        assert follower.keys() == ["/ns/e/1", "/ns/e/3"]
    finally:
        await follower.close()
        await discovery.close()
