"""NatsEventBus against a real nats-server: what only NATS has (the EventBus contract itself, on every
implementation, is in test_event_bus.py)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from dynamo_lite.events.nats import NatsEventBus
from dynamo_lite.protocol.errors import TransportError
from tests.services import free_tcp_port, start_nats


def unique_subject(name: str) -> str:
    return f"t{uuid.uuid4().hex[:8]}.{name}"


@contextlib.asynccontextmanager
async def connected(url: str):
    bus = await NatsEventBus.connect(url)
    try:
        yield bus
    finally:
        await bus.close()


async def receive(subscription, count: int, timeout: float) -> list[bytes]:
    received = []
    async with asyncio.timeout(timeout):
        async for data in subscription:
            received.append(data)
            if len(received) == count:
                break
    return received


class WireRecorder:
    """Speaks just enough of the NATS protocol to a client to record, at each PONG it sends, how many
    SUBs it had already read: what a real server would know when the client's flush returns."""

    def __init__(self):
        self.subs_seen_at_pong: list[int] = []
        self._subs = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'INFO {"server_id":"rec","version":"2.10.0","proto":1,"max_payload":1048576}\r\n')
        while line := await reader.readline():
            if line.startswith(b"SUB "):
                self._subs += 1
            elif line == b"PING\r\n":
                self.subs_seen_at_pong.append(self._subs)
                writer.write(b"PONG\r\n")
        writer.close()


async def test_subscription_reaches_the_server_before_subscribe_returns():
    # nats-py's own flush() sends its PING ahead of a queued SUB; a PONG for it would prove nothing.
    recorder = WireRecorder()
    server = await asyncio.start_server(recorder.serve, "127.0.0.1", 0)
    url = "nats://127.0.0.1:%d" % server.sockets[0].getsockname()[1]
    try:
        async with connected(url) as bus:
            for expected_subs in (1, 2):
                await bus.subscribe(unique_subject("x"))
                assert recorder.subs_seen_at_pong[-1] == expected_subs
    finally:
        server.close()


async def test_unreachable_server_raises_a_clear_error():
    dead = f"nats://127.0.0.1:{free_tcp_port()}"
    with pytest.raises(TransportError, match=dead):
        await NatsEventBus.connect(dead, connect_timeout=2)


async def test_bus_survives_a_nats_server_restart():
    with start_nats() as nats:
        subject = unique_subject("load.m")
        async with connected(nats.url) as publisher, connected(nats.url) as consumer:
            sub = await consumer.subscribe(subject)
            served = await consumer.serve(subject + ".echo", lambda data: asyncio.sleep(0, data))
            try:
                await publisher.publish(subject, b"before")
                assert await receive(sub, 1, timeout=5) == [b"before"]

                nats.stop()
                await publisher.publish(subject, b"while down")  # never raises
                await asyncio.to_thread(nats.start)

                # Messages flow again once both clients reconnected (the subscription is replayed).
                async def flows_again() -> None:
                    while True:
                        await publisher.publish(subject, b"after")
                        try:
                            async with asyncio.timeout(0.5):
                                async for data in sub:
                                    if data == b"after":
                                        return
                        except TimeoutError:
                            continue

                await asyncio.wait_for(flows_again(), timeout=15)
                assert await publisher.request(subject + ".echo", b"ping", timeout=5) == b"ping"
            finally:
                await sub.close()
                await served.close()


@pytest.mark.parametrize("scheme", ["nats://", ""], ids=["nats-scheme", "bare-host-port"])
async def test_planes_connect_nats_by_url_scheme(nats_url, scheme):
    from dynamo_lite import planes

    bus = await planes.connect_event_bus(scheme + nats_url.split("://", 1)[1], name="planes-test")
    try:
        assert isinstance(bus, NatsEventBus)
        subject = f"planes.{uuid.uuid4().hex}"
        sub = await bus.subscribe(subject)
        await bus.publish(subject, b"hello")
        assert await asyncio.wait_for(anext(aiter(sub)), 5.0) == b"hello"
        await sub.close()
    finally:
        await bus.close()
