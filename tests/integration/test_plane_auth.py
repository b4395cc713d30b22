"""The plane secret (transport/auth.py) on the request plane and on the embedded event plane's links, in
one process over loopback TCP: peers with the secret are served; a peer without it, with another one, or a
raw TCP client gets no generation, a clear error, and the listener logs the refusal."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from dynamo_lite import planes
from dynamo_lite.discovery.memory import MemoryDiscovery
from dynamo_lite.events.embedded import EmbeddedEventBus
from dynamo_lite.protocol.errors import ConfigError, WorkerFailedError
from dynamo_lite.protocol.messages import ErrorFrame, GenerateFrame, reply_decoder
from dynamo_lite.transport.auth import PlaneAuth
from dynamo_lite.transport.client import RequestClient
from dynamo_lite.transport.framing import encode_frame, read_frame
from dynamo_lite.transport.server import RequestServer
from tests.integration.test_embedded_bus import received_within
from tests.integration.test_transport import counting_handler, generate

SECRET = b"0123456789abcdef-the-shared-one"
OTHER = b"0123456789abcdef-another-secret"
WAIT = 5.0


@contextlib.asynccontextmanager
async def worker(secret: bytes | None):
    """A request-plane server with `secret` (None: none) that counts the requests it runs."""
    ran = []

    async def handler(request):
        ran.append(request)
        async for frame in counting_handler(request):
            yield frame

    server = RequestServer(handler, "127.0.0.1", 0, auth=PlaneAuth(secret, "request") if secret else None)
    port = await server.start()
    try:
        yield f"127.0.0.1:{port}", ran
    finally:
        await server.close()


async def generation(address: str, secret: bytes | None) -> list:
    client = RequestClient(connect_timeout=2.0, auth=PlaneAuth(secret, "request") if secret else None)
    try:
        async with asyncio.timeout(WAIT):
            return [frame async for frame in client.stream(address, generate("r1", max_tokens=3))]
    finally:
        await client.close()


async def test_peers_with_the_same_secret_are_served_and_reuse_the_connection():
    async with worker(SECRET) as (address, ran):
        client = RequestClient(connect_timeout=2.0, auth=PlaneAuth(SECRET, "request"))
        try:
            for _ in range(2):
                frames = [f async for f in client.stream(address, generate("r", max_tokens=3))]
                assert [f.token_ids for f in frames] == [[0], [1], [2]]
            assert len(client._idle[address]) == 1  # one authenticated connection, pooled
        finally:
            await client.close()
        assert len(ran) == 2


async def test_a_wrong_secret_is_refused_both_ways_and_logged(caplog):
    caplog.set_level(logging.WARNING)
    async with worker(SECRET) as (address, ran):
        with pytest.raises(WorkerFailedError, match="refused our plane secret: the secrets differ"):
            await generation(address, OTHER)
        assert not ran
    assert any("refused the connection" in r.message and "wrong plane secret" in r.message
               for r in caplog.records), caplog.text
    assert OTHER.decode() not in caplog.text and SECRET.decode() not in caplog.text


async def test_a_client_without_the_secret_gets_an_error_frame_naming_the_option(caplog):
    caplog.set_level(logging.WARNING)
    async with worker(SECRET) as (address, ran):
        frames = await generation(address, None)
        assert len(frames) == 1 and isinstance(frames[0], ErrorFrame) and frames[0].status == 503
        assert "--plane-secret-file" in frames[0].message
        assert not ran
    assert "presented no plane secret" in caplog.text


async def test_a_raw_tcp_client_gets_no_generation():
    async with worker(SECRET) as (address, ran):
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(encode_frame(generate("raw", max_tokens=3)))
            async with asyncio.timeout(WAIT):
                first = await read_frame(reader)
                assert await read_frame(reader) is None  # then the worker hangs up
        finally:
            writer.close()
        reply = reply_decoder.decode(first)
        assert isinstance(reply, ErrorFrame) and not isinstance(reply, GenerateFrame)
        assert not ran


async def test_a_client_with_a_secret_refuses_a_worker_without_one():
    async with worker(None) as (address, ran):
        with pytest.raises(WorkerFailedError, match="runs without one"):
            await generation(address, SECRET)
        assert not ran


async def test_no_secret_on_either_side_serves_as_before():
    async with worker(None) as (address, ran):
        assert len(await generation(address, None)) == 3


async def test_embedded_buses_link_only_with_the_same_secret(caplog):
    caplog.set_level(logging.WARNING)
    discovery = MemoryDiscovery()
    started = []
    try:
        for secret in (SECRET, SECRET, OTHER):
            started.append(await EmbeddedEventBus.connect(discovery, namespace="auth", settle_timeout=1.0,
                                                          auth=PlaneAuth(secret, "events")))
        publisher, friend, stranger = started
        mine, theirs = await friend.subscribe("kv"), await stranger.subscribe("kv")
        await publisher.publish("kv", b"hello")
        assert await received_within(mine, WAIT) == [b"hello"]
        assert await received_within(theirs, 0.5) == []
    finally:
        for bus in started:
            await bus.close()
        await discovery.close()
    assert "events plane: refused the connection" in caplog.text


def test_the_secret_comes_from_a_file_or_the_environment(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.decode() + "\n")
    config = planes.PlaneOptions(plane_secret_file=str(secret_file))
    config._resolve_planes(env={})
    assert config.credentials.plane_secret == SECRET  # without the newline
    assert SECRET.decode() not in repr(config)
    env_config = planes.PlaneOptions()
    env_config._resolve_planes(env={planes.PLANE_SECRET_ENV: SECRET.decode()})
    assert env_config.credentials.request_auth() is not None
    none = planes.PlaneOptions()
    none._resolve_planes(env={})
    assert none.credentials.request_auth() is None and none.credentials.events_auth() is None
    with pytest.raises(ConfigError, match="--plane-secret-file .*cannot read"):
        planes.PlaneOptions(plane_secret_file=str(tmp_path / "missing"))._resolve_planes(env={})
    with pytest.raises(ConfigError, match="at least 16"):
        planes.PlaneOptions()._resolve_planes(env={planes.PLANE_SECRET_ENV: "short"})
