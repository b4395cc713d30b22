"""EmbeddedDiscovery across processes, and its journal (discovery/journal.py): compaction, torn lines,
expiry of stalled leases.

The invariants it shares with memory and etcd are in test_discovery_conformance.py. Here other processes
(tests/integration/discovery_child.py) hold leases and watch, as workers and frontends do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from dynamo_lite.discovery import embedded, journal
from dynamo_lite.discovery.embedded import EmbeddedDiscovery
from dynamo_lite.protocol.errors import TransportError

CHILD = str(Path(__file__).with_name("discovery_child.py"))
TTL = 1.5


@contextlib.asynccontextmanager
async def child(*args: str):
    """A discovery_child.py process; killed (by its pid) when the block ends."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = await asyncio.create_subprocess_exec(sys.executable, CHILD, *args, env=env,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def read_line(proc, timeout: float = 15.0):
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    assert line, "the child process ended early"
    return line.decode().strip()


@contextlib.asynccontextmanager
async def opened(directory):
    discovery = await EmbeddedDiscovery.open(directory)
    try:
        yield discovery
    finally:
        await discovery.close()


async def test_a_killed_lease_holder_vanishes_within_its_ttl_for_a_watcher_elsewhere(tmp_path):
    async with opened(tmp_path) as observer, child("hold", str(tmp_path), "/ns/w", str(TTL)) as worker:
        assert await read_line(worker) == "ready"
        items, revision = await observer.get_prefix("/ns/")
        assert items == [("/ns/w", b"held")]
        await asyncio.sleep(TTL * 1.5)  # its keep-alive holds it past the ttl
        assert (await observer.get_prefix("/ns/"))[0] == [("/ns/w", b"held")]
        async with contextlib.aclosing(observer.watch_prefix("/ns/", revision + 1)) as stream:
            os.kill(worker.pid, signal.SIGKILL)
            killed = time.monotonic()
            event = await asyncio.wait_for(anext(stream), TTL + 3)
            assert (event.kind, event.key) == ("delete", "/ns/w")
            assert time.monotonic() - killed <= TTL + embedded.REAP_INTERVAL + 0.5
    assert not list((tmp_path / "leases").iterdir())  # the dead lease's file went with its keys


async def test_two_watcher_processes_see_the_same_sequence(tmp_path):
    async with opened(tmp_path) as writer:
        await writer.put("/ns/before", b"0")
        async with child("watch", str(tmp_path), "/ns/", "5") as a, \
                child("watch", str(tmp_path), "/ns/", "5") as b:
            snapshots = [json.loads(await read_line(a)), json.loads(await read_line(b))]
            assert snapshots[0]["snapshot"] == snapshots[1]["snapshot"] == ["/ns/before"]
            revision = snapshots[0]["revision"]
            lease = await writer.grant_lease(10)
            await writer.put("/ns/x", b"1", lease)
            await writer.put("/ns/y", b"2", lease)
            await writer.put("/elsewhere", b"-")
            await writer.delete("/ns/before")
            await lease.revoke()
            seen = [[json.loads(await read_line(p)) for _ in range(5)] for p in (a, b)]
    expected = [["put", "/ns/x", "1", revision + 1], ["put", "/ns/y", "2", revision + 2],
                ["delete", "/ns/before", "", revision + 4], ["delete", "/ns/x", "", revision + 5],
                ["delete", "/ns/y", "", revision + 5]]
    assert seen[0] == seen[1] == expected


async def test_a_restarted_reader_sees_the_keys_already_there(tmp_path):
    async with child("hold", str(tmp_path), "/ns/w", "10") as worker:
        assert await read_line(worker) == "ready"
        for _ in range(2):  # the reader starts, goes away, starts again
            async with child("watch", str(tmp_path), "/ns/", "0") as reader:
                assert json.loads(await read_line(reader))["snapshot"] == ["/ns/w"]


async def test_the_store_outlives_its_clients(tmp_path):
    async with opened(tmp_path) as d:
        await d.put("/ns/kept", b"1")
        lease = await d.grant_lease(TTL)
        await d.put("/ns/leased", b"2", lease)
    async with opened(tmp_path) as again:  # nobody ran in between: the lease expires on the next read
        assert (await again.get_prefix("/ns/"))[0] == [("/ns/kept", b"1"), ("/ns/leased", b"2")]
        await asyncio.sleep(TTL + 0.2)
        assert (await again.get_prefix("/ns/"))[0] == [("/ns/kept", b"1")]


async def test_the_directory_is_created_private(tmp_path):
    directory = tmp_path / "a" / "b"
    async with opened(directory):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


async def test_compaction_keeps_running_watches_whole_and_bounds_the_journal(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "COMPACT_AFTER", 20)
    monkeypatch.setattr(journal, "MIN_COMPACT_INTERVAL", 0.0)
    async with opened(tmp_path) as writer, opened(tmp_path) as reader:
        _, revision = await reader.get_prefix("/ns/")
        events = []
        async with contextlib.aclosing(reader.watch_prefix("/ns/", revision + 1)) as stream:
            for i in range(100):  # the reader's watch is in the same journal generation at each write
                await writer.put(f"/ns/k{i % 5}", str(i).encode())
                events.append(await asyncio.wait_for(anext(stream), 5))
        assert [(e.key, e.value, e.revision) for e in events] == [
            (f"/ns/k{i % 5}", str(i).encode(), revision + 1 + i) for i in range(100)]
        assert len((tmp_path / "journal").read_bytes().splitlines()) <= 20 + 2
        items, now = await reader.get_prefix("/ns/")
        assert items == [(f"/ns/k{i}", str(95 + i).encode()) for i in range(5)] and now == revision + 100
        async with contextlib.aclosing(reader.watch_prefix("/ns/", revision + 1)) as behind:
            assert (await anext(behind)).kind == "reset"  # its start was compacted away
    async with opened(tmp_path) as fresh:  # a new client starts from the snapshot
        assert await fresh.get_prefix("/ns/") == (items, now)


async def test_a_torn_line_is_skipped(tmp_path):
    async with opened(tmp_path) as writer, opened(tmp_path) as reader:
        await writer.put("/ns/a", b"1")
        with open(tmp_path / "journal", "ab") as journal:
            journal.write(b'{"rev": 99, "kind": "put", "ke')  # a writer killed mid-line
        await writer.put("/ns/b", b"2")
        items, _ = await reader.get_prefix("/ns/")
        assert items == [("/ns/a", b"1"), ("/ns/b", b"2")]


async def test_a_stalled_holder_loses_its_lease_to_another_client(tmp_path):
    async with opened(tmp_path) as holder, opened(tmp_path) as other:
        lease = await holder.grant_lease(3)
        await holder.put("/ns/w", b"v", lease)
        path = tmp_path / "leases" / f"{lease.id:016x}"
        old = time.time() - 10
        os.utime(path, (old, old))  # as if its keep-alive had not run for 10 s
        assert (await other.get_prefix("/ns/"))[0] == []
        deadline = time.monotonic() + 3
        while not lease.lost and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert lease.lost
        with pytest.raises(TransportError, match="not found"):
            await holder.put("/ns/w", b"again", lease)
        await lease.revoke()  # nothing left to revoke: no error
