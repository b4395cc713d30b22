"""etcd with auth enabled (user + password), restarted under a connected client: etcd's simple auth tokens
live in its memory, so every token it gave out is invalid after a restart. A component must get a new one
by itself: its reads and writes work again, its lease is kept alive (not lost), and its watch resumes."""

from __future__ import annotations

import asyncio
import uuid

from dynamo_lite import planes
from dynamo_lite.discovery.base import WatchEventKind
from tests.integration.test_plane_security import ROOT_PASSWORD, auth_etcd, credentials

__all__ = ["auth_etcd"]  # the module-scoped fixture, shared

WAIT = 20.0  # bound on each wait for the client to recover


async def test_a_client_reauthenticates_after_etcd_restarts(auth_etcd, tmp_path):
    creds = credentials(tmp_path, etcd_user="root", etcd_password=ROOT_PASSWORD)
    discovery = await planes.connect_discovery(auth_etcd.url, connect_wait=3.0, credentials=creds)
    prefix = f"/auth-restart/{uuid.uuid4().hex}/"
    events: asyncio.Queue = asyncio.Queue()

    async def watch(revision: int) -> None:
        async for event in discovery.watch_prefix(prefix, revision):
            await events.put(event)

    try:
        lease = await discovery.grant_lease(3.0)
        await discovery.put(prefix + "mine", b"v1", lease)
        _, revision = await discovery.get_prefix(prefix)
        watching = asyncio.create_task(watch(revision + 1))
        await asyncio.sleep(0.5)  # the watch is set up
        auth_etcd.restart(0.5)  # every token is now invalid

        async def retry_put() -> None:
            while True:
                try:
                    await discovery.put(prefix + "after", b"v2")
                    return
                except Exception:  # noqa: BLE001 - until the deadline: the client must recover by itself
                    await asyncio.sleep(0.2)

        await asyncio.wait_for(retry_put(), WAIT)
        items, _ = await discovery.get_prefix(prefix)
        assert dict(items) == {prefix + "mine": b"v1", prefix + "after": b"v2"}
        # The watch resumed after the restart: it saw the new key.
        event = await asyncio.wait_for(events.get(), WAIT)
        assert (event.kind, event.key) == (WatchEventKind.PUT, prefix + "after"), event
        # The lease (3 s) was kept alive across the restart: after twice its ttl the key is still there.
        await asyncio.sleep(6.0)
        assert not lease.lost
        items, _ = await discovery.get_prefix(prefix + "mine")
        assert items == [(prefix + "mine", b"v1")]
        watching.cancel()
    finally:
        await discovery.close()
