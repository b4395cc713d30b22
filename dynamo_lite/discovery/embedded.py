"""Discovery over a directory on one host: no server, any user, etcd's guarantees.

Layout of the directory (created 0700 if missing):

    journal       append-only history: one JSON line per revision (msgspec `_Change`), the first line
                  a "compacted" header carrying the revision the file starts from
    journal.lock  flock()ed by every writer; the kernel releases it when a writer dies
    leases/ID     one file per live lease: its mtime is the heartbeat, its content the ttl

Why a journal rather than a file per key: etcd's contract is a revision-ordered history (get_prefix
returns the revision of its snapshot, a watch resumes from any later revision, exactly once). With
one journal every client replays the same lines in the same order, so two frontends agree by
construction, a restarted one rebuilds the full state from the file, and a watch is "the lines after
revision R". A line is written by one write() under the lock, so readers see whole changes (a torn
line, from a writer killed mid-write, is terminated by the next writer and skipped by readers).

Leases: the holder touches its lease file every ttl/3. Every client, every REAP_INTERVAL and before
each get_prefix, looks for lease files older than their ttl (or keys whose lease file is gone) and,
under the lock, deletes their keys through the journal (one revision per lease, as etcd does) and
removes the file. So a process killed with SIGKILL disappears for every watcher within its ttl plus
REAP_INTERVAL, as long as any client of the directory runs; the holder finds its file gone and its
lease `lost`.

Compaction: when the journal holds COMPACT_AFTER lines past its header, the writer rewrites it as
a snapshot (header at the current revision + one put per live key) and os.replace()s it. A reader
holding the old file reads it to its end first, so a running watch misses nothing; only a watch asked
to start at or before the snapshot's revision gets RESET.

Each client keeps a replica (keys, history since the file's header) fed by tailing the journal; a
background task wakes on `watchfiles` notifications (inotify) with a short timeout as a fallback, and
fans new changes out to the watches. All file I/O runs in a thread; the replica is only touched under
one asyncio lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import watchfiles

from dynamo_lite.discovery.base import Discovery, Lease, WatchEvent, WatchEventKind
from dynamo_lite.protocol.errors import TransportError

logger = logging.getLogger(__name__)

REAP_INTERVAL = 0.5  # seconds between checks for expired leases (and the wake-up fallback)
COMPACT_AFTER = 10_000  # journal lines past the header before it is rewritten as a snapshot
# ... and not sooner than this after the last rewrite: a reader wakes every REAP_INTERVAL, so only one
# stalled this long can miss a whole journal generation (its watches then get RESET).
MIN_COMPACT_INTERVAL = 10.0
_FIRST_REVISION = 1  # an empty store is at revision 1, as in etcd; no change carries it


class _Change(msgspec.Struct, omit_defaults=True):
    """One journal line: every key it names changes at revision `rev`."""

    rev: int
    kind: str  # "put" | "delete" | "compacted" (header: the file starts at rev)
    keys: list[str] = []
    value: bytes = b""  # base64 in JSON
    lease: int = 0
    at: float = 0.0  # header: when the file was written (time.time())


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Change).decode


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
        path = self._discovery._lease_path(self.id)
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
        self._journal_path = directory / "journal"
        self._lock_path = directory / "journal.lock"
        self._leases_dir = directory / "leases"
        # Replica of the journal; changed only under self._lock (in a thread the lock holder awaits).
        self._data: dict[str, tuple[bytes, int]] = {}  # key -> (value, lease id or 0)
        self._revision = _FIRST_REVISION
        self._history: list[WatchEvent] = []  # the changes after _compact_revision
        self._compact_revision = _FIRST_REVISION
        self._file = None  # the journal we read, kept open across compactions to read it to its end
        self._partial = b""  # bytes of a line not yet terminated
        self._lines = 0  # lines past the header of the file we read
        self._file_time = 0.0  # when that file was written
        self._lock = asyncio.Lock()
        self._leases: set[EmbeddedLease] = set()
        self._lease_ttls: dict[str, float] = {}  # lease file name -> ttl (its content never changes)
        self._watches: set[_Watch] = set()
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False

    @classmethod
    async def open(cls, directory: str | os.PathLike) -> EmbeddedDiscovery:
        """Open (creating it if needed) the store in `directory`; TransportError if it cannot."""
        discovery = cls(Path(directory))
        try:
            await asyncio.to_thread(discovery._init_files)
            async with discovery._lock:
                discovery._emit(await asyncio.to_thread(discovery._catch_up))
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
                await asyncio.to_thread(self._create_lease_file, lease_id, float(ttl))
                break
            except FileExistsError:
                continue
        lease = EmbeddedLease(self, lease_id, float(ttl))
        self._leases.add(lease)
        return lease

    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> None:
        lease_id = lease.id if lease is not None else 0
        await self._write(lambda: [_Change(self._revision + 1, "put", [key], bytes(value), lease_id)],
                          check_lease=lease_id)

    async def delete(self, key: str) -> None:
        # Like etcd, a delete that matches nothing does not advance the revision.
        await self._write(lambda: [_Change(self._revision + 1, "delete", [key])] if key in self._data else [])

    async def get_prefix(self, prefix: str) -> tuple[list[tuple[str, bytes]], int]:
        self._check_open()
        await self._reap()  # a reader that starts after a crash must not list the dead
        async with self._lock:
            self._emit(await asyncio.to_thread(self._catch_up))
            items = sorted((k, v) for k, (v, _) in self._data.items() if k.startswith(prefix))
            return items, self._revision

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        if self._closed:
            return
        watch = _Watch(prefix)
        async with self._lock:
            self._emit(await asyncio.to_thread(self._catch_up))
            # Changes up to the header's revision are not in the history (revision 1 carries none).
            compacted = start_revision <= self._compact_revision and self._compact_revision != _FIRST_REVISION
            if not compacted:
                # Replay and registration happen under the lock: nothing is missed or repeated.
                for event in self._history:
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
            if self._file is not None:
                self._file.close()
                self._file = None

    async def compact(self) -> None:
        """Rewrite the journal as a snapshot now (it happens by itself every COMPACT_AFTER lines)."""
        self._check_open()
        async with self._lock:
            self._emit(await asyncio.to_thread(self._compact_locked))

    # ------------------------------------------------------------------ writes and leases

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("embedded discovery is closed")

    def _lease_path(self, lease_id: int) -> Path:
        return self._leases_dir / f"{lease_id:016x}"

    async def _write(self, changes, check_lease: int = 0) -> None:
        """Append what `changes()` returns, computed on the caught-up replica under the file lock."""
        self._check_open()
        async with self._lock:
            events = await asyncio.to_thread(self._append, changes, check_lease)
            self._emit(events)

    async def _end_lease(self, lease_id: int) -> None:
        if self._closed:
            return  # nothing can write any more; the lease expires ttl seconds after its last refresh
        async with self._lock:
            self._emit(await asyncio.to_thread(self._expire, [lease_id], False))

    async def _reap(self) -> None:
        async with self._lock:
            self._emit(await asyncio.to_thread(self._reap_stale))

    # ------------------------------------------------------------------ background: tail and reap

    async def _follow(self) -> None:
        """Catch up whenever the journal changes (or every REAP_INTERVAL), and expire stale leases."""
        changes = watchfiles.awatch(self.directory, stop_event=self._stop, recursive=False,
                                    watch_filter=lambda _, path: Path(path).name == "journal",
                                    debounce=50, step=5, rust_timeout=int(REAP_INTERVAL * 1000),
                                    yield_on_timeout=True)
        while not self._stop.is_set():
            try:
                if changes is not None:
                    await anext(changes)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), REAP_INTERVAL)
                if self._stop.is_set():
                    break
                await self._reap()
                async with self._lock:
                    self._emit(await asyncio.to_thread(self._catch_up))
            except StopAsyncIteration:
                break
            except Exception as e:  # a file watcher can fail (inotify limits): fall back to polling
                if changes is not None:
                    logger.warning("watching %s failed, polling every %ss instead: %s", self.directory,
                                   REAP_INTERVAL, e)
                    changes = None
                else:
                    logger.exception("embedded discovery in %s: catch-up failed", self.directory)
                    await asyncio.sleep(REAP_INTERVAL)

    def _emit(self, events: list[WatchEvent]) -> None:
        for watch in self._watches:
            for event in events:
                if event.kind == WatchEventKind.RESET or event.key.startswith(watch.prefix):
                    watch.queue.put_nowait(event)

    # ------------------------------------------------------------------ file I/O (in a thread)

    @contextlib.contextmanager
    def _file_lock(self):
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _init_files(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._leases_dir.mkdir(mode=0o700, exist_ok=True)
        with self._file_lock():
            if not self._journal_path.exists():
                self._replace_journal([_Change(_FIRST_REVISION, "compacted", at=time.time())])

    def _create_lease_file(self, lease_id: int, ttl: float) -> None:
        with open(self._lease_path(lease_id), "x") as f:
            f.write(f"{ttl}\n")

    def _replace_journal(self, changes: list[_Change]) -> None:
        tmp = self._journal_path.with_name(f"journal.{os.getpid()}.tmp")
        tmp.write_bytes(b"".join(_encode(c) + b"\n" for c in changes))
        os.replace(tmp, self._journal_path)

    def _catch_up(self) -> list[WatchEvent]:
        """Apply the journal's new lines to the replica, following a compaction to the new file."""
        if self._file is None:  # the first read: start from the file's snapshot
            return self._open_journal(initial=True) + self._catch_up()
        events = self._apply_lines(self._file.read())
        try:
            replaced = os.fstat(self._file.fileno()).st_ino != os.stat(self._journal_path).st_ino
        except FileNotFoundError:
            replaced = False  # never happens: os.replace() swaps the name atomically
        if replaced:
            # Compacted: read the old file to its end (no writer appends to it any more), go on in the new.
            events += self._apply_lines(self._file.read())
            self._file.close()
            events += self._open_journal(initial=False)
            events += self._catch_up()
        return events

    def _open_journal(self, initial: bool) -> list[WatchEvent]:
        """Open the journal and read its header; load its snapshot if the replica is older than it."""
        self._file = open(self._journal_path, "rb")
        self._partial, self._lines = b"", 0
        header = _decode(self._file.readline())
        if header.kind != "compacted":
            raise TransportError(f"{self._journal_path}: the first line is not a header")
        events = []
        if initial or header.rev > self._revision:
            if not initial:  # several compactions since we last read: the changes between are gone
                logger.warning("embedded discovery %s: journal compacted past our revision %s",
                               self.directory, self._revision)
                events.append(WatchEvent(WatchEventKind.RESET, ""))
            self._data, self._revision = {}, header.rev
            while True:  # the snapshot: a put per live key at the header's revision
                start = self._file.tell()
                line = self._file.readline()
                change = self._parse(line) if line.endswith(b"\n") else None
                if change is None or change.rev > header.rev or change.kind != "put":
                    self._file.seek(start)
                    break
                self._data[change.keys[0]] = (change.value, change.lease)
        # else the snapshot lines are at or below our revision: _apply_lines skips them.
        self._compact_revision, self._file_time = header.rev, header.at
        self._history = [e for e in self._history if e.revision > header.rev]
        return events

    def _parse(self, line: bytes) -> _Change | None:
        try:
            return _decode(line)
        except msgspec.DecodeError:
            logger.warning("embedded discovery %s: skipping a torn journal line", self.directory)
            return None

    def _apply_lines(self, data: bytes) -> list[WatchEvent]:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        events = []
        for line in lines:
            self._lines += 1
            change = self._parse(line)
            if change is None or change.rev <= self._revision:
                continue
            self._revision = change.rev
            for key in change.keys:
                if change.kind == "put":
                    self._data[key] = (change.value, change.lease)
                    events.append(WatchEvent(WatchEventKind.PUT, key, change.value, change.rev))
                else:
                    self._data.pop(key, None)
                    events.append(WatchEvent(WatchEventKind.DELETE, key, b"", change.rev))
        self._history += events
        return events

    def _append(self, changes, check_lease: int) -> list[WatchEvent]:
        with self._file_lock():
            events = self._catch_up()
            if check_lease and not self._lease_path(check_lease).exists():
                raise TransportError(f"embedded discovery: lease {check_lease:x} not found")
            return events + self._append_locked(changes())

    def _append_locked(self, changes: list[_Change]) -> list[WatchEvent]:
        """Append `changes` (caller holds the file lock and is caught up) and apply them."""
        if not changes:
            return []
        data = b"".join(_encode(c) + b"\n" for c in changes)
        if self._partial:
            data = b"\n" + data  # end the line a killed writer left unfinished
        with open(self._journal_path, "ab") as journal:
            journal.write(data)
        events = self._apply_lines(self._file.read())
        if (self._lines > COMPACT_AFTER and self._lines > 2 * len(self._data)
                and time.time() - self._file_time >= MIN_COMPACT_INTERVAL):
            self._compact()
        return events

    def _compact_locked(self) -> list[WatchEvent]:
        with self._file_lock():
            events = self._catch_up()
            self._compact()
            return events

    def _compact(self) -> None:
        snapshot = [_Change(self._revision, "compacted", at=time.time())] + [
            _Change(self._revision, "put", [key], value, lease) for key, (value, lease) in self._data.items()]
        self._replace_journal(snapshot)
        logger.debug("embedded discovery %s: compacted at revision %s", self.directory, self._revision)
        self._catch_up()

    def _reap_stale(self) -> list[WatchEvent]:
        """Expire leases whose file is older than its ttl, and the leases of keys whose file is gone."""
        now = time.time()
        stale, present = [], set()
        for entry in os.scandir(self._leases_dir):
            try:
                ttl = self._lease_ttls.get(entry.name)
                if ttl is None:
                    ttl = self._lease_ttls[entry.name] = float(Path(entry.path).read_text())
                lease_id = int(entry.name, 16)
                present.add(lease_id)
                if now - entry.stat().st_mtime > ttl:
                    stale.append(lease_id)
            except (OSError, ValueError):
                continue  # removed meanwhile, or being written
        orphans = {lease for _, lease in self._data.values() if lease and lease not in present}
        return self._expire(stale + sorted(orphans), True) if stale or orphans else []

    def _expire(self, lease_ids: list[int], only_stale: bool) -> list[WatchEvent]:
        """Delete the keys of each lease (one revision per lease) and its file, under the file lock."""
        now = time.time()
        with self._file_lock():
            events = self._catch_up()
            for lease_id in lease_ids:
                path = self._lease_path(lease_id)
                try:
                    if only_stale and now - path.stat().st_mtime <= self._lease_ttls.get(path.name, 0):
                        continue  # refreshed since we looked
                    path.unlink()
                except FileNotFoundError:
                    pass  # expired by another client, or an orphan: delete its keys all the same
                self._lease_ttls.pop(path.name, None)
                keys = sorted(k for k, (_, owner) in self._data.items() if owner == lease_id)
                if keys:
                    if only_stale:
                        logger.info("lease %x expired: deleting %s", lease_id, ", ".join(keys))
                    events += self._append_locked([_Change(self._revision + 1, "delete", keys)])
            return events
