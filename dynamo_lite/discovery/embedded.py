"""Discovery over a directory on one host: no server, any user, etcd's guarantees.

Why a journal (discovery/journal.py) rather than a file per key: etcd's contract is a revision-ordered
history (get_prefix returns the revision of its snapshot, a watch resumes from any later revision,
exactly once). With one append-only journal, written under a file lock, every client replays the same
lines in the same order, so two frontends agree by construction, a restarted one rebuilds the whole
state from the file, and a watch is "the lines after revision R".

Leases: the holder touches its lease file every ttl/3. Every client, every REAP_INTERVAL and before
each get_prefix, looks for lease files older than their ttl (and keys whose lease file is gone) and,
under the lock, deletes their keys through the journal (one revision per lease, as etcd does) and
removes the file. So a process killed with SIGKILL disappears for every watcher within its ttl plus
REAP_INTERVAL, as long as any client of the directory runs (and at the latest at the next get_prefix);
the holder finds its file gone and its lease `lost`. Lease ages are wall-clock (file mtimes): one host.

Each client keeps a replica fed by tailing the journal; a background task wakes on `watchfiles`
notifications (inotify) with REAP_INTERVAL as a timeout and fallback, and fans new changes out to the
watches. All file I/O runs in a thread; the replica is only touched under one asyncio lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles

from dynamo_lite.discovery.base import Discovery, Lease, WatchEvent, WatchEventKind
from dynamo_lite.discovery.journal import FIRST_REVISION, Change, Journal
from dynamo_lite.protocol.errors import TransportError

logger = logging.getLogger(__name__)

REAP_INTERVAL = 0.5  # seconds between checks for expired leases (and the wake-up fallback)


class EmbeddedLease(Lease):
    def __init__(self, discovery: EmbeddedDiscovery, lease_id: int, ttl: float):
        self.id = lease_id
        self.ttl = ttl
        self._discovery = discovery
        self._lost = False
        self._revoked = False
        self._task = asyncio.get_running_loop().create_task(self._keep_alive(),
                                                            name=f"embedded-keepalive-{lease_id:x}")

    @property
    def lost(self) -> bool:
        return self._lost

    async def _keep_alive(self) -> None:
        path = self._discovery._journal.lease_path(self.id)
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await asyncio.to_thread(os.utime, path)
            except FileNotFoundError:
                # Another client expired it (this process was stalled longer than the ttl).
                self._lost = True
                logger.error("lease %x is gone from %s (expired)", self.id, self._discovery.directory)
                return
            except OSError as e:
                logger.warning("keep-alive of lease %x failed: %s", self.id, e)

    async def revoke(self) -> None:
        if self._revoked:
            return
        self._revoked = True
        self._task.cancel()
        self._discovery._leases.discard(self)
        if not self._lost:
            await self._discovery._end_lease(self.id)


@dataclass(eq=False)
class _Watch:
    prefix: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class EmbeddedDiscovery(Discovery):
    """Build it with `await EmbeddedDiscovery.open(directory)`; every client of one directory shares
    one store."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._journal = Journal(directory)  # the replica; used only under self._lock, in a thread
        self._lock = asyncio.Lock()
        self._leases: set[EmbeddedLease] = set()
        self._watches: set[_Watch] = set()
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False

    @classmethod
    async def open(cls, directory: str | os.PathLike) -> EmbeddedDiscovery:
        """Open (creating it if needed) the store in `directory`; TransportError if it cannot."""
        discovery = cls(Path(directory))
        try:
            await asyncio.to_thread(discovery._journal.init)
            await discovery._catch_up()
        except OSError as e:
            raise TransportError(f"embedded discovery: cannot use directory {directory}: {e}") from e
        discovery._task = asyncio.get_running_loop().create_task(discovery._follow(),
                                                                 name="embedded-discovery")
        logger.info("embedded discovery in %s", directory)
        return discovery

    # ------------------------------------------------------------------ Discovery

    async def grant_lease(self, ttl: float) -> Lease:
        self._check_open()
        while True:
            lease_id = secrets.randbits(62) + 1  # positive, and unique for the store's lifetime
            try:
                await asyncio.to_thread(self._journal.create_lease, lease_id, float(ttl))
                break
            except FileExistsError:
                continue
        lease = EmbeddedLease(self, lease_id, float(ttl))
        self._leases.add(lease)
        return lease

    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> None:
        lease_id = lease.id if lease is not None else 0
        journal = self._journal
        await self._write(lambda: [Change(journal.revision + 1, "put", [key], bytes(value), lease_id)],
                          check_lease=lease_id)

    async def delete(self, key: str) -> None:
        # Like etcd, a delete that matches nothing does not advance the revision.
        journal = self._journal
        await self._write(lambda: [Change(journal.revision + 1, "delete", [key])] if key in journal.data
                          else [])

    async def get_prefix(self, prefix: str) -> tuple[list[tuple[str, bytes]], int]:
        self._check_open()
        await self._reap()  # a reader that starts after a crash must not list the dead
        async with self._lock:
            self._emit(await asyncio.to_thread(self._journal.catch_up))
            items = sorted((k, v) for k, (v, _) in self._journal.data.items() if k.startswith(prefix))
            return items, self._journal.revision

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        if self._closed:
            return
        watch = _Watch(prefix)
        async with self._lock:
            journal = self._journal
            self._emit(await asyncio.to_thread(journal.catch_up))
            # Changes up to the header's revision are not in the history (revision 1 carries none).
            first = journal.compact_revision == FIRST_REVISION
            compacted = start_revision <= journal.compact_revision and not first
            if not compacted:
                # Replay and registration happen under the lock: nothing is missed or repeated.
                for event in journal.history:
                    if event.revision >= start_revision and event.key.startswith(prefix):
                        watch.queue.put_nowait(event)
                self._watches.add(watch)
        if compacted:
            yield WatchEvent(WatchEventKind.RESET, "")
            return
        try:
            while True:
                event = await watch.queue.get()
                if event is None:  # closed
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
        for lease in list(self._leases):
            lease._task.cancel()  # keep-alives stop: leases not revoked expire ttl seconds later
        self._leases.clear()
        for watch in self._watches:
            watch.queue.put_nowait(None)
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        async with self._lock:
            self._journal.close()

    async def compact(self) -> None:
        """Rewrite the journal as a snapshot now (it happens by itself every COMPACT_AFTER lines)."""
        self._check_open()
        async with self._lock:
            self._emit(await asyncio.to_thread(self._journal.compact))

    # ------------------------------------------------------------------ writes and leases

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("embedded discovery is closed")

    async def _catch_up(self) -> None:
        async with self._lock:
            self._emit(await asyncio.to_thread(self._journal.catch_up))

    async def _write(self, changes: Callable[[], list[Change]], check_lease: int = 0) -> None:
        """Append what `changes()` returns, computed on the caught-up replica under the file lock."""
        self._check_open()
        async with self._lock:
            self._emit(await asyncio.to_thread(self._journal.append, changes, check_lease))

    async def _end_lease(self, lease_id: int) -> None:
        if self._closed:
            return  # nothing can write any more; the lease expires ttl seconds after its last refresh
        async with self._lock:
            self._emit(await asyncio.to_thread(self._journal.expire, [lease_id], False))

    async def _reap(self) -> None:
        async with self._lock:
            self._emit(await asyncio.to_thread(self._journal.reap))

    # ------------------------------------------------------------------ background: tail and reap

    async def _follow(self) -> None:
        """Catch up whenever the journal changes (or every REAP_INTERVAL), and expire stale leases."""
        changes = watchfiles.awatch(self.directory, stop_event=self._stop, recursive=False,
                                    watch_filter=lambda _, path: Path(path).name == "journal",
                                    debounce=50, step=5, rust_timeout=int(REAP_INTERVAL * 1000),
                                    yield_on_timeout=True)
        while not self._stop.is_set():
            if changes is not None:
                try:
                    await anext(changes)
                except StopAsyncIteration:
                    break
                except Exception as e:  # inotify limits, say: poll instead
                    logger.warning("watching %s failed, polling every %ss instead: %s", self.directory,
                                   REAP_INTERVAL, e)
                    changes = None
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), REAP_INTERVAL)
            if self._stop.is_set():
                break
            try:
                await self._reap()
                await self._catch_up()
            except Exception:  # a bad moment of the file system must not end the follower
                logger.exception("embedded discovery in %s: catch-up failed", self.directory)
                await asyncio.sleep(REAP_INTERVAL)

    def _emit(self, events: list[WatchEvent]) -> None:
        for watch in self._watches:
            for event in events:
                if event.kind == WatchEventKind.RESET or event.key.startswith(watch.prefix):
                    watch.queue.put_nowait(event)
