"""In-process Discovery with etcd's semantics (revisions, leases, prefix watches), for unit tests.

Leases are kept alive perfectly while the store is open; `expire_lease()` simulates a worker that
died (its keys vanish, the lease reports `lost`). After `close()` keep-alives stop, so leases
expire ttl seconds later, like a process that went away without revoking. `break_watches()`
simulates an unrecoverable watch (store restarted) and `compact()` drops history.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dynamo_lite.discovery.base import Discovery, Lease, WatchEvent, WatchEventKind
from dynamo_lite.protocol.errors import TransportError

logger = logging.getLogger(__name__)

# Bounds the replay history; a watch starting before the kept history gets a "reset", as etcd
# answers a watch from a compacted revision.
MAX_HISTORY = 100_000


class MemoryLease(Lease):
    def __init__(self, store: MemoryDiscovery, lease_id: int, ttl: float):
        self.id = lease_id
        self.ttl = ttl
        self._store = store
        self._lost = False
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def lost(self) -> bool:
        return self._lost

    async def revoke(self) -> None:
        self._store._end_lease(self.id, lost=False)


@dataclass(eq=False)
class _Watch:
    prefix: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class MemoryDiscovery(Discovery):
    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, int]] = {}  # key -> (value, lease id or 0)
        self._revision = 1  # an empty etcd is at revision 1 too
        self._history: list[WatchEvent] = []
        self._compact_revision = 0  # watches from a revision below this get a reset
        self._leases: dict[int, MemoryLease] = {}
        self._lease_ids = itertools.count(0x1001)
        self._watches: set[_Watch] = set()
        self._closed = False

    # ------------------------------------------------------------------ Discovery

    async def grant_lease(self, ttl: float) -> Lease:
        self._check_open()
        lease = MemoryLease(self, next(self._lease_ids), float(ttl))
        self._leases[lease.id] = lease
        return lease

    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> None:
        self._check_open()
        lease_id = 0
        if lease is not None:
            if lease.id not in self._leases:
                raise TransportError(f"memory discovery: put {key}: lease {lease.id:x} not found")
            lease_id = lease.id
        self._revision += 1
        self._data[key] = (bytes(value), lease_id)
        self._emit([WatchEvent(WatchEventKind.PUT, key, bytes(value), self._revision)])

    async def delete(self, key: str) -> None:
        self._check_open()
        if key not in self._data:
            return  # etcd does not advance the revision for a delete that matched nothing
        self._revision += 1
        del self._data[key]
        self._emit([WatchEvent(WatchEventKind.DELETE, key, b"", self._revision)])

    async def get_prefix(self, prefix: str) -> tuple[list[tuple[str, bytes]], int]:
        self._check_open()
        items = sorted((k, v) for k, (v, _) in self._data.items() if k.startswith(prefix))
        return items, self._revision

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        if self._closed:
            return
        if start_revision < self._compact_revision:
            yield WatchEvent(WatchEventKind.RESET, "")
            return
        watch = _Watch(prefix)
        # Replay and registration happen without an await between them: nothing is missed or repeated.
        for event in self._history:
            if event.revision >= start_revision and event.key.startswith(prefix):
                watch.queue.put_nowait(event)
        self._watches.add(watch)
        try:
            while True:
                event = await watch.queue.get()
                if event is None:  # store closed
                    return
                yield event
                if event.kind == WatchEventKind.RESET:
                    return
        finally:
            self._watches.discard(watch)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watch in self._watches:
            watch.queue.put_nowait(None)
        # Keep-alives stop with the client: leases not revoked expire ttl seconds later.
        loop = asyncio.get_running_loop()
        for lease in list(self._leases.values()):
            lease._expiry = loop.call_later(lease.ttl, self._end_lease, lease.id, True)

    # ------------------------------------------------------------------ test controls

    def expire_lease(self, lease_id: int) -> None:
        """Simulate a lease expiring (its holder died): attached keys vanish, the lease is `lost`."""
        self._end_lease(lease_id, lost=True)

    def break_watches(self) -> None:
        """Make every open watch yield a reset and end (as after an unrecoverable store restart)."""
        for watch in self._watches:
            watch.queue.put_nowait(WatchEvent(WatchEventKind.RESET, ""))

    def compact(self) -> None:
        """Drop the history: watches from an older revision get a reset."""
        self._history.clear()
        self._compact_revision = self._revision

    @property
    def revision(self) -> int:
        return self._revision

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("memory discovery is closed")

    def _end_lease(self, lease_id: int, lost: bool) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        if lease._expiry is not None:
            lease._expiry.cancel()
        lease._lost = lost
        keys = sorted(k for k, (_, owner) in self._data.items() if owner == lease_id)
        if not keys:
            return
        # One revision for all keys of the lease, as etcd deletes them in one transaction.
        self._revision += 1
        for key in keys:
            del self._data[key]
        self._emit([WatchEvent(WatchEventKind.DELETE, key, b"", self._revision) for key in keys])

    def _emit(self, events: list[WatchEvent]) -> None:
        self._history.extend(events)
        if len(self._history) > MAX_HISTORY:
            dropped = len(self._history) - MAX_HISTORY
            self._compact_revision = self._history[dropped].revision
            del self._history[:dropped]
        for watch in self._watches:
            for event in events:
                if event.key.startswith(watch.prefix):
                    watch.queue.put_nowait(event)
