"""A process on an EmbeddedDiscovery directory, for the multi-process tests of test_embedded_discovery.py.

    hold DIR KEY TTL      grant a lease, put KEY under it, print "ready", then keep it alive until killed
    watch DIR PREFIX N    print the snapshot as one JSON line, then the next N changes (N > 0), one JSON
                          line each
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

from dynamo_lite.discovery.embedded import EmbeddedDiscovery


async def hold(directory: str, key: str, ttl: str) -> None:
    discovery = await EmbeddedDiscovery.open(directory)
    lease = await discovery.grant_lease(float(ttl))
    await discovery.put(key, b"held", lease)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def watch(directory: str, prefix: str, count: str) -> None:
    discovery = await EmbeddedDiscovery.open(directory)
    items, revision = await discovery.get_prefix(prefix)
    print(json.dumps({"snapshot": [k for k, _ in items], "revision": revision}), flush=True)
    if int(count) == 0:
        return await discovery.close()
    async with contextlib.aclosing(discovery.watch_prefix(prefix, revision + 1)) as stream:
        seen = 0
        async for event in stream:
            print(json.dumps([event.kind, event.key, event.value.decode(), event.revision]), flush=True)
            seen += 1
            if seen == int(count):
                break
    await discovery.close()


if __name__ == "__main__":
    asyncio.run({"hold": hold, "watch": watch}[sys.argv[1]](*sys.argv[2:]))
