"""The EventBus contract (events/base.py), on each real implementation: NatsEventBus against a real
nats-server and EmbeddedEventBus over one shared MemoryDiscovery. What only one backend has is tested in
test_nats_bus.py and test_embedded_bus.py."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from dynamo_lite.discovery.memory import MemoryDiscovery
from dynamo_lite.events.embedded import EmbeddedEventBus
from dynamo_lite.events.nats import NatsEventBus
from dynamo_lite.protocol.errors import TransportError


def unique_subject(name: str) -> str:
    return f"t{uuid.uuid4().hex[:8]}.{name}"


async def receive(subscription, count: int, timeout: float) -> list[bytes]:
    received = []
    async with asyncio.timeout(timeout):
        async for data in subscription:
            received.append(data)
            if len(received) == count:
                break
    return received


@pytest.fixture(params=["nats", "embedded"])
async def connected(request):
    """connected() -> an async context manager giving a new bus of the parametrized kind; every bus of
    one test reaches the others (one nats-server, or one discovery)."""
    if request.param == "nats":
        url = request.getfixturevalue("nats_url")

        def connect():
            return NatsEventBus.connect(url)
    else:
        discovery = MemoryDiscovery()
        namespace = f"ns{uuid.uuid4().hex[:6]}"

        def connect():
            return EmbeddedEventBus.connect(discovery, namespace=namespace)

    @contextlib.asynccontextmanager
    async def bus():
        instance = await connect()
        try:
            yield instance
        finally:
            await instance.close()

    yield bus
    if request.param == "embedded":
        await discovery.close()


async def test_publish_subscribe_keeps_order(connected):
    subject = unique_subject("kv_events.m")
    async with connected() as publisher, connected() as consumer:
        sub = await consumer.subscribe(subject)
        wildcard = await consumer.subscribe(subject.split(".")[0] + ".kv_events.*")
        try:
            for i in range(200):
                await publisher.publish(subject, b"%d" % i)
            assert await receive(sub, 200, timeout=5) == [b"%d" % i for i in range(200)]
            assert await receive(wildcard, 200, timeout=5) == [b"%d" % i for i in range(200)]
        finally:
            await sub.close()
            await sub.close()  # safe twice
            await wildcard.close()


async def test_a_message_published_right_after_subscribe_arrives(connected):
    async with connected() as publisher, connected() as consumer:
        for _ in range(3):
            subject = unique_subject("load.m")
            sub = await consumer.subscribe(subject)
            await publisher.publish(subject, b"first")
            assert await receive(sub, 1, timeout=5) == [b"first"]
            await sub.close()


async def test_a_bus_that_connects_later_reaches_existing_subscribers_at_once(connected):
    subject = unique_subject("kv_events.m")
    async with connected() as consumer:
        sub = await consumer.subscribe(subject)
        async with connected() as publisher:
            await publisher.publish(subject, b"hello")
            assert await receive(sub, 1, timeout=5) == [b"hello"]
        await sub.close()


async def test_a_bus_receives_its_own_messages(connected):
    subject = unique_subject("x")
    async with connected() as bus:
        sub = await bus.subscribe(subject)
        await bus.publish(subject, b"self")
        assert await receive(sub, 1, timeout=5) == [b"self"]
        await sub.close()


async def test_unsubscribed_messages_stop_arriving(connected):
    subject = unique_subject("x")
    async with connected() as publisher, connected() as consumer:
        closed, kept = await consumer.subscribe(subject), await consumer.subscribe(subject)
        await closed.close()
        await publisher.publish(subject, b"1")
        assert await receive(kept, 1, timeout=5) == [b"1"]
        assert await receive(closed, 1, timeout=1) == []  # its iterator just ends
        await kept.close()


async def test_subscription_iterator_ends_when_closed(connected):
    async with connected() as bus:
        sub = await bus.subscribe(unique_subject("x"))
        reader = asyncio.create_task(receive(sub, 1, timeout=5))
        await asyncio.sleep(0.1)
        await sub.close()
        assert await reader == []


async def test_request_reply(connected):
    subject = unique_subject("resync.1")

    async def answer(data: bytes) -> bytes:
        return b"blocks for " + data

    async with connected() as server, connected() as client:
        served = await server.serve(subject, answer)
        try:
            replies = await asyncio.gather(*(client.request(subject, b"%d" % i, timeout=5)
                                             for i in range(10)))
            assert replies == [b"blocks for %d" % i for i in range(10)]
            assert await server.request(subject, b"me", timeout=5) == b"blocks for me"  # its own responder
        finally:
            await served.close()


async def test_request_times_out(connected):
    subject = unique_subject("slow")

    async def too_slow(data: bytes) -> bytes:
        await asyncio.sleep(5)
        return b"late"

    async with connected() as server, connected() as client:
        with pytest.raises(TimeoutError):  # nobody serves the subject
            await client.request(subject, b"?", timeout=0.5)
        served = await server.serve(subject, too_slow)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TimeoutError):
                await client.request(subject, b"?", timeout=0.5)
            assert loop.time() - started < 3
        finally:
            await served.close()


async def test_a_closed_responder_answers_no_more(connected):
    subject = unique_subject("resync.2")
    async with connected() as server, connected() as client:
        served = await server.serve(subject, lambda data: asyncio.sleep(0, b"yes"))
        assert await client.request(subject, b"?", timeout=5) == b"yes"
        await served.close()
        await served.close()  # safe twice
        await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            await client.request(subject, b"?", timeout=0.5)


async def test_a_closed_bus_refuses_subscriptions_and_drops_publishes(connected):
    async with connected() as bus:
        pass
    await bus.close()  # safe twice
    await bus.publish(unique_subject("x"), b"dropped")  # never raises
    with pytest.raises(TransportError):
        await bus.subscribe(unique_subject("x"))
