"""Presence records: every component on this host says which planes it uses, so that a mismatch shows.

A frontend on etcd and a worker on embedded discovery (or the reverse) never see each other, and the
frontend would only answer "no workers". So every component, whatever its planes, writes a small record
(pid, role, namespace, planes) into DIR/presence/PID.json, DIR being the default embedded directory of
this user (always that one, so that components on different planes still meet there), and every
CHECK_INTERVAL seconds reads the others'. For each live process of the other side (a frontend for a
worker, a worker for a frontend) in the same namespace whose discovery or event plane differs from
ours, it logs one WARNING naming that process and both planes. Records of processes that are gone
(pid not running, or running a younger process) are removed by whoever finds them.

It costs one small file per process and a directory listing every few seconds; it never fails its
component (an unreadable directory only skips the check).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import psutil

logger = logging.getLogger(__name__)

CHECK_INTERVAL = 2.0
FRONTEND = "frontend"


class PresenceRecord(msgspec.Struct, frozen=True):
    pid: int
    started: float  # the process's start time (psutil): tells a reused pid from the recorded process
    role: str  # "frontend", or a worker's role (aggregated, prefill, decode)
    namespace: str
    discovery: str  # "etcd" | "embedded"
    discovery_url: str
    event_plane: str  # "nats" | "embedded" | "none"
    event_plane_url: str

    def what(self) -> str:
        return FRONTEND if self.role == FRONTEND else f"{self.role} worker"

    def planes(self) -> str:
        return (f"discovery {self.discovery} ({self.discovery_url}), event plane {self.event_plane}"
                f" ({self.event_plane_url or 'none'})")


_decoder = msgspec.json.Decoder(PresenceRecord)


def own_record(role: str, namespace: str, discovery: str, discovery_url: str, event_plane: str,
               event_plane_url: str) -> PresenceRecord:
    return PresenceRecord(os.getpid(), psutil.Process().create_time(), role, namespace, discovery,
                          discovery_url, event_plane, event_plane_url)


def _alive(record: PresenceRecord) -> bool:
    try:
        return abs(psutil.Process(record.pid).create_time() - record.started) < 1.0
    except psutil.Error:  # no such process, or not ours to inspect
        return False


class PresenceBoard:
    """This process's record in `directory` and the check of the others'."""

    def __init__(self, directory: str | os.PathLike, record: PresenceRecord):
        self.directory = Path(directory)
        self.record = record
        self._path = self.directory / f"{record.pid}.json"
        self._warned: set[PresenceRecord] = set()

    def publish(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(self.record))
        os.replace(tmp, self._path)  # readers never see half a record

    def withdraw(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    def others(self) -> list[PresenceRecord]:
        """The live records of other processes; the dead ones' files are removed."""
        found = []
        for path in self.directory.glob("*.json"):
            if path == self._path:
                continue
            try:
                other = _decoder.decode(path.read_bytes())
            except (OSError, msgspec.DecodeError):
                continue  # gone meanwhile, or not ours
            if _alive(other):
                found.append(other)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return found

    def mismatches(self) -> list[PresenceRecord]:
        """Live processes of the other side, same namespace, other planes, not reported yet."""
        me, found = self.record, []
        for other in self.others():
            if ((me.role == FRONTEND) == (other.role == FRONTEND) or other.namespace != me.namespace
                    or (other.discovery, other.event_plane) == (me.discovery, me.event_plane)):
                continue
            if other not in self._warned:
                self._warned.add(other)
                found.append(other)
        return found

    def check(self) -> None:
        me = self.record
        for other in self.mismatches():
            logger.warning(
                "planes mismatch: %s pid %s in namespace %s uses %s, but this %s (pid %s) uses %s: they "
                "cannot see each other. Give both the same --discovery / --event-plane (or the same "
                "ETCD_ENDPOINTS / NATS_SERVER)", other.what(), other.pid, me.namespace, other.planes(),
                me.what(), me.pid, me.planes())


@contextlib.asynccontextmanager
async def presence(directory: str | os.PathLike, record: PresenceRecord,
                   interval: float | None = None) -> AsyncIterator[PresenceBoard]:
    """Publish `record` in `directory` and check the others every `interval` seconds until the block ends."""
    board = PresenceBoard(directory, record)
    every = CHECK_INTERVAL if interval is None else interval

    async def check_forever() -> None:
        while True:
            try:
                await asyncio.to_thread(board.check)
            except OSError as e:
                logger.debug("presence check in %s failed: %s", directory, e)
            await asyncio.sleep(every)

    try:
        await asyncio.to_thread(board.publish)
    except OSError as e:
        logger.warning("cannot write a presence record in %s (planes mismatches will not be reported): %s",
                       directory, e)
        yield board
        return
    task = asyncio.get_running_loop().create_task(check_forever(), name="presence-check")
    try:
        yield board
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(board.withdraw)
