"""The journal of an EmbeddedDiscovery directory and one client's replica of it (no asyncio: the
async side, discovery/embedded.py, calls these methods in a thread, one at a time).

Layout of the directory (created 0700 if missing):

    journal       append-only history: one JSON line per revision (`Change`), the first line a "compacted"
                  header carrying the revision the file starts from, followed by its snapshot
    journal.lock  flock()ed by every writer; the kernel releases it when a writer dies
    leases/ID     one file per live lease: its mtime is the heartbeat, its content the ttl

A line is written by one write() under the lock, so readers see whole changes; a torn line (a writer
killed mid-write) is terminated by the next writer and skipped by readers. Compaction rewrites the
journal as a snapshot (header at the current revision + one put per live key) and os.replace()s it; a
reader holding the old file reads it to its end before it moves to the new one, so it misses nothing
unless two compactions pass between two of its reads (MIN_COMPACT_INTERVAL makes that a stall of
many seconds): then its watches get RESET.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from dynamo_lite.discovery.base import WatchEvent, WatchEventKind
from dynamo_lite.protocol.errors import TransportError

logger = logging.getLogger(__name__)

COMPACT_AFTER = 10_000  # journal lines past the header before it is rewritten as a snapshot
# ... and not sooner than this after the last rewrite: a reader catches up at least every
# REAP_INTERVAL (embedded.py), so only one stalled this long can miss a whole journal generation.
MIN_COMPACT_INTERVAL = 10.0
FIRST_REVISION = 1  # an empty store is at revision 1, as in etcd; no change carries it


class Change(msgspec.Struct, omit_defaults=True):
    """One journal line: every key it names changes at revision `rev`."""

    rev: int
    kind: str  # "put" | "delete" | "compacted" (header: the file starts at rev)
    keys: list[str] = []
    value: bytes = b""  # base64 in JSON
    lease: int = 0
    at: float = 0.0  # header: when the file was written (time.time())


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Change).decode


class Journal:
    """The directory's files and this client's replica: keys, revision, history since the header."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._journal_path = directory / "journal"
        self._lock_path = directory / "journal.lock"
        self._leases_dir = directory / "leases"
        self.data: dict[str, tuple[bytes, int]] = {}  # key -> (value, lease id or 0)
        self.revision = FIRST_REVISION
        self.history: list[WatchEvent] = []  # the changes after compact_revision
        self.compact_revision = FIRST_REVISION
        self._file = None  # the journal we read, kept open across compactions to read it to its end
        self._partial = b""  # bytes of a line not yet terminated
        self._lines = 0  # lines past the header of the file we read
        self._file_time = 0.0  # when that file was written
        self._lease_ttls: dict[str, float] = {}  # lease file name -> ttl (its content never changes)

    def lease_path(self, lease_id: int) -> Path:
        return self._leases_dir / f"{lease_id:016x}"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @contextlib.contextmanager
    def _file_lock(self):
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def init(self) -> None:
        """Create the directory and an empty journal (revision 1) if they are missing."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = self.directory.stat().st_uid
        if owner != os.getuid():  # whoever owns it can read and rewrite what we register
            logger.warning("embedded discovery directory %s belongs to uid %s, not to this user (%s)",
                           self.directory, owner, os.getuid())
        self._leases_dir.mkdir(mode=0o700, exist_ok=True)
        with self._file_lock():
            if not self._journal_path.exists():
                self._replace_journal([Change(FIRST_REVISION, "compacted", at=time.time())])

    def create_lease(self, lease_id: int, ttl: float) -> None:
        with open(self.lease_path(lease_id), "x") as f:
            f.write(f"{ttl}\n")

    def _replace_journal(self, changes: list[Change]) -> None:
        tmp = self._journal_path.with_name(f"journal.{os.getpid()}.tmp")
        tmp.write_bytes(b"".join(_encode(c) + b"\n" for c in changes))
        os.replace(tmp, self._journal_path)

    def catch_up(self) -> list[WatchEvent]:
        """Apply the journal's new lines to the replica, following a compaction to the new file."""
        if self._file is None:  # the first read: start from the file's snapshot
            return self._open_journal(initial=True) + self.catch_up()
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
            events += self.catch_up()
        return events

    def _open_journal(self, initial: bool) -> list[WatchEvent]:
        """Open the journal and read its header; load its snapshot if the replica is older than it."""
        self._file = open(self._journal_path, "rb")
        self._partial, self._lines = b"", 0
        header = _decode(self._file.readline())
        if header.kind != "compacted":
            raise TransportError(f"{self._journal_path}: the first line is not a header")
        events = []
        if initial or header.rev > self.revision:
            if not initial:  # several compactions since we last read: the changes between are gone
                logger.warning("embedded discovery %s: journal compacted past our revision %s",
                               self.directory, self.revision)
                events.append(WatchEvent(WatchEventKind.RESET, ""))
            self.data, self.revision = {}, header.rev
            while True:  # the snapshot: a put per live key at the header's revision
                start = self._file.tell()
                line = self._file.readline()
                change = self._parse(line) if line.endswith(b"\n") else None
                if change is None or change.rev > header.rev or change.kind != "put":
                    self._file.seek(start)
                    break
                self.data[change.keys[0]] = (change.value, change.lease)
        # else the snapshot lines are at or below our revision: _apply_lines skips them.
        self.compact_revision, self._file_time = header.rev, header.at
        self.history = [e for e in self.history if e.revision > header.rev]
        return events

    def _parse(self, line: bytes) -> Change | None:
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
            if change is None or change.rev <= self.revision:
                continue
            self.revision = change.rev
            for key in change.keys:
                if change.kind == "put":
                    self.data[key] = (change.value, change.lease)
                    events.append(WatchEvent(WatchEventKind.PUT, key, change.value, change.rev))
                else:
                    self.data.pop(key, None)
                    events.append(WatchEvent(WatchEventKind.DELETE, key, b"", change.rev))
        self.history += events
        return events

    def append(self, changes: Callable[[], list[Change]], check_lease: int) -> list[WatchEvent]:
        """Append what `changes()` returns, computed on the caught-up replica under the file lock (a
        TransportError if `check_lease` is not live)."""
        with self._file_lock():
            events = self.catch_up()
            if check_lease and not self.lease_path(check_lease).exists():
                raise TransportError(f"embedded discovery: lease {check_lease:x} not found")
            return events + self._append_locked(changes())

    def _append_locked(self, changes: list[Change]) -> list[WatchEvent]:
        """Append `changes` (caller holds the file lock and is caught up) and apply them."""
        if not changes:
            return []
        data = b"".join(_encode(c) + b"\n" for c in changes)
        if self._partial:
            data = b"\n" + data  # end the line a killed writer left unfinished
        with open(self._journal_path, "ab") as journal:
            journal.write(data)
        events = self._apply_lines(self._file.read())
        if (self._lines > COMPACT_AFTER and self._lines > 2 * len(self.data)
                and time.time() - self._file_time >= MIN_COMPACT_INTERVAL):
            self._rewrite()
        return events

    def compact(self) -> list[WatchEvent]:
        """Rewrite the journal as a snapshot now."""
        with self._file_lock():
            events = self.catch_up()
            self._rewrite()
            return events

    def _rewrite(self) -> None:
        snapshot = [Change(self.revision, "compacted", at=time.time())] + [
            Change(self.revision, "put", [key], value, lease) for key, (value, lease) in self.data.items()]
        self._replace_journal(snapshot)
        logger.debug("embedded discovery %s: compacted at revision %s", self.directory, self.revision)
        self.catch_up()

    def reap(self) -> list[WatchEvent]:
        """Expire leases whose file is older than its ttl, and the leases of keys whose file is gone."""
        now = time.time()
        stale, present = [], set()
        for entry in os.scandir(self._leases_dir):
            try:
                lease_id = int(entry.name, 16)
                present.add(lease_id)
                ttl = self._lease_ttls.get(entry.name)
                if ttl is None:
                    ttl = self._lease_ttls[entry.name] = float(Path(entry.path).read_text())
                if now - entry.stat().st_mtime > ttl:
                    stale.append(lease_id)
            except (OSError, ValueError):
                continue  # removed meanwhile, or being written
        self._lease_ttls = {name: ttl for name, ttl in self._lease_ttls.items() if int(name, 16) in present}
        orphans = {lease for _, lease in self.data.values() if lease and lease not in present}
        return self.expire(stale + sorted(orphans), True) if stale or orphans else []

    def expire(self, lease_ids: list[int], only_stale: bool) -> list[WatchEvent]:
        """Delete the keys of each lease (one revision per lease) and its file, under the file lock."""
        now = time.time()
        with self._file_lock():
            events = self.catch_up()
            for lease_id in lease_ids:
                path = self.lease_path(lease_id)
                try:
                    if only_stale and now - path.stat().st_mtime <= self._lease_ttls.get(path.name, 0):
                        continue  # refreshed since we looked
                    path.unlink()
                except FileNotFoundError:
                    pass  # expired by another client, or an orphan: delete its keys all the same
                self._lease_ttls.pop(path.name, None)
                keys = sorted(k for k, (_, owner) in self.data.items() if owner == lease_id)
                if keys:
                    if only_stale:
                        logger.info("lease %x expired: deleting %s", lease_id, ", ".join(keys))
                    events += self._append_locked([Change(self.revision + 1, "delete", keys)])
            return events
