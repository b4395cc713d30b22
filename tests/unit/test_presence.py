"""runtime/presence.py: which other components on this host use other planes (no sockets)."""

from __future__ import annotations

import logging
import os

import msgspec

from dynamo_lite.runtime import presence
from dynamo_lite.runtime.presence import PresenceBoard, own_record


def record(role="frontend", namespace="dynamo", discovery="etcd", event_plane="nats", **changes):
    mine = own_record(role, namespace, discovery, f"{discovery}-url", event_plane, f"{event_plane}-url")
    return msgspec.structs.replace(mine, **changes)


def write(directory, name, rec):
    (directory / f"{name}.json").write_bytes(msgspec.json.encode(rec))


def test_a_live_worker_on_other_planes_is_reported_once(tmp_path, caplog):
    board = PresenceBoard(tmp_path, record())
    board.publish()
    # Records of other processes (this test's pid stands in for a live one; the file name is theirs).
    write(tmp_path, "1001", record("aggregated", discovery="embedded"))
    write(tmp_path, "1002", record("prefill"))  # same planes
    write(tmp_path, "1003", record("decode", namespace="other", discovery="embedded"))
    write(tmp_path, "1004", record("frontend", discovery="embedded"))  # two frontends do not need each other
    write(tmp_path, "1005", record("decode", event_plane="embedded"))  # KV events would not arrive
    with caplog.at_level(logging.WARNING):
        board.check()
        board.check()  # reported once per process
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "aggregated worker pid" in warnings[0] and "discovery embedded (embedded-url)" in warnings[0]
    assert "this frontend" in warnings[0] and "discovery etcd (etcd-url)" in warnings[0]
    assert "decode worker pid" in warnings[1] and "event plane embedded" in warnings[1]


def test_records_of_dead_processes_are_removed(tmp_path):
    board = PresenceBoard(tmp_path, record("aggregated"))
    board.publish()
    write(tmp_path, "1", record(discovery="embedded", started=1.0))  # pid reused, or long gone
    write(tmp_path, "2", record(discovery="embedded", pid=2 ** 22 + 17))
    (tmp_path / "3.json").write_bytes(b"{broken")
    assert board.others() == []
    assert {p.name for p in tmp_path.iterdir()} == {"3.json", f"{os.getpid()}.json"}
    board.withdraw()
    board.withdraw()  # safe twice
    assert not (tmp_path / f"{os.getpid()}.json").exists()


async def test_the_context_publishes_checks_and_withdraws(tmp_path, caplog):
    write(tmp_path, "1001", record("aggregated", discovery="embedded"))
    with caplog.at_level(logging.WARNING):
        async with presence.presence(tmp_path, record(), interval=0.05) as board:
            assert (tmp_path / f"{os.getpid()}.json").exists()
            import asyncio
            for _ in range(40):
                if caplog.records:
                    break
                await asyncio.sleep(0.05)
    assert any("planes mismatch" in r.getMessage() for r in caplog.records)
    assert not board._path.exists()
